"""What each checkpoint tensor is predicted from: Adam's arithmetic between two checkpoints.

A tensor is named ``<file>:<name>`` (``optimizer.pt:state/3/exp_avg``, ``model.safetensors:bert.pooler.dense.weight``).
Between checkpoints ``k`` steps apart, AdamW gives (g: gradients, u: the updates):

* ``exp_avg``   ``m1 = b1^k m0 + (1-b1) sum b1^(k-j) g_j``: mostly fresh noise (b1^20 = 0.12), so it is
  coded by sign and exponent, with the previous second moment's exponent as context (the size of a
  gradient);
* ``exp_avg_sq`` ``v1 = b2^k v0 + (1-b2) sum b2^(k-j) g_j^2``: predicted as ``c0 v0 + c1 m1^2`` (fitted;
  the fresh first moment says how large the recent gradients were), context ``exp(m1^2) - exp(v0)``;
* a weight ``w1 = w0 - sum lr_j m_j / (sqrt(v_j) + eps) - decay``: predicted as
  ``c0 w0 + c1 m1/(sqrt(v1)+eps) + c2 m0/(sqrt(v0)+eps)``, context the exponent of ``w0`` (how many ulps one
  step moves it), and its own context for parameters no gradient has touched yet (``v1 == 0``).

Measured on a MiniLM MLM run (checkpoints 20 steps apart, see ``benchmarks/bench_checkpoints.py``):
the weight features take about 1.7 bits per weight off a plain previous-value delta, ``m1^2`` about 0.9
bits per ``exp_avg_sq``. The coefficients are fitted per tensor by the codec and stored with it, so
a poor prediction costs nothing but the fit (the codec falls back to the plain delta).

The coding order puts every ``exp_avg`` first, then every ``exp_avg_sq``, then the rest, so that each
tensor's features are decoded before it.

Example::

    keys = coding_order(keys)
    opts = options(key, current, previous, param_names)   # CodecContext options for the codec
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from tpde_hf.checkpoints import enc_features as EF
from tpde_hf.checkpoints.kernels import ADAM_EPS

_OPT = re.compile(r"^(?P<file>[^:]*optimizer[^:]*):state/(?P<idx>\d+)/(?P<what>exp_avg|exp_avg_sq)$")
EPS = ADAM_EPS
_EPS_ARR = np.array([EPS], np.float32)


def _role(key: str) -> tuple[int, int | None, str | None]:
    m = _OPT.match(key)
    if m is None:
        return 2, None, None
    return (0 if m["what"] == "exp_avg" else 1), int(m["idx"]), m["file"]


def coding_order(keys: Sequence[str]) -> list[str]:
    """``keys`` with every ``exp_avg`` first, then every ``exp_avg_sq``, then the rest (stable)."""
    return sorted(keys, key=lambda k: _role(k)[0])


def stages(keys: Sequence[str]) -> list[list[str]]:
    """:func:`coding_order` cut into stages: a tensor's features come only from earlier stages, so the
    tensors of one stage can be coded in any order, or at once."""
    out: list[list[str]] = [[], [], []]
    for k in keys:
        out[_role(k)[0]].append(k)
    return [s for s in out if s]


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    if t is None or t.dtype != torch.float32:
        return None
    return t.reshape(-1).numpy()


def _ratio(m: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``m / (sqrt(v) + eps)`` (float32): one compiled pass, numpy's bits (its own where any result is NaN)."""
    if m.dtype == v.dtype == np.float32 and m.shape == v.shape:
        r, nan = EF.ratio_f32(m, v, _EPS_ARR)
        if not nan:
            return r
    return m / (np.sqrt(v) + EPS)


class Ratio:
    """The feature ``m / (sqrt(v) + eps)`` (float32) not yet made: the pack's codec forms it inline in its
    compiled prediction (:func:`~tpde_hf.checkpoints.enc_features.predict_ratio_f32`), never storing it; any
    index or slice of it is numpy's formula on those elements (the bits :func:`_ratio` gives), and
    :meth:`array` makes the whole of it (:func:`_ratio`)."""

    dtype = np.dtype(np.float32)

    def __init__(self, m: np.ndarray, v: np.ndarray):
        self.m, self.v = m, v
        self.size = m.size
        self.shape = m.shape

    def __getitem__(self, idx: Any) -> np.ndarray:
        return self.m[idx] / (np.sqrt(self.v[idx]) + EPS)

    def array(self) -> np.ndarray:
        return _ratio(self.m, self.v)


#: kinds of :func:`sources`: what a tensor's features and context are made of
FROM_V, FROM_M, FROM_ADAM = 0, 1, 2


