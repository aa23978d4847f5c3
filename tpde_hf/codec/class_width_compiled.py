"""The class-width delta code in compiled CPU loops: the same bytes and bits as :mod:`.class_width`.

The torch reference makes a pass over memory per operation, with int64 temporaries of about 80
bytes per element; these numba loops make one pass per element, run row blocks on every core
(:func:`tpde_hf.codec.compiled.codec_threads`) and keep only the output. :mod:`.backend` picks
them with the rest of the compiled codec; the tests hold them to the reference's exact bytes.

Encode takes two passes per row block: the first finds each (group, class)'s width and the class-0
minimum (the header) and counts each span's bits, whose prefix sum gives every span's offset; the
second writes the fields. Each block writes its own run of words, and runs are OR-ed together
(neighbouring blocks share at most a boundary word). Decode checks every span offset it reaches
and every row's end against the next row's start and the payload's bit count, and clamps every
read into the payload, so a corrupt delta raises instead of reading out of bounds.

Example::

    code = encode(w, base, 128)                          # == class_width.encode(w, base, 128)
    assert torch.equal(decode(code, base), class_width.decode(code, base))
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

from tpde_hf.codec import base_quant, bitpack
from tpde_hf.codec.checksum import tensor_checksum
from tpde_hf.codec.class_width import (
    CLASS_OF_LEVEL,
    N_CLASSES,
    OFFSET_SPAN,
    ClassWidthDelta,
    _pack_header,
    offset_dtype,
    validate,
)
from tpde_hf.codec.compiled import (
    _BIT_LENGTH_16,
    _blocks,
    _group_shift,
    _np_int,
    _row_chunks,
    _run_all,
    _weight_bits,
    prediction_ordinals,
)
from tpde_hf.codec.compiled_kernels import _bit_length, _code, _ordinal, _wrap, or_into
from tpde_hf.codec.ordinal import bit_width
from tpde_hf.errors import TpdeFormatError

assert OFFSET_SPAN == 1 << 10  # the loops find span starts with `col & 1023` and `col >> 10`
_CLASS_OF_LEVEL = CLASS_OF_LEVEL.numpy().astype(np.int64)


# ============================================================================ loops
@njit(cache=True, inline="always")
def _residual(bits, pred_row, c, width):
    """``r = ord(W) - ord(P)`` wrapped to ``width`` bits, for one element of level ``c``."""
    return _wrap(_ordinal(np.int64(bits), width) - np.int64(pred_row[c + 15]), width)


@njit(cache=True, inline="always")
def _zero_point(zeros, row, gi):
    """The 4-bit zero point of group ``gi`` of ``row`` (two per byte, low nibble first)."""
    return (np.int64(zeros[row, gi >> 1]) >> ((gi & 1) << 2)) & 15


@njit(cache=True, inline="always")
def _field(r, cls, min0):
    """The stored field of ``r``: sign bit plus magnitude over ``min0`` in class 0, zigzag elsewhere."""
    if cls == 0:
        neg = r < 0
        mag = -1 - r if neg else r
        return ((mag - min0) << 1) | np.int64(neg)
    return (r << 1) ^ (r >> 63)


@njit(cache=True, nogil=True)
def encode_header(bits, qweight, zeros, pred, row0, r0, r1, in_f, gshift, width, class_of_level, bl16,
                  widths, min0s, span_bits):
    """Pass 1 over rows ``[r0, r1)``: per (row, group) the four widths and ``min0``, per (row, span) its bits."""
    g = np.int64(1) << gshift
    top = np.zeros(4, dtype=np.int64)
    for row in range(r0, r1):
        qrow = qweight[row]
        for gi in range((in_f + g - 1) >> gshift):
            c0 = gi << gshift
            n = min(g, in_f - c0)
            z = _zero_point(zeros, row, gi)
            prow = pred[row - row0, gi]
            lo = np.int64(1) << 40
            present0 = False
            for t in range(n):  # the class-0 frame of reference
                c = _code(qrow, c0 + t) - z
                if class_of_level[abs(c)] == 0:
                    r = _residual(bits[row * in_f + c0 + t], prow, c, width)
                    lo = min(lo, -1 - r if r < 0 else r)
                    present0 = True
            m0 = lo if present0 else np.int64(0)
            top[:] = 0
            for t in range(n):
                c = _code(qrow, c0 + t) - z
                k = class_of_level[abs(c)]
                top[k] = max(top[k], _field(_residual(bits[row * in_f + c0 + t], prow, c, width), k, m0))
            for k in range(4):
                w = _bit_length(top[k], bl16)
                if k == 0 and present0:
                    w = max(w, np.int64(1))  # the sign bit is always there
                if width == 16 and w == 15:
                    w = np.int64(16)  # width code 15 means 16 bits
                widths[row, gi, k] = w
            min0s[row, gi] = m0
    span_bit_counts(qweight, zeros, r0, r1, in_f, gshift, class_of_level, widths, span_bits)


@njit(cache=True, nogil=True)
def span_bit_counts(qweight, zeros, r0, r1, in_f, gshift, class_of_level, widths, span_bits):
    """``span_bits[row, s]``: the payload bits of span ``s`` of rows ``[r0, r1)``, from the widths alone."""
    g = np.int64(1) << gshift
    for row in range(r0, r1):
        qrow = qweight[row]
        for gi in range((in_f + g - 1) >> gshift):
            c0 = gi << gshift
            z = _zero_point(zeros, row, gi)
            n_bits = np.int64(0)
            for t in range(min(g, in_f - c0)):
                n_bits += widths[row, gi, class_of_level[abs(_code(qrow, c0 + t) - z)]]
            span_bits[row, c0 >> 10] += n_bits  # a span (1024 columns) holds whole groups


@njit(cache=True, nogil=True)
def encode_fields(bits, qweight, zeros, pred, row0, r0, r1, in_f, gshift, width, class_of_level, widths, min0s,
                  row_start, first_word, out):
    """Pass 2: write the fields of rows ``[r0, r1)`` into ``out`` (uint32 words from ``first_word``)."""
    g = np.int64(1) << gshift
    for row in range(r0, r1):
        qrow = qweight[row]
        pos = row_start[row]
        for gi in range((in_f + g - 1) >> gshift):
            c0 = gi << gshift
            z, prow, m0 = _zero_point(zeros, row, gi), pred[row - row0, gi], min0s[row, gi]
            for t in range(min(g, in_f - c0)):
                c = _code(qrow, c0 + t) - z
                k = class_of_level[abs(c)]
                w = widths[row, gi, k]
                if w > 0:
                    f = np.uint64(_field(_residual(bits[row * in_f + c0 + t], prow, c, width), k, m0))
                    v = f << np.uint64(pos & 31)  # < 2**63: a field has at most 32 bits
                    kw = (pos >> 5) - first_word
                    out[kw] |= np.uint32(v & np.uint64(0xFFFFFFFF))
                    out[kw + 1] |= np.uint32(v >> np.uint64(32))
                    pos += w


@njit(cache=True, inline="always")
def _unpack_header(h, width, class_widths):
    """One group's header (``class_width._pack_header``): its four widths into ``class_widths``; returns ``min0``."""
    h0 = np.int64(h[0]) & 0xFFFFFFFF
    if width == 32:  # the widths as bytes, min0 in the second word
        for k in range(4):
            class_widths[k] = (h0 >> (8 * k)) & 0xFF
        return np.int64(h[1]) & 0xFFFFFFFF
    for k in range(4):  # 4-bit width codes, 15 meaning 16 bits; min0 in bits 16-31
        w = (h0 >> (4 * k)) & 15
        class_widths[k] = w + (w == 15)
    return h0 >> 16


