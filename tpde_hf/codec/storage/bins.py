"""numba loops of the ``narrow-rans`` storage codec that build the *bins*: the geometry and the derived tables by
which :mod:`.delta` codes each weight inside its quantization bin.

Every weight ``w`` of a group with scale ``s`` and zero point ``z`` has the level ``c = q - z``, and
(unless it is an exception, see :mod:`.codec`) ``rint(float32(w) / float32(s)) == c``: the quantizer's own
rounding. Both sides can therefore compute the *bin* of ``c``: the run of ordinals ``[L, H]`` (see
:mod:`tpde_hf.codec.ordinal`) whose values round to ``c``. :func:`lower_edge` finds ``L`` exactly by
stepping from an estimate with that predicate.

Inside the bin the weight is coded as if its value were uniform on the bin (a flat density; measured on
MiniLM this beats learned per-context tables). The bin splits into *segments* at binade boundaries
(within a binade ordinals are equally spaced); a segment's probability is its share of the bin's width in
value, so no table is stored. Where every ordinal of a bin can get a frequency of at least 1 (the bins of
levels c != 0 in bf16 and fp16), one rANS symbol codes the ordinal itself (:func:`_single`); elsewhere one
symbol picks the segment, one the offset's top bits inside it (uniform), and for segments of more than 256
ordinals one or two more the remaining low bits (uniform). Binades more than ``DEEP`` below the bin's top
merge into one segment per sign, coded uniformly (near-zero values of the zero bin: rare). A tensor on a
coarser grid (``tz`` low mantissa bits 0 in every weight) is coded on grid ordinals (:func:`_real`).

A one-symbol bin also gets a compact *record* (``REC`` int64s, see :func:`new_cache`) that holds all its decoder
reads in two cache lines, and every bin a *kind* (:data:`EMPTY`, :data:`ONE`, :data:`MULTI`) so that the hot loops
test one byte per weight. Tables are derived, never stored: changing how they are built changes no bytes on disk
as long as their values stay the same (tests compare them with the layout-2 fixture).

Example::

    cache = new_cache(uscales.size)
    mark_bins(q, zeros, sids, 0, q.shape[0], in_f, 7, need)
    build_bins(need, uscales, 0, uscales.size, 16, 7, 0, lut, cache)
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

PB = 16  # probability bits of the delta stream (derived frequencies need the resolution)
DEEP = 13  # binades below a bin's top coded one by one; deeper ones merge into one segment per sign
MAXSEG = 32
LOW_BITS = 12  # at most this many uniform low bits per rANS symbol
MAX_SYMBOLS = 4  # per element: segment, top bits, two chunks of low bits
NLEV = 31  # levels c in -15..15
# Bin tables, field by field: ``T[field, segment]`` (``I[segment]``: 1 / (UF + 1), 1 / UF).
ST, CNT, FR, CUM, SH, NH, UF, UR = range(8)
SMALL = 4  # segments of a bin of a level c != 0 (its values span a ratio of at most 3: three binades)
REC = 20  # int64s per one-symbol record: UR0, CUM1..3, UF0..3, MG0..3 (reciprocals), ST0..3, CN0..3
EMPTY, ONE, MULTI = 0, 1, 2  # kinds of bins: no symbol (exceptions), one symbol, segment + offset symbols
_POW2 = np.ldexp(1.0, np.arange(-64, 65))  # exact powers of two (a table read, not a libm call per segment)


@njit(cache=True, inline="always")
def _pattern(o, width):
    """Ordinal <-> sign-extended bit pattern (an involution, see ``ordinal.py``)."""
    return o ^ ((o >> (width - 1)) & ((np.int64(1) << (width - 1)) - 1))


@njit(cache=True, inline="always")
def _real(o, tz):
    """The dtype's ordinal of *grid* ordinal ``o``: the grid keeps the magnitudes whose low ``tz`` bits are 0
    (a tensor that came from a narrower format, e.g. fp16 values stored as fp32, has ``tz > 0``)."""
    sign = o >> 63  # branch-free (signs are data, a branch on them mispredicts): -1 - o is o ^ -1
    return ((o ^ sign) << tz) ^ sign


@njit(cache=True, inline="always")
def _grid(o, tz):
    """Inverse of :func:`_real` (drops the low ``tz`` magnitude bits)."""
    sign = o >> 63
    return ((o ^ sign) >> tz) ^ sign


@njit(cache=True, inline="always")
def _value(o, width, tz, lut, u32, f32):
    """float32 value of grid ordinal ``o`` (``lut`` for 16-bit dtypes; ``u32``/``f32``: one word seen both ways)."""
    p = _pattern(_real(o, tz), width)
    if width == 32:
        u32[0] = np.uint32(p & 0xFFFFFFFF)
        return f32[0]
    return lut[p & 0xFFFF]


@njit(cache=True, inline="always")
def _level(o, s, width, tz, lut, u32, f32):
    """The quantizer's level of grid ordinal ``o``: ``rint(float32(w) / s)`` (float32; NaN for NaN)."""
    return np.rint(_value(o, width, tz, lut, u32, f32) / s)


