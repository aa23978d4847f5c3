"""The rANS tables of the pack, in compiled code.

* :func:`quantize_tables`: ``rans.quantize_frequencies``' frequency tables (entry for entry) from symbol counts;
* :func:`flat_tables`: one packed uint64 per (context, symbol) for the encoder's exact division by a
  multiply-and-shift (each entry's constants checked);
* :func:`slot_symbols`: the decoder's symbol of every slot (the sampled verify's decode).

Example::

    freq = quantize_tables(hist, PROB_BITS)
    tab = flat_tables(freq, np.cumsum(freq, 1) - freq)
"""

from __future__ import annotations

import numpy as np
from numba import njit

from tpde_hf.checkpoints.kernels import PROB_BITS


def flat_tables(freq, cum):
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
    """:func:`flat_tables`' entries and a status (0 ok, 1 tables out of range, 2 a constant fails its check)."""
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

