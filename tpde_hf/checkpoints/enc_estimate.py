"""The codec's candidate choice: the coded size of a candidate prediction, estimated on a sample.

:func:`sample_costs` gives the conditional entropy of the sampled elements' symbols plus their raw bits, for both
symbol modes at once; :func:`sample_cost` is one mode's, in numpy (the reference the tests hold it to).

Example::

    cost_ord, cost_fld = sample_costs(x, p_sample, ctx, idx, 32, 23, n_ctx)
"""

from __future__ import annotations

import numpy as np
from numba import njit

from tpde_hf.checkpoints.kernels import _bitlen
from tpde_hf.codec.compiled_kernels import _ordinal, _wrap


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
def normal_equations(cols, target, gram, rhs):
    """The least-squares normal equations of ``target ~ cols.T @ c`` (``cols``: 1 to 3 rows) over the rows where
    every column and the target are finite: ``gram = A.T A`` and ``rhs = A.T t`` (float64, one pass, the sums in
    registers). Returns the rows used."""
    k, n = cols.shape
    one = cols[0]
    two = cols[1] if k > 1 else cols[0]
    three = cols[2] if k > 2 else cols[0]
    s00 = s01 = s02 = s11 = s12 = s22 = r0 = r1 = r2 = 0.0
    used = 0
    for i in range(n):
        t, a, b, c = target[i], one[i], two[i], three[i]
        if (t - t) + (a - a) + (b - b) + (c - c) != 0.0:  # not 0 exactly when one is inf or NaN
            continue
        used += 1
        s00 += a * a
        s01 += a * b
        s02 += a * c
        s11 += b * b
        s12 += b * c
        s22 += c * c
        r0 += a * t
        r1 += b * t
        r2 += c * t
    full = np.array([[s00, s01, s02], [s01, s11, s12], [s02, s12, s22]])
    gram[:, :] = full[:k, :k]
    rhs[:] = np.array([r0, r1, r2])[:k]
    return used


@njit(cache=True, nogil=True)
def _solve_scaled(gram, rhs, out):
    """Solve ``gram @ c = rhs`` (symmetric, k <= 3) by Cholesky on the unit-diagonal scaling; False (``out`` not
    set) where a column is zero or the scaled system is near singular (a pivot below 1e-8)."""
    k = rhs.shape[0]
    d = np.empty(k)
    for a in range(k):
        if not gram[a, a] > 0.0 or not np.isfinite(gram[a, a]):
            return False
        d[a] = np.sqrt(gram[a, a])
    low = np.zeros((k, k))
    for a in range(k):
        for b in range(a + 1):
            v = gram[a, b] / (d[a] * d[b])
            for j in range(b):
                v -= low[a, j] * low[b, j]
            if a == b:
                if not v > 1e-8:
                    return False
                low[a, a] = np.sqrt(v)
            else:
                low[a, b] = v / low[b, b]
    z = np.empty(k)
    for a in range(k):
        v = rhs[a] / d[a]
        for j in range(a):
            v -= low[a, j] * z[j]
        z[a] = v / low[a, a]
    for a in range(k - 1, -1, -1):
        v = z[a]
        for j in range(a + 1, k):
            v -= low[j, a] * out[j]
        out[a] = v / low[a, a]
    for a in range(k):
        out[a] /= d[a]
    return True


def least_squares(cols: list[np.ndarray], target: np.ndarray) -> np.ndarray | None:
    """Coefficients ``c`` minimising ``|sum c_i cols_i - target|`` over the finite rows (1 to 3 columns, float64),
    by the normal equations with the columns scaled to unit norm; None with fewer than 16 finite rows, or where the
    scaled system is near singular (the caller then uses an SVD solver, which handles a dependent or all-zero
    column). Why not ``np.linalg.lstsq`` alone: on a sample of 8192 rows its SVD and numpy's temporaries cost
    ~0.15-0.45 ms per fit, this ~0.05 ms (about 200 fits per save). Any coefficients code exactly; these only
    decide the size."""
    k = len(cols)
    if not 1 <= k <= 3:
        raise ValueError("least_squares: 1 to 3 columns")
    a = np.empty((k, target.size))
    for i, c in enumerate(cols):
        a[i] = c
    gram, rhs, out = np.zeros((k, k)), np.zeros(k), np.zeros(k)
    if normal_equations(a, np.asarray(target, np.float64), gram, rhs) < 16 or not _solve_scaled(gram, rhs, out):
        return None
    return out