@njit(cache=True, inline="always")
def _approx_ordinal(v, width, mb, u32, f32):
    """An ordinal near float32 ``v`` in the target dtype (truncated toward zero; refined by the caller)."""
    f32[0] = v
    b = np.int64(u32[0])
    neg = b >> 31
    mag = b & 0x7FFFFFFF
    if width == 32:
        m = mag
    elif mb == 7:  # bf16: the high half
        m = mag >> 16
    else:  # fp16: rebias the exponent, truncate the mantissa
        e16 = (mag >> 23) - 127 + 15
        if e16 >= 31:
            m = np.int64(0x7C00)
        elif e16 >= 1:
            m = (e16 << 10) | ((mag & 0x7FFFFF) >> 13)
        else:
            sh = 14 - e16
            m = np.int64(0) if sh > 24 else ((mag & 0x7FFFFF) | 0x800000) >> sh
    return -1 - m if neg else m


@njit(cache=True, inline="always")
def lower_edge(k, s, width, mb, tz, lut, u32, f32):
    """The smallest grid ordinal whose level is at least ``k`` (exact: steps from an estimate with the predicate).

    Steps are capped so a pathological scale cannot loop; both sides run this same code, so a capped edge
    only makes some weights exceptions, never a mismatch.
    """
    lo_lim = -(np.int64(1) << (width - 1 - tz))
    hi_lim = (np.int64(1) << (width - 1 - tz)) - 1
    kf = np.float32(k)
    o = _grid(_approx_ordinal(np.float32((np.float64(k) - 0.5) * np.float64(s)), width, mb, u32, f32), tz)
    o = min(max(o, lo_lim), hi_lim)
    for _ in range(8):
        if o < hi_lim and _level(o, s, width, tz, lut, u32, f32) < kf:
            o += 1
        else:
            break
    for _ in range(8):
        if o > lo_lim and _level(o - 1, s, width, tz, lut, u32, f32) >= kf:
            o -= 1
        else:
            break
    return o


@njit(cache=True, inline="always")
def _push(top, bot, neg, e, e_ref, n, tab, b, w, mass):
    if n >= w:  # more segments than the table holds: counted, not written (the bin is dropped)
        return n + 1
    tab[b + ST * w + n] = -1 - top if neg else bot
    tab[b + CNT * w + n] = top - bot + 1
    mass[n] = np.float64(top - bot + 1) * _POW2[min(max(max(e, np.int64(1)) - e_ref + 64, 0), 128)]
    return n + 1


@njit(cache=True, inline="always")
def build_segments(L, H, width, mb, tab, b, cap, mass):
    """Segments of the bin ``[L, H]`` (``L <= H``), top binades first (the decoder scans from the front):
    start ordinal, count, frequency (summing to ``2**PB``), cumulative frequency, written to the bin's
    fields ``tab[b + field * cap + segment]`` (no array views: this runs once per bin). Returns their
    number (0 if more than ``cap``).

    The bin is cut at binade boundaries, on each sign side; a segment's mass is its width in value
    (count times its ordinals' spacing, relative to the top binade). Binades more than ``DEEP`` below the
    top merge into one segment per side.
    """
    n = _cut(L, H, mb, tab, b, cap, mass)
    if n > 0:
        _frequencies(n, tab, b, cap, mass)
    return n


