"""numba loops of the ``narrow-rans`` storage codec that code each weight inside its quantization bin: the forward
pass of the encoder (:func:`delta_symbols`, symbols that :func:`.streams.rans_encode` codes) and the decoder
(:func:`delta_decode`). The bins come prebuilt (:mod:`.bins`); these loops only read them.

All rANS here: 32-bit state in ``[2**16, 2**32)``, 16-bit words, at most one word per step. The encoder
runs backwards over a block's symbols and the decoder must end on ``2**16`` with every word read. Layout 2
gives alternate elements of a block two states (lanes, ``lmask = 1``) over one word stream, so that the
CPU overlaps their dependency chains; layout 1 (``lmask = 0``) has one. Hot loops index with unsigned
integers: numba then emits no negative-index wraparound (measured 10-25% of the loop). Every read of a
payload is clamped, so corrupt input never reads out of bounds; the drivers reject the result.

The decoder's common case (a level c != 0 of a 16-bit dtype: one symbol per weight) reads the bin's record
(:data:`.bins.REC` int64s) and nothing else, with no branch on the data but the one on the bin's kind.

Example::

    ns = delta_symbols(bits, q, z, sids, uscales, 0, n, in_f, 7, 16, 7, 0, lut, cache, st, fr, exc, 1)
    delta_decode(words, xs, ps, q.ravel(), z, sids, uscales, 0, n, in_f, 7, 16, 7, 0, lut, cache, out, 1)
"""

from __future__ import annotations

import numpy as np
from numba import njit

from tpde_hf.codec.storage.bins import (
    CNT,
    CUM,
    FR,
    LOW_BITS,
    NH,
    NLEV,
    ONE,
    PB,
    REC,
    SH,
    SMALL,
    ST,
    UF,
    UR,
    _div,
    _grid,
    _pattern,
    _real,
    _where,
)
from tpde_hf.codec.storage.streams import LANE_SHIFT, STATE_LOW

_U0, _U1, _U2, _U3, _U4, _U8, _U12 = (np.uint64(k) for k in (0, 1, 2, 3, 4, 8, 12))  # unsigned offsets: see below


@njit(cache=True, inline="always")
def _group_run(start, i1, in_f, gshift):
    """The run of elements from ``start`` (before ``i1``) in one group: ``(row, group, first col, end col)``."""
    row = start // in_f
    col0 = start - row * in_f
    g = col0 >> gshift
    return row, g, col0, min(min((g + 1) << gshift, in_f), col0 + (i1 - start))


