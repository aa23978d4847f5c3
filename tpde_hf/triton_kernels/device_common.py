"""Device helpers and constants shared by every Triton kernel module (imported lazily, with Triton).

* :func:`_bits_from_f32` / :func:`_f32_from_bits`: float32 <-> a source dtype's bit pattern, rounding as torch does;
* :func:`_level_scale`: a weight's base level ``q - zero`` and its group scale;
* :func:`_offset`: element offsets as the pointer arithmetic should see them;
* :func:`_check_out`: the launchers' check of a caller's output buffer.

Example::

    from tpde_hf.triton_kernels.device_common import _bits_from_f32  # inside a @triton.jit kernel
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tpde_hf.codec.ordinal import DTYPE_CODES
from tpde_hf.triton_kernels.packed import PackedWeight

_BF16: tl.constexpr = tl.constexpr(DTYPE_CODES[torch.bfloat16])
_FP16: tl.constexpr = tl.constexpr(DTYPE_CODES[torch.float16])
_FP32: tl.constexpr = tl.constexpr(DTYPE_CODES[torch.float32])


def interpreting() -> bool:
    return bool(triton.knobs.runtime.interpret)


#: Round float32 -> bfloat16 with the hardware conversion (``cvt.rn``: IEEE round-to-nearest-even,
#: the rounding torch uses) when compiled; the interpreter truncates, so there it is written out in
#: integer arithmetic (about 8 instructions per element). Fixed at import, like the JIT mode itself.
#: ``test_triton_prediction_rounding_on_every_fp16_scale`` checks every prediction on either path.
_HW_BF16_ROUND: tl.constexpr = tl.constexpr(not interpreting())


@triton.jit
def _bits_from_f32(v, CODE: tl.constexpr):
    """Round float32 ``v`` to the dtype ``CODE``; its bit pattern as uint32.

    bfloat16 rounds to nearest even: the hardware's conversion when compiled (a NaN may come out
    with another payload than torch's 0x7FC0: only matmul outputs can be NaN, and those are compared
    as NaN), integer arithmetic under the interpreter (NaN -> 0x7FC0, as torch does).
    """
    if CODE == _BF16:
        if _HW_BF16_ROUND:
            return v.to(tl.bfloat16).to(tl.uint16, bitcast=True).to(tl.uint32)
        else:
            b = v.to(tl.uint32, bitcast=True)
            return tl.where(v != v, 0x7FC0, (b + 0x7FFF + ((b >> 16) & 1)) >> 16)
    elif CODE == _FP16:
        return v.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
    else:
        return v.to(tl.uint32, bitcast=True)


@triton.jit
def _f32_from_bits(b, CODE: tl.constexpr):
    """Bit pattern (uint32) of dtype ``CODE`` -> its exact float32 value."""
    if CODE == _BF16:
        return (b << 16).to(tl.float32, bitcast=True)
    elif CODE == _FP16:
        return b.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        return b.to(tl.float32, bitcast=True)


@triton.jit
def _level_scale(qweight_ptr, scales_ptr, zeros_ptr, row64, col, mask, q_stride, s_stride, z_stride,
                 G: tl.constexpr):
    """``(c = q - zero, scale as float32)`` of the elements at ``(row, col)`` (nibbles low first)."""
    qb = tl.load(qweight_ptr + _offset(row64 * q_stride + (col >> 1)), mask=mask, other=0).to(tl.int32)
    g = (col.to(tl.uint32) // G).to(tl.int32)  # col >= 0: a shift, without a signed division's fix-ups
    zb = tl.load(zeros_ptr + _offset(row64 * z_stride + (g >> 1)), mask=mask, other=0).to(tl.int32)
    s = tl.load(scales_ptr + _offset(row64 * s_stride + g), mask=mask, other=0.0).to(tl.float32)
    return ((qb >> ((col & 1) * 4)) & 15) - ((zb >> ((g & 1) * 4)) & 15), s


@triton.jit
def _offset(v):
    """A non-negative element offset as the pointer arithmetic should see it: int32 ones as uint32,
    which the compiler zero-extends once, where it spreads a signed one's extension over each term."""
    if v.dtype == tl.int32:
        return v.to(tl.uint32, bitcast=True)
    else:
        return v


def _check_out(pw: PackedWeight, out: torch.Tensor) -> None:
    if out.shape != pw.shape or out.dtype != pw.dtype or not out.is_contiguous() or out.device != pw.device:
        raise ValueError(f"out must be a contiguous {pw.dtype} tensor of shape {list(pw.shape)} on {pw.device}")
