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
from numba import carray, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

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


@njit(cache=True)
def _decode_chunk(c, r_bits, out, width, exp_shift, exp_mask, chunk, ctxtab, symlut, fctab, symtab, words,
                  word_start, states, raw_words, raw_start):
    """Decode chunk ``c``; returns its status: 0 when it consumed exactly its words and raw bits and both lanes
    ended on the initial state, else a failure code.

    Per element: two small loads find the symbol (``symlut``: one byte per slot) and its ``freq | cum << 13``
    (``fctab``), so the tables stay in cache; ``symtab[s]`` packs the lane's next previous-symbol row, the raw bit
    count and the value bits the symbol stands for (:func:`tpde_hf.reference.codec.decode_tables`). The
    renormalisation is a select; the raw-bit refill is the one data-dependent branch (rare). Indices are unsigned
    (no negative-index code). ``words`` and ``raw_words`` end with one spare word and every read is clamped, so a
    read past a chunk's end stays in the array; such a chunk fails the final check (positions only grow). The two
    lanes are written out in full, not through a helper: a call per element costs reference counting on every
    array argument (measured ~25% of the decode).
    """
    n = r_bits.shape[0]
    wlast = words.shape[0] - 1
    rlast = raw_words.shape[0] - 1
    lo = c * chunk
    hi = min(lo + chunk, n)
    wp = word_start[c]
    wend = word_start[c + 1]
    rp = raw_start[c]
    rend = raw_start[c + 1]
    if wp < 0 or wend > wlast or wp > wend or rp < 0 or rend > rlast or rp > rend:
        return 1
    x0 = np.int64(states[c, 0])
    x1 = np.int64(states[c, 1])
    acc = np.int64(0)
    nacc = np.int64(0)
    p0 = symtab[0] & 0xFFFF
    p1 = p0
    i = lo
    while i < hi:
        # lane 0 (even offsets)
        rv = np.int64(r_bits[np.uint64(i)])
        cb = ctxtab[np.uint64((rv >> exp_shift) & exp_mask)] + p0  # context row << 12
        slot = x0 & 0xFFF
        s = np.int64(symlut[np.uint64(cb + slot)])
        ent = np.int64(fctab[np.uint64((cb >> 5) + s)])  # row ctx * 128 + s
        x0 = (ent & 0x1FFF) * (x0 >> 12) + slot - (ent >> 13)
        need = np.int64(x0 < STATE_LOW)
        w = np.int64(words[np.uint64(min(wp, wlast))])
        x0 = (x0 << (need << 4)) | (w & -need)
        wp += need
        st = symtab[np.uint64(s)]
        nb = (st >> 16) & 0x3F
        if nacc < nb:
            acc |= np.int64(raw_words[np.uint64(min(rp, rlast))]) << nacc
            rp += 1
            nacc += 32
        u = (st >> 22) | (acc & ((np.int64(1) << nb) - 1))
        acc >>= nb
        nacc -= nb
        p0 = st & 0xFFFF
        out[np.uint64(i)] = _ordinal(_wrap(_ordinal(rv, width) + ((u >> 1) ^ -(u & 1)), width), width)
        i += 1
        if i >= hi:
            break
        # lane 1 (odd offsets): the same step; its chain overlaps lane 0's
        rv = np.int64(r_bits[np.uint64(i)])
        cb = ctxtab[np.uint64((rv >> exp_shift) & exp_mask)] + p1
        slot = x1 & 0xFFF
        s = np.int64(symlut[np.uint64(cb + slot)])
        ent = np.int64(fctab[np.uint64((cb >> 5) + s)])
        x1 = (ent & 0x1FFF) * (x1 >> 12) + slot - (ent >> 13)
        need = np.int64(x1 < STATE_LOW)
        w = np.int64(words[np.uint64(min(wp, wlast))])
        x1 = (x1 << (need << 4)) | (w & -need)
        wp += need
        st = symtab[np.uint64(s)]
        nb = (st >> 16) & 0x3F
        if nacc < nb:
            acc |= np.int64(raw_words[np.uint64(min(rp, rlast))]) << nacc
            rp += 1
            nacc += 32
        u = (st >> 22) | (acc & ((np.int64(1) << nb) - 1))
        acc >>= nb
        nacc -= nb
        p1 = st & 0xFFFF
        out[np.uint64(i)] = _ordinal(_wrap(_ordinal(rv, width) + ((u >> 1) ^ -(u & 1)), width), width)
        i += 1
    if x0 != STATE_LOW or x1 != STATE_LOW or wp != wend or rp != rend:
        return 4
    return 0


