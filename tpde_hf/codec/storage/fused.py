"""One compiled call per weight: every block of the ``narrow-rans`` q stream and delta stream in one nogil loop.

The block drivers of :mod:`.codec` call a kernel per block (on the codec's threads), with Python around each
call: job tuples, copies of the block's states, a check per block, and a release and re-acquire of the GIL per
call. On a load's decode workers (:mod:`tpde_hf.loading.storage_prefetch`) each weight runs on one core anyway,
and the loading thread runs Python beside them: every re-acquire may wait for the GIL (measured 2026-12-07:
a worker's decode took ~1.6x its CPU time inside a load). Here one call decodes every block, and each element's
code and delta in one loop (:func:`_dq_block`: :func:`.streams.q_decode`'s step, then :func:`.delta.delta_decode`'s
body), so the bytes decode to the same bits; it needs the bins of every level a group can use built beforehand
(:meth:`.table.BinTable.build`, which marks by group: the codes are not known before the loop).

Example::

    bad, block = decode_blocks(qw, qs, qc, dw, ds, dc, z, sids, numel, in_f, 7, 16, 0, cache, lutq, fcq, out,
                               1, 1, 1 << 16)   # (0, -1): every block ended on its states
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
    ST,
    UF,
    UR,
    _div,
    _pattern,
    _real,
    _where,
)
from tpde_hf.codec.storage.delta import _U0, _U1, _U2, _U3, _U4, _U8, _U12, _group_run
from tpde_hf.codec.storage.streams import QPB, STATE_LOW

Q_BAD, DELTA_BAD = 1, 2  # what :func:`decode_blocks` reports for a stream that does not end on its states


@njit(cache=True, inline="always")
def _block_words(words, start, count, pad):
    """A block's words (never empty: the kernels read one word ahead, clamped to the array)."""
    return words[start:start + count] if count > 0 else pad


@njit(cache=True, nogil=True)
def _dq_block(words, xs, ps, q_words, qxs, qps, lutq, fcq, zeros, sids, i0, i1, in_f, gshift, width, tz, cache,
              out, lmask, q_lmask):
    """:func:`.delta.delta_decode` of elements ``[i0, i1)`` with each element's code decoded in the same loop, from
    the q stream (``q_words``, lanes ``qxs``, position ``qps``, lane mask ``q_lmask``: :func:`.streams.q_decode`'s
    step), so that the CPU overlaps the two streams' chains and no code array is written or read (measured
    2026-12-07: 0.155 vs 0.161 s for MiniLM's weights, one thread). The loop is :func:`.delta.delta_decode`'s, line
    for line, but for where ``qc`` comes from: keep the two in step (the tests compare this decode with the
    block-by-block one, and both with the layout fixtures; a shared inlined step measured 3x slower)."""
    built, nseg, tab, inv, rec, kind = cache[2], cache[4], cache[5], cache[6], cache[9], cache[10]
    n_scales = built.shape[0]
    nw = words.size  # q: flat, row-major [out, in]
    # the states and read positions live in memory, so that the lanes' chains overlap (see streams.rans_encode)
    mask = (np.int64(1) << PB) - 1
    kindf = kind.reshape(kind.size)  # flat: (scale, level) -> kind, one index per element
    # Runs of one group (same row, scale and zero point): the group's fields are read once per run.
    nqw = q_words.size
    qmask = (np.int64(1) << QPB) - 1
    start = i0
    while start < i1:
        row, g, col0, col1 = _group_run(start, i1, in_f, gshift)
        u = np.int64(sids[row, g])
        zg = np.int64(zeros[row, g])
        kbase = u * NLEV + 15 - zg  # + q: the (scale, level) of code q
        lbase = zg << QPB  # the q stream's tables of this zero point
        fbase = zg << 4
        end = start + (col1 - col0)
        for i in range(start, end):
            # unsigned indices (every one here is >= 0): numba then emits no negative-index wraparound
            lq = np.uint64((i - i0) & q_lmask)  # the code: streams.q_decode's step
            xq = qxs[lq]
            sq = xq & qmask
            qc = np.int64(lutq[np.uint64(lbase + sq)])
            fc = fcq[np.uint64(fbase + qc)]
            xq = (fc >> 16) * (xq >> QPB) + sq - (fc & 0xFFFF)
            pq = qps[0]
            nq = (xq << 16) | np.int64(q_words[np.uint64(min(pq, nqw - 1))])
            rq = xq < STATE_LOW
            qxs[lq] = nq if rq else xq
            qps[0] = pq + np.int64(rq)
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


@njit(cache=True, nogil=True)
def decode_blocks(q_words, q_states, q_counts, d_words, d_states, d_counts, zeros, sids, numel, in_f, gshift, width,
                  tz, cache, lutq, fcq, out, q_lmask, d_lmask, block):
    """Decode the weight's bit patterns ``out`` (flat) of every block of ``block`` elements, codes and delta in one
    loop (:func:`_dq_block`). ``*_states`` ([blocks, 2] int64) and ``*_counts`` ([blocks] int64, summing to the
    word arrays' sizes: the caller checks) are the two streams' block indexes. Returns ``(Q_BAD or DELTA_BAD,
    block)`` for the first block whose stream does not end on ``2**16`` in every lane with all its words read
    (corrupt bytes: the caller raises), else ``(0, -1)``."""
    qx = np.empty(2, dtype=np.int64)
    dx = np.empty(2, dtype=np.int64)
    qp = np.zeros(1, dtype=np.int64)
    dp = np.zeros(1, dtype=np.int64)
    pad = np.zeros(1, dtype=np.uint16)
    qs = np.int64(0)
    ds = np.int64(0)
    for b in range(q_counts.size):
        i0 = b * block
        i1 = min(i0 + block, numel)
        qc = q_counts[b]
        dc = d_counts[b]
        qx[0] = q_states[b, 0]
        qx[1] = q_states[b, 1]
        dx[0] = d_states[b, 0]
        dx[1] = d_states[b, 1]
        qp[0] = 0
        dp[0] = 0
        _dq_block(_block_words(d_words, ds, dc, pad), dx, dp, _block_words(q_words, qs, qc, pad), qx, qp, lutq, fcq,
                  zeros, sids, i0, i1, in_f, gshift, width, tz, cache, out[i0:i1], d_lmask, q_lmask)
        if qx[0] != STATE_LOW or qx[1] != STATE_LOW or qp[0] != qc:
            return Q_BAD, b
        if dx[0] != STATE_LOW or dx[1] != STATE_LOW or dp[0] != dc:
            return DELTA_BAD, b
        qs += qc
        ds += dc
    return 0, -1