def sources(key: str, cur: Mapping[str, torch.Tensor], prev: Mapping[str, torch.Tensor] | None,
            param_names: Sequence[str] | None, backward: bool = False,
            sizes: Mapping[str, int | None] | None = None) -> tuple[int, tuple[np.ndarray, ...]] | None:
    """``(kind, arrays)``: the already-decoded float32 tensors ``key``'s features and context are made from, or None
    (plain previous-value delta). The one place that picks them, for :func:`options` and for the restore's fused
    decoder (:mod:`tpde_hf.checkpoints.dec_features`), so both always read the same inputs.

    * :data:`FROM_V` ``(v0,)``: ``exp_avg``, context the exponent of the neighbour's ``exp_avg_sq``;
    * :data:`FROM_M` ``(m,)``: ``exp_avg_sq``, feature ``m * m``, context ``exp(m * m) - exp(ref)``; ``m`` is this
      checkpoint's ``exp_avg`` (forward) or the later one's (``backward``: ``v_N = (v_{N+1} - fresh) / b2^k``, and
      ``m_{N+1}^2`` says how large the fresh part is). Measured on the MiniLM run (checkpoints 100 -> 120), bits
      per backward ``exp_avg_sq``: this 22.04; with ``m_N^2`` as a second feature 22.04; ``m_N^2`` alone 22.50;
      no feature 22.69; the forward delta of the same pair 21.91;
    * :data:`FROM_ADAM` ``(m1, v1, m0, v0)``: a weight, features ``m / (sqrt(v) + eps)`` of both checkpoints,
      context the exponent of the neighbour's weight.

    ``sizes``: float32 element counts of ``cur``'s tensors not decoded yet (None: not float32). A backward
    ``exp_avg_sq`` reads its own checkpoint's ``exp_avg`` only for its size, so with ``sizes`` it need not wait
    for that decode."""
    if prev is None:
        return None
    role, idx, file = _role(key)
    if role == 0:
        v0, ref = _np(prev.get(f"{file}:state/{idx}/exp_avg_sq")), prev.get(key)
        return (FROM_V, (v0,)) if v0 is not None and ref is not None and v0.size == ref.numel() else None
    if role == 1:
        mk = f"{file}:state/{idx}/exp_avg"
        v = _np(prev.get(key))
        if backward:  # m_{N+1} is the feature; m_N only has to exist with the same size
            m = _np(prev.get(mk))
            if sizes is not None:  # without reading cur[mk], which may still be decoding
                now = sizes.get(mk) if mk in cur else None
            else:
                m_now = _np(cur.get(mk))
                now = None if m_now is None else m_now.size
            ok = m is not None and v is not None and now is not None and m.size == now == v.size
        else:
            m = _np(cur.get(mk))
            ok = m is not None and v is not None and m.size == v.size
        return (FROM_M, (m,)) if ok else None
    if not param_names or ":" not in key:
        return None
    name = key.split(":", 1)[1]
    if name not in param_names:
        return None
    i = list(param_names).index(name)
    opt = next((k.split(":")[0] for k in cur if k.endswith(f":state/{i}/exp_avg")), None)
    if opt is None:
        return None
    m1, v1 = _np(cur.get(f"{opt}:state/{i}/exp_avg")), _np(cur.get(f"{opt}:state/{i}/exp_avg_sq"))
    m0, v0 = _np(prev.get(f"{opt}:state/{i}/exp_avg")), _np(prev.get(f"{opt}:state/{i}/exp_avg_sq"))
    w0 = _np(prev.get(key))
    if any(a is None for a in (m1, v1, m0, v0, w0)) or len({a.size for a in (m1, v1, m0, v0, w0)}) != 1:
        return None
    return FROM_ADAM, (m1, v1, m0, v0)


def options(key: str, cur: Mapping[str, torch.Tensor], prev: Mapping[str, torch.Tensor] | None,
            param_names: Sequence[str] | None, backward: bool = False, lazy: bool = False) -> dict[str, Any]:
    """Codec options (``features``, ``ctx``) for ``key``; ``{}`` (plain previous-value delta) when the
    inputs are missing (:func:`sources`). Both sides call this with the same already-decoded tensors.

    ``lazy``: a weight's Adam ratios as :class:`Ratio` (the pack's codec forms them inside its prediction).
    ``backward``: ``prev`` is the *later* checkpoint (N+1) and ``cur`` the one being coded (N). The
    weight's and ``exp_avg``'s relations are symmetric in time (the fitted coefficients take the
    sign and the decay); ``exp_avg_sq`` is ``v_N = (v_{N+1} - fresh) / b2^k``, predicted from
    ``v_{N+1}`` and ``m_{N+1}^2`` (the fresh gradients' size), see :func:`sources`."""
    src = sources(key, cur, prev, param_names, backward)
    if src is None:
        return {}
    kind, arrays = src
    if kind == FROM_V:
        return {"ctx": EF.half_exponent(arrays[0])}
    if kind == FROM_M:
        m2, ctx = EF.square_ctx(arrays[0], _np(prev.get(key)))  # m * m, exponent(m * m) - exponent(ref) (int32)
        return {"features": [m2], "ctx": ctx}
    m1, v1, m0, v0 = arrays
    ctx = EF.weight_ctx(_np(prev.get(key)), v1, -1000)  # exponent(w0); -1000 where never touched by a gradient
    if lazy:
        return {"features": [Ratio(m1, v1), Ratio(m0, v0)], "ctx": ctx}
    return {"features": [_ratio(m1, v1), _ratio(m0, v0)], "ctx": ctx}
