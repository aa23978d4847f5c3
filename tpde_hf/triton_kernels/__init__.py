"""GPU kernels (Triton) and their torch fallbacks for tpde weights.

Which path gives which guarantee:

========================================  ===========================================================
call                                      result
========================================  ===========================================================
``reconstruct(pw)``                       the original weight, **bit for bit** (every backend)
``lossless_linear(x, pw)``, torch         ``F.linear(x, W)``: **bit-identical** to the dense model
``lossless_linear(x, pw)``, Triton,       ``F.linear(x, reconstruct(pw))``: **bit-identical** to the
  more than ``FUSED_MAX_ROWS`` rows       dense model (prefill: reconstruct once, then cuBLAS)
``lossless_linear(x, pw)``, Triton,       fused decode + GEMV, ``W`` never in memory: equal to
  up to ``FUSED_MAX_ROWS`` rows           ``F.linear(x, W)`` within float32-accumulation tolerance
``base_weight(pw)``                       the 4-bit prediction ``P``, bit for bit (``enc.base_weight()``)
``base_linear(x, pw)``                    ``F.linear(x, P)`` within tolerance (lossy by design)
========================================  ===========================================================

So a model whose every linear goes through ``reconstruct`` (or the torch backend) produces exactly
the dense model's outputs; the fused GEMV trades the last bits of the float32 sum for not writing
the weight.

Example::

    from tpde_hf.triton_kernels import PackedWeight, lossless_linear, reconstruct
    pw = PackedWeight.from_encoded(enc, "cuda")
    y = lossless_linear(x, pw, bias)          # decode (x: [1, 4096]) or prefill ([2048, 4096])
    W = reconstruct(pw)                       # == decode_tensor(enc), bit for bit

Every function takes ``backend="auto" | "triton" | "torch"``: ``auto`` is Triton for CUDA tensors
and torch otherwise; tests force ``"triton"`` on the CPU under ``TRITON_INTERPRET=1``.
"""

from tpde_hf.triton_kernels.dispatch import (
    BASE_FUSED_MAX_ROWS,
    FUSED_MAX_ROWS,
    base_linear,
    base_weight,
    lossless_linear,
    reconstruct,
    triton_available,
)
from tpde_hf.triton_kernels.packed import PackedWeight

__all__ = [
    "BASE_FUSED_MAX_ROWS",
    "FUSED_MAX_ROWS",
    "PackedWeight",
    "base_linear",
    "base_weight",
    "lossless_linear",
    "reconstruct",
    "triton_available",
]
