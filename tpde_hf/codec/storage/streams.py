"""numba loops of the ``narrow-rans`` storage codec that know nothing of bins: the rANS encoder of a block of
symbols, the q stream (the 4-bit codes, context: the group's zero point), and a scan for the coarse grid.

All rANS here: 32-bit state in ``[2**16, 2**32)``, 16-bit words, at most one word per step. The encoder runs
backwards over a block's symbols; the decoder must end on ``2**16`` with every word read (the drivers check).

Layout 2 interleaves two rANS states per block (element ``i`` of a block starting at ``i0`` goes to lane
``(i - i0) & 1``) over one word stream; layout 1 has one. (Four states with a word stream each, so that no
lane waits for another's refill, measured no faster on 2026-12-07: the loops are bound by their instruction
count, not by that chain; they were not kept, as their block index costs 0.005 bits per weight.)

Example: ``xs, first = rans_encode(starts, freqs, n, 16, words)``; the block's words are ``words[first:]``.
"""

from __future__ import annotations

import numpy as np
from numba import njit

QPB = 12  # probability bits of the q stream (stored tables: coarser is cheaper)
STATE_LOW = 1 << 16
LANE_SHIFT = 20  # symbol starts (< 2**16) carry their element's lane above this bit
LANE_MASK = (1 << LANE_SHIFT) - 1
NLANES = 2  # rANS states per block (layout 1 uses 1, layout 2 both)


@njit(cache=True, nogil=True)
def rans_encode(sym_st, sym_fr, ns, pb, words):
    """rANS-encode symbols ``[0, ns)`` backwards into the end of ``words``; ``(state of each lane, first word)``.
    A symbol's start carries its lane above bit :data:`LANE_SHIFT` (layout 1: all lane 0). The lanes share the
    word stream. Unused lanes end in ``2**16``."""
    # The states (lanes) in memory, not registers: a select between registers would make each symbol wait
    # for the other lanes' chains; through memory each lane waits only for itself, so the chains overlap.
    xs = np.full(NLANES, np.uint64(STATE_LOW), dtype=np.uint64)
    p = words.size
    for t in range(ns - 1, -1, -1):
        st = np.int64(sym_st[t])
        ln = st >> LANE_SHIFT
        x = xs[ln]
        f = np.uint64(sym_fr[t])
        if x >= f << np.uint64(32 - pb):
            p -= 1
            words[p] = np.uint16(x & np.uint64(0xFFFF))
            x >>= np.uint64(16)
        # x < 2**32 and f <= 2**16: x * (1 / f) is within 2**-19 of x / f, so its floor is off by at most one.
        # 1 / f does not depend on the state: the CPU computes it ahead while the state's chain only multiplies.
        d = np.uint64(np.float64(x) * (1.0 / np.float64(sym_fr[t])))
        if d * f > x:
            d -= np.uint64(1)
        elif (d + np.uint64(1)) * f <= x:
            d += np.uint64(1)
        xs[ln] = (d << np.uint64(pb)) + (x - d * f) + np.uint64(st & LANE_MASK)
    return xs, p


@njit(cache=True, nogil=True)
def or_finite_magnitudes(bits, width, mb):
    """OR of the magnitude bits of every finite weight (bit patterns ``bits``)."""
    mag_mask = (np.int64(1) << (width - 1)) - 1
    inf_exp = (np.int64(1) << (width - 1 - mb)) - 1
    acc = np.int64(0)
    for v in bits:
        m = np.int64(v) & mag_mask
        if (m >> mb) != inf_exp:
            acc |= m
    return acc


@njit(cache=True, nogil=True)
def q_counts(q, zeros, gshift):
    """``counts[z, v]``: how often code ``v`` occurs in a group of zero point ``z`` (one pass, no copies)."""
    counts = np.zeros((16, 16), dtype=np.int64)
    out_f, in_f = q.shape
    for row in range(out_f):
        for col in range(in_f):
            counts[zeros[row, col >> gshift], q[row, col]] += 1
    return counts


