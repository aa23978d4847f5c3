"""numba loops of the reference-delta codec: symbols, rANS encode and the blocked decode.

A weight ``t`` is coded against the reference weight ``r`` at the same position through the ordinal
delta ``d = wrap(ord(t) - ord(r))`` (:mod:`tpde_hf.codec.ordinal`), zig-zagged to ``u >= 0``. ``u`` becomes
a *magnitude-class symbol*: ``u`` itself below 16, else ``16 + 2 * (e - 4) + m`` with ``e`` the index of
``u``'s top bit and ``m`` the bit below it; the ``e - 1`` bits under those two are stored raw. The symbol is
rANS-coded with a static table per context ``ctx = eb * n_prev + pb``: ``eb`` is the bucket of the
reference value's exponent (an Adam step moves a small weight by more ulps than a large one), ``pb`` the
class of the previous symbol (changes come in runs: rows, tokens, heads).

The flattened tensor is cut into chunks of ``chunk`` elements, each an independent rANS stream (32-bit
state, 16-bit words) plus a raw bit stream; chunks are coded and decoded in parallel (``prange``). Every
read is clamped into its array (or provably inside it), so a corrupt payload cannot make a loop read or write
out of bounds; each chunk reports a status and the driver (:mod:`tpde_hf.reference.codec`) raises on any failure.

The decode works in blocks of :data:`BLOCK` elements, in passes: the context rows (vectorized), the rANS state
chains alone (the loop-carried latency: two full chunks are decoded at once, four chains, so the table loads
of one chain overlap the others'), then the raw bits (each element's bit position is a running sum, no refill
branch) and the ordinal arithmetic (vectorized). Measured on the SmolLM2-135M pair (134.5M weights, one thread,
2026-12-07, busy 2-core VM): 4.2-4.3 against 5.9-6.1 ns per weight for the fused two-chain loop it replaced, which
``tests/test_reference_kernels.py`` keeps as its oracle.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
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


#: elements per decode block: a block's context rows / symbols (int32) and values (uint32) stay in L1 between passes
BLOCK = 4096


@intrinsic
def _load_u64(typingctx, arr, index):
    """``arr[index] | arr[index + 1] << 32`` (uint32 words, little-endian) as one int64: one unaligned load. The
    caller keeps ``index + 1`` inside the array."""
    sig = types.int64(arr, types.int64)

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = builder.bitcast(builder.gep(ary.data, [args[1]]), ir.IntType(64).as_pointer())
        return builder.load(ptr, align=4)

    return sig, codegen


@njit(cache=True, nogil=True)
def _rows(r_bits, b, m, exp_shift, exp_mask, ctxtab, rows, at):
    """``rows[at + k]``: the context row (``<< 12``, previous-symbol bucket 0) of reference element ``b + k``,
    ``k < m``. The same value as ``ctxtab[exponent]``, computed from the parameters :func:`decode_tables
    <tpde_hf.reference.codec.decode_tables>` appends to ``ctxtab`` (``e_low, n_eb, n_prev``): arithmetic, not a
    table lookup, so the loop vectorizes."""
    e_low = np.int32(ctxtab[exp_mask + 1])
    top = np.int32(ctxtab[exp_mask + 2] - 1)
    n_prev = np.int32(ctxtab[exp_mask + 3])
    ref = r_bits[b : b + m]
    out = rows[at : at + m]
    for k in range(m):
        e = ((np.int32(ref[k]) >> exp_shift) & exp_mask) - e_low
        out[k] = (min(max(e, 0), top) * n_prev) << 12


@njit(cache=True, inline="always")
def _step(x, p, wp, cb, symlut, fctab, symtab, words, wlast, clamp):
    """One rANS step of a lane in context row ``cb`` (``<< 12``, previous-symbol bucket included): ``(state,
    symbol, next previous-symbol row, word position)``. ``clamp`` is a constant of the caller: False only where the
    block cannot read past ``words`` (a step reads at most one word). The renormalisation is a select on an
    *unsigned* compare (a cmov and an adc): written as a mask, LLVM turned it into an unpredictable branch."""
    slot = x & 0xFFF
    s = np.int64(symlut[np.uint64(cb + slot)])
    ent = np.int64(fctab[np.uint64((cb >> 5) + s)])  # row ctx * 128 + s: freq | cum << 13
    x = (ent & 0x1FFF) * (x >> 12) + slot - (ent >> 13)
    need = np.uint64(x) < np.uint64(STATE_LOW)
    w = np.int64(words[np.uint64(min(wp, wlast) if clamp else wp)])
    xw = (x << 16) | w
    x = xw if need else x
    return x, s, symtab[np.uint64(s)] & 0xFFFF, wp + np.int64(need)


@njit(cache=True, inline="always")
def _entropy4(m, rows, symlut, fctab, symtab, words, wlast, x0, x1, x2, x3, p0, p1, p2, p3, wp, wq, clamp):
    """The rANS chains of two chunks at once (four independent state chains hide the table loads' latency):
    ``m`` (even) elements each, context rows in ``rows[0:m]`` and ``rows[BLOCK:BLOCK + m]``, replaced in place by
    the symbols."""
    for k in range(0, m, 2):
        x0, s, p0, wp = _step(x0, p0, wp, np.int64(rows[np.uint64(k)]) + p0, symlut, fctab, symtab, words, wlast,
                              clamp)
        rows[np.uint64(k)] = s
        x2, s, p2, wq = _step(x2, p2, wq, np.int64(rows[np.uint64(k + BLOCK)]) + p2, symlut, fctab, symtab, words,
                              wlast, clamp)
        rows[np.uint64(k + BLOCK)] = s
        x1, s, p1, wp = _step(x1, p1, wp, np.int64(rows[np.uint64(k + 1)]) + p1, symlut, fctab, symtab, words, wlast,
                              clamp)
        rows[np.uint64(k + 1)] = s
        x3, s, p3, wq = _step(x3, p3, wq, np.int64(rows[np.uint64(k + BLOCK + 1)]) + p3, symlut, fctab, symtab,
                              words, wlast, clamp)
        rows[np.uint64(k + BLOCK + 1)] = s
    return x0, x1, x2, x3, p0, p1, p2, p3, wp, wq


@njit(cache=True, inline="always")
def _entropy2(m, rows, symlut, fctab, symtab, words, wlast, x0, x1, p0, p1, wp, clamp):
    """:func:`_entropy4` for one chunk (two chains), ``m`` elements (odd only at the chunk's end)."""
    k = 0
    while k + 1 < m:
        x0, s, p0, wp = _step(x0, p0, wp, np.int64(rows[np.uint64(k)]) + p0, symlut, fctab, symtab, words, wlast,
                              clamp)
        rows[np.uint64(k)] = s
        x1, s, p1, wp = _step(x1, p1, wp, np.int64(rows[np.uint64(k + 1)]) + p1, symlut, fctab, symtab, words,
                              wlast, clamp)
        rows[np.uint64(k + 1)] = s
        k += 2
    if k < m:
        x0, s, p0, wp = _step(x0, p0, wp, np.int64(rows[np.uint64(k)]) + p0, symlut, fctab, symtab, words, wlast,
                              clamp)
        rows[np.uint64(k)] = s
    return x0, x1, p0, p1, wp


@njit(cache=True, inline="always")
def _raw_loop(syms, m, symtab, raw_words, rp, rlim, bits, u, clamp):
    for k in range(m):
        st = symtab[np.uint64(syms[np.uint64(k)])]
        nb = (st >> 16) & 0x3F
        q = rp + (bits >> 5)
        two = _load_u64(raw_words, min(q, rlim) if clamp else q)
        u[np.uint64(k)] = np.uint32((st >> 22) | ((two >> (bits & 31)) & ((np.int64(1) << nb) - 1)))
        bits += nb
    return bits


@njit(cache=True, nogil=True)
def _raw(syms, m, symtab, raw_words, rp, rlim, bits, u):
    """``u[k]`` (the zig-zagged delta) of the block's symbols ``syms[0:m]``: the symbol's value bits and its raw bits,
    read at bit ``bits`` of the chunk's raw stream (from word ``rp``); returns the bits consumed so far. The two
    words read are clamped to ``rlim + 1`` (``len(raw_words) - 1``) unless the block cannot reach it (at most 30 raw
    bits per element): no branch, no out-of-bounds read; a stream that needs a word past its end fails the chunk's
    end check."""
    if rp + ((bits + 30 * m) >> 5) <= rlim:
        return _raw_loop(syms, m, symtab, raw_words, rp, rlim, bits, u, False)
    return _raw_loop(syms, m, symtab, raw_words, rp, rlim, bits, u, True)


@njit(cache=True, nogil=True)
def _values(r_bits, b, m, u, out):
    """``out[b + k] = ord(wrap(ord(ref) + unzigzag(u[k])))``, ``k < m`` (vectorized)."""
    width = out.itemsize * 8
    low = (np.int64(1) << (width - 1)) - 1
    ref = r_bits[b : b + m]
    dst = out[b : b + m]
    for k in range(m):
        uk = np.int64(u[k])
        v = _ordinal(np.int64(ref[k]), width) + ((uk >> 1) ^ -(uk & 1))
        # ord(wrap(v)) on the low ``width`` bits that are stored: the wrap's sign is bit width - 1 of v
        dst[k] = v ^ (((v << (64 - width)) >> 63) & low)


@njit(cache=True, nogil=True)
def _bad_bounds(c, word_start, raw_start, wlast, rlast):
    """Whether chunk ``c``'s word or raw range lies outside its stream (status 1)."""
    wp, wend, rp, rend = word_start[c], word_start[c + 1], raw_start[c], raw_start[c + 1]
    return wp < 0 or wend > wlast or wp > wend or rp < 0 or rend > rlast or rp > rend


@njit(cache=True, nogil=True)
def _end_status(x0, x1, wp, bits, c, word_start, raw_start):
    """0 if the chunk ended as encoded (both lanes on the initial state, every word and raw word used: the encoder
    wrote ``ceil(bits / 32)`` raw words), else 4."""
    ok = x0 == STATE_LOW and x1 == STATE_LOW and wp == word_start[c + 1]
    return 0 if ok and raw_start[c] + ((bits + 31) >> 5) == raw_start[c + 1] else 4


@njit(cache=True, nogil=True)
def _spare_raw(raw_words):
    """The raw stream, or two zero words if it has fewer than two (a tensor without raw bits): :func:`_raw` reads
    two words at a time."""
    return raw_words if raw_words.shape[0] >= 2 else np.zeros(2, np.uint32)


@njit(cache=True, nogil=True)
def _decode_chunk(c, r_bits, out, width, exp_shift, exp_mask, chunk, ctxtab, symlut, fctab, symtab, words,
                  word_start, states, raw_words, raw_start):
    """Decode chunk ``c`` alone (two chains); returns its status: 0 when it consumed exactly its words and raw bits
    and both lanes ended on the initial state, 1 when its stream bounds are wrong, 4 when it did not end as
    encoded. :func:`_decode_pair` decodes two full chunks at once (the common case).

    Per block of :data:`BLOCK` elements, three passes: the context rows (vectorized), the rANS chains alone
    (:func:`_entropy2`: the loop-carried latency), then the raw bits and the values (:func:`_raw`, :func:`_values`,
    no loop-carried state but a bit position). Indices are unsigned (no negative-index code); every read is clamped
    or provably inside its array, so a corrupt chunk cannot read or write out of bounds.
    """
    n = r_bits.shape[0]
    wlast = words.shape[0] - 1
    if _bad_bounds(c, word_start, raw_start, wlast, raw_words.shape[0] - 1):
        return 1
    raw = _spare_raw(raw_words)
    rlim = raw.shape[0] - 2
    lo = c * chunk
    hi = min(lo + chunk, n)
    wp = word_start[c]
    rp = raw_start[c]
    x0 = np.int64(states[c, 0])
    x1 = np.int64(states[c, 1])
    p0 = symtab[0] & 0xFFFF
    p1 = p0
    rows = np.empty(BLOCK, np.int32)
    u = np.empty(BLOCK, np.uint32)
    bits = np.int64(0)
    for b in range(lo, hi, BLOCK):
        m = min(BLOCK, hi - b)
        _rows(r_bits, b, m, exp_shift, exp_mask, ctxtab, rows, 0)
        if wp + m <= wlast:
            x0, x1, p0, p1, wp = _entropy2(m, rows, symlut, fctab, symtab, words, wlast, x0, x1, p0, p1, wp, False)
        else:
            x0, x1, p0, p1, wp = _entropy2(m, rows, symlut, fctab, symtab, words, wlast, x0, x1, p0, p1, wp, True)
        bits = _raw(rows, m, symtab, raw, rp, rlim, bits, u)
        _values(r_bits, b, m, u, out)
    return _end_status(x0, x1, wp, bits, c, word_start, raw_start)


@njit(cache=True, nogil=True)
def _decode_pair(c, r_bits, out, width, exp_shift, exp_mask, chunk, ctxtab, symlut, fctab, symtab, words,
                 word_start, states, raw_words, raw_start):
    """Decode chunks ``c`` and ``c + 1``, both full and ``chunk`` even; their statuses as :func:`_decode_chunk`
    gives them. The two chunks' rANS chains run interleaved (:func:`_entropy4`)."""
    wlast = words.shape[0] - 1
    rlast = raw_words.shape[0] - 1
    if _bad_bounds(c, word_start, raw_start, wlast, rlast) or _bad_bounds(c + 1, word_start, raw_start, wlast, rlast):
        return (_decode_chunk(c, r_bits, out, width, exp_shift, exp_mask, chunk, ctxtab, symlut, fctab, symtab, words,
                              word_start, states, raw_words, raw_start),
                _decode_chunk(c + 1, r_bits, out, width, exp_shift, exp_mask, chunk, ctxtab, symlut, fctab, symtab,
                              words, word_start, states, raw_words, raw_start))
    raw = _spare_raw(raw_words)
    rlim = raw.shape[0] - 2
    lo = c * chunk
    wp = word_start[c]
    wq = word_start[c + 1]
    x0 = np.int64(states[c, 0])
    x1 = np.int64(states[c, 1])
    x2 = np.int64(states[c + 1, 0])
    x3 = np.int64(states[c + 1, 1])
    p0 = symtab[0] & 0xFFFF
    p1 = p0
    p2 = p0
    p3 = p0
    rows = np.empty(2 * BLOCK, np.int32)
    u = np.empty(BLOCK, np.uint32)
    bits = np.int64(0)
    bits2 = np.int64(0)
    for b in range(lo, lo + chunk, BLOCK):
        m = min(BLOCK, lo + chunk - b)
        _rows(r_bits, b, m, exp_shift, exp_mask, ctxtab, rows, 0)
        _rows(r_bits, b + chunk, m, exp_shift, exp_mask, ctxtab, rows, BLOCK)
        if max(wp, wq) + m <= wlast:
            x0, x1, x2, x3, p0, p1, p2, p3, wp, wq = _entropy4(m, rows, symlut, fctab, symtab, words, wlast, x0, x1, x2,
                                                               x3, p0, p1, p2, p3, wp, wq, False)
        else:
            x0, x1, x2, x3, p0, p1, p2, p3, wp, wq = _entropy4(m, rows, symlut, fctab, symtab, words, wlast, x0, x1, x2,
                                                               x3, p0, p1, p2, p3, wp, wq, True)
        bits = _raw(rows, m, symtab, raw, raw_start[c], rlim, bits, u)
        _values(r_bits, b, m, u, out)
        bits2 = _raw(rows[BLOCK:], m, symtab, raw, raw_start[c + 1], rlim, bits2, u)
        _values(r_bits, b + chunk, m, u, out)
    return (_end_status(x0, x1, wp, bits, c, word_start, raw_start),
            _end_status(x2, x3, wq, bits2, c + 1, word_start, raw_start))


@njit(cache=True, nogil=True)
def _pairable(c, n_chunks, chunk, n):
    """Whether chunks ``c`` and ``c + 1`` are both full and ``chunk`` is even (:func:`_decode_pair`)."""
    return c + 1 < n_chunks and (c + 2) * chunk <= n and chunk % 2 == 0


@njit(cache=True, parallel=True)
def rans_decode(r_bits, out, width, exp_shift, exp_mask, chunk, ctxtab, symlut, fctab, symtab, words, word_start,
                states, raw_words, raw_start, status):
    """Decode every chunk into ``out`` (bit patterns of the out dtype), chunks in parallel; ``status[c]`` as
    :func:`_decode_chunk` returns it. The tables are :func:`tpde_hf.reference.codec.decode_tables`'."""
    nk = status.shape[0]
    for q in prange((nk + 1) // 2):
        c = 2 * q
        if _pairable(c, nk, chunk, r_bits.shape[0]):
            status[c], status[c + 1] = _decode_pair(c, r_bits, out, width, exp_shift, exp_mask, chunk, ctxtab, symlut,
                                                    fctab, symtab, words, word_start, states, raw_words, raw_start)
        else:
            for k in range(c, min(c + 2, nk)):
                status[k] = _decode_chunk(k, r_bits, out, width, exp_shift, exp_mask, chunk, ctxtab, symlut, fctab,
                                          symtab, words, word_start, states, raw_words, raw_start)


@njit(cache=True, nogil=True)
def rans_decode_serial(r_bits, out, width, exp_shift, exp_mask, chunk, ctxtab, symlut, fctab, symtab, words,
                       word_start, states, raw_words, raw_start, status):
    """:func:`rans_decode` on this thread, without the GIL: small tensors, where waking the thread pool costs more
    than it saves (tens of milliseconds on a busy machine), and tensors decoded one call each (``ref-sparse``'s
    values; a load decodes its ``ref-ord`` tensors through :func:`decode_units`)."""
    nk = status.shape[0]
    c = 0
    while c < nk:
        if _pairable(c, nk, chunk, r_bits.shape[0]):
            status[c], status[c + 1] = _decode_pair(c, r_bits, out, width, exp_shift, exp_mask, chunk, ctxtab, symlut,
                                                    fctab, symtab, words, word_start, states, raw_words, raw_start)
            c += 2
        else:
            status[c] = _decode_chunk(c, r_bits, out, width, exp_shift, exp_mask, chunk, ctxtab, symlut, fctab, symtab,
                                      words, word_start, states, raw_words, raw_start)
            c += 1


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
    u = lo
    while u < hi:
        j = unit_job[u]
        c = unit_chunk[u]
        n = jobs[j, J_N]
        nk = jobs[j, J_NCHUNKS]
        chunk = jobs[j, J_CHUNK]
        nctx = jobs[j, J_NCTX]
        emask = jobs[j, J_EMASK]
        ctx = carray(_voidptr(jobs[j, J_CTX]), emask + 4, np.int64)
        lut = carray(_voidptr(jobs[j, J_SYMLUT]), nctx << 12, np.uint8)
        fc = carray(_voidptr(jobs[j, J_FC]), nctx * 128, np.int32)
        sym = carray(_voidptr(jobs[j, J_SYM]), 128, np.int64)
        words = carray(_voidptr(jobs[j, J_WORDS]), jobs[j, J_NWORDS] + 1, np.uint16)
        raw = carray(_voidptr(jobs[j, J_RAW]), jobs[j, J_NRAW] + 1, np.uint32)
        ws = carray(_voidptr(jobs[j, J_WSTART]), nk + 1, np.int64)
        rs = carray(_voidptr(jobs[j, J_RSTART]), nk + 1, np.int64)
        st = carray(_voidptr(jobs[j, J_STATES]), (nk, LANES), np.int64)
        # the next unit is this tensor's next chunk (units are in load order): decode both at once
        pair = u + 1 < hi and unit_job[u + 1] == j and unit_chunk[u + 1] == c + 1 and _pairable(c, nk, chunk, n)
        if jobs[j, J_WIDTH] == 16:
            rb = carray(_voidptr(jobs[j, J_REF]), n, np.int16)
            ob = carray(_voidptr(jobs[j, J_OUT]), n, np.int16)
            if pair:
                status[u], status[u + 1] = _decode_pair(c, rb, ob, 16, jobs[j, J_SHIFT], emask, chunk, ctx, lut, fc,
                                                        sym, words, ws, st, raw, rs)
            else:
                status[u] = _decode_chunk(c, rb, ob, 16, jobs[j, J_SHIFT], emask, chunk, ctx, lut, fc, sym, words, ws,
                                          st, raw, rs)
        else:
            rb32 = carray(_voidptr(jobs[j, J_REF]), n, np.int32)
            ob32 = carray(_voidptr(jobs[j, J_OUT]), n, np.int32)
            if pair:
                status[u], status[u + 1] = _decode_pair(c, rb32, ob32, 32, jobs[j, J_SHIFT], emask, chunk, ctx, lut,
                                                        fc, sym, words, ws, st, raw, rs)
            else:
                status[u] = _decode_chunk(c, rb32, ob32, 32, jobs[j, J_SHIFT], emask, chunk, ctx, lut, fc, sym, words,
                                          ws, st, raw, rs)
        u += 2 if pair else 1
