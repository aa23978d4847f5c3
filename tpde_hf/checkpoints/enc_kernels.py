"""Encoder-side numba loops of the checkpoint delta codec, with the decoder's inverse checked inline.

Same stream as :func:`tpde_hf.checkpoints.kernels.encode_chunks` (byte for byte: the decoder is
unchanged), at a fraction of its CPU:

* :func:`unsymbolize_check` runs the decoder's inverse of the symbol map on every element
  (``x == unsymbolize(sym, raw, p)``);
* :func:`encode_compact` replaces the rANS step's 64-bit integer division by Granlund and Montgomery's
  exact multiply-and-shift (one packed 64-bit table entry per symbol; every entry's constants are checked
  against the condition that makes the quotient exact for every 32-bit state, and tables must have
  ``cum + f <= 2**12``), writes each renormalisation word unconditionally (a select, no branch), and flags
  any step of a symbol without mass and any final state out of range; :func:`encode_split` codes a large
  tensor's chunks in runs that other threads may take (the same bytes);
* the pack's large elementwise outputs (symbols, contexts, predictions, Adam features) are numpy-allocated
  (:func:`symbolize`, :func:`buckets`, :func:`predict_f32`, :func:`ratio_f32`, :func:`half_exponent`,
  :func:`square_ctx`, :func:`weight_ctx`: the same values as the numpy or ``kernels`` versions): numpy asks
  for transparent huge pages, where a numba allocation of 50 MB costs several times more in page faults.

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

from tpde_hf.checkpoints.kernels import (
    LANES,
    PROB_BITS,
    STATE_LOW,
    _bitlen,
    _decode_chunk,
    buckets_into,
    is_serial,
    symbolize_into,
)
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
def _step(x, e, words, w):
    """One rANS encoder step for table entry ``e`` (:func:`_flat_tables`: magic ``m'``, ``f``, ``cum``, shift
    ``l``): renormalise (at most one word), then ``x -> (x // f) << 12 | x % f + cum``, written as
    ``x + cum + q * (2**12 - f)``. ``q = x // f`` is exact by Granlund and Montgomery's multiply-and-shift
    (``q = (((x * m') >> 32) + x) >> l``, exact for every ``x < 2**32`` by the condition :func:`_flat_tables`
    checks on each entry). Returns the state, the word position and ``f`` (the caller flags ``f == 0``)."""
    m = e & np.uint64(0xFFFFFFFF)
    f = np.int64((e >> np.uint64(32)) & np.uint64(0x1FFF))
    cum = np.int64((e >> np.uint64(45)) & np.uint64(0x1FFF))
    need = np.int64(x >= (f << (32 - PROB_BITS)))
    words[w - 1] = np.uint16(x & 0xFFFF)  # always written; kept only when needed (the next write may overwrite it)
    w -= need  # selects, no branch: whether a word is due is close to a coin flip
    x >>= need << 4
    ux = np.uint64(x)
    q = np.int64((((ux * m) >> np.uint64(32)) + ux) >> (e >> np.uint64(58)))
    return x + cum + q * ((1 << PROB_BITS) - f), w, f


@njit(cache=True, nogil=True)
def _encode_chunk(lo, hi, sym, nraw, raw, ctx, tab, nsym, states, words, bitwords):
    """Encode elements ``[lo, hi)`` into one chunk's ``words`` (filled from the end) and ``bitwords``;
    returns ``(n_words, n_bitwords, bad)``. Tables are flat: index ``ctx * nsym + sym``."""
    chk = np.int64(0)
    x0 = x1 = x2 = x3 = np.int64(STATE_LOW)
    w = words.shape[0]
    i = hi - 1
    # the tail down to a multiple of LANES (lane = (i - lo) & 3), then groups of 4 with the lanes in registers
    while i >= lo and ((i - lo + 1) & (LANES - 1)) != 0:
        e = tab[np.int64(ctx[i]) * nsym + sym[i]]
        lane = (i - lo) & (LANES - 1)
        if lane == 0:
            x0, w, f = _step(x0, e, words, w)
        elif lane == 1:
            x1, w, f = _step(x1, e, words, w)
        else:
            x2, w, f = _step(x2, e, words, w)
        chk |= f - 1  # negative for a symbol without mass
        i -= 1
    while i >= lo:  # here (i - lo) & 3 == 3: lanes 3, 2, 1, 0
        x3, w, f3 = _step(x3, tab[np.int64(ctx[i]) * nsym + sym[i]], words, w)
        x2, w, f2 = _step(x2, tab[np.int64(ctx[i - 1]) * nsym + sym[i - 1]], words, w)
        x1, w, f1 = _step(x1, tab[np.int64(ctx[i - 2]) * nsym + sym[i - 2]], words, w)
        x0, w, f0 = _step(x0, tab[np.int64(ctx[i - 3]) * nsym + sym[i - 3]], words, w)
        chk |= (f3 - 1) | (f2 - 1) | (f1 - 1) | (f0 - 1)
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
def _chunk(c, sym, nraw, raw, ctx, tab, nsym, chunk, states, n_words, n_bitwords, words, bitwords):
    lo = c * chunk
    n_words[c], n_bitwords[c], bad = _encode_chunk(lo, min(sym.shape[0], lo + chunk), sym, nraw, raw, ctx, tab,
                                                   nsym, states[c], words[c], bitwords[c])
    return bad


@njit(cache=True, parallel=True, nogil=True)
def _encode_par(sym, nraw, raw, ctx, tab, nsym, chunk):
    states, n_words, n_bitwords, words, bitwords, bad = _alloc(sym.shape[0], chunk)
    for c in prange(states.shape[0]):
        bad[c] = _chunk(c, sym, nraw, raw, ctx, tab, nsym, chunk, states, n_words, n_bitwords, words, bitwords)
    return states, n_words, n_bitwords, words, bitwords, bad.sum()


@njit(cache=True, nogil=True)
def _encode_range(sym, nraw, raw, ctx, tab, nsym, chunk, c0, c1, w_out, b_out):
    """Chunks ``[c0, c1)`` one after the other on this thread, writing the streams as stored into ``w_out`` (at
    least ``m + 4`` words for ``m`` elements) and ``b_out`` (``m + chunks + 2``): each chunk's words (encoded into
    a scratch row that stays in cache) and bit words one after the other. Returns ``(states, n_words, n_bitwords,
    words used, bit words used, bad)``. The callers allocate the outputs with numpy (transparent huge pages: a
    numba allocation of this size costs several times more in page faults) and touch only what is written."""
    n = sym.shape[0]
    nch = c1 - c0
    states = np.empty((nch, LANES), np.int64)
    n_words = np.empty(nch, np.int64)
    n_bitwords = np.empty(nch, np.int64)
    scratch = np.empty(chunk + 4, np.uint16)
    wpos = 0
    bpos = 0
    bad = 0
    for c in range(nch):
        lo = (c0 + c) * chunk
        hi = min(n, lo + chunk)
        nw, nb, bd = _encode_chunk(lo, hi, sym, nraw, raw, ctx, tab, nsym, states[c], scratch,
                                   b_out[bpos:])
        cap = scratch.shape[0]
        w_out[wpos:wpos + nw] = scratch[cap - nw:]
        n_words[c] = nw
        n_bitwords[c] = nb
        wpos += nw
        bpos += nb
        bad += bd
    return states, n_words, n_bitwords, wpos, bpos, bad


def _encode_run(sym, nraw, raw, ctx, tab, nsym, chunk, c0, c1):
    """:func:`_encode_range` with numpy-allocated outputs, trimmed to what was written."""
    m = max(0, min(sym.shape[0], c1 * chunk) - c0 * chunk)
    w_out = np.empty(m + 4, np.uint16)
    b_out = np.empty(m + (c1 - c0) + 2, np.uint32)
    states, n_words, n_bitwords, nw, nb, bad = _encode_range(sym, nraw, raw, ctx, tab, nsym, chunk, np.int64(c0),
                                                             np.int64(c1), w_out, b_out)
    return states, n_words, n_bitwords, w_out[:nw], b_out[:nb], bad


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
    tab = _flat_tables(freq, cum)
    if is_serial():
        return _encode_run(sym, nraw, raw, ctx, tab, np.int64(freq.shape[1]), chunk, 0, (sym.shape[0] + chunk - 1)
                           // chunk)
    states, n_words, n_bitwords, words, bitwords, bad = _encode_par(sym, nraw, raw, ctx, tab,
                                                                    np.int64(freq.shape[1]), chunk)
    w, b = _gather(words, n_words, bitwords, n_bitwords)
    return states, n_words, n_bitwords, w, b, bad


def encode_split(sym, nraw, raw, ctx, freq, cum, chunk, fork, pieces):
    """:func:`encode_compact` (same result) as ``pieces`` runs of whole chunks mapped with ``fork(fn, items)``
    (e.g. :meth:`tpde_hf.checkpoints.assist.Assist.fork`, where idle threads may take some), then joined."""
    tab = _flat_tables(freq, cum)
    nsym = np.int64(freq.shape[1])
    nch = (sym.shape[0] + chunk - 1) // chunk
    cuts = np.linspace(0, nch, max(1, min(pieces, nch)) + 1).astype(np.int64)
    runs = [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:], strict=True) if b > a] or [(0, 0)]
    outs = fork(lambda r: _encode_run(sym, nraw, raw, ctx, tab, nsym, chunk, r[0], r[1]), runs)
    if len(outs) == 1:
        return outs[0]
    return (np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs]),
            np.concatenate([o[2] for o in outs]), np.concatenate([o[3] for o in outs]),
            np.concatenate([o[4] for o in outs]), sum(int(o[5]) for o in outs))


def _flat_tables(freq, cum):
    """One uint64 per table entry, ``m' | f << 32 | cum << 45 | l << 58``, for :func:`_step`'s exact division
    (``l = ceil(log2 f)``, ``m' = 2**(32 + l) // f + 1 - 2**32``; all 0 for a symbol without mass). Each entry
    is checked against Granlund and Montgomery's condition, which makes ``(x * (2**32 + m')) >> (32 + l)``
    equal ``x // f`` for every ``x < 2**32``: ``2**(32 + l) <= (2**32 + m') * f <= 2**(32 + l) + 2**l``."""
    freq = np.asarray(freq, np.int64)
    cum = np.asarray(cum, np.int64)
    if freq.min(initial=0) < 0 or cum.min(initial=0) < 0 or (cum + freq).max(initial=0) > 1 << PROB_BITS:
        raise ValueError("rANS tables out of range")
    f = freq.reshape(-1)
    d = np.maximum(f, 1)
    sh = np.zeros(d.size, np.int64)
    for k in range(PROB_BITS + 1):  # ceil(log2 d), in integers
        sh += (np.int64(1) << k) < d
    top = np.int64(1) << (32 + sh)
    m = top // d + 1 - (np.int64(1) << 32)
    full = (m + (np.int64(1) << 32)) * d
    ok = (full >= top) & (full <= top + (np.int64(1) << sh)) & (m >= 0) & (m <= 0xFFFFFFFF)
    if not ok[f > 0].all():
        raise ValueError("rANS division constants fail their check (encoder bug)")
    live = f > 0
    return ((np.where(live, m, 0).astype(np.uint64)) | (f.astype(np.uint64) << np.uint64(32))
            | (np.where(live, cum.reshape(-1), 0).astype(np.uint64) << np.uint64(45))
            | (np.where(live, sh, 0).astype(np.uint64) << np.uint64(58)))


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
def _predict_f32_into(ref, f1, f2, coef, n_feat, p):
    """``codec.predict`` for float32 in one pass: the same correctly rounded float32 operations in the same
    order (``ref * c0``, then ``+ c_i * f_i`` for each nonzero ``c_i`` of the first ``n_feat``; no fused
    multiply-add: numba sets no fast-math flags). ``coef``: float32 ``[c0, c1, c2]`` with ``c0`` not 0 or 1.
    Writes ``p``; returns the count of NaN predictions (x86 passes an operand's NaN payload on, and
    the operand order of a compiled multiply is not pinned down: the caller then uses numpy's)."""
    n = ref.shape[0]
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
    return nan


def predict_f32(ref, f1, f2, coef, n_feat):
    """The prediction of :func:`_predict_f32_into` in a numpy-allocated array, and its NaN count: ``(p, nan)``."""
    p = np.empty(ref.shape[0], np.float32)
    return p, _predict_f32_into(ref, f1, f2, coef, np.int64(n_feat), p)


@njit(cache=True, nogil=True)
def _ratio_into(m, v, eps, out):
    e = eps[0]
    for i in range(m.shape[0]):  # no reduction in this loop: it vectorises
        out[i] = m[i] / (np.sqrt(v[i]) + e)
    nan = 0
    for i in range(m.shape[0]):
        nan += out[i] != out[i]
    return nan


def ratio_f32(m, v, eps):
    """``m / (sqrt(v) + eps)`` in float32, numpy's correctly rounded operations in the same order, in one pass
    (no temporaries; ``eps``: a float32 array of one). Returns ``(r, nan)``: ``nan`` counts NaN results (their
    payloads may differ from numpy's: the caller then uses numpy's)."""
    out = np.empty(m.shape[0], np.float32)
    return out, _ratio_into(m, v, eps, out)


def symbolize(x, p, mode, width, mant_bits):
    """:func:`tpde_hf.checkpoints.kernels.symbolize` (the same arrays) into numpy-allocated outputs."""
    n = x.shape[0]
    sym, nraw, raw = np.empty(n, np.uint16), np.empty(n, np.uint8), np.empty(n, np.uint32)
    symbolize_into(x, p, mode, width, mant_bits, sym, nraw, raw)
    return sym, nraw, raw


def buckets(src, lo, n_ctx, special):
    """:func:`tpde_hf.checkpoints.kernels.buckets` (the same array) into a numpy-allocated output."""
    out = np.empty(src.shape[0], np.uint8)
    buckets_into(src, np.int64(lo), np.int64(n_ctx), np.int64(special), out)
    return out


@njit(cache=True, nogil=True)
def _half_exponent_into(v, out):
    for i in range(v.shape[0]):
        out[i] = ((np.int64(v[i]) >> 23) & 0xFF) >> 1


@njit(cache=True, nogil=True)
def _square_ctx_into(m, v, m2, m2_bits, ctx):
    for i in range(m.shape[0]):
        m2[i] = m[i] * m[i]
    for i in range(m.shape[0]):
        ctx[i] = ((np.int64(m2_bits[i]) >> 23) & 0xFF) - ((np.int64(v[i]) >> 23) & 0xFF)


@njit(cache=True, nogil=True)
def _weight_ctx_into(w, v1, special, out):
    for i in range(w.shape[0]):
        out[i] = special if v1[i] == 0 else (np.int64(w[i]) >> 23) & 0xFF


def half_exponent(v):
    """``exponent(v) // 2`` (int16) of a float32 array: the context of an ``exp_avg``."""
    out = np.empty(v.shape[0], np.int16)
    _half_exponent_into(v.view(np.int32), out)
    return out


def square_ctx(m, v):
    """``(m * m, exponent(m * m) - exponent(v))`` (float32, int32) of float32 arrays, in two passes."""
    m2, ctx = np.empty(m.shape[0], np.float32), np.empty(m.shape[0], np.int32)
    _square_ctx_into(m, v.view(np.int32), m2, m2.view(np.int32), ctx)
    return m2, ctx


def weight_ctx(w, v1, special):
    """``exponent(w)`` as int32, ``special`` where ``v1 == 0`` (float32 arrays): the context of a weight."""
    out = np.empty(w.shape[0], np.int32)
    _weight_ctx_into(w.view(np.int32), v1, np.int64(special), out)
    return out


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


__all__ = ["buckets", "decode_some", "encode_compact", "encode_split", "half_exponent", "predict_f32", "ratio_f32",
           "sample_cost", "sample_costs", "square_ctx", "symbolize", "unsymbolize_check", "weight_ctx"]