@njit(cache=True, inline="always")
def _cut(L, H, mb, tab, b, cap, mass):
    """:func:`build_segments` without the frequencies: each segment's start ordinal and count in ``tab``, its
    mass in ``mass``; the number of segments (0 if more than ``cap``)."""
    has_neg = L < 0
    has_pos = H >= 0
    n_lo = -1 - min(H, -1)  # magnitudes of the negative side: [n_lo, n_hi]
    n_hi = -1 - L
    p_lo = max(L, 0)
    p_hi = H
    e_ref = np.int64(0)
    if has_neg:
        e_ref = max(e_ref, n_hi >> mb)
    if has_pos:
        e_ref = max(e_ref, p_hi >> mb)
    e_min = e_ref  # the lowest binade either side reaches: stop there (a bin of c != 0 spans 1 to 3)
    if has_neg:
        e_min = min(e_min, n_lo >> mb)
    if has_pos:
        e_min = min(e_min, p_lo >> mb)
    n = 0
    for d in range(DEEP + 2):
        e = e_ref - d
        if e < 0 or (e < e_min and d <= DEEP):
            break
        for side in range(2):
            if side == 0:
                ok, lo, hi, neg = has_pos, p_lo, p_hi, False
            else:
                ok, lo, hi, neg = has_neg, n_lo, n_hi, True
            if not ok:
                continue
            top = min(hi, ((e + 1) << mb) - 1)
            bot = lo if d > DEEP else max(lo, e << mb)
            if top >= bot:
                n = _push(top, bot, neg, e, e_ref, n, tab, b, cap, mass)
    if n > cap:
        return 0  # cannot happen for real scales; both sides then treat the bin as empty (exceptions)
    return n


@njit(cache=True, inline="always")
def _frequencies(n, tab, b, cap, mass):
    """The ``n`` segments' frequencies (summing to ``2**PB``, from their masses) and cumulative frequencies."""
    total = 0.0
    for i in range(n):
        total += mass[i]
    scale = np.float64(1 << PB) / total
    acc = np.int64(0)
    big = 0
    fr = b + FR * cap
    for i in range(n):
        tab[fr + i] = max(np.int64(1), np.int64(mass[i] * scale))
        acc += tab[fr + i]
        if tab[fr + i] > tab[fr + big]:
            big = i
    tab[fr + big] += (np.int64(1) << PB) - acc  # the largest takes the rounding (it holds >= 2**PB / n)
    c = np.int64(0)
    for i in range(n):
        tab[b + CUM * cap + i] = c
        c += tab[fr + i]


def new_cache(n_scales: int) -> tuple:
    """Bin tables for ``n_scales`` distinct scales, one per tensor, shared by its threads: :func:`build_bins`
    fills the bins that :func:`mark_bins` found in use before any block is coded; the hot loops only read.

    Bins depend on the scale and the level only, never on the zero point, and a tensor has few distinct
    scales (a 5120 x 13824 weight: ~150 groups per scale), so a bin is built once per (scale, level).
    A bin never built has 0 segments and kind :data:`EMPTY` (its weights are exceptions), so no loop reads an
    unset table. Cache fields: 0, 1 edges built / edges; 2 bins built; 3 ``[L, H]``; 4 segment counts; 5 tables;
    6 reciprocals; 7 scratch; 8 one-symbol flags; 9 one-symbol records (``REC`` per (scale, level), at
    ``(u * NLEV + c + 15) * REC``); 10 kinds.
    """
    # Tables are flat, so that the per-element loop indexes them without making array views:
    # level c != 0 of scale u at ((u * NLEV + c + 15) * 8 + field) * SMALL + segment; the zero bin after all
    # of those, at n_scales * NLEV * 8 * SMALL + (u * 8 + field) * MAXSEG + segment. ``inv`` alike, 2 per segment.
    n_tab = n_scales * NLEV * 8 * SMALL + n_scales * 8 * MAXSEG
    n_inv = n_scales * NLEV * SMALL * 2 + n_scales * MAXSEG * 2
    return (np.zeros((n_scales, 32), dtype=np.bool_), np.empty((n_scales, 32), dtype=np.int64),
            np.zeros((n_scales, NLEV), dtype=np.bool_), np.empty((n_scales, NLEV, 2), dtype=np.int64),
            np.zeros((n_scales, NLEV), dtype=np.int64), np.empty(n_tab, dtype=np.int64),
            np.empty(n_inv, dtype=np.int64), np.empty(MAXSEG, dtype=np.float64),
            np.zeros((n_scales, NLEV), dtype=np.bool_), np.empty(n_scales * NLEV * REC, dtype=np.int64),
            np.zeros((n_scales, NLEV), dtype=np.int8))


@njit(cache=True, inline="always")
def _where(c, u, li, n_scales):
    """``(table base, segment stride, reciprocal base)`` of level ``c``'s bin of scale ``u``."""
    if c == 0:
        return (n_scales * NLEV * 8 * SMALL + u * 8 * MAXSEG, np.int64(MAXSEG),
                n_scales * NLEV * SMALL * 2 + u * MAXSEG * 2)
    k = u * NLEV + li
    return k * 8 * SMALL, np.int64(SMALL), k * SMALL * 2


