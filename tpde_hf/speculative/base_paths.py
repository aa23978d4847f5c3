"""How a draft layer computes ``x @ P.T (+ bias)`` with the 4-bit base ``P`` of a tpde weight.

``P = dtype(float32(q - zero) * float32(scale))`` (:func:`tpde_hf.nn.holder.base_weight_torch`). Four
ways to apply it, one per :class:`BasePath` subclass; :func:`choose_backend` picks one per device:

* ``"int4"`` (CPU default): torch's weight-only int4 matmul for CPU,
  ``torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros)``. Its
  packed layout is not tpde's (it blocks 64 output rows per ``k``), so the codes are **repacked once**
  when the draft is built: an extra ``N * K_pad / 2`` bytes of codes plus ``ceil(K / G) * N * 2``
  scale/zero values in the compute dtype per weight, about the size of the base itself (measured
  per model by ``draft_memory``). The kernel dequantizes ``(q - 8) * s + z`` per group; tpde's
  ``(q - zero) * scale`` is that with ``s = scale`` and ``z = (8 - zero) * scale``. In float32 that
  is exact (both products are exact, their sum too: at most 15 significant bits each), so the
  float32 kernel gives ``P`` before its final rounding; in bf16 the kernel needs bf16 scales, so
  ``scale`` (fp16, 11 significant bits) is rounded to 8 bits: the draft's weight then differs from
  ``P`` by up to 2^-9 relative, far below the 4-bit error itself. A draft only proposes tokens, the
  exact model accepts or rejects them, so this costs acceptance at most, never correctness.
  Constraints of the kernel, handled here: ``K`` a multiple of the group size (tpde pads the last
  group: each group is split into the largest kernel group that divides ``K``, e.g. 128 -> 64 for
  ``K = 576``, else ``x`` is zero-padded at each call), ``N`` a multiple of 16 (zero rows padded,
  output sliced), group size 32/64/128/256.
* ``"triton"`` (CUDA default when tpde's kernels are available): ``tpde_hf.triton_kernels.base_linear``
  on a ``PackedWeight.from_base`` that references the very same base tensors (no copy).
* ``"dequantize"``: ``F.linear(x, base_weight_torch(...))``, rebuilding the dense ``P`` at every
  forward (today's ``base`` mode on CPU; no extra memory, slowest).
* ``"dense"``: ``P`` rebuilt once and kept (``out * in`` values of the compute dtype per weight, i.e. a
  dense bf16 copy of every converted layer: the memory the tpde model was meant to save).

GPT-2 ``Conv1D`` weights (stored ``[in, out]``, groups along the output) cannot use the ``int4`` or
``triton`` layouts; they fall back to ``dequantize``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from tpde_hf.nn.holder import base_weight_torch

BACKENDS = ("auto", "int4", "triton", "dequantize", "dense")
INT4_GROUP_SIZES = (32, 64, 128, 256)


def int4_cpu_available() -> bool:
    """Whether this torch has the CPU int4 weight-only matmul (torch >= 2.5 on x86/ARM builds)."""
    ops = torch.ops.aten
    return hasattr(ops, "_weight_int4pack_mm_for_cpu") and hasattr(ops, "_convert_weight_to_int4pack_for_cpu")


def _triton_kernels(device: torch.device) -> Any | None:
    """tpde's Triton kernel module when it can run on ``device`` (CUDA, or anywhere under TRITON_INTERPRET=1)."""
    try:
        from tpde_hf import triton_kernels as tk
    except ImportError:
        return None
    if not all(hasattr(tk, n) for n in ("PackedWeight", "base_linear", "triton_available")):
        return None
    try:
        return tk if tk.triton_available(device) else None
    except Exception:  # a broken Triton install must not break the draft
        return None


def choose_backend(requested: str, device: torch.device, transposed: bool, group_size: int) -> str:
    """The backend a layer uses: ``requested`` unless it cannot run here (then ``dequantize``)."""
    if requested not in BACKENDS:
        raise ValueError(f"tpde draft: backend {requested!r} is not one of {BACKENDS}")
    if requested == "auto":
        if device.type == "cuda":
            requested = "triton"
        elif device.type == "cpu":
            requested = "int4"
        else:
            requested = "dequantize"
    if requested == "int4" and (transposed or device.type != "cpu" or not int4_cpu_available()
                                or group_size not in INT4_GROUP_SIZES):
        return "dequantize"
    if requested == "triton" and (transposed or _triton_kernels(device) is None):
        return "dequantize"
    return requested


def unpack_codes(qweight: torch.Tensor, out_f: int, ng: int, group_size: int) -> torch.Tensor:
    """The 4-bit codes ``q`` as ``uint8 [out, ng * group_size]`` (low nibble = even column)."""
    return torch.stack((qweight & 0x0F, qweight >> 4), dim=-1).view(out_f, ng * group_size)


def unpack_zeros(zeros: torch.Tensor, out_f: int, ng: int) -> torch.Tensor:
    """The zero points ``uint8 [out, ng]``."""
    return torch.stack((zeros & 0x0F, zeros >> 4), dim=-1).view(out_f, -1)[:, :ng]