@njit(cache=True, nogil=True)
def delta_symbols(bits, q, zeros, sids, uscales, i0, i1, in_f, gshift, width, mb, tz, lut, cache, sym_st,
                  sym_fr, exc, lmask):
    """Forward pass of a block: the rANS symbols ``(start, freq)`` of elements ``[i0, i1)`` in coding order.

    ``sids[row, group]`` indexes the group's scale in ``uscales``. ``exc[i - i0]`` is set to 1 for an
    exception (ordinal outside its level's bin; coded as the bin's lowest ordinal, or not at all for an
    empty bin). Every symbol of element ``i`` goes to lane ``(i - i0) & lmask`` (its start carries the lane
    above bit ``LANE_SHIFT``, see :func:`streams.rans_encode`). Returns the number of symbols.
    """
    built, lohi, nseg, tab, rec, kind = cache[2], cache[3], cache[4], cache[5], cache[9], cache[10]
    n_scales = built.shape[0]
    ns = 0
    # Runs of one group (same row, scale and zero point): the group's fields are read once per run.
    start = i0
    while start < i1:
        row, g, col0, col1 = _group_run(start, i1, in_f, gshift)
        u = sids[row, g]
        zg = np.int64(zeros[row, g])
        kind_u = kind[u]
        i = start - 1
        start += col1 - col0
        for col in range(col0, col1):
            i += 1
            c = np.int64(q[row, col]) - zg
            li = c + 15
            kd = kind_u[li]
            if kd == 0:  # EMPTY
                exc[i - i0] = 1
                continue
            n = nseg[u, li]
            ln = ((i - i0) & lmask) << LANE_SHIFT
            b, w, _ = _where(c, u, li, n_scales)
            o = _pattern(np.int64(bits[i]), width)
            mag = o if o >= 0 else -1 - o
            o = _grid(o, tz)
            if o < lohi[u, li, 0] or o > lohi[u, li, 1] or (mag & ((np.int64(1) << tz) - 1)) != 0:
                exc[i - i0] = 1
                o = lohi[u, li, 0]
            j = 0
            if kd == ONE:  # one symbol: the ordinal itself (see bins._single, bins._record)
                r = (u * NLEV + li) * REC
                for k in range(1, SMALL):  # branch-free: o lies in exactly one segment (unused ones count 0)
                    st = rec[r + 12 + k]
                    j += k * np.int64((st <= o) & (o < st + rec[r + 16 + k]))
                off = o - rec[r + 12 + j]
                sub = rec[r + j]  # CUM_j + UR_j
                wj = rec[r + 4 + j]
                first = (j == 0) & (off == 0)
                sym_st[ns] = (np.int64(0) if first else sub + off * wj) | ln
                sym_fr[ns] = wj + sub if first else wj
                ns += 1
                continue
            while not (tab[b + ST * w + j] <= o < tab[b + ST * w + j] + tab[b + CNT * w + j]):
                j += 1
            if n > 1:
                sym_st[ns] = tab[b + CUM * w + j] | ln
                sym_fr[ns] = tab[b + FR * w + j]
                ns += 1
            off = o - tab[b + ST * w + j]
            sh = tab[b + SH * w + j]
            nh = tab[b + NH * w + j]
            if nh > 1:
                v = off >> sh
                f = tab[b + UF * w + j]
                r = tab[b + UR * w + j]
                if v < r:
                    sym_st[ns] = v * (f + 1) | ln
                    sym_fr[ns] = f + 1
                else:
                    sym_st[ns] = r * (f + 1) + (v - r) * f | ln
                    sym_fr[ns] = f
                ns += 1
            k = sh
            while k > 0:  # the low bits, uniform, in chunks of at most LOW_BITS (deep fp32 segments need two)
                nb = min(k, LOW_BITS)
                k -= nb
                sym_fr[ns] = np.int64(1) << (PB - nb)
                sym_st[ns] = ((off >> k) & ((np.int64(1) << nb) - 1)) * sym_fr[ns] | ln
                ns += 1
    return ns


