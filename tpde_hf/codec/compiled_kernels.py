"""numba loops of the compiled CPU codec: one pass per element, the same math as the numpy reference.

Everything here works on plain arrays; :mod:`tpde_hf.codec.compiled` prepares them and checks
the results. An element ``i`` of a ``[out, in]`` weight sits at ``row = i // in``, ``col = i % in``
and belongs to lane ``i % n_lanes`` (step ``i // n_lanes``). Its level is ``c = q - zero`` read from
the packed nibbles; its prediction's ordinal comes from ``pred[row - row0, col >> gshift, c + 15]``,
a table built in numpy with the exact rounding of :func:`base_quant.predict_from_levels`.

Loops visit steps in order and, within a step, lanes in order, so they read and write contiguous
runs of elements. Every read of the payload is clamped into its array, so a corrupt file can never
make a loop read or write out of bounds; the drivers then reject any lane that did not end exactly
where the lane table says.
"""

from __future__ import annotations

import numpy as np
from numba import njit

STATE_LOW = 1 << 16


@njit(cache=True, inline="always")
def _ordinal(v, width):
    """Ordinal of a sign-extended bit pattern ``v`` (an involution, see ``ordinal.py``)."""
    return v ^ ((v >> (width - 1)) & ((np.int64(1) << (width - 1)) - 1))


@njit(cache=True, inline="always")
def _wrap(d, width):
    half = np.int64(1) << (width - 1)
    return ((d + half) & ((np.int64(1) << width) - 1)) - half


@njit(cache=True, inline="always")
def _bit_length(u, bl16):
    s = np.int64(16) if u >= 65536 else np.int64(0)  # a select, not a branch: u < 2**32
    return np.int64(bl16[u >> s]) + s


@njit(cache=True, inline="always")
def _symbol(u, k, m, bl16):
    """``(symbol, raw_bit_count, raw_value)`` of a zig-zagged delta ``u`` (see ``symbols.py``).

    Written with selects instead of branches: whether ``u`` is small is close to a coin flip.
    """
    small = u < (np.int64(1) << k)
    e = _bit_length(u, bl16) - 1
    nr = max(e - m, np.int64(0))
    mant = (u >> nr) & ((np.int64(1) << m) - 1)
    big = (np.int64(1) << k) + (e - k) * (np.int64(1) << m) + mant
    sym = u if small else big
    nr = np.int64(0) if small else nr
    return sym, nr, u & ((np.int64(1) << nr) - 1)


@njit(cache=True, inline="always")
def _delta_symbol(bit_pattern, pred_ordinal, width, k, m, bl16):
    """``(symbol, raw_bit_count, raw_value)`` of one weight against its prediction."""
    r = _wrap(_ordinal(np.int64(bit_pattern), width) - np.int64(pred_ordinal), width)
    return _symbol((r << 1) ^ (r >> 63), k, m, bl16)


@njit(cache=True, inline="always")
def _row_col(i, in_f):
    row = i // in_f
    return row, i - row * in_f


@njit(cache=True, inline="always")
def _segment(qweight, zeros, pred, row0, row, col, in_f, gshift, limit):
    """The run of at most ``limit`` elements from ``(row, col)`` that shares a row and a group:
    ``(length, zero point, prediction-table row, packed-code row)``. Loops walk runs so that the
    inner loop stays tight."""
    gi = col >> gshift
    n = min(min((gi + 1) << gshift, in_f) - col, limit)
    z = (np.int64(zeros[row, gi >> 1]) >> ((gi & 1) << 2)) & 15
    return n, z, pred[row - row0, gi], qweight[row]


@njit(cache=True, inline="always")
def _after_segment(row, col, n, in_f):
    """``(row, col)`` just past a run of ``n`` elements (a run never crosses the end of a row)."""
    col += n
    if col == in_f:
        return row + 1, 0
    return row, col


@njit(cache=True, inline="always")
def _code(qrow, col):
    return (np.int64(qrow[col >> 1]) >> ((col & 1) << 2)) & 15


@njit(cache=True, inline="always")
def _rans_put(x, f, c, prob_bits, ln, word_pos, words):
    """One rANS encode step of lane ``ln`` (state ``x``, frequency ``f``, start ``c``): the new state."""
    # Branch-free renormalization: the word slot is written every time, kept only on emit.
    emit = x >= f << np.uint64(32 - prob_bits)
    p = word_pos[ln]
    words[ln, p] = np.uint16(x & np.uint64(0xFFFF))
    word_pos[ln] = p - np.int64(emit)
    x >>= np.uint64(16 * emit)
    # float64 division is correctly rounded and x < 2**32: the floor is exact.
    q = np.uint64(np.float64(x) / np.float64(f))
    return (q << np.uint64(prob_bits)) + (x - q * f) + c


