"""numba loops of the ``narrow-rans`` storage codec that know nothing of bins: the rANS encoder of a block of
symbols, the q stream (the 4-bit codes, context: the group's zero point), and a scan for the coarse grid.

All rANS here: 32-bit state in ``[2**16, 2**32)``, 16-bit words, at most one word per step. The encoder runs
backwards over a block's symbols; the decoder must end on ``2**16`` with every word read (the drivers check).

Example: ``state, first = rans_encode(starts, freqs, n, 16, words)``; the block's words are ``words[first:]``.
"""

from __future__ import annotations

import numpy as np
from numba import njit

QPB = 12  # probability bits of the q stream (stored tables: coarser is cheaper)
STATE_LOW = 1 << 16


@njit(cache=True, nogil=True)
def rans_encode(sym_st, sym_fr, ns, pb, words):
    """rANS-encode symbols ``[0, ns)`` backwards into the end of ``words``; ``(final state, first word)``."""
    # Reciprocals first: independent divisions pipeline, while the state's chain below only multiplies.
    rcp = np.empty(ns, dtype=np.float64)
    for t in range(ns):
        rcp[t] = 1.0 / np.float64(sym_fr[t])
    x = np.uint64(STATE_LOW)
    p = words.size
    for t in range(ns - 1, -1, -1):
        f = np.uint64(sym_fr[t])
        if x >= f << np.uint64(32 - pb):
            p -= 1
            words[p] = np.uint16(x & np.uint64(0xFFFF))
            x >>= np.uint64(16)
        # x < 2**32 and f <= 2**16: x * (1 / f) is within 2**-19 of x / f, so its floor is off by at most one.
        d = np.uint64(np.float64(x) * rcp[t])
        if d * f > x:
            d -= np.uint64(1)
        elif (d + np.uint64(1)) * f <= x:
            d += np.uint64(1)
        x = (d << np.uint64(pb)) + (x - d * f) + np.uint64(sym_st[t])
    return x, p


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
def q_symbols(q, zeros, i0, i1, in_f, gshift, cumq, freqq, sym_st, sym_fr):
    """Forward pass of a block of the base: symbol ``q`` in context ``z`` (its group's zero point)."""
    ns = 0
    row = i0 // in_f
    col = i0 - row * in_f
    for _ in range(i0, i1):
        z = zeros[row, col >> gshift]
        v = q[row, col]
        sym_st[ns] = cumq[z, v]
        sym_fr[ns] = freqq[z, v]
        ns += 1
        col += 1
        if col == in_f:  # no division per element
            col = 0
            row += 1
    return ns


@njit(cache=True, nogil=True)
def q_decode(words, state, zeros, i0, i1, in_f, gshift, lutq, cumq, freqq, q):
    """Decode the codes of elements ``[i0, i1)`` into ``q`` ([out, in]); ``(final state, words read)``.
    ``words`` is never empty (the driver passes one pad word for an empty stream)."""
    nw = words.size
    pos = 0
    x = np.int64(state)
    mask = (np.int64(1) << QPB) - 1
    row = i0 // in_f
    col = i0 - row * in_f
    for _ in range(i0, i1):
        z = zeros[row, col >> gshift]
        slot = x & mask
        v = lutq[z, slot]
        x = freqq[z, v] * (x >> QPB) + slot - cumq[z, v]
        nxt = (x << 16) | np.int64(words[min(pos, nw - 1)])  # read unconditionally (nw >= 1): a select
        renorm = x < STATE_LOW
        x = nxt if renorm else x
        pos += np.int64(renorm)
        q[row, col] = v
        col += 1
        if col == in_f:
            col = 0
            row += 1
    return x, pos
