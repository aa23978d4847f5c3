"""The public entry points: pick the Triton kernel or the torch fallback, and shape the inputs.

``backend="auto"`` runs Triton on CUDA tensors (when Triton is installed) and torch elsewhere;
``"triton"`` forces the kernels (on CPU tensors this needs ``TRITON_INTERPRET=1``: how the tests
run them without a GPU); ``"torch"`` forces the fallback.
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F

from tpde_hf.triton_kernels import torch_ref
from tpde_hf.triton_kernels.packed import PackedWeight

#: ``lossless_linear`` fuses the decode into a GEMV up to this many rows of ``x``; above it the
#: weight is reconstructed once into a scratch buffer for cuBLAS (see ``triton_impl``'s docstring).
FUSED_MAX_ROWS = 16
#: ``base_linear`` uses its tiled 4-bit kernel up to this many rows; above, dequantize + cuBLAS,
#: whose large-batch GEMM a simple Triton tile loop does not beat. Not tuned on a GPU yet.
BASE_FUSED_MAX_ROWS = 64
_BACKENDS = ("auto", "triton", "torch")
_X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def triton_available(device: torch.device | str | None = None) -> bool:
    """Whether the Triton kernels can run on ``device``: CUDA with triton installed, or any device
    while ``TRITON_INTERPRET=1`` (the interpreter runs them on the CPU)."""
    if importlib.util.find_spec("triton") is None:
        return False
    if _interpreting():
        return True
    dev = torch.device(device) if device is not None else torch.device("cuda")
    return dev.type == "cuda" and torch.cuda.is_available()


def _use_triton(device: torch.device, backend: str) -> bool:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "triton":
        if not triton_available(device):
            raise RuntimeError(f"the Triton kernels cannot run on {device} (no CUDA, or TRITON_INTERPRET unset)")
        return True
    # auto: the interpreter is a test tool, far slower than the torch path, so never picked here.
    return device.type == "cuda" and triton_available(device) and not _interpreting()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _impl():
    from tpde_hf.triton_kernels import triton_impl  # imports triton; only when a kernel runs

    return triton_impl


def _class_width_packed(pw: PackedWeight):
    """The class-width kernels' view of ``pw`` (imports triton; only when a kernel runs)."""
    from tpde_hf.triton_kernels import class_width_kernels

    return class_width_kernels, class_width_kernels.ClassWidthPacked(*pw.class_width_parts())


def reconstruct(pw: PackedWeight, out: torch.Tensor | None = None, *, backend: str = "auto",
                check: bool = False) -> torch.Tensor:
    """The exact original weight ``[out, in]`` in the source dtype, on ``pw``'s device.

    Bit-identical to ``tpde_hf.codec.decode_tensor`` on every backend. ``out`` (contiguous, right
    shape and dtype) is filled in place, e.g. a scratch buffer reused layer after layer. ``check``
    makes the Triton path verify every lane's end-of-stream state (a device sync); the torch path
    always checks, since it costs it nothing.

    Example::

        W = reconstruct(PackedWeight.from_encoded(enc, "cuda"))
        assert torch.equal(W.cpu().view(torch.int16), decode_tensor(enc).view(torch.int16))
    """
    if _use_triton(pw.device, backend):  # each launcher checks its `out`
        if pw.delta_code == "class-width":  # its layout was checked when pw was built
            pw.require_delta()
            kernels, cw = _class_width_packed(pw)
            return kernels.cw_reconstruct(cw, out)
        return _impl().reconstruct(pw, out, check=check)
    if out is not None and (out.shape != pw.shape or out.dtype != pw.dtype or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {pw.dtype} tensor of shape {list(pw.shape)}")
    return torch_ref.reconstruct(pw, out)


def base_weight(pw: PackedWeight, *, backend: str = "auto") -> torch.Tensor:
    """The lossy 4-bit weight ``P`` in the source dtype, bit-identical to ``enc.base_weight()``."""
    if _use_triton(pw.device, backend):
        return _impl().base_weight(pw)
    return torch_ref.base_weight(pw)


def lossless_linear(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None, *,
                    backend: str = "auto", fused: bool | None = None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` with the exact weight ``W``; ``x`` has any leading dims.

    With ``M`` = rows of ``x`` (leading dims flattened), the Triton backend fuses the decode into
    the GEMV for ``M <= FUSED_MAX_ROWS`` (``W`` never reaches memory; equal to ``F.linear`` within
    float32-accumulation tolerance, not bit for bit) and otherwise reconstructs ``W`` and calls
    ``F.linear`` (bit-identical to the dense model). ``fused`` forces either choice. The torch
    backend always reconstructs, so its output is bit-identical too.

    ``W`` is used in ``x``'s dtype (``F.linear(x, W.to(x.dtype))``) when they differ.
    """
    pw.require_delta()
    _check_x(x, pw)
    if not _use_triton(pw.device, backend):
        return torch_ref.lossless_linear(x, pw, bias)
    x2 = x.reshape(-1, pw.shape[1])
    if fused is None:
        fused = x2.shape[0] <= FUSED_MAX_ROWS
    if not fused:
        return F.linear(x, reconstruct(pw, backend=backend).to(x.dtype), bias)
    if pw.delta_code == "class-width":
        kernels, cw = _class_width_packed(pw)
        return kernels.cw_fused_linear(x2, cw, bias).view(*x.shape[:-1], pw.shape[0])
    y = _impl().fused_linear(x2.contiguous(), pw)
    if bias is not None:
        y += bias.to(torch.float32)
    return y.to(x.dtype).view(*x.shape[:-1], pw.shape[0])


def base_linear(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None, *,
                backend: str = "auto", fused: bool | None = None) -> torch.Tensor:
    """``x @ P.T (+ bias)`` with the lossy 4-bit weight ``P`` (``base`` mode).

    Equal to ``F.linear(x, base_weight(pw).to(x.dtype), bias)`` within matmul tolerance on the
    Triton backend (bit for bit on the torch backend, and on Triton above ``BASE_FUSED_MAX_ROWS``
    rows or with ``fused=False``, which dequantize and call ``F.linear``).
    """
    _check_x(x, pw)
    if not _use_triton(pw.device, backend):
        return torch_ref.base_linear(x, pw, bias)
    x2 = x.reshape(-1, pw.shape[1])
    if fused is None:
        fused = x2.shape[0] <= BASE_FUSED_MAX_ROWS
    if not fused:
        return F.linear(x, _impl().base_weight(pw).to(x.dtype), bias)
    if bias is not None:
        bias = bias.contiguous()
    y = _impl().base_linear(x2.contiguous(), pw, bias)
    return y.view(*x.shape[:-1], pw.shape[0])


def _check_x(x: torch.Tensor, pw: PackedWeight) -> None:
    if x.dim() == 0 or x.shape[-1] != pw.shape[1]:
        raise ValueError(f"{pw.name}: x has shape {list(x.shape)}, the weight expects [..., {pw.shape[1]}]")
    if x.dtype not in _X_DTYPES:
        raise TypeError(f"{pw.name}: x must be bfloat16, float16 or float32, got {x.dtype}")
    if x.device != pw.device:
        raise ValueError(f"{pw.name}: x is on {x.device}, the weight on {pw.device}")
