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
* the pack's path stores no symbol arrays (:func:`encode_fused`, :func:`sym_histogram`): a histogram pass makes
  the symbols block by block in cache, then each chunk's symbols, raw bits and table indices are made into a
  chunk of scratch (one vectorised loop, with the decoder's inverse of the symbol map on every element), the
  raw bits packed forwards and the rANS pass run backwards over it. The same bytes as :func:`symbolize` +
  :func:`encode_compact`, about 7 bytes per value less memory traffic and no 7-byte-per-value arrays to fault in;
* the pack's large elementwise outputs (contexts, predictions, Adam features) are numpy-allocated
  (:func:`buckets`, :func:`predict_f32`, :func:`ratio_f32`, :func:`half_exponent`, :func:`square_ctx`,
  :func:`weight_ctx`: the same values as the numpy or ``kernels`` versions), and inside :func:`scratch` they
  come from a pool of reused buffers: on this VM a fresh array of tens of MB costs about as much system time
  (page faults, unmapping) as the loop that fills it;
* the tables (:func:`quantize_tables`: ``rans.quantize_frequencies``' tables; :func:`_flat_tables`;
  :func:`slot_symbols` for the sampled decode) are compiled loops instead of per-context numpy calls.

Each returns a count of elements whose check failed (0 when all is well); the codec refuses to store a
tensor with a nonzero count. Together with a decode-and-compare of sampled chunks (:func:`decode_some`, the codec's
``verify``), this is the pack-time guarantee that what is stored decodes to the tensor.

Example::

    assert unsymbolize_check(x, p, sym, raw, MODE_ORD, 32, 23) == 0
    states, n_words, n_bitwords, words, bitwords, bad = encode_compact(sym, nraw, raw, ctx, freq, cum, chunk)
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core.extending import intrinsic

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


# ---------------------------------------------------------------- reused buffers for one tensor's temporaries
_pool_lock = threading.Lock()
_pool: list[np.ndarray] = []  # free buffers (uint8), reused by any thread inside scratch()
_local = threading.local()
_POOL_MIN = 1 << 20  # smaller arrays come from malloc, whose own free lists serve them without page faults


@contextlib.contextmanager
def scratch() -> Iterator[None]:
    """Within this block, this thread's large temporaries (:func:`empty`: contexts, predictions, features) come
    from a pool of buffers that earlier blocks gave back. Why: a fresh array of tens of MB costs page faults
    and an unmap when it is freed, about as much CPU as the loop that fills it (measured: a third of a pack's
    CPU was system time). Nothing made inside may be used after the block (the buffers are reused)."""
    taken: list[np.ndarray] = []
    prev = getattr(_local, "taken", None)
    _local.taken = taken
    try:
        yield
    finally:
        _local.taken = prev
        with _pool_lock:
            _pool.extend(taken)


def empty(n: int, dtype) -> np.ndarray:
    """``np.empty(n, dtype)``, from the pool inside :func:`scratch` (on this thread), else fresh."""
    dt = np.dtype(dtype)
    nbytes = int(n) * dt.itemsize
    taken = getattr(_local, "taken", None)
    if taken is None or nbytes < _POOL_MIN:
        return np.empty(n, dt)
    with _pool_lock:
        fits = [i for i, b in enumerate(_pool) if b.size >= nbytes]
        buf = _pool.pop(min(fits, key=lambda i: _pool[i].size)) if fits else None
    if buf is None:
        buf = np.empty(nbytes, np.uint8)
    taken.append(buf)
    return buf[:nbytes].view(dt)


def release_scratch() -> int:
    """Drop the pool's free buffers (bounded memory between packs); returns the bytes released."""
    with _pool_lock:
        freed = sum(b.size for b in _pool)
        _pool.clear()
    return freed


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


@njit(cache=True, inline="always")
def _step_u(x, e, words, w):
    """:func:`_step` with an unsigned word position (the same state, words and ``f``)."""
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
    freq = np.ascontiguousarray(freq, np.int64)
    cum = np.ascontiguousarray(cum, np.int64)
    if freq.shape != cum.shape or freq.ndim != 2:
        raise ValueError("rANS tables out of range")
    tab, status = _flat_tables_into(freq.reshape(-1), cum.reshape(-1))
    if status == 1:
        raise ValueError("rANS tables out of range")
    if status == 2:
        raise ValueError("rANS division constants fail their check (encoder bug)")
    return tab


@njit(cache=True, nogil=True)
def _flat_tables_into(f, cum):
    """:func:`_flat_tables`' entries and a status (0 ok, 1 tables out of range, 2 a constant fails its check)."""
    tab = np.zeros(f.shape[0], np.uint64)
    for k in range(f.shape[0]):
        if f[k] < 0 or cum[k] < 0 or cum[k] + f[k] > (1 << PROB_BITS):
            return tab, 1
    for k in range(f.shape[0]):
        fk = f[k]
        if fk <= 0:
            tab[k] = np.uint64(0)  # a symbol without mass: f = 0 flags any step that codes it
            continue
        sh = np.int64(0)
        while (np.int64(1) << sh) < fk:  # ceil(log2 f)
            sh += 1
        top = np.int64(1) << (32 + sh)
        m = top // fk + 1 - (np.int64(1) << 32)
        full = (m + (np.int64(1) << 32)) * fk
        if not (full >= top and full <= top + (np.int64(1) << sh) and m >= 0 and m <= 0xFFFFFFFF):
            return tab, 2
        tab[k] = (np.uint64(m) | (np.uint64(fk) << np.uint64(32)) | (np.uint64(cum[k]) << np.uint64(45))
                  | (np.uint64(sh) << np.uint64(58)))
    return tab, 0


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
    p = empty(ref.shape[0], np.float32)
    return p, _predict_f32_into(ref, f1, f2, coef, np.int64(n_feat), p)


@njit(cache=True, nogil=True)
def _predict_ratio_into(ref, m1, v1, m2, v2, coef, n_feat, eps, p):
    """:func:`_predict_f32_into` with features ``f_k = m_k / (sqrt(v_k) + eps)`` made inline (the same float32
    operations as :func:`_ratio_into`, then the prediction's, in the same order): the features are never stored.
    Returns the count of NaN predictions (the caller then makes the features and the prediction with numpy)."""
    n = ref.shape[0]
    c0, c1, c2 = coef[0], coef[1], coef[2]
    e = eps[0]
    use1 = n_feat >= 1 and c1 != 0
    use2 = n_feat >= 2 and c2 != 0
    nan = 0
    for i in range(n):
        v = ref[i] * c0
        if use1:
            v = v + c1 * (m1[i] / (np.sqrt(v1[i]) + e))
        if use2:
            v = v + c2 * (m2[i] / (np.sqrt(v2[i]) + e))
        p[i] = v
        nan += v != v
    return nan


def predict_ratio_f32(ref, m1, v1, m2, v2, coef, n_feat, eps):
    """The prediction of :func:`_predict_ratio_into` (pooled inside :func:`scratch`) and its NaN count."""
    p = empty(ref.shape[0], np.float32)
    return p, _predict_ratio_into(ref, m1, v1, m2, v2, coef, np.int64(n_feat), eps, p)


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
    out = empty(m.shape[0], np.float32)
    return out, _ratio_into(m, v, eps, out)


def symbolize(x, p, mode, width, mant_bits):
    """:func:`tpde_hf.checkpoints.kernels.symbolize` (the same arrays) into numpy-allocated outputs."""
    n = x.shape[0]
    sym, nraw, raw = np.empty(n, np.uint16), np.empty(n, np.uint8), np.empty(n, np.uint32)
    symbolize_into(x, p, mode, width, mant_bits, sym, nraw, raw)
    return sym, nraw, raw


def buckets(src, lo, n_ctx, special):
    """:func:`tpde_hf.checkpoints.kernels.buckets` (the same array) into a numpy-allocated output."""
    out = empty(src.shape[0], np.uint8)
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
    out = empty(v.shape[0], np.int16)
    _half_exponent_into(v.view(np.int32), out)
    return out


def square_ctx(m, v):
    """``(m * m, exponent(m * m) - exponent(v))`` (float32, int32) of float32 arrays, in two passes."""
    m2, ctx = empty(m.shape[0], np.float32), empty(m.shape[0], np.int32)
    _square_ctx_into(m, v.view(np.int32), m2, m2.view(np.int32), ctx)
    return m2, ctx


def weight_ctx(w, v1, special):
    """``exponent(w)`` as int32, ``special`` where ``v1 == 0`` (float32 arrays): the context of a weight."""
    out = empty(w.shape[0], np.int32)
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


# ---------------------------------------------------------------- fused symbols and streams (the pack's path)
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
    """:func:`_encode_chunk` of elements ``[lo, hi)`` with the symbols made here (:func:`_symbols_block`, into
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
    """:func:`_encode_range` with the symbols made chunk by chunk (:func:`_fused_chunk`)."""
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
    m = max(0, min(x.shape[0], c1 * chunk) - c0 * chunk)
    w_out = np.empty(m + 4, np.uint16)
    b_out = np.empty(m + (c1 - c0) + 2, np.uint32)
    states, n_words, n_bitwords, nw, nb, bad = _fused_range(x, p, ctx, tab, nsym, np.int64(mode), np.int64(width),
                                                            np.int64(mant_bits), bool(check), np.int64(chunk),
                                                            np.int64(c0), np.int64(c1), w_out, b_out)
    return states, n_words, n_bitwords, w_out[:nw], b_out[:nb], bad


def encode_fused(x, p, ctx, freq, cum, mode, width, mant_bits, chunk, check=True, fork=None, pieces=1):
    """:func:`encode_compact` of ``symbolize(x, p, mode, width, mant_bits)`` (the same bytes) without the symbol
    arrays: each chunk's symbols are made, used and dropped in cache. ``check``: each element also passes the
    decoder's inverse of the symbol map (what :func:`unsymbolize_check` counts; failures add to ``bad``).
    ``fork(fn, items)`` with ``pieces > 1``: runs of whole chunks mapped with it (:func:`encode_split`)."""
    if freq.shape[0] * freq.shape[1] > 1 << 16 or ctx.dtype != np.uint8 or x.shape != p.shape or x.shape != ctx.shape:
        raise ValueError("encode_fused: the table index ctx * nsym + symbol must fit 16 bits, one uint8 context per "
                         "element")
    tab = _flat_tables(freq, cum)
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


@njit(cache=True, nogil=True)
def quantize_tables(counts, prob_bits):
    """:func:`tpde_hf.codec.rans.quantize_frequencies` (the same tables, entry for entry) in compiled code: per
    context, ``counts * 2**prob_bits // total``, at least 1 for a symbol that occurs, the surplus to the most
    frequent symbol or the deficit taken from the most frequent first (ties in symbol order); all mass on symbol 0
    for a context that never occurs."""
    total_mass = np.int64(1) << prob_bits
    n_ctx, nsym = counts.shape
    freq = np.zeros((n_ctx, nsym), np.int64)
    for c in range(n_ctx):
        cnt = counts[c].astype(np.int64)
        total = cnt.sum()
        if total == 0:
            freq[c, 0] = total_mass
            continue
        f = (cnt * total_mass) // total
        fsum = np.int64(0)
        for s in range(nsym):
            if cnt[s] > 0 and f[s] == 0:
                f[s] = 1
            fsum += f[s]
        diff = total_mass - fsum
        order = np.argsort(-cnt, kind="mergesort")  # stable: ties in symbol order
        if diff > 0:
            f[order[0]] += diff
        else:
            for s in order:
                if diff == 0:
                    break
                take = min(-diff, f[s] - 1)
                f[s] -= take
                diff += take
        freq[c] = f
    return freq


@njit(cache=True, nogil=True)
def slot_symbols(freq):
    """The decoder's symbol of every rANS slot, all contexts one after the other (``uint16``, ``n_ctx * 2**12``
    entries: ``np.repeat(arange(nsym), freq[c])`` per context). ``freq`` rows must each sum to ``2**12``."""
    n_ctx, nsym = freq.shape
    out = np.empty(n_ctx << PROB_BITS, np.uint16)
    k = 0
    for c in range(n_ctx):
        for s in range(nsym):
            for _ in range(freq[c, s]):
                out[k] = s
                k += 1
    return out


__all__ = ["buckets", "decode_some", "empty", "encode_compact", "encode_fused", "encode_split", "half_exponent",
           "predict_f32", "predict_ratio_f32", "quantize_tables", "ratio_f32", "release_scratch", "sample_cost",
           "sample_costs", "scratch", "slot_symbols", "square_ctx", "sym_histogram", "symbolize", "unsymbolize_check",
           "weight_ctx"]