@njit(cache=True, inline="always")
def _raw_put(raw, nr, ln, raw_pos, raw_base, raw_words):
    """Write lane ``ln``'s next raw field (``nr`` bits of ``raw``), back to front."""
    bp = raw_pos[ln] - nr  # a zero-width field ORs in nothing
    raw_pos[ln] = bp
    v = np.uint64(raw) << np.uint64(bp & 31)
    kw = (bp >> 5) - raw_base
    raw_words[kw] |= v & np.uint64(0xFFFFFFFF)
    raw_words[kw + 1] |= v >> np.uint64(32)


@njit(cache=True, nogil=True)
def symbol_statistics(bits, qweight, zeros, pred, row0, i0, i1, in_f, gshift, n_lanes, width, k, m, n_sym,
                      bl16, counts, lane_raw_bits, packed, j_bits, nr_bits):
    """Add elements ``[i0, i1)`` to the ``(context, symbol)`` counts and each lane's raw-bit total.

    Unless ``packed`` is empty, also keep each element's coding fields there for :func:`encode_packed`:
    ``j = context * n_sym + symbol`` in the low ``j_bits``, the raw-bit count in the next ``nr_bits``,
    the raw value above them.
    """
    store = packed.size > 0
    i = i0
    row, col = _row_col(i0, in_f)
    lane = i0 % n_lanes
    while i < i1:
        n, z, prow, qrow = _segment(qweight, zeros, pred, row0, row, col, in_f, gshift, i1 - i)
        for t in range(n):
            c = _code(qrow, col + t) - z
            sym, nr, raw = _delta_symbol(bits[i + t], prow[c + 15], width, k, m, bl16)
            j = abs(c) * n_sym + sym
            counts[j] += 1
            if store:
                packed[i + t] = j | (nr << j_bits) | (raw << (j_bits + nr_bits))
            lane_raw_bits[lane] += nr
            lane += 1
            if lane == n_lanes:
                lane = 0
        i += n
        row, col = _after_segment(row, col, n, in_f)


@njit(cache=True, nogil=True)
def encode_steps(bits, qweight, zeros, pred, row0, e0, e1, numel, in_f, gshift, n_lanes, width, k, m, n_sym,
                 bl16, freq, cum, prob_bits, state, word_pos, words, raw_pos, l0, l1, raw_base, raw_words):
    """rANS-encode lanes ``[l0, l1)`` over steps ``e1 - 1`` down to ``e0`` (the encoder runs backwards).

    Lane ``l`` pushes its words into ``words[l]`` from the end (``word_pos[l]`` is the next free slot)
    and its raw fields backwards from bit ``raw_pos[l]`` into ``raw_words`` (32-bit values in uint64),
    which holds this block's part of the stream from word ``raw_base`` on. Threads encode disjoint
    lane blocks at once, each into its own ``raw_words``.
    """
    for e in range(e1 - 1, e0 - 1, -1):
        i = e * n_lanes + l0
        lane = l0
        row, col = _row_col(i, in_f)
        while lane < l1 and i < numel:
            n, z, prow, qrow = _segment(qweight, zeros, pred, row0, row, col, in_f, gshift, min(l1 - lane, numel - i))
            for t in range(n):
                c = _code(qrow, col + t) - z
                sym, nr, raw = _delta_symbol(bits[i + t], prow[c + 15], width, k, m, bl16)
                ln = lane + t
                j = abs(c) * n_sym + sym
                state[ln] = _rans_put(state[ln], np.uint64(freq[j]), np.uint64(cum[j]), prob_bits, ln, word_pos,
                                      words)
                _raw_put(raw, nr, ln, raw_pos, raw_base, raw_words)
            lane += n
            i += n
            row, col = _after_segment(row, col, n, in_f)


@njit(cache=True, nogil=True)
def encode_packed(packed, j_bits, nr_bits, e0, e1, numel, n_lanes, freq, cum, prob_bits, state, word_pos, words,
                  raw_pos, l0, l1, raw_base, raw_words):
    """:func:`encode_steps` from the fields :func:`symbol_statistics` kept: the same words and raw bits,
    without walking the base or recomputing any symbol."""
    j_mask = (np.int64(1) << j_bits) - 1
    nr_mask = (np.int64(1) << nr_bits) - 1
    for e in range(e1 - 1, e0 - 1, -1):
        i0 = e * n_lanes
        for ln in range(l0, min(l1, numel - i0)):
            pk = np.int64(packed[i0 + ln])
            j = pk & j_mask
            nr = (pk >> j_bits) & nr_mask
            state[ln] = _rans_put(state[ln], np.uint64(freq[j]), np.uint64(cum[j]), prob_bits, ln, word_pos, words)
            _raw_put(pk >> (j_bits + nr_bits), nr, ln, raw_pos, raw_base, raw_words)


