"""The restore-side decoder of ``ckpt-delta``: the same stream as :func:`kernels.decode_chunks`, in fewer cycles.

:func:`kernels._decode_chunk` stays the reference (the pack-time verify decodes with it). This one reads the
same bytes and gives the same bit patterns and the same ``bad`` flags, faster:

* one 64-bit table entry per (context, slot) holds everything a rANS step needs (frequency, ``slot - cum``,
  raw bit count, the symbol's high bits), so a step is one load instead of three dependent ones;
* the four interleaved rANS states live in registers (the loop is unrolled by :data:`~kernels.LANES`), and
  array indices are unsigned (numba then emits no negative-index wraparound);
* renormalisation and the raw-bit refill are selects, not branches (they were unpredictable);
* for float32 the prediction ``c0 * ref + c1 * f1 + c2 * f2`` is formed chunk by chunk into a chunk-sized
  scratch buffer that stays in cache (the same correctly rounded operations in the same order as
  ``codec.predict``; no fused multiply-add: numba sets no fast-math flags), so no tensor-sized prediction is
  written and read back. NaN predictions are counted and the caller then decodes that tensor with numpy's
  prediction instead (x86 passes an operand's NaN payload on, and the operand order of a compiled add is not
  pinned down);
* a chunk whose start leaves room for one word of each stream per element cannot read past the arrays, so it
  runs a loop without clamps (one of four loops: two modes, clamped or not, built by :func:`_make`).

Measured on the MiniLM checkpoints (word-embedding weight, ``exp_avg``, ``exp_avg_sq``; one thread, CPU time,
prediction given): 5.2 / 6.2 / 5.7 ns per element against the reference's 11.0 / 7.1 / 10.6. With both cores busy
the gain shrinks (the two vCPUs share execution resources): about 20% less CPU per link in a whole decode.

Every read is clamped into its array or provably inside it, so a corrupt payload never reads out of bounds; the
raw-bit reader reads ahead, so its end check compares the bits consumed with the chunk's word count
(``ceil(bits / 32)``), which is what the reference's ``bp == bit_start[c + 1]`` means.

Example::

    tab = slot_table(freq, MODE_ORD, 23)
    bad, nan = decode_f32(ref, f1, f2, coef, ctx, tab, states, ws, words, bs, bitwords, MODE_ORD, 1 << 15, out,
                          parallel=True)
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from tpde_hf.checkpoints.kernels import LANES, PROB_BITS, STATE_LOW
from tpde_hf.codec.compiled_kernels import _ordinal, _wrap

_SLOTS = 1 << PROB_BITS
_MASK32 = np.int64(0xFFFFFFFF)
assert LANES == 4  # the loop below is unrolled by four


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
def _end(c, x0, x1, x2, x3, wp, bp, nacc, word_start, bit_start):
    """1 unless the chunk ended exactly as encoded (states back at the start value, every word used)."""
    used = (bp - bit_start[c]) * 32 - nacc  # raw bits consumed; the encoder wrote ceil(used / 32) words
    ok = x0 == STATE_LOW and x1 == STATE_LOW and x2 == STATE_LOW and x3 == STATE_LOW and wp == word_start[c + 1] \
        and (used + 31) // 32 == bit_start[c + 1] - bit_start[c]
    return 0 if ok else 1


@njit(cache=True, nogil=True)
def _start(c, states):
    x0, x1, x2, x3 = states[c, 0], states[c, 1], states[c, 2], states[c, 3]
    if min(min(x0, x1), min(x2, x3)) < STATE_LOW or max(max(x0, x1), max(x2, x3)) >= (np.int64(1) << 32):
        low = np.int64(STATE_LOW)
        return 1, low, low, low, low
    return 0, x0, x1, x2, x3


@njit(cache=True, nogil=True)
def _elem(i, x, p, pi, ctx, tab, wp, wlim, words, acc, nacc, bp, blim, bitwords, out, mode, clamp):
    """Element ``i`` with rANS state ``x``: the new state, word pointer and bit reader. ``mode`` and ``clamp``
    are constants of the calling :func:`_make` loop (folded once inlined); with ``clamp`` every read is clamped
    to ``wlim``/``blim`` (``len - 1``). The width is the output's (a compile-time constant)."""
    width = out.itemsize * 8
    e = tab[np.uint64((np.int64(ctx[np.uint64(i)]) << PROB_BITS) | (x & (_SLOTS - 1)))]
    x = ((e >> 32) & 0x1FFF) * (x >> PROB_BITS) + ((e >> 45) & 0xFFF)
    need = np.int64(x < STATE_LOW)  # renormalise by a select: the branch was unpredictable
    x = (x << (need << 4)) | (np.int64(words[np.uint64(min(wp, wlim) if clamp else wp)]) & -need)
    refill = np.int64(nacc < 32)  # a select: keep at least 32 raw bits (a field is at most 29)
    acc |= (np.int64(bitwords[np.uint64(min(bp, blim) if clamp else bp)]) << nacc) & -refill
    nr = e >> 57
    rv = acc & ((np.int64(1) << nr) - 1)
    pv = np.int64(p[np.uint64(pi)])
    if mode == 0:
        u = (e & _MASK32) | rv
        r = (u >> 1) ^ (-(u & 1))
        out[np.uint64(i)] = _ordinal(_wrap(_ordinal(pv, width) + r, width), width)
    else:
        ub = ((e & _MASK32) ^ (np.int64(pv < 0) << (width - 1))) | rv
        out[np.uint64(i)] = ub - ((ub >> (width - 1)) << width)  # sign-extend
    return x, wp + need, acc >> nr, nacc + (refill << 5) - nr, bp + refill


