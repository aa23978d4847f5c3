"""Encoder-side numba loops of the checkpoint delta codec, with the decoder's inverse checked inline.

Same stream as :func:`tpde_hf.checkpoints.kernels.encode_chunks` (byte for byte: the decoder is
unchanged), at a fraction of its CPU:

* :func:`unsymbolize_check` runs the decoder's inverse of the symbol map on every element
  (``x == unsymbolize(sym, raw, p)``);
* :func:`encode_compact` replaces the rANS step's 64-bit integer division by a float reciprocal with an
  exact integer correction, writes each renormalisation word unconditionally (a select, no branch),
  and checks the decoder's inverse of every step: ``0 <= x mod f < f`` after the correction, so the
  decoder's ``f * (X >> 12) + slot - cum`` gives back the state (with tables whose ``cum + f <= 2**12``,
  checked once per tensor by the caller).

Each returns a count of elements whose check failed (0 when all is well); the codec refuses to store a
tensor with a nonzero count. Together with a decode-and-compare of sampled chunks (:func:`decode_some`, the codec's
``verify``), this is the pack-time guarantee that what is stored decodes to the tensor.

Example::

    assert unsymbolize_check(x, p, sym, raw, MODE_ORD, 32, 23) == 0
    states, n_words, n_bitwords, words, bitwords, bad = encode_compact(sym, nraw, raw, ctx, freq, cum, chunk)
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from tpde_hf.checkpoints.kernels import LANES, PROB_BITS, STATE_LOW, _bitlen, _decode_chunk, is_serial
from tpde_hf.codec.compiled_kernels import _ordinal, _wrap

assert LANES == 4, "the encoder's main loop is written out for 4 lanes"


@njit(cache=True, nogil=True)
def unsymbolize_check(x, p, sym, raw, mode, width, mant_bits):
    """How many elements the decoder's inverse of the symbol map does not give back (0 when all is well):
    ``x[i] != unsymbolize(sym[i], raw[i], p[i])``, with the decoder's own formulas (``kernels._decode_chunk``)."""
    bad = 0
    sign_shift = width - 1 - mant_bits
    for i in range(x.shape[0]):
        s = np.int64(sym[i])
        rv = np.int64(raw[i])
        pv = np.int64(p[i])
        if mode == 0:
            if s < 4:
                hib = s
            else:
                hib = (4 | ((s - 4) & 3)) << ((s - 4) // 4)
            u = hib | rv
            r = (u >> 1) ^ (-(u & 1))
            v = _ordinal(_wrap(_ordinal(pv, width) + r, width), width)
        else:
            flip = np.int64(1) if pv < 0 else np.int64(0)
            ub = ((s << mant_bits) ^ (flip << (sign_shift + mant_bits))) | rv
            v = ub - ((ub >> (width - 1)) << width)
        bad += v != np.int64(x[i])
    return bad


@njit(cache=True, inline="always")
def _step(x, e, rcp, words, w):
    """One rANS encoder step for table entry ``e = f | cum << 16``: renormalise (at most one word), then
    ``x -> (x // f) << 12 | x % f + cum``. Returns the state, the word position and ``x % f`` (checked)."""
    f = e & 0xFFFF
    need = np.int64(x >= (f << (32 - PROB_BITS)))
    words[w - 1] = np.uint16(x & 0xFFFF)  # always written; kept only when needed (the next write may overwrite it)
    w -= need  # selects, no branch: whether a word is due is close to a coin flip
    x >>= need << 4
    q = np.int64(np.float64(x) * rcp)  # floor(x / f) or one less: x < 2**32, the reciprocal is within 2**-52
    r = x - q * f
    adj = np.int64(r >= f)
    q += adj
    r -= adj * f
    return (q << PROB_BITS) + r + (e >> 16), w, r


@njit(cache=True, inline="always")
def _bad(r, e):
    """Negative unless ``0 <= r < f`` (and so ``f > 0``): OR-ed over a chunk, one sign test at its end."""
    return r | ((e & 0xFFFF) - 1 - r)


@njit(cache=True, nogil=True)
def _encode_chunk(lo, hi, sym, nraw, raw, ctx, tab, rcp, nsym, states, words, bitwords):
    """Encode elements ``[lo, hi)`` into one chunk's ``words`` (filled from the end) and ``bitwords``;
    returns ``(n_words, n_bitwords, bad)``. Tables are flat: index ``ctx * nsym + sym``."""
    chk = np.int64(0)
    x0 = x1 = x2 = x3 = np.int64(STATE_LOW)
    w = words.shape[0]
    i = hi - 1
    # the tail down to a multiple of LANES (lane = (i - lo) & 3), then groups of 4 with the lanes in registers
    while i >= lo and ((i - lo + 1) & (LANES - 1)) != 0:
        j = np.int64(ctx[i]) * nsym + sym[i]
        e = tab[j]
        lane = (i - lo) & (LANES - 1)
        if lane == 0:
            x0, w, r = _step(x0, e, rcp[j], words, w)
        elif lane == 1:
            x1, w, r = _step(x1, e, rcp[j], words, w)
        else:
            x2, w, r = _step(x2, e, rcp[j], words, w)
        chk |= _bad(r, e)
        i -= 1
    while i >= lo:  # here (i - lo) & 3 == 3: lanes 3, 2, 1, 0
        j = np.int64(ctx[i]) * nsym + sym[i]
        x3, w, r = _step(x3, tab[j], rcp[j], words, w)
        chk |= _bad(r, tab[j])
        j = np.int64(ctx[i - 1]) * nsym + sym[i - 1]
        x2, w, r = _step(x2, tab[j], rcp[j], words, w)
        chk |= _bad(r, tab[j])
        j = np.int64(ctx[i - 2]) * nsym + sym[i - 2]
        x1, w, r = _step(x1, tab[j], rcp[j], words, w)
        chk |= _bad(r, tab[j])
        j = np.int64(ctx[i - 3]) * nsym + sym[i - 3]
        x0, w, r = _step(x0, tab[j], rcp[j], words, w)
        chk |= _bad(r, tab[j])
        i -= LANES
    states[0], states[1], states[2], states[3] = x0, x1, x2, x3
    bad = np.int64(chk < 0)
    for xl in (x0, x1, x2, x3):
        bad += (xl < STATE_LOW) | (xl >= (np.int64(1) << 32))
    n_words = words.shape[0] - w
    acc = np.uint64(0)
    nacc = np.int64(0)
    b = 0
    for i in range(lo, hi):
        nr = np.int64(nraw[i])
        rv = np.uint64(raw[i])
        bad += (rv >> np.uint64(nr)) != 0  # the decoder reads exactly nr bits
        acc |= rv << np.uint64(nacc)
        nacc += nr
        full = np.int64(nacc >= 32)
        bitwords[b] = np.uint32(acc & np.uint64(0xFFFFFFFF))  # kept only when full (selects, no branch)
        b += full
        acc >>= np.uint64(full << 5)
        nacc -= full << 5
    if nacc > 0:
        bitwords[b] = np.uint32(acc & np.uint64(0xFFFFFFFF))
        b += 1
    return n_words, b, bad


@njit(cache=True, nogil=True)
def _alloc(n, chunk):
    nch = (n + chunk - 1) // chunk
    # at most one word per element (see _step), plus slack for the unconditional write
    return (np.empty((nch, LANES), np.int64), np.empty(nch, np.int64), np.empty(nch, np.int64),
            np.empty((nch, chunk + 4), np.uint16), np.empty((nch, chunk + 2), np.uint32), np.zeros(nch, np.int64))


@njit(cache=True, nogil=True)
def _chunk(c, sym, nraw, raw, ctx, tab, rcp, nsym, chunk, states, n_words, n_bitwords, words, bitwords):
    lo = c * chunk
    n_words[c], n_bitwords[c], bad = _encode_chunk(lo, min(sym.shape[0], lo + chunk), sym, nraw, raw, ctx, tab, rcp,
                                                   nsym, states[c], words[c], bitwords[c])
    return bad


@njit(cache=True, parallel=True, nogil=True)
def _encode_par(sym, nraw, raw, ctx, tab, rcp, nsym, chunk):
    states, n_words, n_bitwords, words, bitwords, bad = _alloc(sym.shape[0], chunk)
    for c in prange(states.shape[0]):
        bad[c] = _chunk(c, sym, nraw, raw, ctx, tab, rcp, nsym, chunk, states, n_words, n_bitwords, words, bitwords)
    return states, n_words, n_bitwords, words, bitwords, bad.sum()


@njit(cache=True, nogil=True)
def _encode_ser_compact(sym, nraw, raw, ctx, tab, rcp, nsym, chunk):
    """The chunks one after the other on this thread, writing the streams as stored: each chunk's words (encoded
    into a scratch row that stays in cache) and bit words one after the other, no ``[n_chunks, cap]`` arrays to
    gather from."""
    n = sym.shape[0]
    nch = (n + chunk - 1) // chunk
    states = np.empty((nch, LANES), np.int64)
    n_words = np.empty(nch, np.int64)
    n_bitwords = np.empty(nch, np.int64)
    scratch = np.empty(chunk + 4, np.uint16)
    # at most one word per element and 32 raw bits per element: only the pages written are ever touched
    w_out = np.empty(n + 4, np.uint16)
    b_out = np.empty(n + nch + 2, np.uint32)
    wpos = 0
    bpos = 0
    bad = 0
    for c in range(nch):
        lo = c * chunk
        hi = min(n, lo + chunk)
        nw, nb, bd = _encode_chunk(lo, hi, sym, nraw, raw, ctx, tab, rcp, nsym, states[c], scratch,
                                   b_out[bpos:])
        cap = scratch.shape[0]
        w_out[wpos:wpos + nw] = scratch[cap - nw:]
        n_words[c] = nw
        n_bitwords[c] = nb
        wpos += nw
        bpos += nb
        bad += bd
    return states, n_words, n_bitwords, w_out[:wpos], b_out[:bpos], bad


@njit(cache=True, parallel=True, nogil=True)
def _gather(words, n_words, bitwords, n_bitwords):
    nch = n_words.shape[0]
    ws = np.zeros(nch + 1, np.int64)
    bs = np.zeros(nch + 1, np.int64)
    for c in range(nch):
        ws[c + 1] = ws[c] + n_words[c]
        bs[c + 1] = bs[c] + n_bitwords[c]
    w_out = np.empty(ws[nch], np.uint16)
    b_out = np.empty(bs[nch], np.uint32)
    cap = words.shape[1]
    for c in prange(nch):
        w_out[ws[c]:ws[c + 1]] = words[c, cap - n_words[c]:]
        b_out[bs[c]:bs[c + 1]] = bitwords[c, :n_bitwords[c]]
    return w_out, b_out


def encode_compact(sym, nraw, raw, ctx, freq, cum, chunk):
    """rANS-encode and pack raw bits chunk by chunk, the stream of :func:`tpde_hf.checkpoints.kernels.encode_chunks`
    (same bytes) as stored: ``(states, n_words, n_bitwords, words, bitwords, bad)``, ``words`` (uint16) the chunks'
    words one after the other, ``bitwords`` (uint32) likewise, ``bad`` the count of failed inline checks. Chunks
    in parallel unless ``kernels.serial``."""
    tab, rcp = _flat_tables(freq, cum)
    if is_serial():
        return _encode_ser_compact(sym, nraw, raw, ctx, tab, rcp, np.int64(freq.shape[1]), chunk)
    states, n_words, n_bitwords, words, bitwords, bad = _encode_par(sym, nraw, raw, ctx, tab, rcp,
                                                                    np.int64(freq.shape[1]), chunk)
    w, b = _gather(words, n_words, bitwords, n_bitwords)
    return states, n_words, n_bitwords, w, b, bad


def _flat_tables(freq, cum):
    freq = np.asarray(freq, np.int64)
    if freq.min(initial=0) < 0 or (np.asarray(cum) + freq).max(initial=0) > 1 << PROB_BITS:
        raise ValueError("rANS tables out of range")
    tab = np.ascontiguousarray(freq | (np.asarray(cum, np.int64) << 16)).reshape(-1)
    rcp = (1.0 / np.maximum(freq, 1)).reshape(-1)
    return tab, rcp


@njit(cache=True, nogil=True)
def _sample_hist(x, p, ctx, idx, mode, width, mant_bits, n_ctx, nsym):
    """Histogram and raw-bit total of the sampled elements ``idx`` (``p`` is given per sample)."""
    hist = np.zeros((n_ctx, nsym), np.int64)
    nr_total = np.int64(0)
    for j in range(idx.shape[0]):
        xv = np.int64(x[idx[j]])
        pv = np.int64(p[j])
        if mode == 0:
            r = _wrap(_ordinal(xv, width) - _ordinal(pv, width), width)
            u = (r << 1) ^ (r >> 63)
            if u < 4:
                s = u
            else:
                e = _bitlen(u) - 1
                s = 4 + (e - 2) * 4 + ((u >> (e - 2)) & 3)
                nr_total += e - 2
        else:
            flip = np.int64(1) if pv < 0 else np.int64(0)
            s = ((xv & ((np.int64(1) << width) - 1)) >> mant_bits) ^ (flip << (width - 1 - mant_bits))
            nr_total += mant_bits
        hist[ctx[idx[j]], s] += 1
    return hist, nr_total


def sample_cost(x, p, ctx, idx, mode, width, mant_bits, n_ctx, nsym) -> float:
    """Estimated bits of the sampled elements: conditional entropy of the symbols plus the raw bits."""
    h, nr = _sample_hist(x, p, ctx, idx, mode, width, mant_bits, n_ctx, nsym)
    h = h.astype(np.float64)
    tot = h.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.nansum(h * np.log2(np.where(h > 0, h / np.maximum(tot, 1), 1)))
    return float(ent + nr)


@njit(cache=True, nogil=True)
def predict_f32(ref, f1, f2, coef, n_feat):
    """``codec.predict`` for float32 in one pass: the same correctly rounded float32 operations in the same
    order (``ref * c0``, then ``+ c_i * f_i`` for each nonzero ``c_i`` of the first ``n_feat``; no fused
    multiply-add: numba sets no fast-math flags). ``coef``: float32 ``[c0, c1, c2]`` with ``c0`` not 0 or 1.
    Returns ``(p, nan)``, ``nan`` the count of NaN predictions (x86 passes an operand's NaN payload on, and
    the operand order of a compiled multiply is not pinned down: the caller then uses numpy's)."""
    n = ref.shape[0]
    p = np.empty(n, np.float32)
    c0, c1, c2 = coef[0], coef[1], coef[2]
    use1 = n_feat >= 1 and c1 != 0
    use2 = n_feat >= 2 and c2 != 0
    nan = 0
    for i in range(n):
        v = ref[i] * c0
        if use1:
            v = v + c1 * f1[i]
        if use2:
            v = v + c2 * f2[i]
        p[i] = v
        nan += v != v
    return p, nan


@njit(cache=True, nogil=True)
def _entropy_bits(hist):
    ent = 0.0
    for c in range(hist.shape[0]):
        tot = 0
        for s in range(hist.shape[1]):
            tot += hist[c, s]
        for s in range(hist.shape[1]):
            h = hist[c, s]
            if h > 0:
                ent -= h * np.log2(h / tot)
    return ent


@njit(cache=True, nogil=True)
def sample_costs(x, p, ctx, idx, width, mant_bits, n_ctx):
    """:func:`sample_cost` of both modes at once (``(cost MODE_ORD, cost MODE_FLD)``), in one compiled call."""
    out = np.empty(2)
    for mode in range(2):
        nsym = 4 + (width - 2) * 4 if mode == 0 else 1 << (width - mant_bits)
        h, nr = _sample_hist(x, p, ctx, idx, mode, width, mant_bits, n_ctx, nsym)
        out[mode] = _entropy_bits(h) + nr
    return out


@njit(cache=True, nogil=True)
def decode_some(which, p, ctx, lut, freq, cum, states, word_start, words, bit_start, bitwords,
                mode, width, mant_bits, chunk, out):
    """Decode only the chunks ``which`` into ``out`` (the rest of ``out`` is left as is); the count of
    those that did not end exactly as encoded."""
    bad = 0
    for j in range(which.shape[0]):
        bad += _decode_chunk(which[j], p, ctx, lut, freq, cum, states, word_start, words, bit_start, bitwords,
                             mode, width, mant_bits, chunk, out)
    return bad


__all__ = ["decode_some", "encode_compact", "predict_f32", "sample_cost", "sample_costs",
           "unsymbolize_check"]
