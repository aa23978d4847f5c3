"""The pack's elementwise compiled passes: context buckets, Adam features and fp32 predictions.

Each gives the numpy (or :mod:`~tpde_hf.checkpoints.kernels`) version's values bit for bit, in one pass without
temporaries, into an array from :func:`~tpde_hf.checkpoints.enc_buffers.empty` (pooled inside ``scratch()``):

* :func:`buckets`: a tensor's context buckets (uint8);
* :func:`half_exponent`, :func:`square_ctx`, :func:`weight_ctx`: the contexts and ``m * m`` feature of
  :func:`tpde_hf.checkpoints.predict.options`;
* :func:`ratio_f32`: ``m / (sqrt(v) + eps)``; :func:`predict_f32` / :func:`predict_ratio_f32`: ``codec.predict``'s
  float32 arithmetic in the same order (the latter with the Adam ratios formed inline, never stored).

Where a result is NaN (whose payload a compiled operation may not reproduce) they return a count, and the caller
falls back to numpy.

Example::

    p, nan = predict_f32(ref, f1, f2, np.array([0.9, 0.1, 0], np.float32), 1)
"""

from __future__ import annotations

import numpy as np
from numba import njit

from tpde_hf.checkpoints.enc_buffers import empty
from tpde_hf.checkpoints.kernels import buckets_into


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


@njit(cache=True, inline="always", error_model="numpy")
def _ratio_pred_loop(ref, m1, v1, m2, v2, c0, c1, c2, e, use1, use2, p):
    """:func:`_predict_ratio_into`'s loop; ``use1``/``use2`` are literals at each call, so each copy has no branch
    and vectorises. Why ``error_model="numpy"``: numba's default checks every division for zero (to raise
    ZeroDivisionError), which keeps the loop scalar (measured 4.9 vs 1.8 ns per weight; ``sqrt(v) + eps`` is never
    0, and IEEE division and square root are correctly rounded either way: numpy's bits)."""
    nan = 0
    for i in range(ref.shape[0]):
        v = ref[i] * c0
        if use1:
            v = v + c1 * (m1[i] / (np.sqrt(v1[i]) + e))
        if use2:
            v = v + c2 * (m2[i] / (np.sqrt(v2[i]) + e))
        p[i] = v
        nan += v != v
    return nan


@njit(cache=True, nogil=True, error_model="numpy")
def _predict_ratio_into(ref, m1, v1, m2, v2, coef, n_feat, eps, p):
    """:func:`_predict_f32_into` with features ``f_k = m_k / (sqrt(v_k) + eps)`` made inline (the same float32
    operations as :func:`_ratio_into`, then the prediction's, in the same order): the features are never stored.
    Returns the count of NaN predictions (the caller then makes the features and the prediction with numpy)."""
    c0, c1, c2 = coef[0], coef[1], coef[2]
    e = eps[0]
    use1 = n_feat >= 1 and c1 != 0
    use2 = n_feat >= 2 and c2 != 0
    if use1 and use2:
        return _ratio_pred_loop(ref, m1, v1, m2, v2, c0, c1, c2, e, True, True, p)
    if use1:
        return _ratio_pred_loop(ref, m1, v1, m2, v2, c0, c1, c2, e, True, False, p)
    if use2:
        return _ratio_pred_loop(ref, m1, v1, m2, v2, c0, c1, c2, e, False, True, p)
    return _ratio_pred_loop(ref, m1, v1, m2, v2, c0, c1, c2, e, False, False, p)


def predict_ratio_f32(ref, m1, v1, m2, v2, coef, n_feat, eps):
    """The prediction of :func:`_predict_ratio_into` (pooled inside ``enc_buffers.scratch()``) and its NaN count."""
    p = empty(ref.shape[0], np.float32)
    return p, _predict_ratio_into(ref, m1, v1, m2, v2, coef, np.int64(n_feat), eps, p)


@njit(cache=True, nogil=True, error_model="numpy")
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

def buckets(src, lo, n_ctx, special):
    """Context buckets (:func:`tpde_hf.checkpoints.kernels.buckets_into`) into a numpy-allocated output: the
    encoder's and the decoder's (``codec._buckets``)."""
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