@njit(cache=True, inline="always")
def _edge(k, u, s, width, mb, tz, lut, u32, f32, cache):
    """``lower_edge(k)`` for scale ``u``, cached."""
    stamp_e, edges = cache[0], cache[1]
    if not stamp_e[u, k + 15]:
        edges[u, k + 15] = lower_edge(k, s, width, mb, tz, lut, u32, f32)
        stamp_e[u, k + 15] = True
    return edges[u, k + 15]


@njit(cache=True, inline="always")
def _bin(c, u, s, width, mb, tz, lut, u32, f32, cache, mass, stab, sinv):
    """Build level ``c``'s bin for scale ``u``: its edges, its kind, and its tables: a one-symbol bin's record
    (:func:`_record`), else its segments, each with its offset code: ``SH`` low bits (uniform) under a top part
    uniform on ``NH`` values, where the first ``UR`` values get frequency ``UF + 1`` and the rest ``UF``.

    The bin is built in the scratch tables ``stab``/``sinv`` (its own stride, at 0) and only what the loops
    read is copied out: the big per-tensor tables are written (and their pages touched) for two-symbol bins only.
    """
    i = c + 15
    lohi, nseg = cache[3], cache[4]
    L = _edge(c, u, s, width, mb, tz, lut, u32, f32, cache)
    H = _edge(c + 1, u, s, width, mb, tz, lut, u32, f32, cache) - 1
    lohi[u, i, 0] = L
    lohi[u, i, 1] = H
    b, w, ib = _where(c, u, i, cache[2].shape[0])
    n = 0
    if L <= H:
        n = _cut(L, H, mb - tz, stab, 0, w, mass)
    sgl = c != 0 and n > 0 and _single(n, 0, w, 0, stab, sinv, mass)
    if sgl:
        _record(n, 0, w, 0, stab, sinv, cache[9], (u * NLEV + i) * REC)
    elif n > 0:
        _frequencies(n, stab, 0, w, mass)
        tab, inv = cache[5], cache[6]
        for j in range(n):  # the two-symbol code's fields
            m = stab[CNT * w + j]
            sh = max(_bit_length(m - 1) - 8, np.int64(0))
            nh = ((m - 1) >> sh) + 1
            f = (np.int64(1) << PB) // nh
            for fld in range(SH):  # ST, CNT, FR, CUM
                tab[b + fld * w + j] = stab[fld * w + j]
            tab[b + SH * w + j] = sh
            tab[b + NH * w + j] = nh
            tab[b + UF * w + j] = f
            tab[b + UR * w + j] = (np.int64(1) << PB) - f * nh
            inv[ib + 2 * j] = _magic(f + 1)
            inv[ib + 2 * j + 1] = _magic(f)
    cache[8][u, i] = sgl
    cache[10][u, i] = ONE if sgl else (MULTI if n > 0 else EMPTY)
    nseg[u, i] = n
    cache[2][u, i] = True


@njit(cache=True, inline="always")
def _single(n, b, w, ib, tab, inv, mass):
    """Turn the bin at ``b`` into one symbol per weight when every ordinal can get a frequency of at least 1:
    ordinals of segment ``j`` get ``UF[j]`` each (its share of the bin's width in value), and the rounding
    remainder ``UR[0]`` goes to the first ordinal of segment 0. ``FR``/``CUM``: each segment's slot range.
    Returns False (the bin keeps its two-symbol code; ``mass`` untouched, ``UF`` scratch) when some ordinal
    would get 0."""
    total = 0.0
    for j in range(n):
        total += mass[j]
    s = 0
    for j in range(n):  # UF is scratch until the bin is known to be one-symbol (see _bin: never copied out)
        wj = np.int64(mass[j] / np.float64(tab[b + CNT * w + j]) * np.float64(1 << PB) / total)
        if wj < 1:
            return False
        tab[b + UF * w + j] = wj
        s += wj * tab[b + CNT * w + j]
    rem = (np.int64(1) << PB) - s
    cum = np.int64(0)
    for j in range(n):
        wj = tab[b + UF * w + j]
        tab[b + UR * w + j] = rem if j == 0 else 0
        tab[b + FR * w + j] = wj * tab[b + CNT * w + j] + (rem if j == 0 else 0)
        tab[b + CUM * w + j] = cum
        cum += tab[b + FR * w + j]
        inv[ib + 2 * j] = _magic(wj)
    for j in range(n, SMALL):  # unused segments: never chosen by the decoder's branch-free search
        tab[b + CUM * w + j] = np.int64(1) << PB
    return True


