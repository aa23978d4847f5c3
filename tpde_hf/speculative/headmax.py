"""The argmax of plain decoding's ``lm_head`` row, certified from one batched product and error bounds.

Greedy decoding needs only the argmax of each row's logits, but the argmax of the logits *plain decoding*
computes: ``L = F.linear(h, W)`` on one row, whose bf16 values tie often (and ``argmax`` then takes the
first index). Recomputing that product per verified row costs a full pass over the largest weight
(SmolLM2: 49152 x 576, ~5 ms per row on 2 cores). :func:`certified_argmax` gets the same answer for all
rows at once, or says it cannot:

1. one batched product ``Lb = F.linear(H, W)`` (any kernel; its rounding may differ from the one-row call);
2. a rigorous bound on how far any fp32 accumulation of the exact products can be from the true sum:
   ``|S - T| <= E = gamma_K * sum_k |h_k W_jk|`` for *every* summation order, with or without FMA
   (``gamma_K = K u / (1 - K u)``, ``u = 2**-24``; bf16 products are exact in fp32), plus an absolute term
   for flushed subnormals; ``sum |h_k W_jk|`` is bounded by ``min(|h|_2 |W_j|_2, |h|_inf |W_j|_1)``;
3. from ``Lb`` and these bounds, the candidates that could be (or tie) the plain row's maximum;
4. for the candidates only, the true sums in float64 (exact products, a bounded float64 sum), hence an
   interval for the accumulator ``S`` of the plain call and, rounding it outward to fp32 and then as the
   kernel rounds (round to nearest even), an interval for the plain logit ``L``;
5. the winner when its interval lies above every other candidate's (ties resolved by index, as
   ``argmax`` resolves them) and above every non-candidate's bound; else ``None``: the caller computes
   that row with the plain one-row product.

What is assumed of the plain one-row kernel: it accumulates the products in fp32 (any order, FMA or not,
subnormals kept or flushed) and rounds the sum once to the output dtype, to nearest. No bias (a layer
with one is not certified). Output dtypes bf16 and fp32 only.

Example::

    best = certified_argmax(h, w, HeadNorms.of(w))   # [m] ints, or None where not certified
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: more candidates than this: not worth refining (the caller falls back to the plain row)
MAX_CANDIDATES = 64
_U32 = 2.0 ** -24
_TINY = 2.0 ** -120  # absolute slack per value: flushed subnormal products and sums, bf16 subnormal rounding


@dataclass(frozen=True)
class HeadNorms:
    """Upper bounds on the row norms of a weight ``[N, K]`` (L2 and L1, float32), with the weight's identity."""

    key: tuple
    l2: torch.Tensor
    l1: torch.Tensor
    finite: bool = True

    @staticmethod
    def key_of(w: torch.Tensor) -> tuple:
        return (w.data_ptr(), w._version, tuple(w.shape), w.dtype, w.device)

    @classmethod
    def of(cls, w: torch.Tensor) -> HeadNorms:
        """The norms of ``w``, computed once per weight (a module-level cache keyed by the weight's identity)."""
        key = cls.key_of(w)
        got = _NORMS.get(key)
        if got is None:
            w32 = w.detach().to(torch.float32)
            # float32 sums of K terms: within K 2**-24 of the exact norms; 1 + 2**-8 covers that for K < 2**15
            up = 1 + 2.0  	** -8
            got = cls(key, w32.norm(dim=1) * up, w32.abs().sum(dim=1) * up, bool(torch.isfinite(w32).all()))
            _NORMS.clear()  # one lm_head at a time is the use; do not pin old weights' norms
            _NORMS[key] = got
        return got


_NORMS: dict[tuple, HeadNorms] = {}