@njit(cache=True, nogil=True)
def or_into(dst, start, src):
    """``dst[start + j] |= src[j]`` for the words of ``src`` that fall inside ``dst``."""
    for j in range(min(src.size, dst.size - start)):
        dst[start + j] |= src[j]


@njit(cache=True, nogil=True)
def gather_lane_words(words, word_pos, out):
    """Concatenate each lane's words (``words[l, word_pos[l] + 1:]``) in lane order into ``out``."""
    steps = words.shape[1]
    o = 0
    for lane in range(words.shape[0]):
        for p in range(word_pos[lane] + 1, steps):
            out[o] = words[lane, p]
            o += 1
    return o


@njit(cache=True, nogil=True)
def decode_steps(qweight, zeros, pred, row0, e0, e1, numel, in_f, gshift, n_lanes, width, prob_bits,
                 lut, words, raw_words, state, word_ptr, raw_ptr, l0, l1, out):
    """Decode lanes ``[l0, l1)`` over steps ``[e0, e1)`` into ``out`` (the weight's bits, flat).

    ``lut[ctx << prob_bits | slot]`` packs the rANS step (``freq | (slot - cum) << 16``), the symbol's
    leading value bits (bits 32..40) and its raw-bit count (bits 48..53): one gather per element.

    Threads decode disjoint lane blocks at once (the GIL is released): each writes a disjoint run of
    every step. ``state``, ``word_ptr`` and ``raw_ptr`` carry over between calls.

    No per-element bounds check is needed for correctness: pointers only grow, so a lane that ever
    reads past its own end finishes past it, and the caller rejects any lane whose final pointers
    are not exactly its ends (and whose state is not the initial one).
    """
    mask = np.uint64((1 << prob_bits) - 1)
    last_word = max(words.size - 1, 0)
    last_raw = raw_words.size - 2  # raw_words ends with one padding word
    t_ctx = np.empty(16, dtype=np.int64)  # per run, by raw 4-bit code: the LUT row and the prediction
    t_pred = np.empty(16, dtype=np.int64)
    for e in range(e0, e1):
        i = e * n_lanes + l0
        lane = l0
        row, col = _row_col(i, in_f)
        while lane < l1 and i < numel:
            n, z, prow, qrow = _segment(qweight, zeros, pred, row0, row, col, in_f, gshift, min(l1 - lane, numel - i))
            for q in range(16):
                t_ctx[q] = abs(q - z) << prob_bits
                t_pred[q] = prow[q - z + 15]
            for t in range(n):
                q = _code(qrow, col + t)
                ln = lane + t
                x = state[ln]
                ent = lut[t_ctx[q] | np.int64(x & mask)]
                bias = (ent >> np.uint64(16)) & np.uint64(0xFFFF)
                x = (ent & np.uint64(0xFFFF)) * (x >> np.uint64(prob_bits)) + bias
                # Branch-free: renormalization is close to a coin flip. Reads are clamped into the
                # arrays, so a corrupt lane can read another lane's data but never out of bounds.
                need = x < STATE_LOW
                p = word_ptr[ln]
                wv = np.uint64(words[min(p, last_word)])
                x = ((x << np.uint64(16)) | wv) if need else x
                word_ptr[ln] = p + np.int64(need)
                state[ln] = x
                nr = np.int64(ent >> np.uint64(48))
                u = np.int64((ent >> np.uint64(32)) & np.uint64(0x1FF)) << nr
                bp = raw_ptr[ln]
                kw = min(bp >> 5, last_raw)
                w = np.uint64(raw_words[kw]) | (np.uint64(raw_words[kw + 1]) << np.uint64(32))
                u |= np.int64((w >> np.uint64(bp & 31)) & ((np.uint64(1) << np.uint64(nr)) - np.uint64(1)))
                raw_ptr[ln] = bp + nr
                r = (u >> 1) ^ -(u & 1)
                out[i + t] = _ordinal(_wrap(t_pred[q] + r, width), width)
            lane += n
            i += n
            row, col = _after_segment(row, col, n, in_f)


@njit(cache=True, nogil=True)
def group_ranges(w, r0, r1, gshift, lo, hi):
    """``lo[row, g] = min(0, finite values of the group)``, ``hi`` likewise with max, rows ``[r0, r1)``."""
    in_f = w.shape[1]
    size = 1 << gshift
    for row in range(r0, r1):
        for g in range(lo.shape[1]):
            low = np.float32(0.0)
            high = np.float32(0.0)
            for col in range(g * size, min((g + 1) * size, in_f)):
                v = w[row, col]
                v = v if np.isfinite(v) else np.float32(0.0)  # 0 is always in the range anyway
                low = min(low, v)
                high = max(high, v)
            lo[row, g] = low
            hi[row, g] = high


