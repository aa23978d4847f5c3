"""The fused encoder: a tensor's symbols, raw bits and rANS streams, the symbols never stored (the codec's one
encode path).

Same stream as :func:`tpde_hf.checkpoints.kernels.encode_chunks` (byte for byte: the decoder is unchanged), at a
fraction of its CPU:

* :func:`sym_histogram`: the symbol counts, the symbols made 4096 at a time in cache;
* :func:`encode_fused`: each chunk's symbols, raw bits and table indices made into a chunk of scratch (one
  vectorised loop, with the decoder's inverse of the symbol map on every element), the raw bits packed forwards,
  then the rANS pass backwards over the scratch. The rANS step divides by Granlund and Montgomery's exact
  multiply-and-shift (:func:`~tpde_hf.checkpoints.enc_tables.flat_tables`), writes each renormalisation word
  unconditionally (a select, no branch), and flags any step of a symbol without mass and any final state out of
  range. A large tensor's chunks may be coded in runs that other threads take (``fork``; the same bytes);
* :func:`decode_some`: the decode of sampled chunks that the codec's ``verify`` compares bit for bit.

Each returns a count of elements whose check failed (0 when all is well); the codec refuses to store a tensor with
a nonzero count. With the sampled decode this is the pack-time guarantee that what is stored decodes to the
tensor.

Example::

    hist = sym_histogram(x, p, ctx, MODE_ORD, 32, 23, n_ctx, nsym)
    states, n_words, n_bitwords, words, bitwords, bad = encode_fused(x, p, ctx, freq, cum, MODE_ORD, 32, 23, 1 << 15)
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core.extending import intrinsic

from tpde_hf.checkpoints.enc_tables import flat_tables
from tpde_hf.checkpoints.kernels import LANES, PROB_BITS, STATE_LOW, _decode_chunk
from tpde_hf.codec.compiled_kernels import _ordinal, _wrap

assert LANES == 4, "the encoder's main loop is written out for 4 lanes"


@njit(cache=True, inline="always")
def _step_u(x, e, words, w):
    """One rANS encoder step for table entry ``e`` (:func:`~tpde_hf.checkpoints.enc_tables.flat_tables`: magic
    ``m'``, ``f``, ``cum``, shift ``l``): renormalise (at most one word), then ``x -> (x // f) << 12 | x % f + cum``,
    written as ``x + cum + q * (2**12 - f)``. ``q = x // f`` is exact by Granlund and Montgomery's
    multiply-and-shift (``q = (((x * m') >> 32) + x) >> l``, exact for every ``x < 2**32`` by the condition
    ``flat_tables`` checks on each entry). The word position ``w`` is unsigned (no negative-index wraparound code).
    Returns the state, the word position and ``f`` (the caller flags ``f == 0``)."""
    m = e & np.uint64(0xFFFFFFFF)
    f = np.int64((e >> np.uint64(32)) & np.uint64(0x1FFF))
    cum = np.int64((e >> np.uint64(45)) & np.uint64(0x1FFF))
    need = np.uint64(x >= (f << (32 - PROB_BITS)))
    words[w - np.uint64(1)] = np.uint16(x & 0xFFFF)  # always written; kept only when needed
    w -= need
    x >>= np.int64(need << np.uint64(4))
    ux = np.uint64(x)
    q = np.int64((((ux * m) >> np.uint64(32)) + ux) >> (e >> np.uint64(58)))
    return x + cum + q * ((1 << PROB_BITS) - f), w, f


@njit(cache=True, inline="always")
def _range_outputs(nch, chunk):
    """A range encoder's per-chunk outputs (states, word and bit-word counts) and its one chunk's word row."""
    return (np.empty((nch, LANES), np.int64), np.empty(nch, np.int64), np.empty(nch, np.int64),
            np.empty(chunk + 4, np.uint16))


@njit(cache=True, inline="always")
def _place_chunk(c, nw, nb, wrow, w_out, wpos, n_words, n_bitwords):
    """Chunk ``c``'s words (the last ``nw`` of ``wrow``, decoder order) appended to ``w_out`` at ``wpos``, its
    counts recorded; returns the next word position."""
    cap = wrow.shape[0]
    w_out[wpos:wpos + nw] = wrow[cap - nw:]
    n_words[c] = nw
    n_bitwords[c] = nb
    return wpos + nw


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


@intrinsic
def _clz64(typingctx, u):
    """Leading zeros of a 64-bit integer (64 for 0): LLVM's ``ctlz``, one ``lzcnt`` on x86."""
    sig = types.int64(types.int64)

    def codegen(context, builder, signature, args):
        return builder.ctlz(args[0], ir.Constant(ir.IntType(1), 0))

    return sig, codegen


@njit(cache=True, inline="always")
def _symbol(xv, pv, mode, width, mant_bits):
    """``(symbol, raw bit count, raw value)`` of one element: :func:`~tpde_hf.checkpoints.kernels.symbolize_into`'s
    values, written without branches (the bit length by ``lzcnt``; ``u < 4`` by a select)."""
    if mode == 0:
        r = _wrap(_ordinal(xv, width) - _ordinal(pv, width), width)
        u = (r << 1) ^ (r >> 63)
        nr = max(np.int64(61) - _clz64(u), np.int64(0))  # bit length - 3, at least 0
        s = 4 + 4 * nr + ((u >> nr) & 3) - 4 * np.int64(u < 4)
        return s, nr, u & ((np.int64(1) << nr) - 1)
    ub = xv & ((np.int64(1) << width) - 1)
    flip = np.int64(pv < 0)
    return (ub >> mant_bits) ^ (flip << (width - 1 - mant_bits)), np.int64(mant_bits), ub & (
        (np.int64(1) << mant_bits) - 1)


@njit(cache=True, inline="always")
def _unsymbol(s, rv, pv, mode, width, mant_bits):
    """The decoder's inverse of the symbol map (``kernels._decode_chunk``'s formulas): the value back."""
    if mode == 0:
        if s < 4:
            hib = s
        else:
            hib = (4 | ((s - 4) & 3)) << ((s - 4) // 4)
        u = hib | rv
        r = (u >> 1) ^ (-(u & 1))
        return _ordinal(_wrap(_ordinal(pv, width) + r, width), width)
    flip = np.int64(1) if pv < 0 else np.int64(0)
    ub = ((s << mant_bits) ^ (flip << (width - 1))) | rv
    return ub - ((ub >> (width - 1)) << width)


@njit(cache=True, inline="always")
def _symbols_loop(xs, ps, cs, mode, width, mant_bits, nsym, check, idx, nraw, raw):
    """:func:`_symbols_block`'s loop; ``mode`` is a literal at each call, so each copy has no branch on it."""
    bad = np.int64(0)
    for i in range(xs.shape[0]):
        xv = np.int64(xs[i])
        pv = np.int64(ps[i])
        s, nr, rv = _symbol(xv, pv, mode, width, mant_bits)
        idx[i] = np.int64(cs[i]) * nsym + s
        nraw[i] = nr
        raw[i] = rv
        if check:
            bad += _unsymbol(s, rv, pv, mode, width, mant_bits) != xv
    return bad


@njit(cache=True, nogil=True)
def _symbols_block(x, p, ctx, lo, hi, mode, width, mant_bits, nsym, check, idx, nraw, raw):
    """Elements ``[lo, hi)``: each one's table index ``ctx * nsym + symbol`` into ``idx``, raw bit count into
    ``nraw`` and raw value into ``raw`` (scratch from 0, small enough to stay in cache); ``check``: the count of
    elements the decoder's inverse of the symbol map does not give back. Loops without branches, one per mode,
    which the compiler vectorises (the rANS and raw-bit loops that read the scratch cannot be)."""
    xs, ps, cs = x[lo:hi], p[lo:hi], ctx[lo:hi]  # slices: indices from range() need no wraparound, so it vectorises
    if mode == 0:
        return _symbols_loop(xs, ps, cs, 0, width, mant_bits, nsym, check, idx, nraw, raw)
    return _symbols_loop(xs, ps, cs, 1, width, mant_bits, nsym, check, idx, nraw, raw)


_BLOCK = 4096  # elements per block of symbols in sym_histogram (its scratch stays in L1)


@njit(cache=True, nogil=True)
def sym_histogram(x, p, ctx, mode, width, mant_bits, n_ctx, nsym):
    """:func:`~tpde_hf.checkpoints.kernels.histogram` of the symbols of ``x`` against ``p`` (the counts of
    ``symbolize`` then ``histogram``) without storing the symbols: block by block, with four partial tables
    so that runs of one symbol do not wait on each other's counts."""
    if n_ctx * nsym > 1 << 16:
        raise ValueError("sym_histogram: the table index ctx * nsym + symbol must fit 16 bits")
    h = np.zeros((4, n_ctx * nsym), np.int64)
    idx = np.empty(_BLOCK, np.uint16)
    nraw = np.empty(_BLOCK, np.uint8)
    raw = np.empty(_BLOCK, np.uint32)
    n = x.shape[0]
    for lo in range(0, n, _BLOCK):
        m = min(n - lo, _BLOCK)
        _symbols_block(x, p, ctx, lo, lo + m, mode, width, mant_bits, nsym, False, idx, nraw, raw)
        m4 = m - m % 4
        for j in range(0, m4, 4):
            h[0, idx[j]] += 1
            h[1, idx[j + 1]] += 1
            h[2, idx[j + 2]] += 1
            h[3, idx[j + 3]] += 1
        for j in range(m4, m):
            h[0, idx[j]] += 1
    out = np.zeros((n_ctx, nsym), np.int64)
    for c in range(n_ctx):
        for s in range(nsym):
            k = c * nsym + s
            out[c, s] = h[0, k] + h[1, k] + h[2, k] + h[3, k]
    return out


@njit(cache=True, nogil=True)
def _fused_chunk(lo, hi, x, p, ctx, tab, nsym, mode, width, mant_bits, check, idx, nraw, raw, states, words,
                 bitwords):
    """One chunk: elements ``[lo, hi)``, the symbols made here (:func:`_symbols_block`, into
    scratch that stays in cache, with the inverse check), then the raw bits packed forwards and the rANS
    pass backwards over the scratch. Returns ``(n_words, n_bitwords, bad)``."""
    bad = _symbols_block(x, p, ctx, lo, hi, mode, width, mant_bits, nsym, check, idx, nraw, raw)
    m = hi - lo
    acc = np.uint64(0)
    nacc = np.int64(0)
    b = 0
    for i in range(m):
        nr = np.int64(nraw[i])
        rv = np.uint64(raw[i])
        bad += (rv >> np.uint64(nr)) != 0  # the decoder reads exactly nr bits
        # LSB first; nacc + nr < 64, so a word is full exactly when bit 5 of the sum is set
        t = nacc + nr
        acc |= rv << np.uint64(nacc)
        bitwords[b] = np.uint32(acc & np.uint64(0xFFFFFFFF))  # kept only when full (selects, no branch)
        full = t >> 5
        b += full
        acc >>= np.uint64(full << 5)
        nacc = t & 31
    if nacc > 0:
        bitwords[b] = np.uint32(acc & np.uint64(0xFFFFFFFF))
        b += 1
    chk = np.int64(0)
    x0 = x1 = x2 = x3 = np.int64(STATE_LOW)
    w = np.uint64(words.shape[0])  # unsigned indices: no negative-index wraparound code in the loop
    i = m - 1
    while i >= 0 and ((i + 1) & (LANES - 1)) != 0:  # the tail down to a multiple of LANES
        e = tab[idx[i]]
        lane = i & (LANES - 1)
        if lane == 0:
            x0, w, f = _step_u(x0, e, words, w)
        elif lane == 1:
            x1, w, f = _step_u(x1, e, words, w)
        else:
            x2, w, f = _step_u(x2, e, words, w)
        chk |= f - 1
        i -= 1
    j = np.uint64(i + 1)  # a multiple of LANES: lanes 3, 2, 1, 0 of elements j - 1 .. j - 4
    while j > 0:
        j -= np.uint64(LANES)
        x3, w, f3 = _step_u(x3, tab[idx[j + np.uint64(3)]], words, w)
        x2, w, f2 = _step_u(x2, tab[idx[j + np.uint64(2)]], words, w)
        x1, w, f1 = _step_u(x1, tab[idx[j + np.uint64(1)]], words, w)
        x0, w, f0 = _step_u(x0, tab[idx[j]], words, w)
        chk |= (f3 - 1) | (f2 - 1) | (f1 - 1) | (f0 - 1)
    states[0], states[1], states[2], states[3] = x0, x1, x2, x3
    bad += np.int64(chk < 0)
    for xl in (x0, x1, x2, x3):
        bad += (xl < STATE_LOW) | (xl >= (np.int64(1) << 32))
    return words.shape[0] - np.int64(w), b, bad


@njit(cache=True, nogil=True)
def _fused_range(x, p, ctx, tab, nsym, mode, width, mant_bits, check, chunk, c0, c1, w_out, b_out):
    """Chunks ``[c0, c1)`` one after the other on this thread (:func:`_fused_chunk`), writing the streams as
    stored into ``w_out`` (at least ``m + 4`` words for ``m`` elements) and ``b_out`` (``m + chunks + 2``): each
    chunk's words (encoded into a scratch row that stays in cache) and bit words one after the other. Returns
    ``(states, n_words, n_bitwords, words used, bit words used, bad)``. The callers allocate the outputs with numpy
    (transparent huge pages: a numba allocation of this size costs several times more in page faults)."""
    n = x.shape[0]
    nch = c1 - c0
    states, n_words, n_bitwords, wrow = _range_outputs(nch, chunk)
    idx, nraw, raw = np.empty(chunk, np.uint16), np.empty(chunk, np.uint8), np.empty(chunk, np.uint32)
    wpos = 0
    bpos = 0
    bad = 0
    for c in range(nch):
        lo = (c0 + c) * chunk
        hi = min(n, lo + chunk)
        nw, nb, bd = _fused_chunk(lo, hi, x, p, ctx, tab, nsym, mode, width, mant_bits, check, idx, nraw, raw,
                                  states[c], wrow, b_out[bpos:])
        wpos = _place_chunk(c, nw, nb, wrow, w_out, wpos, n_words, n_bitwords)
        bpos += nb
        bad += bd
    return states, n_words, n_bitwords, wpos, bpos, bad


def _fused_run(x, p, ctx, tab, nsym, mode, width, mant_bits, check, chunk, c0, c1):
    """:func:`_fused_range` with numpy-allocated outputs, trimmed to what was written."""
    m = max(0, min(x.shape[0], c1 * chunk) - c0 * chunk)
    w_out = np.empty(m + 4, np.uint16)
    b_out = np.empty(m + (c1 - c0) + 2, np.uint32)
    states, n_words, n_bitwords, nw, nb, bad = _fused_range(x, p, ctx, tab, nsym, np.int64(mode), np.int64(width),
                                                            np.int64(mant_bits), bool(check), np.int64(chunk),
                                                            np.int64(c0), np.int64(c1), w_out, b_out)
    return states, n_words, n_bitwords, w_out[:nw], b_out[:nb], bad


def encode_fused(x, p, ctx, freq, cum, mode, width, mant_bits, chunk, check=True, fork=None, pieces=1):
    """The rANS streams and raw bits of ``x`` against the prediction ``p`` (bit patterns), chunk by chunk, as stored:
    ``(states, n_words, n_bitwords, words, bitwords, bad)``; ``words`` (uint16) the chunks' words one after the
    other, ``bitwords`` (uint32) likewise, ``bad`` the count of failed inline checks. The bytes of
    :func:`tpde_hf.checkpoints.kernels.symbolize` + ``encode_chunks`` (the test oracle:
    :func:`tpde_hf.checkpoints.enc_oracle.encode_compact`) without the symbol arrays: each chunk's symbols are made,
    used and dropped in cache. ``check``: each element also passes the decoder's inverse of the symbol map (failures
    add to ``bad``). ``fork(fn, items)`` with ``pieces > 1``: runs of whole chunks mapped with it (e.g.
    :meth:`tpde_hf.checkpoints.assist.Assist.fork`, where idle threads may take some), then joined."""
    if freq.shape[0] * freq.shape[1] > 1 << 16 or ctx.dtype != np.uint8 or x.shape != p.shape or x.shape != ctx.shape:
        raise ValueError("encode_fused: the table index ctx * nsym + symbol must fit 16 bits, one uint8 context per "
                         "element")
    tab = flat_tables(freq, cum)
    nsym = np.int64(freq.shape[1])
    nch = (x.shape[0] + chunk - 1) // chunk
    if fork is None or pieces <= 1:
        return _fused_run(x, p, ctx, tab, nsym, mode, width, mant_bits, check, chunk, 0, nch)
    cuts = np.linspace(0, nch, max(1, min(pieces, nch)) + 1).astype(np.int64)
    runs = [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:], strict=True) if b > a] or [(0, 0)]
    outs = fork(lambda r: _fused_run(x, p, ctx, tab, nsym, mode, width, mant_bits, check, chunk, r[0], r[1]), runs)
    if len(outs) == 1:
        return outs[0]
    return (np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs]),
            np.concatenate([o[2] for o in outs]), np.concatenate([o[3] for o in outs]),
            np.concatenate([o[4] for o in outs]), sum(int(o[5]) for o in outs))

