"""Triton kernels for the class-width delta code (:mod:`tpde_hf.codec.class_width`, ``delta_code="class-width"``).

They read the code that ``class_width.encode`` writes and rebuild exactly the weight that
``class_width.decode`` rebuilds. That holds on every path, including the interpreter. The public
entry points (``tpde_hf.triton_kernels.reconstruct`` and ``lossless_linear``) call them for a
``PackedWeight`` whose delta is class-width, so a loaded layer uses them on CUDA.

A program owns ``BLOCK_R`` rows and one span of ``OFFSET_SPAN`` columns. It starts at the span's stored
bit offset and walks the span one group (``G`` columns) at a time. Per group and row:

* it reads the codes and the header word, from which each element gets its class and width;
* an in-register prefix sum (``tl.cumsum``) of the widths gives every field's bit position;
* it reads each field from a 64-bit window of two payload words.

No element waits for another's decode. Reconstruct stores the source bits. The fused GEMV multiplies
the rebuilt tile by ``x`` and writes one float32 partial per span, which the launcher sums in span
order. At batch 1 it uses one FMA per weight into a tile-shaped accumulator; batches of 2 to 16 take
a row sum per batch row and step. ``x`` is loaded as a ``[BLOCK_R, G]`` tile, so that the whole tile
keeps the decode's layout. The fused GEMV is therefore deterministic, but it is only equal to
``F.linear`` within matmul tolerance; reconstruct is bit-exact.

Static cost (sm_90, Triton 3.9, ``benchmarks/sass_counts.py``), in SASS instructions per weight:
reconstruct 48.5, fused GEMV 52 at batch 1 and 125 at batch 16. The rANS kernels take 108 and 170 (at
batch 1), and they are also latency-bound. ``benchmarks/GPU_NOTES.md`` has what these figures predict.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tpde_hf.codec import base_quant, class_width
from tpde_hf.codec.class_width import OFFSET_SPAN, ClassWidthDelta
from tpde_hf.codec.ordinal import DTYPE_CODES, INT_VIEW, bit_width
from tpde_hf.triton_kernels.triton_impl import (
    _bits_from_f32,
    _check_out,
    _f32_from_bits,
    bits_of_ordinal,
)

_SPAN: tl.constexpr = tl.constexpr(OFFSET_SPAN)
#: Rows per program. 16 rows x 128 columns = 16 weights per thread at 4 warps.
CW_BLOCK_R = 16
CW_NUM_WARPS = 4
#: Batch rows per program of the fused GEMV, at most (more rows re-launch over row blocks). With an
#: fp32 weight or fp32 activations, 16 rows spill registers (sm_90, Triton 3.9): 8 there.
CW_FUSED_MAX_M = 16
CW_FUSED_MAX_M_FP32 = 8


def fused_max_m(dtype: torch.dtype, x_dtype: torch.dtype) -> int:
    """Batch rows per program of the fused GEMV for a weight of ``dtype`` and activations of ``x_dtype``."""
    return CW_FUSED_MAX_M_FP32 if torch.float32 in (dtype, x_dtype) else CW_FUSED_MAX_M


@dataclass(frozen=True)
class ClassWidthPacked:
    """The base and the class-width delta of one weight, their tensors on one device."""

    code: ClassWidthDelta
    base: base_quant.BaseTensors

    @classmethod
    def from_code(cls, code: ClassWidthDelta, base: base_quant.BaseTensors,
                  device: torch.device | str) -> ClassWidthPacked:
        """Example: ``ClassWidthPacked.from_code(class_width.encode(w, base, 128), base, "cuda")``.

        Checks the layout first (``class_width.check_layout``): the kernels trust the header's widths
        to keep every read inside the payload.
        """
        class_width.check_layout(code, base)

        def dev(t: torch.Tensor) -> torch.Tensor:
            return t.to(device).contiguous()

        return cls(dataclasses.replace(code, header=dev(code.header), offsets=dev(code.offsets), words=dev(code.words)),
                   base_quant.BaseTensors(dev(base.qweight), dev(base.scales), dev(base.zeros)))

    @property
    def shape(self) -> tuple[int, int]:
        return self.code.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.code.dtype

    @property
    def group_size(self) -> int:
        return self.code.group_size

    @property
    def device(self) -> torch.device:
        return self.code.words.device

    def kernel_args(self) -> tuple:
        """The tensors and sizes both kernels take, in their order (``qweight_ptr`` ... ``n_spans``)."""
        out_f, in_f = self.shape
        b, c = self.base, self.code
        return (b.qweight, b.scales, b.zeros, c.header, c.offsets, c.words), (
            out_f, in_f, b.qweight.stride(0), b.scales.stride(0), b.zeros.stride(0),
            base_quant.n_groups(in_f, self.group_size), c.offsets.shape[1])


# ============================================================================ device helpers
@triton.jit
def _cw_tile(qweight_ptr, scales_ptr, zeros_ptr, header_ptr, words_ptr, rows, row_ok, g, cols, ok, word0, sh0,
             q_stride, s_stride, z_stride, ng, G: tl.constexpr, WIDTH: tl.constexpr, CODE: tl.constexpr,
             K_TAIL: tl.constexpr):
    """The source bits (uint32) of group ``g`` of ``rows`` (a ``[BLOCK_R, G]`` tile), and where the next
    group's fields start.

    ``word0``/``sh0`` (per row) are the word and bit where this group's first field starts; the result
    carries them past the bits the group used. What is per row (scale, zero, header) is loaded once per
    group.
    """
    r64 = rows.to(tl.int64)
    zb = tl.load(zeros_ptr + r64 * z_stride + (g >> 1), mask=row_ok, other=0).to(tl.int32)
    z = ((zb >> ((g & 1) * 4)) & 15)[:, None]
    s = tl.load(scales_ptr + r64 * s_stride + g, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    # A per-row table of widths by level a = min(|c|, 4), FB bits each (classes {0}, {1}, {2, 3}, {4..}),
    # built once per group, so that an element's width is one shift and one mask.
    if WIDTH == 16:
        h = tl.load(header_ptr + r64 * ng + g, mask=row_ok, other=0).to(tl.uint32, bitcast=True)
        min0 = (h >> 16)[:, None]
        w0 = _width_of_code(h & 15)
        w1 = _width_of_code((h >> 4) & 15)
        w2 = _width_of_code((h >> 8) & 15)
        w3 = _width_of_code((h >> 12) & 15)
    else:
        h = tl.load(header_ptr + r64 * (2 * ng) + 2 * g, mask=row_ok, other=0).to(tl.uint32, bitcast=True)
        min0 = tl.load(header_ptr + r64 * (2 * ng) + 2 * g + 1, mask=row_ok, other=0).to(tl.uint32, bitcast=True)
        min0 = min0[:, None]
        w0, w1, w2, w3 = h & 0xFF, (h >> 8) & 0xFF, (h >> 16) & 0xFF, h >> 24
    FB: tl.constexpr = 5 if WIDTH == 16 else 6
    tab = w0 | (w1 << FB) | (w2 << (2 * FB)) | (w2 << (3 * FB)) | (w3 << (4 * FB))
    qb = tl.load(qweight_ptr + r64[:, None] * q_stride + (cols >> 1), mask=ok, other=0).to(tl.int32)
    c = ((qb >> ((cols & 1) * 4)) & 15) - z
    a = tl.minimum(tl.abs(c), 4).to(tl.uint32)
    w = ((tab[:, None] >> (a * FB)) & ((1 << FB) - 1)).to(tl.int32)
    if K_TAIL:  # the padding of a partial last group takes no bits
        w = tl.where(ok, w, 0)
    pos = tl.cumsum(w, axis=1) - w + sh0[:, None]  # bit position from word0, < 2**31
    widx = word0[:, None] + (pos >> 5)
    lo = tl.load(words_ptr + widx, mask=ok, other=0).to(tl.uint32, bitcast=True)
    hi = tl.load(words_ptr + widx + 1, mask=ok, other=0).to(tl.uint32, bitcast=True)
    window = (lo.to(tl.uint64) | (hi.to(tl.uint64) << 32)) >> (pos & 31).to(tl.uint64)
    if WIDTH == 16:  # w <= 16: the field fits 32 bits and so does its mask
        field = window.to(tl.uint32) & ((tl.full(w.shape, 1, tl.uint32) << w.to(tl.uint32)) - 1)
    else:
        field = (window & ((tl.full(w.shape, 1, tl.uint64) << w.to(tl.uint64)) - 1)).to(tl.uint32)
    # class 0: ((mag - min0) << 1) | sign, others zigzag(r); r = (stored magnitude) ^ -(sign)
    r = ((field >> 1) + tl.where(a == 0, min0, 0)) ^ (0 - (field & 1))
    # ord(P) = bits(|P|) ^ (all ones if P < 0): the sign of P is the sign of c (scales are positive), and
    # rounding commutes with it; this skips reading the sign back from the rounded bits.
    pabs = _bits_from_f32(tl.abs(c).to(tl.float32) * s, CODE)
    bits = bits_of_ordinal((pabs ^ (c >> 31).to(tl.uint32, bitcast=True)) + r, WIDTH)
    sh_next = sh0 + tl.sum(w, axis=1)
    return bits, word0 + (sh_next >> 5), sh_next & 31


@triton.jit
def _width_of_code(code):
    """A 16-bit source's 4-bit width code -> bits (code 15 means 16)."""
    return code + (code == 15).to(tl.uint32)


