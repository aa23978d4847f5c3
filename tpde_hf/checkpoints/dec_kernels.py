"""The restore-side decoder of ``ckpt-delta``: the same stream as :func:`kernels.decode_chunks`, in fewer cycles.

:func:`kernels._decode_chunk` stays the reference (the pack-time verify decodes with it). This one reads the
same bytes and gives the same bit patterns and the same ``bad`` flags, faster. A chunk is decoded block by
block (:data:`BLOCK` elements, every per-block buffer in cache), each block in four passes:

* **inputs**: the block's context buckets and float32 prediction, formed in cache from the tensors they come
  from (a *recipe*: given arrays, or Adam's features computed on the spot, see below), so no tensor-sized
  feature, context or prediction array is ever written and read back;
* **entropy**: only the four interleaved rANS states (in registers; one table entry per (context, slot) holds
  what a step needs, so a step is one load; renormalisation a select, not a branch); each element's table entry
  goes to a block buffer. Where the symbols fit in 8 bits (the ordinal mode) the entry is 32-bit
  (:func:`slot_table32`: ``f - 1``, ``slot - cum``, the symbol), so a 32-context table is 512 KiB and stays in
  a 1 MiB L2 beside the block buffers; else 64-bit (:func:`slot_table`: also the raw bit count and the
  symbol's high bits);
* **raw bits**: each element's raw bits read at its own bit offset (a running sum of the bit counts: no serial
  bit-buffer chain beside the rANS chains), joined to the symbol's high bits (from the 64-bit entry, or the
  32-bit entry's symbol through a 256-entry table);
* **values**: the prediction plus the ordinal / zig-zag (or sign-flip) arithmetic, independent per element,
  so LLVM vectorises it (AVX-512 where present).

Recipes (:data:`RECIPE_BITS` ... :data:`RECIPE_W`): the prediction's bit patterns given; a float32 prediction
``c0 * ref + c1 * f1 + c2 * f2`` from given features; and the three of
:func:`tpde_hf.checkpoints.predict.options`, computed per block from the tensors they read, with the same
correctly rounded float32 operations in the same order as ``predict`` / ``enc_kernels``: ``exp_avg`` (context
``exponent(v0) // 2``), ``exp_avg_sq`` (feature ``m * m``, context ``exponent(m * m) - exponent(ref)``) and a
weight (features ``m / (sqrt(v) + eps)`` of both checkpoints, context ``exponent(w0)`` or special where
``v1 == 0``). No fused multiply-add (numba sets no fast-math flags); numpy's error model only drops the
zero-division branch, which kept the ratio loop scalar (``sqrt(v) + eps`` is never 0); the loops index the
block's slices from 0, since an index ``s + j`` kept numba's negative-index select and with it the loops
scalar (3-6x slower). Contexts are bucketed as
:func:`kernels.buckets_into`. A prediction made by arithmetic that is NaN is counted and the caller then decodes
that tensor through numpy's prediction instead (x86 passes an operand's NaN payload on, and the operand order
of a compiled add is not pinned down).

Every read is clamped into its array or provably inside it (a chunk whose start leaves room for one rANS word
per element reads those unclamped; raw-bit reads are always clamped), so a corrupt payload never reads out of
bounds; the end check compares the raw bits consumed with the chunk's word count (``ceil(bits / 32)``), which
is what the reference's ``bp == bit_start[c + 1]`` means.

Each thread's block buffers are made once and reused by every call on that thread (made per chunk, their pages
were faulted in again and again).

Measured on the MiniLM checkpoints (checkpoint-100 against 120, one thread, CPU time, load about 2.5): the
largest ``exp_avg`` / ``exp_avg_sq`` / weight 4.97 / 4.99 / 5.87 ns per element (previously 6.4 / 8.5 / 11.9);
of the weight's 5.87 the inputs pass (two ratios, context, prediction) takes 1.47, the rANS steps 2.1, the raw
bits 1.5. The rANS steps are latency-bound (four chains, a table load each); memory traffic is far from the
machine's 20 GB/s per core. Not kept (measured): the raw bits read inside the rANS steps (+7%), a two-pass raw
bits loop (offsets, then the reads: +10%).

Example::

    tab, sym = table(freq, MODE_ORD, 23)
    bad, nan = decode_f32(ref, f1, f2, coef, ctx, tab, states, ws, words, bs, bitwords, MODE_ORD, 1 << 15, out,
                          parallel=True, sym=sym)
"""