@njit(cache=True, nogil=True)
def delta_decode(words, xs, ps, q, zeros, sids, uscales, i0, i1, in_f, gshift, width, mb, tz, lut, cache,
                 out, lmask):
    """Decode elements ``[i0, i1)`` into ``out`` (bit patterns). Element ``i`` reads lane ``l = (i - i0) & lmask``:
    state ``xs[l]``, the next word at ``ps[0]`` (both updated in place; the caller checks them: ``2**16`` each
    and every word read). ``words`` is never empty (the driver passes one pad word for an empty stream):
    reads are clamped to it, so a corrupt stream never reads out of bounds.
    Bins come prebuilt (:func:`build_bins`)."""
    built, nseg, tab, inv, rec, kind = cache[2], cache[4], cache[5], cache[6], cache[9], cache[10]
    n_scales = built.shape[0]
    nw = words.size  # q: flat, row-major [out, in]
    # the states and read positions live in memory, so that the lanes' chains overlap (see streams.rans_encode)
    mask = (np.int64(1) << PB) - 1
    kindf = kind.reshape(kind.size)  # flat: (scale, level) -> kind, one index per element
    # Runs of one group (same row, scale and zero point): the group's fields are read once per run.
    start = i0
    while start < i1:
        row, g, col0, col1 = _group_run(start, i1, in_f, gshift)
        u = np.int64(sids[row, g])
        zg = np.int64(zeros[row, g])
        kbase = u * NLEV + 15 - zg  # + q: the (scale, level) of code q
        end = start + (col1 - col0)
        for i in range(start, end):
            # unsigned indices (every one here is >= 0): numba then emits no negative-index wraparound
            iu = np.uint64(i)
            qc = np.int64(q[iu])
            kd = kindf[np.uint64(kbase + qc)]
            ln = np.uint64((i - i0) & lmask)
            if kd == ONE:  # one symbol per weight (see bins._single, bins._record)
                x = xs[ln]
                r = np.uint64((kbase + qc) * REC)
                slot = x & mask
                # branch-free segment search: CUM of the unused segments is 2**PB, n <= SMALL
                j = np.uint64((slot >= rec[r + _U1]) + (slot >= rec[r + _U2]) + (slot >= rec[r + _U3]))
                sub = rec[r + j]  # CUM_j + UR_j (segment 0: UR_0, the first ordinal's extra frequency)
                wj = rec[r + _U4 + j]
                off = _div(max(slot - sub, np.int64(0)), rec[r + _U8 + j])
                first = (j == _U0) & (off == 0)  # the first ordinal: slots [0, UF_0 + UR_0)
                a = np.int64(0) if first else sub + off * wj
                f = wj + sub if first else wj
                x = f * (x >> PB) + slot - a
                pos = ps[0]
                nxt = (x << 16) | np.int64(words[np.uint64(min(pos, nw - 1))])  # read unconditionally: a select
                renorm = x < STATE_LOW
                xs[ln] = nxt if renorm else x
                ps[0] = pos + np.int64(renorm)
                # off < CNT_j always: slot < CUM_{j+1} = CUM_j + UR_j + UF_j * CNT_j (corrupt streams too)
                out[np.uint64(i - i0)] = _pattern(_real(rec[r + _U12 + j] + off, tz), width)
                continue
            if kd == 0:  # EMPTY: an exception, patched by the driver
                out[np.uint64(i - i0)] = 0
                continue
            c = qc - zg
            li = c + 15
            n = nseg[u, li]
            x = xs[ln]
            pos = ps[0]
            b, w, ib = _where(c, u, li, n_scales)
            j = 0
            if n > 1:
                slot = x & mask
                # the first four steps of the search branch-free (most weights of the zero bin lie in its top
                # binades, the first segments), then one by one; reads past the n used segments are masked
                cm = np.uint64(b + CUM * w)
                j = np.int64((n > 1) & (slot >= tab[cm + _U1])) + np.int64((n > 2) & (slot >= tab[cm + _U2])) \
                    + np.int64((n > 3) & (slot >= tab[cm + _U3])) + np.int64((n > 4) & (slot >= tab[cm + _U4]))
                while j < n - 1 and slot >= tab[np.uint64(b + CUM * w + j)] + tab[np.uint64(b + FR * w + j)]:
                    j += 1
                x = tab[np.uint64(b + FR * w + j)] * (x >> PB) + slot - tab[np.uint64(b + CUM * w + j)]
                nxt = (x << 16) | np.int64(words[np.uint64(min(pos, nw - 1))])  # a select, no branch (see above)
                renorm = x < STATE_LOW
                x = nxt if renorm else x
                pos += np.int64(renorm)
            sh = tab[np.uint64(b + SH * w + j)]
            nh = tab[np.uint64(b + NH * w + j)]
            off = np.int64(0)
            if nh > 1:
                slot = x & mask
                f = tab[np.uint64(b + UF * w + j)]
                ur = tab[np.uint64(b + UR * w + j)]
                big = ur * (f + 1)
                # both halves computed, one selected: which half a slot falls in is data (a branch mispredicts)
                hi = slot >= big
                v_lo = _div(slot, inv[np.uint64(ib + 2 * j)])
                v_hi = ur + _div(max(slot - big, np.int64(0)), inv[np.uint64(ib + 2 * j + 1)])
                v = v_hi if hi else v_lo
                a = big + (v_hi - ur) * f if hi else v_lo * (f + 1)
                f = f if hi else f + 1
                x = f * (x >> PB) + slot - a
                nxt = (x << 16) | np.int64(words[np.uint64(min(pos, nw - 1))])  # a select, no branch (see above)
                renorm = x < STATE_LOW
                x = nxt if renorm else x
                pos += np.int64(renorm)
                off = v << sh
            k = sh
            while k > 0:
                nb = min(k, LOW_BITS)
                k -= nb
                slot = x & mask
                f = np.int64(1) << (PB - nb)
                lo = slot >> (PB - nb)
                x = f * (x >> PB) + slot - lo * f
                nxt = (x << 16) | np.int64(words[np.uint64(min(pos, nw - 1))])  # a select, no branch (see above)
                renorm = x < STATE_LOW
                x = nxt if renorm else x
                pos += np.int64(renorm)
                off |= lo << k
            xs[ln] = x
            ps[0] = pos
            off = min(off, tab[np.uint64(b + CNT * w + j)] - 1)  # a corrupt stream may point past the segment
            out[np.uint64(i - i0)] = _pattern(_real(tab[np.uint64(b + ST * w + j)] + off, tz), width)
        start = end