@njit(cache=True, parallel=True)
def rans_decode(r_bits, out, width, exp_shift, exp_mask, chunk, ctxtab, symlut, fctab, symtab, words, word_start,
                states, raw_words, raw_start, status):
    """Decode every chunk into ``out`` (bit patterns of the out dtype), chunks in parallel; ``status[c]`` as
    :func:`_decode_chunk` returns it. The tables are :func:`tpde_hf.reference.codec.decode_tables`'."""
    for c in prange(status.shape[0]):
        status[c] = _decode_chunk(c, r_bits, out, width, exp_shift, exp_mask, chunk, ctxtab, symlut, fctab, symtab,
                                  words, word_start, states, raw_words, raw_start)


@njit(cache=True, nogil=True)
def rans_decode_serial(r_bits, out, width, exp_shift, exp_mask, chunk, ctxtab, symlut, fctab, symtab, words,
                       word_start, states, raw_words, raw_start, status):
    """:func:`rans_decode` on this thread, without the GIL: small tensors, where waking the thread pool costs more
    than it saves (tens of milliseconds on a busy machine), and tensors decoded one call each (``ref-sparse``'s
    values; a load decodes its ``ref-ord`` tensors through :func:`decode_units`)."""
    for c in range(status.shape[0]):
        status[c] = _decode_chunk(c, r_bits, out, width, exp_shift, exp_mask, chunk, ctxtab, symlut, fctab, symtab,
                                  words, word_start, states, raw_words, raw_start)


@intrinsic
def _voidptr(typingctx, addr):
    """An address (int64) as a ``void*`` for :func:`numba.carray`: the load's tensors, each its own buffer."""

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(types.int64), codegen


#: columns of :func:`decode_units`' job table (one row per tensor): addresses (``*``) and sizes
(J_REF, J_OUT, J_N, J_WIDTH, J_SHIFT, J_EMASK, J_CHUNK, J_NCTX, J_CTX, J_SYMLUT, J_FC, J_SYM, J_WORDS, J_NWORDS,
 J_RAW, J_NRAW, J_WSTART, J_RSTART, J_STATES, J_NCHUNKS) = range(20)
J_FIELDS = 20


@njit(cache=True, nogil=True)
def decode_units(lo, hi, unit_job, unit_chunk, jobs, status):
    """Decode units ``lo..hi-1`` (one chunk of one tensor each) of a whole load in one call, without the GIL.

    ``jobs[j]`` (columns ``J_*``) holds the addresses of tensor ``j``'s arrays, each its own buffer kept alive by
    the caller (:class:`tpde_hf.reference.batch.BatchDecode`): reference and output bits (int16 for width 16,
    int32 for 32), the tables of :func:`tpde_hf.reference.codec.decode_tables`, the word and raw streams (each
    with its spare word: :func:`_decode_chunk` clamps every read into them), chunk starts and final states; and
    its sizes and format constants. The tables are built by the caller, not read from the stream, so their
    indices stay inside them. ``status[u]`` as :func:`_decode_chunk` returns it for unit ``u``.
    """
    for u in range(lo, hi):
        j = unit_job[u]
        n = jobs[j, J_N]
        nk = jobs[j, J_NCHUNKS]
        nctx = jobs[j, J_NCTX]
        emask = jobs[j, J_EMASK]
        ctx = carray(_voidptr(jobs[j, J_CTX]), emask + 1, np.int64)
        lut = carray(_voidptr(jobs[j, J_SYMLUT]), nctx << 12, np.uint8)
        fc = carray(_voidptr(jobs[j, J_FC]), nctx * 128, np.int32)
        sym = carray(_voidptr(jobs[j, J_SYM]), 128, np.int64)
        words = carray(_voidptr(jobs[j, J_WORDS]), jobs[j, J_NWORDS] + 1, np.uint16)
        raw = carray(_voidptr(jobs[j, J_RAW]), jobs[j, J_NRAW] + 1, np.uint32)
        ws = carray(_voidptr(jobs[j, J_WSTART]), nk + 1, np.int64)
        rs = carray(_voidptr(jobs[j, J_RSTART]), nk + 1, np.int64)
        st = carray(_voidptr(jobs[j, J_STATES]), (nk, LANES), np.int64)
        if jobs[j, J_WIDTH] == 16:
            rb = carray(_voidptr(jobs[j, J_REF]), n, np.int16)
            ob = carray(_voidptr(jobs[j, J_OUT]), n, np.int16)
            status[u] = _decode_chunk(unit_chunk[u], rb, ob, 16, jobs[j, J_SHIFT], emask, jobs[j, J_CHUNK], ctx, lut,
                                      fc, sym, words, ws, st, raw, rs)
        else:
            rb32 = carray(_voidptr(jobs[j, J_REF]), n, np.int32)
            ob32 = carray(_voidptr(jobs[j, J_OUT]), n, np.int32)
            status[u] = _decode_chunk(unit_chunk[u], rb32, ob32, 32, jobs[j, J_SHIFT], emask, jobs[j, J_CHUNK], ctx,
                                      lut, fc, sym, words, ws, st, raw, rs)