from __future__ import annotations

import threading

import numpy as np
from numba import njit, prange

from tpde_hf.checkpoints.kernels import ADAM_EPS, LANES, PROB_BITS, STATE_LOW
from tpde_hf.codec.compiled_kernels import _ordinal, _wrap

_SLOTS = 1 << PROB_BITS
_MASK32 = np.int64(0xFFFFFFFF)
#: elements per block: long enough runs of each input for the hardware prefetcher (1024: +20% time on the
#: fp32 path), the block buffers (about 340 KiB) still in L2 beside the hot table rows
BLOCK = 16384
SPECIAL = -1000  # codec.SPECIAL: a context at or below it is bucket 0 (a parameter no gradient touched)
#: recipes: prediction bits given; float32 prediction from given features; Adam's exp_avg, exp_avg_sq, weight
RECIPE_BITS, RECIPE_F32, RECIPE_M, RECIPE_V, RECIPE_W = range(5)
#: symbols a compact (32-bit) table entry can name
SYMS32 = 256
assert LANES == 4  # the entropy loop is unrolled by four


@njit(cache=True, nogil=True)
def slot_table(freq, mode, mant_bits):
    """Per (context, slot): ``hib | f << 32 | (slot - cum) << 45 | nr << 57`` (int64, bit 63 clear).

    ``f`` the symbol's frequency (1..4096), ``nr`` its raw bit count, ``hib`` its value above the raw bits
    (``kernels.symbolize``'s inverse). ``freq``: ``[n_ctx, nsym]`` rows summing to 4096 (checked by the caller).
    """
    n_ctx, nsym = freq.shape
    tab = np.zeros(n_ctx * _SLOTS, np.int64)
    for k in range(n_ctx):
        pos = np.int64(0)
        for s in range(nsym):
            f = np.int64(freq[k, s])
            if mode == 0:
                if s < 4:
                    nr = np.int64(0)
                    hib = np.int64(s)
                else:
                    nr = np.int64((s - 4) // 4)
                    hib = np.int64(4 | ((s - 4) & 3)) << nr
            else:
                nr = np.int64(mant_bits)
                hib = np.int64(s) << mant_bits
            for b in range(f):
                if pos + b < _SLOTS:
                    tab[k * _SLOTS + pos + b] = hib | (f << 32) | (np.int64(b) << 45) | (nr << 57)
            pos += f
    return tab


@njit(cache=True, nogil=True)
def _sym_entry(s, mode, mant_bits):
    """Symbol ``s``'s value above its raw bits and its raw bit count: ``hib | nr << 57``
    (``kernels.symbolize``'s inverse)."""
    if mode == 0:
        if s < 4:
            return np.int64(s)
        nr = np.int64((s - 4) // 4)
        return (np.int64(4 | ((s - 4) & 3)) << nr) | (nr << 57)
    return (np.int64(s) << mant_bits) | (np.int64(mant_bits) << 57)


@njit(cache=True, nogil=True)
def slot_table32(freq, mode, mant_bits):
    """The compact table of :func:`table` (at most :data:`SYMS32` symbols): per (context, slot)
    ``(f - 1) | (slot - cum) << 12 | s << 24`` (uint32), half the bytes of :func:`slot_table`, so a 32-context
    table (512 KiB) stays in a 1 MiB L2 beside the block buffers; and per symbol ``hib | nr << 57``
    (:data:`SYMS32` entries, the symbol's value bits above its raw bits and its raw bit count)."""
    n_ctx, nsym = freq.shape
    tab = np.zeros(n_ctx * _SLOTS, np.uint32)
    for k in range(n_ctx):
        pos = np.int64(0)
        for s in range(nsym):
            f = np.int64(freq[k, s])
            for b in range(f):
                if pos + b < _SLOTS:
                    tab[k * _SLOTS + pos + b] = np.uint32((f - 1) | (np.int64(b) << 12) | (np.int64(s) << 24))
            pos += f
    sym = np.zeros(SYMS32, np.int64)
    for s in range(min(nsym, SYMS32)):
        sym[s] = _sym_entry(s, mode, mant_bits)
    return tab, sym


def table(freq: np.ndarray, mode: int, mant_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """``(tab, sym)`` for the decoders: the compact 32-bit table where the symbols fit in 8 bits (the ordinal
    mode), else :func:`slot_table` (int64; ``sym`` then unused). ``freq``: checked rows summing to 4096."""
    if freq.shape[1] <= SYMS32:
        return slot_table32(freq, mode, mant_bits)
    return slot_table(freq, mode, mant_bits), _NONE_I64


@njit(cache=True, nogil=True)
def _start(c, states):
    x0, x1, x2, x3 = states[c, 0], states[c, 1], states[c, 2], states[c, 3]
    if min(min(x0, x1), min(x2, x3)) < STATE_LOW or max(max(x0, x1), max(x2, x3)) >= (np.int64(1) << 32):
        low = np.int64(STATE_LOW)
        return 1, low, low, low, low
    return 0, x0, x1, x2, x3


@njit(cache=True, nogil=True, inline="always")
def _step(j, x, cb, cbase, tab, wp, wlim, words, ebuf, clamp):
    """Element ``j`` of the block (context ``cb[cbase + j]``) with rANS state ``x``: its table entry into
    ``ebuf[j]``; returns the new state and word pointer. Only the rANS chain: raw bits are read by :func:`_raw`."""
    e = tab[np.uint64((np.int64(cb[np.uint64(cbase + j)]) << PROB_BITS) | (x & (_SLOTS - 1)))]
    x = ((e >> 32) & 0x1FFF) * (x >> PROB_BITS) + ((e >> 45) & 0xFFF)
    need = np.int64(x < STATE_LOW)  # renormalise by a select: the branch was unpredictable
    x = (x << (need << 4)) | (np.int64(words[np.uint64(min(wp, wlim) if clamp else wp)]) & -need)
    ebuf[np.uint64(j)] = e
    return x, wp + need


@njit(cache=True, nogil=True, inline="always")
def _step32(j, x, cb, cbase, tab, wp, wlim, words, ebuf, clamp):
    """:func:`_step` with a :func:`slot_table32` entry (``ebuf`` uint32)."""
    e = np.int64(tab[np.uint64((np.int64(cb[np.uint64(cbase + j)]) << PROB_BITS) | (x & (_SLOTS - 1)))])
    x = ((e & 0xFFF) + 1) * (x >> PROB_BITS) + ((e >> 12) & 0xFFF)
    need = np.int64(x < STATE_LOW)
    x = (x << (need << 4)) | (np.int64(words[np.uint64(min(wp, wlim) if clamp else wp)]) & -need)
    ebuf[np.uint64(j)] = e
    return x, wp + need


@njit(cache=True, nogil=True)
def _raw32(ebuf, m, off, bw, blim, ubuf, sym):
    """:func:`_raw` for :func:`slot_table32` entries: the symbol's bits and raw bit count from ``sym``."""
    for j in range(m):
        e = sym[np.uint64(ebuf[j] >> 24)]  # ebuf holds table entries: s < SYMS32 == sym.shape[0]
        nr = e >> 57
        wi = off >> 5
        two = np.int64(bw[np.uint64(min(wi, blim))]) | (np.int64(bw[np.uint64(min(wi + 1, blim))]) << 32)
        ubuf[j] = (e & _MASK32) | ((two >> (off & 31)) & ((np.int64(1) << nr) - 1))
        off += nr
    return off


@njit(cache=True, nogil=True)
def _raw(ebuf, m, off, bw, blim, ubuf):
    """Each element's value bits above the prediction (symbol high bits | raw bits) into ``ubuf``: the raw
    bits sit at bit ``off`` (a running sum of the bit counts, no serial bit buffer) of the chunk's bit words
    ``bw``, read from the two words there (clamped to ``blim``). Returns the new offset."""
    for j in range(m):
        e = ebuf[j]
        nr = e >> 57
        wi = off >> 5
        two = np.int64(bw[np.uint64(min(wi, blim))]) | (np.int64(bw[np.uint64(min(wi + 1, blim))]) << 32)
        ubuf[j] = (e & _MASK32) | ((two >> (off & 31)) & ((np.int64(1) << nr) - 1))
        off += nr
    return off


@njit(cache=True, nogil=True, inline="always")
def _bucket(v, lo, n_ctx):
    """:func:`kernels.buckets_into` of one context value."""
    return 0 if v <= SPECIAL or n_ctx == 1 else min(max(v - lo, 1), max(1, n_ctx - 1))


@njit(cache=True, nogil=True)
def _base(kind, R, m, c0, pbuf):
    """Where ``codec.predict`` starts, into ``pbuf[:m]``: 0 zeros, 1 the reference, 2 ``ref * c0`` (``R``: the
    block's slice)."""
    if kind == 0:
        for j in range(m):
            pbuf[j] = np.float32(0.0)
    elif kind == 1:
        for j in range(m):
            pbuf[j] = R[j]
    else:
        for j in range(m):
            pbuf[j] = R[j] * c0


@njit(cache=True, nogil=True, error_model="numpy")  # no zero-division branch: the ratio loops vectorise
def _inputs(recipe, s, m, R, Ri, A, B, C, Dd, coef, kind, lo, n_ctx, cbuf, pbuf, fbuf):
    """The inputs of block ``s:s + m`` by ``recipe``: context buckets into ``cbuf`` (Adam recipes) and the
    float32 prediction into ``pbuf`` (all but :data:`RECIPE_BITS`). Returns the number of NaN predictions made
    by arithmetic (a prediction that is the reference itself, or zeros, is exact whatever it holds).

    ``codec.predict``'s order: the start, then ``+ c1 * f1``, then ``+ c2 * f2``, each term a loop of its own
    (simple loops vectorise; a condition inside one kept the square roots and divisions scalar). ``recipe``
    is a run-time value: each branch is self-contained, so the types a branch infers for arrays it is not
    meant for never reach another branch's float32 arithmetic."""
    c0, c1, c2, eps = coef[0], coef[1], coef[2], coef[3]
    if recipe == RECIPE_BITS:
        return 0
    # the block's slices: indexed from 0 by the loop counter, LLVM sees every index is >= 0 and drops numba's
    # negative-index select, so these loops vectorise (indexed by ``s + j`` they ran 3-6x slower)
    e = s + m
    Rb, Rib, Ab, Bb, Cb, Db = R[s:e], Ri[s:e], A[s:e], B[s:e], C[s:e], Dd[s:e]
    _base(kind, Rb, m, c0, pbuf)
    if recipe == RECIPE_M:  # context exponent(v0) // 2 (A: v0's bit patterns); no features
        for j in range(m):
            cbuf[j] = _bucket(((np.int64(Ab[j]) >> 23) & 0xFF) >> 1, lo, n_ctx)
    elif recipe == RECIPE_V:  # feature m * m (A: m), context exponent(m * m) - exponent(ref)
        fbi = fbuf.view(np.int32)
        for j in range(m):
            fbuf[j] = Ab[j] * Ab[j]
        for j in range(m):
            cbuf[j] = _bucket(((np.int64(fbi[j]) >> 23) & 0xFF) - ((np.int64(Rib[j]) >> 23) & 0xFF), lo, n_ctx)
        if c1 != 0:
            for j in range(m):
                pbuf[j] = pbuf[j] + c1 * fbuf[j]
    elif recipe == RECIPE_W:  # context exponent(w0), special where v1 == 0; features m / (sqrt(v) + eps)
        for j in range(m):
            cbuf[j] = _bucket(SPECIAL if Bb[j] == 0 else (np.int64(Rib[j]) >> 23) & 0xFF, lo, n_ctx)
        if c1 != 0:  # enc_kernels.ratio_f32's operations, then codec.predict's
            for j in range(m):
                pbuf[j] = pbuf[j] + c1 * (Ab[j] / (np.sqrt(Bb[j]) + eps))
        if c2 != 0:
            for j in range(m):
                pbuf[j] = pbuf[j] + c2 * (Cb[j] / (np.sqrt(Db[j]) + eps))
    else:  # RECIPE_F32: given features
        if c1 != 0:
            for j in range(m):
                pbuf[j] = pbuf[j] + c1 * Ab[j]
        if c2 != 0:
            for j in range(m):
                pbuf[j] = pbuf[j] + c2 * Bb[j]
    nan = 0
    if kind == 2 or c1 != 0 or c2 != 0:
        for j in range(m):
            nan += pbuf[j] != pbuf[j]
    return nan


@njit(cache=True, nogil=True)
def _chunk(recipe, c, mode, R, Ri, A, B, C, Dd, G, P, coef, kind, lo_ctx, n_ctx, tab, sym, states, ws, words, bs,
           bitwords, size, out, bufs):
    """Chunk ``c``: ``(bad, NaN predictions)``; ``bufs``: this thread's :func:`_buffers`."""
    st, bad, bw, clamp = _begin(c, states, ws, words, bs, bitwords, out.shape[0], size)
    lo = c * size
    hi = min(out.shape[0], lo + size)
    nan = 0
    for s in range(lo, hi, BLOCK):
        m = min(hi - s, BLOCK)
        if clamp:
            st, k = _block(recipe, s, m, mode, R, Ri, A, B, C, Dd, G, P, coef, kind, lo_ctx, n_ctx, tab, sym, words,
                           bw, st, bufs, out, True)
        else:
            st, k = _block(recipe, s, m, mode, R, Ri, A, B, C, Dd, G, P, coef, kind, lo_ctx, n_ctx, tab, sym, words,
                           bw, st, bufs, out, False)
        nan += k
    return bad | _end(c, st, ws, bs), nan


@njit(cache=True, nogil=True)
def _buffers():
    """One thread's block buffers: buckets, prediction, a feature, value bits, table entries."""
    return (np.empty(BLOCK, np.uint8), np.empty(BLOCK, np.float32), np.empty(BLOCK, np.float32),
            np.empty(BLOCK, np.uint32), np.empty(BLOCK, np.int64))


@njit(cache=True, nogil=True)
def _begin(c, states, ws, words, bs, bitwords, n, size):
    """Chunk ``c``'s start: ``(state, bad, its raw-bit words on, clamp)``; state ``(x0..x3, word pointer, raw
    bits read)``. A rANS step reads at most one word, so a chunk whose start leaves room for one per element
    cannot read past the words, whatever its payload says: it reads them unclamped (``clamp`` False)."""
    bad, x0, x1, x2, x3 = _start(c, states)
    m = min(n, (c + 1) * size) - c * size
    bw = bitwords[min(bs[c], bitwords.shape[0] - 1):]  # never empty: the codec gives at least one word
    return (x0, x1, x2, x3, ws[c], np.int64(0)), bad, bw, ws[c] + m > words.shape[0]


@njit(cache=True, nogil=True)
def _end(c, st, ws, bs):
    """1 unless the chunk ended exactly as encoded: states back at the start value, every word used, and the
    raw bits read filling the chunk's ``ceil(bits / 32)`` raw-bit words."""
    x0, x1, x2, x3, wp, off = st
    ok = x0 == STATE_LOW and x1 == STATE_LOW and x2 == STATE_LOW and x3 == STATE_LOW and wp == ws[c + 1] \
        and (off + 31) // 32 == bs[c + 1] - bs[c]
    return 0 if ok else 1


@njit(cache=True, nogil=True)
def _block(recipe, s, m, mode, R, Ri, A, B, C, Dd, G, P, coef, kind, lo_ctx, n_ctx, tab, sym, words, bw, st, bufs,
           out, clamp):
    """Elements ``s:s + m`` of one chunk: inputs, the entropy pass, raw bits, values into ``out``. Returns the
    chunk's new state and the block's NaN predictions."""
    cbuf, pbuf, fbuf, ubuf, ebuf = bufs
    x0, x1, x2, x3, wp, off = st
    nan = _inputs(recipe, s, m, R, Ri, A, B, C, Dd, coef, kind, lo_ctx, n_ctx, cbuf, pbuf, fbuf)
    given = recipe == RECIPE_BITS or recipe == RECIPE_F32
    cb = G if given else cbuf  # context buckets: given for the whole tensor, else the block's
    cbase = s if given else 0
    if tab.itemsize == 4:  # a slot_table32 (a constant per compiled signature: one branch is kept)
        eb = ebuf.view(np.uint32)
        x0, x1, x2, x3, wp = _entropy32(m, x0, x1, x2, x3, cb, cbase, tab, wp, words, eb, clamp)
        off = _raw32(eb, m, off, bw, bw.shape[0] - 1, ubuf, sym)
    else:
        x0, x1, x2, x3, wp = _entropy(m, x0, x1, x2, x3, cb, cbase, tab, wp, words, ebuf, clamp)
        off = _raw(ebuf, m, off, bw, bw.shape[0] - 1, ubuf)
    if recipe == RECIPE_BITS:
        _values(mode, out.itemsize * 8, ubuf, P[s:s + m], out[s:s + m])
    else:
        _values(mode, out.itemsize * 8, ubuf, pbuf.view(np.int32), out[s:s + m])
    return (x0, x1, x2, x3, wp, off), nan


@njit(cache=True, nogil=True)
def _entropy(m, x0, x1, x2, x3, cb, cbase, tab, wp, words, ebuf, clamp):
    """The block's rANS pass with :func:`slot_table` entries: element ``j + l`` uses state ``l``, four
    independent chains in registers; each element's table entry into ``ebuf``."""
    wlim = words.shape[0] - 1
    j = 0
    while j + LANES <= m:
        x0, wp = _step(j, x0, cb, cbase, tab, wp, wlim, words, ebuf, clamp)
        x1, wp = _step(j + 1, x1, cb, cbase, tab, wp, wlim, words, ebuf, clamp)
        x2, wp = _step(j + 2, x2, cb, cbase, tab, wp, wlim, words, ebuf, clamp)
        x3, wp = _step(j + 3, x3, cb, cbase, tab, wp, wlim, words, ebuf, clamp)
        j += LANES
    if j < m:
        x0, wp = _step(j, x0, cb, cbase, tab, wp, wlim, words, ebuf, clamp)
    if j + 1 < m:
        x1, wp = _step(j + 1, x1, cb, cbase, tab, wp, wlim, words, ebuf, clamp)
    if j + 2 < m:
        x2, wp = _step(j + 2, x2, cb, cbase, tab, wp, wlim, words, ebuf, clamp)
    return x0, x1, x2, x3, wp


@njit(cache=True, nogil=True)
def _entropy32(m, x0, x1, x2, x3, cb, cbase, tab, wp, words, ebuf, clamp):
    """:func:`_entropy` with :func:`slot_table32` entries (``ebuf`` uint32)."""
    wlim = words.shape[0] - 1
    j = 0
    while j + LANES <= m:
        x0, wp = _step32(j, x0, cb, cbase, tab, wp, wlim, words, ebuf, clamp)
        x1, wp = _step32(j + 1, x1, cb, cbase, tab, wp, wlim, words, ebuf, clamp)
        x2, wp = _step32(j + 2, x2, cb, cbase, tab, wp, wlim, words, ebuf, clamp)
        x3, wp = _step32(j + 3, x3, cb, cbase, tab, wp, wlim, words, ebuf, clamp)
        j += LANES
    if j < m:
        x0, wp = _step32(j, x0, cb, cbase, tab, wp, wlim, words, ebuf, clamp)
    if j + 1 < m:
        x1, wp = _step32(j + 1, x1, cb, cbase, tab, wp, wlim, words, ebuf, clamp)
    if j + 2 < m:
        x2, wp = _step32(j + 2, x2, cb, cbase, tab, wp, wlim, words, ebuf, clamp)
    return x0, x1, x2, x3, wp


@njit(cache=True, nogil=True)
def _values(mode, width, ubuf, p, out):
    """``out[k]`` from the value bits ``ubuf[k]`` and the prediction's bits ``p[k]``: independent per element,
    vectorised."""
    if mode == 0:
        for k in range(out.shape[0]):
            u = np.int64(ubuf[k])
            r = (u >> 1) ^ (-(u & 1))
            out[k] = _ordinal(_wrap(_ordinal(np.int64(p[k]), width) + r, width), width)
    else:
        for k in range(out.shape[0]):
            ub = np.int64(ubuf[k]) ^ (np.int64(p[k] < 0) << (width - 1))
            out[k] = ub - ((ub >> (width - 1)) << width)  # sign-extend


@njit(cache=True, nogil=True, parallel=True)
def _run_par(recipe, mode, R, Ri, A, B, C, Dd, G, P, coef, kind, lo_ctx, n_ctx, tab, sym, states, ws, words, bs,
             bitwords, size, out):
    nch = states.shape[0]
    bad = np.zeros(nch, np.int64)
    nan = np.zeros(nch, np.int64)
    for c in prange(nch):
        bad[c], nan[c] = _chunk(recipe, c, mode, R, Ri, A, B, C, Dd, G, P, coef, kind, lo_ctx, n_ctx, tab, sym,
                                states, ws, words, bs, bitwords, size, out, _buffers())
    return bad, nan


@njit(cache=True, nogil=True)
def _run_ser(recipe, mode, R, Ri, A, B, C, Dd, G, P, coef, kind, lo_ctx, n_ctx, tab, sym, states, ws, words, bs,
             bitwords, size, out, bufs):
    nch = states.shape[0]
    bad = np.zeros(nch, np.int64)
    nan = np.zeros(nch, np.int64)
    for c in range(nch):
        bad[c], nan[c] = _chunk(recipe, c, mode, R, Ri, A, B, C, Dd, G, P, coef, kind, lo_ctx, n_ctx, tab, sym,
                                states, ws, words, bs, bitwords, size, out, bufs)
    return bad, nan


_NONE = np.zeros(1, np.float32)
_NONE_I = np.zeros(1, np.int32)
_NONE_U8 = np.zeros(1, np.uint8)
_NONE_I64 = np.zeros(SYMS32, np.int64)
EPS = ADAM_EPS  # predict.EPS, one constant


def _coef4(coef, eps=EPS) -> np.ndarray:
    """``[c0, c1, c2, eps]`` as float32 (missing coefficients 0)."""
    c = np.zeros(4, np.float32)
    c[:min(3, len(coef))] = np.asarray(coef, np.float32)[:3]
    c[3] = eps
    return c


def _sized(n, *arrays) -> None:
    """Every array the loops index by element holds ``n`` elements (the loops do not check)."""
    for x in arrays:
        if x is not None and x.shape[0] != n:
            raise ValueError(f"an input of {x.shape[0]} elements for a tensor of {n}")


_local = threading.local()


def _run(parallel):
    """The chunk loop: in parallel (block buffers per chunk), or on this thread with this thread's block buffers,
    made once and reused by every call: made per chunk, their pages were faulted in again and again (about
    30,000 page faults and 0.1 s of system time per 274 MB link)."""
    if parallel:
        return _run_par
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = _buffers()
    return lambda *args: _run_ser(*args, bufs)


def _sym(tab: np.ndarray, sym: np.ndarray | None) -> np.ndarray:
    """The symbol table to pass with ``tab``: a :func:`slot_table32` needs its own (the raw pass indexes it by
    any entry's top byte, so it must hold :data:`SYMS32` entries); a :func:`slot_table` none."""
    if tab.dtype == np.int64:
        return _NONE_I64
    if tab.dtype != np.uint32 or sym is None or sym.dtype != np.int64 or sym.shape[0] < SYMS32:
        raise ValueError("a 32-bit slot table needs its symbol table (dec_kernels.table)")
    return sym


def decode_bits(p, ctx, tab, states, word_start, words, bit_start, bitwords, mode, width, chunk, out,
                parallel=False, sym=None):
    """:func:`kernels.decode_chunks` with a :func:`slot_table` (or :func:`slot_table32` and its ``sym``): ``p``
    the prediction's bit patterns (the output's width), ``ctx`` the context buckets (each below the table's
    context count); chunks in parallel with ``parallel``. Returns the per-chunk bad flags."""
    if out.itemsize * 8 != width:
        raise ValueError(f"a {width}-bit tensor decoded into {out.dtype}")
    _sized(out.shape[0], p, ctx)
    n = _NONE
    bad, _ = _run(parallel)(RECIPE_BITS, int(mode), n, _NONE_I, n, n, n, n, ctx, p, _coef4(()), 0, 0, 1, tab,
                            _sym(tab, sym), states, word_start, words, bit_start, bitwords, chunk, out)
    return bad


def f32_kind(ref, coef) -> int:
    """How :func:`codec.predict` starts a float32 prediction: 0 zeros, 1 the reference itself, 2 ``ref * c0``."""
    c0 = np.float32(coef[0])
    return 0 if ref is None or c0 == 0 else (1 if c0 == 1 else 2)


def decode_f32(ref, f1, f2, coef, ctx, tab, states, word_start, words, bit_start, bitwords, mode, chunk, out,
               parallel=False, sym=None):
    """Decode a float32 tensor (``out`` int32), its prediction formed block by block: ``ref`` (None: zeros),
    ``coef`` float32 ``[c0, c1, c2]`` (an absent feature: coefficient 0, ``f`` None). Returns
    ``(bad flags, NaN predictions)``; with NaNs the caller decodes with numpy's prediction instead."""
    c4 = _coef4(coef)
    if (f1 is None and c4[1] != 0) or (f2 is None and c4[2] != 0):
        raise ValueError("a feature coefficient without its feature")
    _sized(out.shape[0], ref, f1, f2, ctx)
    none = _NONE
    bad, nan = _run(parallel)(RECIPE_F32, int(mode), none if ref is None else ref, _NONE_I,
                              none if f1 is None else f1, none if f2 is None else f2, none, none, ctx, _NONE_I, c4,
                              f32_kind(ref, coef), 0, 1, tab, _sym(tab, sym), states, word_start, words, bit_start,
                              bitwords, chunk, out)
    return bad, int(nan.sum())


def decode_adam(recipe, ref, a, b, c, d, coef, lo_ctx, n_ctx, tab, states, word_start, words, bit_start, bitwords,
                mode, chunk, out, parallel=False, sym=None):
    """Decode a float32 tensor whose context and features are Adam's (:mod:`~tpde_hf.checkpoints.predict`),
    computed block by block from the float32 tensors they come from (``ref``: the same tensor one checkpoint
    away; ``lo_ctx``, ``n_ctx``: the stored bucketing, ``n_ctx`` the table's context count):

    * :data:`RECIPE_M` (``exp_avg``): ``a`` the neighbour's ``exp_avg_sq``, no feature;
    * :data:`RECIPE_V` (``exp_avg_sq``): ``a`` the ``exp_avg`` whose square is the feature;
    * :data:`RECIPE_W` (a weight): ``a, b, c, d`` = ``m1, v1, m0, v0``.

    Unused arrays may be None; ``tab``: a :func:`slot_table`, or a :func:`slot_table32` with its ``sym``.
    Returns ``(bad flags, NaN predictions)`` as :func:`decode_f32`.
    """
    need = {RECIPE_M: (a,), RECIPE_V: (a,), RECIPE_W: (a, b, c, d)}.get(recipe)
    c4 = _coef4(coef)
    if need is None or any(x is None or x.dtype != np.float32 for x in (ref, *need)) or tab.shape[0] < n_ctx << 12:
        raise ValueError(f"recipe {recipe}: float32 inputs and a table of {n_ctx} contexts expected")
    if recipe != RECIPE_W and c4[2] != 0 or recipe == RECIPE_M and c4[1] != 0:
        raise ValueError("a feature coefficient without its feature")
    _sized(out.shape[0], ref, *need)
    none = _NONE
    ai = a.view(np.int32) if recipe == RECIPE_M else a
    bad, nan = _run(parallel)(int(recipe), int(mode), ref, ref.view(np.int32), ai, none if b is None else b,
                              none if c is None else c, none if d is None else d, _NONE_U8, _NONE_I, c4,
                              f32_kind(ref, coef), int(lo_ctx), int(n_ctx), tab, _sym(tab, sym), states, word_start,
                              words, bit_start, bitwords, chunk, out)
    return bad, int(nan.sum())