@njit(cache=True, nogil=True)
def quantize_codes(w, r0, r1, gshift, scale, zero, qweight):
    """Packed 4-bit codes ``clamp(rint(w / scale) + zero, 0, 15)``, rows ``[r0, r1)``.

    float32 arithmetic throughout, like :func:`base_quant.quantize`; non-finite entries and the
    padding columns get the code ``zero``. A group at a time with its scale and zero in registers,
    and no branch in the inner loop, so that it vectorizes.
    """
    in_f = w.shape[1]
    n_cols = 2 * qweight.shape[1]
    size = 1 << gshift
    codes = np.empty(n_cols, dtype=np.uint8)
    for row in range(r0, r1):
        for g in range(scale.shape[1]):
            s = scale[row, g]
            z = zero[row, g]
            c0 = g * size
            c1 = min(c0 + size, in_f)
            for col in range(c0, c1):
                v = w[row, col]
                q = min(max(np.rint(v / s) + z, np.float32(0)), np.float32(15))
                codes[col] = np.uint8(q if np.isfinite(v) else z)
            for col in range(c1, min(c0 + size, n_cols)):  # padding of the last group
                codes[col] = np.uint8(z)
        for byte in range(qweight.shape[1]):
            qweight[row, byte] = codes[2 * byte] | (codes[2 * byte + 1] << np.uint8(4))

@njit(cache=True, nogil=True)
def fill_decode_table(freq, prob_bits, lead, n_raw, out):
    """``out[ctx << prob_bits | slot]`` for every context row of ``freq`` (see ``compiled.decode_table``).

    Each row's frequencies sum to ``2**prob_bits`` (checked when the tables are read); slots past the
    end of the table are never written.
    """
    total = 1 << prob_bits
    for ctx in range(freq.shape[0]):
        slot = 0
        for sym in range(freq.shape[1]):
            f = np.uint64(freq[ctx, sym])
            tag = f | (np.uint64(lead[sym]) << np.uint64(32)) | (np.uint64(n_raw[sym]) << np.uint64(48))
            for j in range(min(np.int64(f), total - slot)):
                out[(ctx << prob_bits) | (slot + j)] = tag | (np.uint64(j) << np.uint64(16))
            slot += np.int64(f)


@njit(cache=True, inline="always")
def _f32_bits_to_f16(u):
    """The fp16 pattern nearest (ties to even) to the finite float32 with bits ``u``, as numpy's cast.

    Integer math, because numba has no float16 on the CPU: past the fp16 range the result is inf,
    below it a subnormal or a signed zero.
    """
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    if a >= 0x477FF000:  # 65520 and up round to inf
        return sign | 0x7C00
    if a >= 0x38800000:  # normal: rebias the exponent, round the mantissa to 10 bits
        r = a - 0x38000000
        q = r >> 13
        rem = r & 0x1FFF
        return sign | (q + ((rem > 0x1000) | ((rem == 0x1000) & (q & 1))))
    shift = 126 - (a >> 23)  # subnormal: the value in units of 2**-24 is m >> shift
    if shift >= 25:
        return sign
    m = (a & 0x7FFFFF) | 0x800000
    q = m >> shift
    rem = m & ((np.int64(1) << shift) - 1)
    half = np.int64(1) << (shift - 1)
    return sign | (q + ((rem > half) | ((rem == half) & (q & 1))))


@njit(cache=True, nogil=True)
def prediction_rows(scale32, r0, r1, width, is_fp16, out):
    """Rows ``[r0, r1)`` of the prediction table (see ``compiled.prediction_ordinals``).

    ``out[row, g, c + 15] = ord(dtype(scale32[row, g] * c))``: the float32 product is exact, so
    the rounding to the source dtype (integer math on its bits) is the only one.
    """
    prod = np.empty(31, dtype=np.float32)
    bits = prod.view(np.uint32)
    for row in range(r0, r1):
        for g in range(scale32.shape[1]):
            s = scale32[row, g]
            for j in range(31):
                prod[j] = s * np.float32(j - 15)
            for j in range(31):
                u = np.int64(bits[j])
                if width == 32:
                    v = u - ((u & 0x80000000) << 1)  # sign-extend
                else:
                    if is_fp16:
                        p = _f32_bits_to_f16(u)
                    else:  # bfloat16: round the float32 bits to nearest even
                        p = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
                    v = (p ^ 0x8000) - 0x8000
                out[row, g, j] = _ordinal(v, width)
            out[row, g, 31] = 0