@triton.jit
def _cw_program(offsets_ptr, out_f, in_f, n_spans, G: tl.constexpr, BLOCK_R: tl.constexpr):
    """This program's rows (clamped, so that loads stay in bounds) and which are real, the word and bit
    where each row's first field in the span starts (the offsets are int32 or int64), the span's first
    column and its number of groups."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rows = tl.minimum(r, out_f - 1)
    span = tl.program_id(1)
    bit = tl.load(offsets_ptr + rows.to(tl.int64) * n_spans + span)
    k0 = span * _SPAN
    return rows, r < out_f, bit >> 5, (bit & 31).to(tl.int32), k0, (tl.minimum(in_f - k0, _SPAN) + G - 1) // G


# ============================================================================ kernels
@triton.jit
def _cw_reconstruct_kernel(qweight_ptr, scales_ptr, zeros_ptr, header_ptr, offsets_ptr, words_ptr, out_ptr,
                           out_f, in_f, q_stride, s_stride, z_stride, ng, n_spans,
                           G: tl.constexpr, WIDTH: tl.constexpr, CODE: tl.constexpr, BLOCK_R: tl.constexpr,
                           K_TAIL: tl.constexpr):
    rows, row_ok, word0, sh, k0, n_steps = _cw_program(offsets_ptr, out_f, in_f, n_spans, G, BLOCK_R)
    for step in range(n_steps):
        cols = k0 + step * G + tl.arange(0, G)
        ok = row_ok[:, None] & (cols < in_f)[None, :]
        bits, word0, sh = _cw_tile(qweight_ptr, scales_ptr, zeros_ptr, header_ptr, words_ptr, rows, row_ok,
                                   k0 // G + step, cols[None, :], ok, word0, sh, q_stride, s_stride, z_stride, ng,
                                   G, WIDTH, CODE, K_TAIL)
        dst = out_ptr + rows.to(tl.int64)[:, None] * in_f + cols[None, :]
        if WIDTH == 16:
            tl.store(dst, bits.to(tl.uint16).to(tl.int16, bitcast=True), mask=ok)
        else:
            tl.store(dst, bits.to(tl.int32, bitcast=True), mask=ok)


@triton.jit
def _cw_fused_gemv_kernel(x_ptr, part_ptr, qweight_ptr, scales_ptr, zeros_ptr, header_ptr, offsets_ptr, words_ptr,
                          M, x_stride, out_f, in_f, q_stride, s_stride, z_stride, ng, n_spans,
                          G: tl.constexpr, WIDTH: tl.constexpr, CODE: tl.constexpr, XCODE: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, K_TAIL: tl.constexpr):
    """``part[span, m, row] = sum over the span's columns of W[row, col] * x[m, col]`` (float32).

    Each batch row's ``x`` is loaded as a ``[BLOCK_R, G]`` tile (the rows read the same values, from L1).
    Loaded as a ``[G]`` vector broadcast over the rows, it gave the whole tile its layout, and the scan of
    the widths took 80 shuffles per iteration (145 instructions per weight against 55).
    """
    rows, row_ok, word0, sh, k0, n_steps = _cw_program(offsets_ptr, out_f, in_f, n_spans, G, BLOCK_R)
    m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    if BLOCK_M == 1:  # batch 1: one FMA per weight into a [BLOCK_R, G] accumulator, reduced once at the end
        acc2 = tl.zeros((BLOCK_R, G), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)
    for step in range(n_steps):
        cols = k0 + step * G + tl.arange(0, G)
        col_ok = cols < in_f
        ok = row_ok[:, None] & col_ok[None, :]
        bits, word0, sh = _cw_tile(qweight_ptr, scales_ptr, zeros_ptr, header_ptr, words_ptr, rows, row_ok,
                                   k0 // G + step, cols[None, :], ok, word0, sh, q_stride, s_stride, z_stride, ng,
                                   G, WIDTH, CODE, K_TAIL)
        w = _f32_from_bits(bits, CODE)
        if XCODE != CODE:  # the weight in x's dtype, as F.linear(x, W.to(x.dtype)) sees it
            w = _f32_from_bits(_bits_from_f32(w, XCODE), XCODE)
        if K_TAIL:
            w = tl.where(ok, w, 0.0)  # a NaN weight in a padded column must not reach the sum
        if BLOCK_M == 1:
            xv = tl.load(x_ptr + (cols + 0 * rows[:, None]), mask=ok, other=0.0).to(tl.float32)
            acc2 += w * xv
        else:  # a row sum per batch row and step: about 4.6 instructions per weight and batch row
            for j in tl.static_range(BLOCK_M):
                mj = tl.program_id(2) * BLOCK_M + j
                xj = tl.load(x_ptr + mj.to(tl.int64) * x_stride + (cols + 0 * rows[:, None]),
                             mask=ok & (cols * 0 + mj < M), other=0.0).to(tl.float32)
                part = tl.sum(w * xj, axis=1)
                acc += tl.where(tl.arange(0, BLOCK_M)[None, :] == j, part[:, None], 0.0)
    if BLOCK_M == 1:
        acc = tl.sum(acc2, axis=1)[:, None]
    dst = part_ptr + (tl.program_id(1) * M + m.to(tl.int64))[None, :] * out_f + rows[:, None]
    tl.store(dst, acc, mask=row_ok[:, None] & m_ok[None, :])


# ============================================================================ launchers
def cw_reconstruct(pw: ClassWidthPacked, out: torch.Tensor | None = None) -> torch.Tensor:
    """The exact weight (``pw.dtype``, ``pw.shape``) on ``pw``'s device: one launch. ``out`` (contiguous,
    that shape and dtype) is filled in place.

    Example: ``w = cw_reconstruct(ClassWidthPacked.from_code(code, base, "cuda"))``.
    """
    out_f, in_f = pw.shape
    tensors, sizes = pw.kernel_args()
    if out is None:
        out = torch.empty(pw.shape, dtype=pw.dtype, device=pw.device)
    _check_out(pw, out)
    result, out = out, out.view(INT_VIEW[pw.dtype])
    grid = (triton.cdiv(out_f, CW_BLOCK_R), pw.code.offsets.shape[1])
    _cw_reconstruct_kernel[grid](*tensors, out, *sizes, G=pw.group_size, WIDTH=bit_width(pw.dtype),
                                 CODE=DTYPE_CODES[pw.dtype], BLOCK_R=CW_BLOCK_R,
                                 K_TAIL=in_f % pw.group_size != 0, num_warps=CW_NUM_WARPS)
    return result


def cw_fused_linear(x2: torch.Tensor, pw: ClassWidthPacked, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x2 @ W.T (+ bias)`` with ``W`` rebuilt tile by tile in registers (2-D ``x2``; within matmul tolerance)."""
    out_f, in_f = pw.shape
    if x2.dim() != 2 or x2.shape[1] != in_f:
        raise ValueError(f"expected x of shape [M, {in_f}], got {list(x2.shape)}")
    x2 = x2.contiguous()
    M = x2.shape[0]
    n_spans = pw.code.offsets.shape[1]
    tensors, sizes = pw.kernel_args()
    part = torch.empty((n_spans, M, out_f), dtype=torch.float32, device=x2.device)
    # The tensor cores (tl.dot) were tried for batches above 1: the dot's operand layout reached back
    # into the decode and cost about 150 instructions per weight, against 61 (2 rows) to 125 (16) here.
    block_m = 1 if M == 1 else min(fused_max_m(pw.dtype, x2.dtype), triton.next_power_of_2(M))
    grid = (triton.cdiv(out_f, CW_BLOCK_R), n_spans, triton.cdiv(M, block_m))
    _cw_fused_gemv_kernel[grid](x2, part, *tensors, M, x2.stride(0), *sizes, G=pw.group_size, WIDTH=bit_width(pw.dtype),
                                CODE=DTYPE_CODES[pw.dtype], XCODE=DTYPE_CODES[x2.dtype], BLOCK_R=CW_BLOCK_R,
                                BLOCK_M=block_m, K_TAIL=in_f % pw.group_size != 0, num_warps=CW_NUM_WARPS)
    y = part.sum(0)  # in span order: deterministic
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x2.dtype)


__all__ = ["CW_BLOCK_R", "CW_FUSED_MAX_M", "CW_FUSED_MAX_M_FP32", "CW_NUM_WARPS", "ClassWidthPacked", "cw_fused_linear",
           "cw_reconstruct", "fused_max_m"]
