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

from tpde_hf.checkpoints import enc_kernels as E

_OPT = re.compile(r"^(?P<file>[^:]*optimizer[^:]*):state/(?P<idx>\d+)/(?P<what>exp_avg|exp_avg_sq)$")
EPS = np.float32(1e-8)
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
        r, nan = E.ratio_f32(m, v, _EPS_ARR)
        if not nan:
            return r
    return m / (np.sqrt(v) + EPS)


def options(key: str, cur: Mapping[str, torch.Tensor], prev: Mapping[str, torch.Tensor] | None,
            param_names: Sequence[str] | None, backward: bool = False) -> dict[str, Any]:
    """Codec options (``features``, ``ctx``) for ``key``; ``{}`` (plain previous-value delta) when the
    inputs are missing. Both sides call this with the same already-decoded tensors.

    ``backward``: ``prev`` is the *later* checkpoint (N+1) and ``cur`` the one being coded (N). The
    weight's and ``exp_avg``'s relations are symmetric in time (the fitted coefficients take the
    sign and the decay); ``exp_avg_sq`` is ``v_N = (v_{N+1} - fresh) / b2^k``, predicted from
    ``v_{N+1}`` and ``m_{N+1}^2`` (the fresh gradients' size), see :func:`_backward_v`."""
    if prev is None:
        return {}
    role, idx, file = _role(key)
    if role == 0:
        v0 = _np(prev.get(f"{file}:state/{idx}/exp_avg_sq"))
        ref = prev.get(key)
        if v0 is None or ref is None or v0.size != ref.numel():
            return {}
        return {"ctx": E.half_exponent(v0)}
    if role == 1 and backward:
        return _backward_v(_np(prev.get(f"{file}:state/{idx}/exp_avg")), _np(cur.get(f"{file}:state/{idx}/exp_avg")),
                           _np(prev.get(key)))
    if role == 1:
        m1, v0 = _np(cur.get(f"{file}:state/{idx}/exp_avg")), _np(prev.get(key))
        if m1 is None or v0 is None or m1.size != v0.size:
            return {}
        m2, ctx = E.square_ctx(m1, v0)  # m1 * m1, exponent(m1 * m1) - exponent(v0) as int32
        return {"features": [m2], "ctx": ctx}
    if not param_names or ":" not in key:
        return {}
    file, name = key.split(":", 1)
    if name not in param_names:
        return {}
    i = list(param_names).index(name)
    opt = next((k.split(":")[0] for k in cur if k.endswith(f":state/{i}/exp_avg")), None)
    if opt is None:
        return {}
    m1, v1 = _np(cur.get(f"{opt}:state/{i}/exp_avg")), _np(cur.get(f"{opt}:state/{i}/exp_avg_sq"))
    m0, v0 = _np(prev.get(f"{opt}:state/{i}/exp_avg")), _np(prev.get(f"{opt}:state/{i}/exp_avg_sq"))
    w0 = _np(prev.get(key))
    if any(a is None for a in (m1, v1, m0, v0, w0)) or len({a.size for a in (m1, v1, m0, v0, w0)}) != 1:
        return {}
    ctx = E.weight_ctx(w0, v1, -1000)  # exponent(w0); -1000 where never touched by a gradient (decay alone)
    return {"features": [_ratio(m1, v1), _ratio(m0, v0)], "ctx": ctx}


def _backward_v(m_later: np.ndarray | None, m_now: np.ndarray | None, v_later: np.ndarray | None) -> dict[str, Any]:
    """Options for ``v_N`` given ``m_{N+1}``, ``m_N`` and ``v_{N+1}``: feature ``m_{N+1}^2``, context
    ``exp(m_{N+1}^2) - exp(v_{N+1})`` (how much of ``v_{N+1}`` is fresh, i.e. missing from ``v_N``).

    Measured on the MiniLM run (checkpoints 100 -> 120, 20 steps apart), bits per ``exp_avg_sq``:
    this 22.04; with ``m_N^2`` as a second feature 22.04; ``m_N^2`` alone (the forward formula's
    mirror) 22.50; no feature 22.69; the forward delta of the same pair 21.91.
    """
    if m_later is None or m_now is None or v_later is None or not m_later.size == m_now.size == v_later.size:
        return {}
    m2, ctx = E.square_ctx(m_later, v_later)  # m_later ** 2, exponent(m_later ** 2) - exponent(v_later) (int32)
    return {"features": [m2], "ctx": ctx}