class BasePath:
    """Computes ``x @ P.T`` for one weight (no bias; the layer adds it). ``nbytes``: memory it adds."""

    name = "?"

    def __call__(self, x2: torch.Tensor) -> torch.Tensor:  # x2: [M, in]
        raise NotImplementedError

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors this path holds beyond the shared base (registered as buffers, so they are counted)."""
        return {}


class DequantizePath(BasePath):
    """``F.linear(x, P)`` with ``P`` rebuilt at every call (no memory beyond the shared base)."""

    name = "dequantize"

    def __init__(self, layer: Any):
        self.layer = layer

    def weight(self) -> torch.Tensor:
        lay = self.layer
        w = base_weight_torch(lay.qweight, lay.scales, lay.zeros, (lay.out_rows, lay.in_cols), lay.group_size,
                              lay.source_dtype)
        return w if w.dtype == lay.compute_dtype else w.to(lay.compute_dtype)

    def __call__(self, x2: torch.Tensor) -> torch.Tensor:
        w = self.weight()
        if self.layer.transposed:
            return x2 @ w.to(x2.dtype)
        return F.linear(x2, w.to(x2.dtype))


class DensePath(DequantizePath):
    """``P`` rebuilt once and kept: fastest torch matmul, costs a dense copy of the weight."""

    name = "dense"

    def __init__(self, layer: Any):
        super().__init__(layer)
        self.dense = self.weight()

    def __call__(self, x2: torch.Tensor) -> torch.Tensor:
        w = self.dense if self.dense.dtype == x2.dtype else self.dense.to(x2.dtype)
        return x2 @ w if self.layer.transposed else F.linear(x2, w)

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        return {"dense_base": self.dense}


class Int4CpuPath(BasePath):
    """torch's CPU int4 weight-only matmul on a one-time repack of the codes (see the module docstring)."""

    name = "int4"

    def __init__(self, layer: Any):
        out_f, in_f, g = layer.out_rows, layer.in_cols, layer.group_size
        ng = layer.scales.shape[1]
        q = unpack_codes(layer.qweight, out_f, ng, g).to(torch.int32)
        z = unpack_zeros(layer.zeros, out_f, ng).to(torch.float32)
        s = layer.scales.to(torch.float32)
        # ``in`` not a multiple of the group (tpde pads the last group): split every group into the largest
        # kernel group that divides both, repeating its scale and zero, so that ``x`` needs no padding per call
        sub = next((h for h in INT4_GROUP_SIZES[::-1] if g % h == 0 and in_f % h == 0 and h <= g), None)
        if in_f % g and sub is not None:
            rep = g // sub
            q, z, s = q[:, :in_f], z.repeat_interleave(rep, dim=1), s.repeat_interleave(rep, dim=1)
            ng, g = in_f // sub, sub
            z, s = z[:, :ng].contiguous(), s[:, :ng].contiguous()
        k_pad = ng * g
        n_pad = -(-out_f // 16) * 16
        if n_pad != out_f:  # zero scale on the padded rows: they output 0 and are sliced away
            q = torch.cat((q, q.new_zeros(n_pad - out_f, k_pad)))
            s = torch.cat((s, s.new_zeros(n_pad - out_f, ng)))
            z = torch.cat((z, z.new_full((n_pad - out_f, ng), 8.0)))
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 2)
        dtype = layer.compute_dtype
        # [ng, N, 2]: (scale, (8 - zero) * scale); exact in float32, scale rounded to dtype otherwise
        self.scales_and_zeros = torch.stack((s, (8.0 - z) * s), dim=-1).transpose(0, 1).contiguous().to(dtype)
        self.out_f, self.in_f, self.k_pad, self.g = out_f, in_f, k_pad, g

    def __call__(self, x2: torch.Tensor) -> torch.Tensor:
        sz = self.scales_and_zeros
        xin = x2 if x2.dtype == sz.dtype else x2.to(sz.dtype)
        if self.k_pad != self.in_f:
            xin = F.pad(xin, (0, self.k_pad - self.in_f))
        elif not xin.is_contiguous():
            xin = xin.contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xin, self.packed, self.g, sz)
        if y.shape[1] != self.out_f:
            y = y[:, : self.out_f]
        return y if y.dtype == x2.dtype else y.to(x2.dtype)

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        return {"int4_packed": self.packed, "int4_scales_and_zeros": self.scales_and_zeros}


class TritonPath(BasePath):
    """tpde's Triton base matmul on a ``PackedWeight`` that references the shared base tensors."""

    name = "triton"

    def __init__(self, layer: Any):
        self.tk = _triton_kernels(layer.qweight.device)
        if self.tk is None:
            raise RuntimeError("tpde draft: the Triton kernels are not available on this device")
        self.pw = self.tk.PackedWeight.from_base(layer.qweight, layer.scales, layer.zeros,
                                                 (layer.out_rows, layer.in_cols), layer.source_dtype,
                                                 layer.group_size, name=layer.tpde_name)

    def __call__(self, x2: torch.Tensor) -> torch.Tensor:
        return self.tk.base_linear(x2, self.pw, None)


PATHS = {"int4": Int4CpuPath, "triton": TritonPath, "dequantize": DequantizePath, "dense": DensePath}

__all__ = ["BACKENDS", "BasePath", "DensePath", "DequantizePath", "Int4CpuPath", "PATHS", "TritonPath",
           "choose_backend", "int4_cpu_available", "unpack_codes", "unpack_zeros"]
