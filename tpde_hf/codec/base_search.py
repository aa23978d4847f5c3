"""An error-minimizing 4-bit base: a per-group search of scale and zero point, without calibration data.

The default base (:func:`tpde_hf.codec.base_quant.quantize`) maps each group's full range ``[min, max]``
onto the 16 codes. One outlier then stretches the scale for the whole group, and every other weight
gets a coarser grid. This quantizer tries several clipped ranges per group (``[min, max]`` shrunk
toward 0 by a factor from :data:`SHRINK_GRID`). Then, like HQQ's alternating solver, it refits the
scale by least squares for the chosen codes and re-rounds. Each group keeps whichever candidate has
the smallest squared error.

The result has the same layout (fp16 scales, 4-bit integer zeros), so the format, the kernels and the
draft path take it unchanged, and the delta still makes the weight exact. Only the encoder needs to
know which quantizer ran. The decoder reads ``q``, ``scale`` and ``zero`` from the file.

Example::

    base = quantize_search(torch.randn(8, 256, dtype=torch.bfloat16), group_size=128)
    err_search = (base_quant.predict(base, (8, 256), 128, torch.float32) - w.float()).pow(2).sum()
    # err_search <= the min-max base's error, group by group (the min-max range is candidate 1.0)
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from tpde_hf.codec.base_quant import FP16_MAX, FP16_MIN_SUBNORMAL, BaseTensors, n_groups, pack_nibbles

#: Fractions of the group's range tried; 1.0 (the min-max base) is always among them, so the search never loses.
SHRINK_GRID = (1.0, 0.96, 0.92, 0.88, 0.84, 0.80, 0.76, 0.72, 0.68, 0.64)
#: Least-squares refits of the scale after the grid search (HQQ-style alternating steps).
REFINE_STEPS = 2
_CHUNK_ELEMENTS = 1 << 22


def _fp16_scale(scale32: torch.Tensor) -> torch.Tensor:
    """``scale32`` as a usable fp16 scale: clamped, and never 0 (an all-zero group gets 1.0)."""
    scale = scale32.clamp(min=0.0, max=FP16_MAX).to(torch.float16)
    fallback = torch.where(scale32 > 0, FP16_MIN_SUBNORMAL, 1.0).to(torch.float16)
    return torch.where(scale == 0, fallback, scale)


@njit(cache=True, parallel=True)
def _candidate_errors(w: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> np.ndarray:
    """Squared error of each group of ``w`` ``[n, G]`` under each candidate ``(scale, zero)`` ``[n, C]``.

    Non-finite weights count 0 (they get the code ``zero`` and the delta carries them)."""
    n, g = w.shape
    c_n = scales.shape[1]
    err = np.zeros((n, c_n), dtype=np.float64)
    for i in prange(n):
        for c in range(c_n):
            s = scales[i, c]
            z = zeros[i, c]
            acc = 0.0
            for j in range(g):
                x = w[i, j]
                if not np.isfinite(x):
                    continue
                q = min(max(np.round(x / s) + z, 0.0), 15.0)
                d = (q - z) * s - x
                acc += d * d
            err[i, c] = acc
    return err


@njit(cache=True, parallel=True)
def _codes_and_moments(w: np.ndarray, scale: np.ndarray, zero: np.ndarray):
    """Codes of ``w`` under one ``(scale, zero)`` per group, and the least-squares sums ``sum(w c)``, ``sum(c c)``."""
    n, g = w.shape
    q = np.empty((n, g), dtype=np.uint8)
    num = np.zeros(n, dtype=np.float64)
    den = np.zeros(n, dtype=np.float64)
    for i in prange(n):
        s = scale[i]
        z = zero[i]
        for j in range(g):
            x = w[i, j]
            if not np.isfinite(x):
                q[i, j] = np.uint8(z)
                continue
            qq = min(max(np.round(x / s) + z, 0.0), 15.0)
            q[i, j] = np.uint8(qq)
            c = qq - z
            num[i] += x * c
            den[i] += c * c
    return q, num, den


def _search_chunk(w: torch.Tensor, grid: tuple[float, ...], refine_steps: int) -> tuple[torch.Tensor, ...]:
    """Best ``(q, scale, zero)`` per group of ``w`` (``[groups, G]`` float32)."""
    wn = w.numpy()
    wf = torch.where(torch.isfinite(w), w, 0.0)
    lo = wf.amin(dim=-1).clamp(max=0.0)
    hi = wf.amax(dim=-1).clamp(min=0.0)
    f = torch.tensor(grid, dtype=torch.float32)
    scales = _fp16_scale((hi - lo)[:, None] * f / 15.0)  # [groups, C], fp16 as stored
    zeros = torch.round(-lo[:, None] * f / scales.to(torch.float32)).clamp(0, 15)
    for _ in range(refine_steps + 1):
        err = torch.from_numpy(_candidate_errors(wn, scales.to(torch.float32).numpy(), zeros.numpy()))
        best = err.argmin(dim=-1, keepdim=True)  # ties: the first (the min-max range comes first)
        scale, zero = scales.gather(1, best)[:, 0], zeros.gather(1, best)[:, 0]
        q, num, den = _codes_and_moments(wn, scale.to(torch.float32).numpy(), zero.numpy())
        if _ == refine_steps:
            break
        # HQQ-style step: the least-squares scale for these codes becomes one more candidate
        num_t, den_t = torch.from_numpy(num).float(), torch.from_numpy(den).float()
        refit = _fp16_scale(torch.where(den_t > 0, num_t / den_t.clamp(min=1.0), scale.to(torch.float32)).abs())
        scales = torch.cat((scale[:, None], refit[:, None]), dim=1)
        zeros = torch.cat((zero[:, None], zero[:, None]), dim=1)
    return torch.from_numpy(q), scale, zero


def quantize_search(weight: torch.Tensor, group_size: int = 128, grid: tuple[float, ...] = SHRINK_GRID,
                    refine_steps: int = REFINE_STEPS) -> BaseTensors:
    """The packed 4-bit base of a 2-D ``weight`` with the smallest squared error found per group.

    Non-finite entries get the code ``zero`` (prediction 0), as in the min-max base; the delta carries them.
    """
    if 1.0 not in grid:
        raise ValueError("the grid must contain 1.0 (the min-max range) so the search never does worse")
    out_f, in_f = weight.shape
    ng = n_groups(in_f, group_size)
    rows = max(1, _CHUNK_ELEMENTS // max(1, ng * group_size))
    qs, scales, zeros = [], [], []
    for r0 in range(0, out_f, rows):
        w = weight[r0 : r0 + rows].to(torch.float32)
        r = w.shape[0]
        w = torch.nn.functional.pad(w, (0, ng * group_size - in_f)).reshape(r * ng, group_size).contiguous()
        q, scale, zero = _search_chunk(w, grid, refine_steps)
        qs.append(q.view(r, ng * group_size))
        scales.append(scale.view(r, ng))
        zeros.append(zero.to(torch.uint8).view(r, ng))
    return BaseTensors(qweight=pack_nibbles(torch.cat(qs)), scales=torch.cat(scales),
                       zeros=pack_nibbles(torch.cat(zeros)))