@njit(cache=True, nogil=True)
def q_symbols(q, zeros, i0, i1, in_f, gshift, cumq, freqq, sym_st, sym_fr, lmask):
    """Forward pass of a block of the base: symbol ``q`` in context ``z`` (its group's zero point); element
    ``i`` goes to lane ``(i - i0) & lmask`` (``lmask`` 0: one lane, layout 1; 1: two lanes)."""
    ns = 0
    row = i0 // in_f
    col = i0 - row * in_f
    for i in range(i0, i1):
        z = zeros[row, col >> gshift]
        v = q[row, col]
        sym_st[ns] = cumq[z, v] | (((i - i0) & lmask) << LANE_SHIFT)
        sym_fr[ns] = freqq[z, v]
        ns += 1
        col += 1
        if col == in_f:  # no division per element
            col = 0
            row += 1
    return ns


@njit(cache=True, nogil=True)
def q_decode(words, xs, ps, zeros, i0, i1, in_f, gshift, lutq, fcq, q, lmask):
    """Decode the codes of elements ``[i0, i1)`` into ``q`` (flat, row-major [out, in]). Element ``i`` reads lane
    ``l = (i - i0) & lmask``: state ``xs[l]``, the next word at ``ps[0]`` (both updated in place: the driver
    checks them). ``lutq`` (flat ``[16 * 2**QPB]``): the code of each slot per zero point; ``fcq`` (flat
    ``[16 * 16]``): ``freq << 16 | cum`` per (zero point, code). ``words`` is never empty (the driver passes one
    pad word for an empty stream); reads are clamped to it, so a corrupt stream never reads out of bounds."""
    nw = words.size
    mask = (np.int64(1) << QPB) - 1
    start = i0
    while start < i1:  # runs of one group: its zero point's tables are found once per run
        row = start // in_f
        col0 = start - row * in_f
        end = start + min(min(((col0 >> gshift) + 1) << gshift, in_f) - col0, i1 - start)
        z = np.int64(zeros[row, col0 >> gshift])
        lbase = z << QPB
        fbase = z << 4
        for i in range(start, end):
            # unsigned indices (every one here is >= 0): numba then emits no negative-index wraparound
            ln = np.uint64((i - i0) & lmask)
            x = xs[ln]  # in memory: see rans_encode
            slot = x & mask
            v = np.int64(lutq[np.uint64(lbase + slot)])
            fc = fcq[np.uint64(fbase + v)]
            x = (fc >> 16) * (x >> QPB) + slot - (fc & 0xFFFF)
            p = ps[0]
            nxt = (x << 16) | np.int64(words[np.uint64(min(p, nw - 1))])  # read unconditionally (nw >= 1)
            renorm = x < STATE_LOW
            xs[ln] = nxt if renorm else x
            ps[0] = p + np.int64(renorm)
            q[np.uint64(i)] = v
        start = end


@njit(cache=True, nogil=True)
def scale_ids(s16):
    """``(distinct values of uint16 ``s16``, sorted; the index of each element's value among them)``: what
    ``np.unique(s16, return_inverse=True)`` returns, by counting (no sort)."""
    slot = np.zeros(1 << 16, dtype=np.int32)
    flat = s16.ravel()
    for v in flat:
        slot[v] = 1
    n = 0
    for p in range(1 << 16):
        if slot[p]:
            slot[p] = n
            n += 1
    uniq = np.empty(n, dtype=np.uint16)
    ids = np.empty(flat.size, dtype=np.int32)
    for i in range(flat.size):
        ids[i] = slot[flat[i]]
        uniq[slot[flat[i]]] = flat[i]
    return uniq, ids


@njit(cache=True, nogil=True)
def pack_codes(q, z, g, out):
    """The resident ``qweight`` ([out, ng * g / 2] uint8, two codes a byte, low nibble first) of codes ``q``
    ([out, in]) in groups of ``g``, the padding past ``in`` being each group's zero point ``z`` ([out, ng])."""
    out_f, in_f = q.shape
    half = out.shape[1]
    for r in range(out_f):
        for k in range(half):
            c = 2 * k
            lo = q[r, c] if c < in_f else z[r, c // g]
            hi = q[r, c + 1] if c + 1 < in_f else z[r, (c + 1) // g]
            out[r, k] = lo | (hi << 4)