@njit(cache=True, nogil=True)
def decode_rows(qweight, zeros, pred, row0, r0, r1, in_f, gshift, width, class_of_level, header, offsets,
                words, out, row_end):
    """Rebuild rows ``[r0, r1)`` into ``out`` (flat bit patterns); ``row_end[row]`` gets each row's last bit.

    Returns the number of span offsets that disagreed with the widths (0 for a sound delta). Reads are
    clamped into ``words``, which ends with one zero word of padding.

    Per group, three 16-entry tables indexed by the raw 4-bit code hold its field width, its
    prediction's ordinal and its class-0 frame, so the inner loop has no class logic: a class-0
    field is ``((mag - min0) << 1) | sign`` and any other is ``zigzag(r)``, and both decode to
    ``r = ((f >> 1) + frame) ^ -(f & 1)`` with ``frame`` = ``min0`` in class 0, else 0.
    """
    g = np.int64(1) << gshift
    last = words.size - 2
    bad = 0
    t_width = np.empty(16, dtype=np.int64)
    t_pred = np.empty(16, dtype=np.int64)
    t_frame = np.empty(16, dtype=np.int64)
    class_widths = np.empty(4, dtype=np.int64)
    for row in range(r0, r1):
        qrow = qweight[row]
        pos = np.int64(offsets[row, 0])
        kw = max(min(pos >> 5, last), 0)  # a crafted offset may point anywhere
        buf = (np.uint64(words[kw]) | (np.uint64(words[kw + 1]) << np.uint64(32))) >> np.uint64(pos & 31)
        avail = 64 - (pos & 31)  # valid bits in buf; the bits above them are 0
        nxt = kw + 2
        for gi in range((in_f + g - 1) >> gshift):
            c0 = gi << gshift
            if (c0 & 1023) == 0 and pos != offsets[row, c0 >> 10]:  # a span holds whole groups
                bad += 1
            z, prow = _zero_point(zeros, row, gi), pred[row - row0, gi]
            m0 = _unpack_header(header[row, gi], width, class_widths)
            for q in range(16):
                k = class_of_level[abs(q - z)]
                t_width[q] = class_widths[k]
                t_pred[q] = prow[q - z + 15]
                t_frame[q] = m0 if k == 0 else 0
            base = row * in_f + c0
            for t in range(min(g, in_f - c0)):
                q = _code(qrow, c0 + t)
                w = t_width[q]
                if avail < 32:  # a field has at most 32 bits
                    buf |= np.uint64(words[min(nxt, last + 1)]) << np.uint64(avail)
                    nxt += 1
                    avail += 32
                f = np.int64(buf & ((np.uint64(1) << np.uint64(w)) - np.uint64(1)))
                buf >>= np.uint64(w)
                avail -= w
                pos += w
                r = ((f >> 1) + t_frame[q]) ^ -(f & 1)
                out[base + t] = _ordinal(_wrap(t_pred[q] + r, width), width)
        row_end[row] = pos
    return bad