def _make(mode: int, clamp: bool):
    """The chunk loop of one mode, reads clamped or not: both constants of the closure, which numba folds (the
    closure holds only these two ints, so numba's on-disk cache keys it stably)."""

    def chunk(c, p, pbase, ctx, tab, states, word_start, words, bit_start, bitwords, size, out):
        lo = c * size
        hi = min(out.shape[0], lo + size)
        wlim, blim = words.shape[0] - 1, bitwords.shape[0] - 1
        bad, x0, x1, x2, x3 = _start(c, states)
        wp, bp, acc, nacc = word_start[c], bit_start[c], np.int64(0), np.int64(0)
        i = lo
        while i + LANES <= hi:  # element i + j uses state j: four independent chains, in registers
            x0, wp, acc, nacc, bp = _elem(i, x0, p, i - pbase, ctx, tab, wp, wlim, words, acc, nacc, bp, blim,
                                          bitwords, out, mode, clamp)
            x1, wp, acc, nacc, bp = _elem(i + 1, x1, p, i + 1 - pbase, ctx, tab, wp, wlim, words, acc, nacc, bp,
                                          blim, bitwords, out, mode, clamp)
            x2, wp, acc, nacc, bp = _elem(i + 2, x2, p, i + 2 - pbase, ctx, tab, wp, wlim, words, acc, nacc, bp,
                                          blim, bitwords, out, mode, clamp)
            x3, wp, acc, nacc, bp = _elem(i + 3, x3, p, i + 3 - pbase, ctx, tab, wp, wlim, words, acc, nacc, bp,
                                          blim, bitwords, out, mode, clamp)
            i += LANES
        if i < hi:
            x0, wp, acc, nacc, bp = _elem(i, x0, p, i - pbase, ctx, tab, wp, wlim, words, acc, nacc, bp, blim,
                                          bitwords, out, mode, clamp)
        if i + 1 < hi:
            x1, wp, acc, nacc, bp = _elem(i + 1, x1, p, i + 1 - pbase, ctx, tab, wp, wlim, words, acc, nacc, bp,
                                          blim, bitwords, out, mode, clamp)
        if i + 2 < hi:
            x2, wp, acc, nacc, bp = _elem(i + 2, x2, p, i + 2 - pbase, ctx, tab, wp, wlim, words, acc, nacc, bp,
                                          blim, bitwords, out, mode, clamp)
        return bad | _end(c, x0, x1, x2, x3, wp, bp, nacc, word_start, bit_start)

    chunk.__name__ = chunk.__qualname__ = f"_chunk_{mode}_{int(clamp)}"  # one cache file each
    return njit(cache=True, nogil=True)(chunk)


_chunk_ord = _make(0, True)
_chunk_ord_unchecked = _make(0, False)
_chunk_fld = _make(1, True)
_chunk_fld_unchecked = _make(1, False)


@njit(cache=True, nogil=True)
def _one(c, mode, p, pbase, ctx, tab, states, ws, words, bs, bitwords, size, out):
    """Chunk ``c``: a step reads at most one word of each stream, so a chunk whose start leaves room for one per
    element cannot read past the arrays, whatever its payload says, and runs without clamps."""
    n = min(out.shape[0], (c + 1) * size) - c * size
    inside = ws[c] + n <= words.shape[0] and bs[c] + n <= bitwords.shape[0]
    if mode == 0:
        if inside:
            return _chunk_ord_unchecked(c, p, pbase, ctx, tab, states, ws, words, bs, bitwords, size, out)
        return _chunk_ord(c, p, pbase, ctx, tab, states, ws, words, bs, bitwords, size, out)
    if inside:
        return _chunk_fld_unchecked(c, p, pbase, ctx, tab, states, ws, words, bs, bitwords, size, out)
    return _chunk_fld(c, p, pbase, ctx, tab, states, ws, words, bs, bitwords, size, out)


@njit(cache=True, nogil=True, parallel=True)
def _bits_par(mode, p, ctx, tab, states, ws, words, bs, bitwords, size, out):
    bad = np.zeros(states.shape[0], np.int64)
    for c in prange(states.shape[0]):
        bad[c] = _one(c, mode, p, 0, ctx, tab, states, ws, words, bs, bitwords, size, out)
    return bad