@njit(cache=True, inline="always")
def _record(n, b, w, ib, tab, inv, rec, r):
    """The one-symbol bin at ``b`` as the record at ``rec[r:r + REC]``: ``UR0`` (the first ordinal's extra
    frequency), ``CUM1..3`` (unused segments: ``2**PB``), then per segment ``UF``, reciprocal of ``UF`` (see
    :func:`_div`), start ordinal, count (unused segments: 0). With ``CUM0 = 0`` and ``UR = 0`` past segment 0,
    ``rec[r + j]`` is what a slot of segment ``j`` is reduced by (``CUM_j + UR_j``). The decoder reads the first
    16 (two cache lines), the encoder also the counts."""
    rec[r] = tab[b + UR * w]
    for j in range(1, SMALL):
        rec[r + j] = tab[b + CUM * w + j]
    for j in range(SMALL):
        used = j < n
        rec[r + 4 + j] = tab[b + UF * w + j] if used else 1
        rec[r + 8 + j] = inv[ib + 2 * j] if used else _magic(1)
        rec[r + 12 + j] = tab[b + ST * w + j] if used else 0
        rec[r + 16 + j] = tab[b + CNT * w + j] if used else 0


@njit(cache=True, nogil=True)
def mark_bins(q, zeros, sids, r0, r1, in_f, gshift, need):
    """Set ``need[u, c + 15]`` for every (scale id, level) that rows ``[r0, r1)`` use."""
    ng = zeros.shape[1]
    for row in range(r0, r1):
        for g in range(ng):
            u = sids[row, g]
            z = np.int64(zeros[row, g])
            for col in range(g << gshift, min(in_f, (g + 1) << gshift)):
                need[u, np.int64(q[row, col]) - z + 15] = True


@njit(cache=True, nogil=True)
def mark_group_bins(zeros, sids, need):
    """Set ``need[u, c + 15]`` for every level ``c = -z .. 15 - z`` of every group (scale id ``u``, zero point
    ``z``): the bins its codes can use."""
    for row in range(zeros.shape[0]):
        for g in range(zeros.shape[1]):
            z = np.int64(zeros[row, g])
            u = sids[row, g]
            for li in range(15 - z, 31 - z):
                need[u, li] = True


@njit(cache=True, nogil=True)
def build_bins(need, uscales, u0, u1, width, mb, tz, lut, cache):
    """Build every needed bin of scale ids ``[u0, u1)`` (threads take disjoint ranges of one cache)."""
    u32 = np.zeros(1, dtype=np.uint32)
    f32 = u32.view(np.float32)
    mass = np.empty(MAXSEG, dtype=np.float64)
    stab = np.empty(8 * MAXSEG, dtype=np.int64)  # one bin's tables, built here, copied out (see _bin)
    sinv = np.empty(2 * MAXSEG, dtype=np.int64)
    built = cache[2]
    for u in range(u0, u1):
        for li in range(NLEV):
            if need[u, li] and not built[u, li]:
                _bin(li - 15, u, uscales[u], width, mb, tz, lut, u32, f32, cache, mass, stab, sinv)


@njit(cache=True, inline="always")
def _magic(b):
    """The multiplier of :func:`_div` for divisor ``b`` (``1 <= b <= 2**16``): ``2**32 // b + 1``.

    A float division (faster than an integer one): ``2**32 / b = Q + r / b`` with ``r / b <= 1 - 2**-16``, and
    the float64 quotient is within ``2**-21`` of it (``Q < 2**33``), so its floor is ``Q`` exactly (a test checks
    every ``b``)."""
    return np.int64(4294967296.0 / np.float64(b)) + 1


@njit(cache=True, inline="always")
def _bit_length(m):
    """``int(m).bit_length()`` for ``0 <= m < 2**53`` (exact: the exponent of an exactly represented float)."""
    return np.int64(0) if m == 0 else np.int64(math.frexp(np.float64(m))[1])


@njit(cache=True, inline="always")
def _div(a, magic):
    """``a // b`` for ``0 <= a < 2**16`` and ``magic = _magic(b)``: one multiply, exact. With
    ``e = magic * b - 2**32`` in ``(0, b]``, ``a * magic / 2**32 = a / b + a * e / (b * 2**32)`` and
    ``a * e < 2**32``, so the error stays under ``1 / b`` and never crosses the next integer."""
    return (a * magic) >> 32
