"""numba loops of the reference-delta codec: symbols, rANS encode and the fused decode.

A weight ``t`` is coded against the reference weight ``r`` at the same position through the ordinal
delta ``d = wrap(ord(t) - ord(r))`` (:mod:`tpde_hf.codec.ordinal`), zig-zagged to ``u >= 0``. ``u`` becomes
a *magnitude-class symbol*: ``u`` itself below 16, else ``16 + 2 * (e - 4) + m`` with ``e`` the index of
``u``'s top bit and ``m`` the bit below it; the ``e - 1`` bits under those two are stored raw. The symbol is
rANS-coded with a static table per context ``ctx = eb * n_prev + pb``: ``eb`` is the bucket of the
reference value's exponent (an Adam step moves a small weight by more ulps than a large one), ``pb`` the
class of the previous symbol (changes come in runs: rows, tokens, heads).

The flattened tensor is cut into chunks of ``chunk`` elements, each an independent rANS stream (32-bit
state, 16-bit words) plus a raw bit stream; chunks are coded and decoded in parallel (``prange``). Every
read is clamped into its array, so a corrupt payload cannot make a loop read or write out of bounds; each
chunk reports a status and the driver (:mod:`tpde_hf.reference.codec`) raises on any failure.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from tpde_hf.codec.compiled_kernels import _ordinal, _wrap  # the format's ord map, shared

STATE_LOW = 1 << 16
DIRECT = 16  # symbols 0..15 are u itself
N_SYM = DIRECT + 2 * 28  # e in [4, 31], two symbols each
LANES = 2  # interleaved rANS states per chunk (rans_decode unrolls exactly two)


@njit(cache=True, inline="always")
def _prev_bucket(sym, n_prev):
    if n_prev == 1:
        return 0
    if sym == 0:
        return 0
    if sym <= 2:
        return 1
    if sym < DIRECT:
        return 2
    return 3


@njit(cache=True, inline="always")
def _exp_bucket(rbits, exp_shift, exp_mask, e_low, n_eb):
    e = (rbits >> exp_shift) & exp_mask
    b = e - e_low
    if b < 0:
        b = 0
    if b > n_eb - 1:
        b = n_eb - 1
    return b


@njit(cache=True, parallel=True)
def symbols(t_bits, r_bits, width, exp_shift, exp_mask, e_low, n_eb, n_prev, chunk, sym, ctx, nraw, raw, chunk_bits):
    """Per element: symbol, context, raw bit count and raw bits; per chunk: the raw bits it needs.

    The previous-symbol context is per lane (element ``i - LANES``): the lanes decode independently.
    """
    n = t_bits.shape[0]
    n_chunks = (n + chunk - 1) // chunk
    for c in prange(n_chunks):
        lo = c * chunk
        hi = min(lo + chunk, n)
        pbs = np.zeros(LANES, np.int64)
        bits = np.int64(0)
        for i in range(lo, hi):
            rv = np.int64(r_bits[i])
            d = _wrap(_ordinal(np.int64(t_bits[i]), width) - _ordinal(rv, width), width)
            u = (d << 1) ^ (d >> 63)
            if u < DIRECT:
                s = u
                nr = np.int64(0)
                rw = np.int64(0)
            else:
                e = np.int64(63)
                while (u >> e) == 0:
                    e -= 1
                m = (u >> (e - 1)) & 1
                s = DIRECT + 2 * (e - 4) + m
                nr = e - 1
                rw = u & ((np.int64(1) << nr) - 1)
            eb = _exp_bucket(rv & ((np.int64(1) << width) - 1), exp_shift, exp_mask, e_low, n_eb)
            lane = (i - lo) & (LANES - 1)
            sym[i] = s
            ctx[i] = eb * n_prev + pbs[lane]
            nraw[i] = nr
            raw[i] = rw
            bits += nr
            pbs[lane] = _prev_bucket(s, n_prev)
        chunk_bits[c] = bits


@njit(cache=True, parallel=True)
def rans_encode(sym, ctx, nraw, raw, freq, cum, prob_bits, chunk, word_buf, word_count, states, raw_words, raw_start):
    """Encode every chunk: words into ``word_buf[c]`` (decoder order, at its end), final lane states into
    ``states[c]``, raw bits into ``raw_words`` from ``raw_start[c]``."""
    n = sym.shape[0]
    n_chunks = (n + chunk - 1) // chunk
    cap = word_buf.shape[1]
    for c in prange(n_chunks):
        lo = c * chunk
        hi = min(lo + chunk, n)
        xs = np.full(LANES, np.uint64(STATE_LOW), np.uint64)
        pos = cap
        for i in range(hi - 1, lo - 1, -1):
            lane = (i - lo) & (LANES - 1)
            x = xs[lane]
            f = np.uint64(freq[ctx[i], sym[i]])
            x_max = f << np.uint64(32 - prob_bits)
            if x >= x_max:
                pos -= 1
                word_buf[c, pos] = np.uint16(x & np.uint64(0xFFFF))
                x >>= np.uint64(16)
            xs[lane] = ((x // f) << np.uint64(prob_bits)) + (x % f) + np.uint64(cum[ctx[i], sym[i]])
        for j in range(LANES):
            states[c, j] = xs[j]
        word_count[c] = cap - pos
        acc = np.uint64(0)
        nacc = np.int64(0)
        w = raw_start[c]
        for i in range(lo, hi):
            nr = np.int64(nraw[i])
            if nr == 0:
                continue
            acc |= np.uint64(raw[i]) << np.uint64(nacc)
            nacc += nr
            if nacc >= 32:
                raw_words[w] = np.uint32(acc & np.uint64(0xFFFFFFFF))
                w += 1
                acc >>= np.uint64(32)
                nacc -= 32
        if nacc > 0:
            raw_words[w] = np.uint32(acc & np.uint64(0xFFFFFFFF))


@njit(cache=True, inline="always")
def _decode_one(x, pb, rv, wmask, width, exp_shift, exp_mask, e_low, n_eb, n_prev, prob_bits, lut, pbmap,
                words, wp, wend, raw_words, rp, rend, acc, nacc, bad):
    """One element of one lane: ``(x, pb, bit pattern, wp, rp, acc, nacc, bad)``."""
    eb = _exp_bucket(rv & wmask, exp_shift, exp_mask, e_low, n_eb)
    idx = ((eb * n_prev + pb) << prob_bits) + np.int64(x & np.uint64((1 << prob_bits) - 1))
    e = np.uint64(lut[idx])  # freq (13 bits) | slot - cum (12 bits) << 13 | symbol << 25
    x = (e & np.uint64(0x1FFF)) * (x >> np.uint64(prob_bits)) + ((e >> np.uint64(13)) & np.uint64(0xFFF))
    s = np.int64(e >> np.uint64(25))
    if x < np.uint64(STATE_LOW):
        if wp < wend:
            x = (x << np.uint64(16)) | np.uint64(words[wp])
            wp += 1
        else:
            bad = 2
            x = x << np.uint64(16)
    if s < DIRECT:
        u = s
    else:
        ex = 4 + ((s - DIRECT) >> 1)
        m = (s - DIRECT) & 1
        nr = ex - 1
        while nacc < nr:
            if rp < rend:
                acc |= np.uint64(raw_words[rp]) << np.uint64(nacc)
                rp += 1
            else:
                bad = 3
            nacc += 32
        u = (np.int64(1) << ex) | (m << (ex - 1)) | np.int64(acc & np.uint64((np.int64(1) << nr) - 1))
        acc >>= np.uint64(nr)
        nacc -= nr
    d = (u >> 1) ^ -(u & 1)
    o = _wrap(_ordinal(rv, width) + d, width)
    return x, np.int64(pbmap[s]), _ordinal(o, width), wp, rp, acc, nacc, bad


@njit(cache=True, inline="always")
def _decode_chunk(c, r_bits, out, width, exp_shift, exp_mask, e_low, n_eb, n_prev, chunk, prob_bits, lut, pbmap,
                  words, word_start, states, raw_words, raw_start):
    """Decode chunk ``c``; returns its status: 0 when it consumed exactly its words and raw bits and every lane
    ended on the initial state, else a failure code. Two lanes (even and odd elements) are unrolled so that their
    dependency chains overlap."""
    n = r_bits.shape[0]
    wmask = (np.int64(1) << width) - 1
    lo = c * chunk
    hi = min(lo + chunk, n)
    wp = word_start[c]
    wend = word_start[c + 1]
    rp = raw_start[c]
    rend = raw_start[c + 1]
    if wp < 0 or wend > words.shape[0] or wp > wend or rp < 0 or rend > raw_words.shape[0] or rp > rend:
        return 1
    x0 = np.uint64(states[c, 0])
    x1 = np.uint64(states[c, 1])
    acc = np.uint64(0)
    nacc = np.int64(0)
    p0 = np.int64(0)
    p1 = np.int64(0)
    bad = 0
    i = lo
    while i + 1 < hi:
        x0, p0, v0, wp, rp, acc, nacc, bad = _decode_one(
            x0, p0, np.int64(r_bits[i]), wmask, width, exp_shift, exp_mask, e_low, n_eb, n_prev, prob_bits,
            lut, pbmap, words, wp, wend, raw_words, rp, rend, acc, nacc, bad)
        x1, p1, v1, wp, rp, acc, nacc, bad = _decode_one(
            x1, p1, np.int64(r_bits[i + 1]), wmask, width, exp_shift, exp_mask, e_low, n_eb, n_prev, prob_bits,
            lut, pbmap, words, wp, wend, raw_words, rp, rend, acc, nacc, bad)
        out[i] = v0
        out[i + 1] = v1
        i += 2
    if i < hi:
        x0, p0, v0, wp, rp, acc, nacc, bad = _decode_one(
            x0, p0, np.int64(r_bits[i]), wmask, width, exp_shift, exp_mask, e_low, n_eb, n_prev, prob_bits,
            lut, pbmap, words, wp, wend, raw_words, rp, rend, acc, nacc, bad)
        out[i] = v0
    if bad == 0 and (x0 != np.uint64(STATE_LOW) or x1 != np.uint64(STATE_LOW) or wp != wend or rp != rend):
        bad = 4
    return bad


@njit(cache=True, parallel=True)
def rans_decode(r_bits, out, width, exp_shift, exp_mask, e_low, n_eb, n_prev, chunk, prob_bits, lut, pbmap,
                words, word_start, states, raw_words, raw_start, status):
    """Decode every chunk into ``out`` (bit patterns of the out dtype), chunks in parallel; ``status[c]`` as
    :func:`_decode_chunk` returns it."""
    n_chunks = status.shape[0]
    for c in prange(n_chunks):
        status[c] = _decode_chunk(c, r_bits, out, width, exp_shift, exp_mask, e_low, n_eb, n_prev, chunk, prob_bits,
                                  lut, pbmap, words, word_start, states, raw_words, raw_start)


@njit(cache=True, nogil=True)
def rans_decode_serial(r_bits, out, width, exp_shift, exp_mask, e_low, n_eb, n_prev, chunk, prob_bits, lut, pbmap,
                       words, word_start, states, raw_words, raw_start, status):
    """:func:`rans_decode` on this thread, without the GIL: small tensors, where waking the thread pool costs more
    than it saves (tens of milliseconds on a busy machine), and the load's pool that decodes tensors in parallel
    (:mod:`tpde_hf.reference.prefetch`)."""
    for c in range(status.shape[0]):
        status[c] = _decode_chunk(c, r_bits, out, width, exp_shift, exp_mask, e_low, n_eb, n_prev, chunk, prob_bits,
                                  lut, pbmap, words, word_start, states, raw_words, raw_start)


@njit(cache=True, nogil=True)
def decode_lut(freq, prob_bits, lut):
    """Per context and slot: ``freq | (slot - cum) << 13 | symbol << 25`` (one uint32 load per decode step)."""
    n_ctx, n_sym = freq.shape
    for cx in range(n_ctx):
        slot = 0
        base = cx << prob_bits
        for s in range(n_sym):
            f = freq[cx, s]
            for j in range(f):
                lut[base + slot] = np.uint32(f | (j << 13) | (s << 25))
                slot += 1