@njit(cache=True, nogil=True)
def _bits_ser(mode, p, ctx, tab, states, ws, words, bs, bitwords, size, out):
    bad = np.zeros(states.shape[0], np.int64)
    for c in range(states.shape[0]):
        bad[c] = _one(c, mode, p, 0, ctx, tab, states, ws, words, bs, bitwords, size, out)
    return bad


@njit(cache=True, nogil=True)
def _f32_one(c, mode, ref, f1, f2, coef, kind, ctx, tab, states, ws, words, bs, bitwords, size, out, scratch, nan):
    lo = c * size
    nan[c] = _predict(lo, min(out.shape[0], lo + size), ref, f1, f2, coef, kind, scratch)
    return _one(c, mode, scratch.view(np.int32), lo, ctx, tab, states, ws, words, bs, bitwords, size, out)


@njit(cache=True, nogil=True, parallel=True)
def _f32_par(mode, ref, f1, f2, coef, kind, ctx, tab, states, ws, words, bs, bitwords, size, out):
    nch = states.shape[0]
    bad = np.zeros(nch, np.int64)
    nan = np.zeros(nch, np.int64)
    for c in prange(nch):
        scratch = np.empty(size, np.float32)  # one chunk's prediction: it stays in cache
        bad[c] = _f32_one(c, mode, ref, f1, f2, coef, kind, ctx, tab, states, ws, words, bs, bitwords, size, out,
                          scratch, nan)
    return bad, nan


@njit(cache=True, nogil=True)
def _f32_ser(mode, ref, f1, f2, coef, kind, ctx, tab, states, ws, words, bs, bitwords, size, out):
    nch = states.shape[0]
    bad = np.zeros(nch, np.int64)
    nan = np.zeros(nch, np.int64)
    scratch = np.empty(size, np.float32)
    for c in range(nch):
        bad[c] = _f32_one(c, mode, ref, f1, f2, coef, kind, ctx, tab, states, ws, words, bs, bitwords, size, out,
                          scratch, nan)
    return bad, nan


@njit(cache=True, nogil=True)
def _predict(lo, hi, ref, f1, f2, coef, kind, scratch):
    """``codec.predict``'s float32 values of elements ``lo:hi`` into ``scratch`` (float32); the NaN count.
    ``kind``: 0 zeros + terms, 1 ref + terms, 2 ref * c0 + terms (the same operations in the same order)."""
    c0, c1, c2 = coef[0], coef[1], coef[2]
    use1 = c1 != 0
    use2 = c2 != 0
    nan = 0
    for i in range(lo, hi):  # one pass; the conditions are loop-invariant (LLVM unswitches them)
        if kind == 0:
            v = np.float32(0.0)
        elif kind == 1:
            v = ref[i]
        else:
            v = ref[i] * c0
        if use1:
            v = v + c1 * f1[i]
        if use2:
            v = v + c2 * f2[i]
        scratch[i - lo] = v
        nan += v != v
    return nan


_NONE = np.zeros(1, np.float32)


def decode_bits(p, ctx, tab, states, word_start, words, bit_start, bitwords, mode, width, chunk, out,
                parallel=False):
    """:func:`kernels.decode_chunks` with a :func:`slot_table`: ``p`` the prediction's bit patterns (any dtype);
    chunks in parallel with ``parallel``. Returns the per-chunk bad flags."""
    if out.itemsize * 8 != width:
        raise ValueError(f"a {width}-bit tensor decoded into {out.dtype}")
    run = _bits_par if parallel else _bits_ser
    return run(int(mode), p, ctx, tab, states, word_start, words, bit_start, bitwords, chunk, out)


def f32_kind(ref, coef) -> int:
    """How :func:`codec.predict` starts a float32 prediction: 0 zeros, 1 the reference itself, 2 ``ref * c0``."""
    c0 = np.float32(coef[0])
    return 0 if ref is None or c0 == 0 else (1 if c0 == 1 else 2)


def decode_f32(ref, f1, f2, coef, ctx, tab, states, word_start, words, bit_start, bitwords, mode, chunk, out,
               parallel=False):
    """Decode a float32 tensor (``out`` int32), its prediction formed chunk by chunk: ``ref`` (None: zeros),
    ``coef`` float32 ``[c0, c1, c2]`` (an absent feature: coefficient 0, ``f`` None). Returns
    ``(bad flags, NaN predictions)``; with NaNs the caller decodes with numpy's prediction instead."""
    run = _f32_par if parallel else _f32_ser
    none = _NONE
    bad, nan = run(int(mode), none if ref is None else ref, none if f1 is None else f1, none if f2 is None else f2,
                   coef, f32_kind(ref, coef), ctx, tab, states, word_start, words, bit_start, bitwords, chunk, out)
    return bad, int(nan.sum())