def supported(w: torch.Tensor, h: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether :func:`certified_argmax` may be used for this product."""
    return (bias is None and w.dim() == 2 and w.dtype in (torch.bfloat16, torch.float32) and h.dtype == w.dtype
            and w.device.type == "cpu" and w.shape[1] < 2 ** 15)


def _round32(x: torch.Tensor, up: bool) -> torch.Tensor:
    """``x`` (float64) rounded to float32 toward +inf (``up``) or -inf, as float32."""
    y = x.to(torch.float32)
    if up:
        return torch.where(y.to(torch.float64) < x, torch.nextafter(y, torch.full_like(y, float("inf"))), y)
    return torch.where(y.to(torch.float64) > x, torch.nextafter(y, torch.full_like(y, float("-inf"))), y)


def _out_interval(s_lo: torch.Tensor, s_hi: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The output values an fp32 accumulator in ``[s_lo, s_hi]`` can round to (monotone rounding), as float64."""
    lo, hi = _round32(s_lo, up=False), _round32(s_hi, up=True)
    if dtype != torch.float32:
        lo, hi = lo.to(dtype), hi.to(dtype)
    return lo.to(torch.float64), hi.to(torch.float64)


def certified_argmax(h: torch.Tensor, w: torch.Tensor, norms: HeadNorms) -> list[int | None]:
    """Per row of ``h`` (``[m, K]``): the index plain ``F.linear(row, w).float().argmax()`` returns, or None.

    ``norms`` must be :meth:`HeadNorms.of` ``w`` (checked by its key). See the module docstring.
    """
    if norms.key != HeadNorms.key_of(w):
        raise ValueError("tpde certified_argmax: the norms belong to another weight (or a modified one)")
    m, k = h.shape
    if not norms.finite or not bool(torch.isfinite(h).all()):
        return [None] * m
    gamma = k * _U32 / (1 - k * _U32)
    r_out = 2.0 ** -7 if w.dtype == torch.bfloat16 else 2.0 ** -23  # a full ulp of the output, relative
    h32 = h.to(torch.float32)
    # |sum_k h_k W_jk| bounds per row (float32 products of bounds, inflated for their own rounding)
    n2 = (h32.norm(dim=1, keepdim=True) * (1 + 2.0 ** -8))
    ninf = h32.abs().amax(dim=1, keepdim=True)
    # coarse stage, all rows at once in float32: every bound inflated (2**-20 relative covers float32 rounding)
    lb = F.linear(h, w).to(torch.float32)  # [m, N], any kernel
    if not bool(torch.isfinite(lb).all()):
        return [None] * m
    a = torch.minimum(n2 * norms.l2, ninf * norms.l1)
    # |S_plain - Lb| <= Lb's own rounding + two accumulation errors (to the true sum and back)
    d = (lb.abs() * (r_out + 2.0 ** -20) + (2 * gamma * (1 + 2.0 ** -20)) * a + (2 * k + 2) * _TINY)
    s_hi = lb + d
    top = (lb - d).amax(dim=1, keepdim=True)  # the largest lower bound of a plain accumulator, per row
    floor = top - top.abs() * 2.0 ** -6 - _TINY  # two output ulps below it: every value that may round to a tie
    # the candidates are the rows' largest upper bounds down to ``floor``; the next one bounds all the others
    top_hi, top_idx = torch.topk(s_hi, min(MAX_CANDIDATES + 1, s_hi.shape[1]), dim=1)
    n_cand = (top_hi >= floor).sum(dim=1).tolist()
    out: list[int | None] = []
    h64 = h.to(torch.float64)
    for i in range(m):
        c = n_cand[i]
        if c == 0 or c > MAX_CANDIDATES:
            out.append(None)
            continue
        cand = torch.sort(top_idx[i, :c]).values
        rest_max = float(top_hi[i, c]) if c < top_hi.shape[1] else float("-inf")
        # the candidates' true sums: exact products in float64, a float64 sum within 2 K 2**-53 of the total
        t = w[cand].to(torch.float64) @ h64[i]
        a_c = a[i, cand].to(torch.float64) * (1 + 2.0 ** -20)
        e = a_c * (gamma + 2 * k * 2.0 ** -53) + t.abs() * 2.0 ** -50 + (k + 1) * _TINY  # + rounding of t -/+ e
        lo, hi = _out_interval(t - e, t + e, w.dtype)
        j = int(torch.argmax(lo))  # first index of the largest lower bound (candidates are in index order)
        win_lo = lo[j]
        idx = torch.arange(lo.numel())
        ok = bool((hi[idx < j] < win_lo).all()) and bool((hi[idx > j] <= win_lo).all())
        if ok and rest_max != float("-inf"):  # every other value's accumulator is at most rest_max
            rm = torch.tensor([rest_max + abs(rest_max) * 2.0 ** -20 + _TINY], dtype=torch.float64)
            ok = bool(_out_interval(rm, rm, w.dtype)[1][0] < win_lo)
        out.append(int(cand[j]) if ok else None)
    return out


__all__ = ["MAX_CANDIDATES", "HeadNorms", "certified_argmax", "supported"]