# ============================================================================ drivers
def encode(weight: torch.Tensor, base: base_quant.BaseTensors, group_size: int) -> ClassWidthDelta:
    """:func:`class_width.encode` in compiled loops, byte for byte."""
    out_f, in_f = weight.shape
    width, gshift = bit_width(weight.dtype), _group_shift(group_size)
    ng = base_quant.n_groups(in_f, group_size)
    n_spans = -(-in_f // OFFSET_SPAN)
    bits = _weight_bits(weight)
    qweight, zeros = base.qweight.numpy(), base.zeros.numpy()
    widths = np.zeros((out_f, ng, N_CLASSES), dtype=np.int64)
    min0s = np.zeros((out_f, ng), dtype=np.int64)
    span_bits = np.zeros((out_f, n_spans), dtype=np.int64)
    for r0, r1 in _row_chunks(out_f, in_f):
        pred = prediction_ordinals(base.scales[r0:r1], weight.dtype)
        _run_all(encode_header, [
            (bits, qweight, zeros, pred, r0, r0 + b0, r0 + b1, in_f, gshift, width, _CLASS_OF_LEVEL, _BIT_LENGTH_16,
             widths, min0s, span_bits) for b0, b1 in _blocks(r1 - r0, (r1 - r0) * in_f)])
    ends = np.cumsum(span_bits.ravel())
    total = int(ends[-1])
    starts = (ends - span_bits.ravel()).reshape(out_f, n_spans)
    words = np.zeros(bitpack.n_words(total) + 1, dtype=np.uint32)
    for r0, r1 in _row_chunks(out_f, in_f):
        pred = prediction_ordinals(base.scales[r0:r1], weight.dtype)
        jobs = []
        for b0, b1 in _blocks(r1 - r0, (r1 - r0) * in_f):
            first = int(starts[r0 + b0, 0]) >> 5
            end = int(starts[r0 + b1, 0]) if r0 + b1 < out_f else total
            jobs.append((bits, qweight, zeros, pred, r0, r0 + b0, r0 + b1, in_f, gshift, width, _CLASS_OF_LEVEL,
                         widths, min0s, starts[:, 0], first, np.zeros((end >> 5) - first + 2, dtype=np.uint32)))
        _run_all(encode_fields, jobs)
        for job in jobs:  # blocks share at most their boundary word: OR them in
            or_into(words, job[14], job[15])
    return ClassWidthDelta(
        shape=(out_f, in_f), dtype=weight.dtype, group_size=group_size,
        header=_pack_header(torch.from_numpy(widths), torch.from_numpy(min0s), weight.dtype),
        offsets=torch.from_numpy(starts.astype(np.int64)).to(offset_dtype(total)),
        words=torch.from_numpy(words.view(np.int32)),
        total_bits=total, checksum=tensor_checksum(weight),
    )


def _span_starts(code: ClassWidthDelta, base: base_quant.BaseTensors, widths: np.ndarray) -> tuple[np.ndarray, int]:
    """Every span's first bit ``[out, n_spans]`` and the payload's bit count, from the header's widths."""
    out_f, in_f = code.shape
    span_bits = np.zeros((out_f, -(-in_f // OFFSET_SPAN)), dtype=np.int64)
    qweight, zeros = base.qweight.numpy(), base.zeros.numpy()
    _run_all(span_bit_counts, [(qweight, zeros, b0, b1, in_f, _group_shift(code.group_size), _CLASS_OF_LEVEL, widths,
                                span_bits) for b0, b1 in _blocks(out_f, out_f * in_f)])
    ends = np.cumsum(span_bits.ravel())
    return (ends - span_bits.ravel()).reshape(span_bits.shape), int(ends[-1])


def check_layout(code: ClassWidthDelta, base: base_quant.BaseTensors) -> None:
    """:func:`class_width.check_layout` in compiled loops: the same checks, without touching the payload."""
    validate(code, base)
    starts, total = _span_starts(code, base, code.widths().numpy())
    if not np.array_equal(starts, code.offsets.numpy().astype(np.int64)):
        raise TpdeFormatError(None, "class-width delta: stored span offsets disagree with the header's widths")
    if total != code.total_bits:
        raise TpdeFormatError(None, f"class-width delta: the header's widths add up to {total} bits, "
                                    f"the payload holds {code.total_bits}")


def decode(code: ClassWidthDelta, base: base_quant.BaseTensors, verify: bool = False) -> torch.Tensor:
    """:func:`class_width.decode` in compiled loops, bit for bit; raises on an inconsistent delta."""
    validate(code, base)
    out_f, in_f = code.shape
    width, gshift = bit_width(code.dtype), _group_shift(code.group_size)
    header, offsets = code.header.numpy(), code.offsets.numpy()
    words = code.words.numpy().view(np.uint32)
    if words.size < 2:  # the loop reads a two-word window, clamped into the array
        words = np.concatenate((words, np.zeros(2 - words.size, dtype=np.uint32)))
    qweight, zeros = base.qweight.numpy(), base.zeros.numpy()
    out = np.empty(out_f * in_f, dtype=_np_int(code.dtype))
    row_end = np.zeros(out_f, dtype=np.int64)
    bad = 0
    for r0, r1 in _row_chunks(out_f, in_f):
        pred = prediction_ordinals(base.scales[r0:r1], code.dtype)
        bad += sum(_run_all(decode_rows, [
            (qweight, zeros, pred, r0, r0 + b0, r0 + b1, in_f, gshift, width, _CLASS_OF_LEVEL, header,
             offsets, words, out, row_end) for b0, b1 in _blocks(r1 - r0, (r1 - r0) * in_f)]))
    if bad or not np.array_equal(row_end[:-1], offsets[1:, 0].astype(np.int64)):
        raise TpdeFormatError(None, "class-width delta: stored span offsets disagree with the header's widths")
    if int(row_end[-1]) != code.total_bits:
        raise TpdeFormatError(None, f"class-width delta: the header's widths add up to {int(row_end[-1])} bits "
                                    f"from the last row's offset, the payload holds {code.total_bits}")
    weight = torch.from_numpy(out).view(code.dtype).view(out_f, in_f)
    if verify and tensor_checksum(weight) != code.checksum:
        raise TpdeFormatError(None, "class-width delta: checksum mismatch, the delta or its base is corrupt")
    return weight


__all__ = ["check_layout", "decode", "encode", "span_bit_counts"]
