"""The test oracle of the fused encoder: the same streams from whole symbol arrays.

:func:`symbolize` makes the symbol arrays (:func:`tpde_hf.checkpoints.kernels.symbolize`'s), :func:`encode_compact`
codes them (the rANS step and raw-bit packing written over stored symbols), :func:`unsymbolize_check` runs the
decoder's inverse of the symbol map on every element. The codec never calls these; the tests hold
:func:`tpde_hf.checkpoints.enc_stream.encode_fused` to their bytes, and :func:`encode_compact` to the plain
reference encoder ``kernels.encode_chunks``.

Example::

    sym, nraw, raw = symbolize(x, p, MODE_ORD, 32, 23)
    assert unsymbolize_check(x, p, sym, raw, MODE_ORD, 32, 23) == 0
    states, n_words, n_bitwords, words, bitwords, bad = encode_compact(sym, nraw, raw, ctx, freq, cum, chunk)
"""

from __future__ import annotations

import numpy as np
from numba import njit

from tpde_hf.checkpoints.enc_stream import _place_chunk, _range_outputs, _unsymbol
from tpde_hf.checkpoints.enc_tables import flat_tables
from tpde_hf.checkpoints.kernels import LANES, PROB_BITS, STATE_LOW, symbolize_into


@njit(cache=True, nogil=True)
def unsymbolize_check(x, p, sym, raw, mode, width, mant_bits):
    """How many elements the decoder's inverse of the symbol map does not give back (0 when all is well):
    ``x[i] != unsymbolize(sym[i], raw[i], p[i])``, with the decoder's own formulas (``kernels._decode_chunk``)."""
    bad = 0
    for i in range(x.shape[0]):
        bad += _unsymbol(np.int64(sym[i]), np.int64(raw[i]), np.int64(p[i]), mode, width, mant_bits) != np.int64(x[i])
    return bad


@njit(cache=True, inline="always")
def _step(x, e, words, w):
    """:func:`tpde_hf.checkpoints.enc_stream._step_u` (one rANS step by an exact multiply-and-shift) with a
    signed word position: the same state, words and ``f``."""
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
def _encode_range(sym, nraw, raw, ctx, tab, nsym, chunk, c0, c1, w_out, b_out):
    """Chunks ``[c0, c1)`` one after the other on this thread, writing the streams as stored into ``w_out`` (at
    least ``m + 4`` words for ``m`` elements) and ``b_out`` (``m + chunks + 2``): each chunk's words (encoded into
    a scratch row that stays in cache) and bit words one after the other. Returns ``(states, n_words, n_bitwords,
    words used, bit words used, bad)``. The callers allocate the outputs with numpy (transparent huge pages: a
    numba allocation of this size costs several times more in page faults) and touch only what is written."""
    n = sym.shape[0]
    nch = c1 - c0
    states, n_words, n_bitwords, wrow = _range_outputs(nch, chunk)
    wpos = 0
    bpos = 0
    bad = 0
    for c in range(nch):
        lo = (c0 + c) * chunk
        hi = min(n, lo + chunk)
        nw, nb, bd = _encode_chunk(lo, hi, sym, nraw, raw, ctx, tab, nsym, states[c], wrow,
                                   b_out[bpos:])
        wpos = _place_chunk(c, nw, nb, wrow, w_out, wpos, n_words, n_bitwords)
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


def encode_compact(sym, nraw, raw, ctx, freq, cum, chunk):
    """rANS-encode and pack raw bits chunk by chunk from whole symbol arrays, the stream of
    :func:`tpde_hf.checkpoints.kernels.encode_chunks` (same bytes) as stored: ``(states, n_words, n_bitwords, words,
    bitwords, bad)`` (see :func:`tpde_hf.checkpoints.enc_stream.encode_fused`, which the tests hold to it)."""
    tab = flat_tables(freq, cum)
    return _encode_run(sym, nraw, raw, ctx, tab, np.int64(freq.shape[1]), chunk, 0, (sym.shape[0] + chunk - 1)
                       // chunk)


def symbolize(x, p, mode, width, mant_bits):
    """:func:`tpde_hf.checkpoints.kernels.symbolize` (the same arrays) into numpy-allocated outputs."""
    n = x.shape[0]
    sym, nraw, raw = np.empty(n, np.uint16), np.empty(n, np.uint8), np.empty(n, np.uint32)
    symbolize_into(x, p, mode, width, mant_bits, sym, nraw, raw)
    return sym, nraw, raw
