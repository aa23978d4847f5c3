"""Which batched linear products are row-identical to one-row products, checked at run time.

The exact verifier (:mod:`tpde_hf.speculative.exact`) must compute every drafted row as plain decoding
does: ``F.linear`` on one row. Multiplying ``m`` rows in one call is cheaper, but the CPU GEMM picks its
kernel (and so its summation order) by shape: measured on a 2-core EPYC (torch 2.13, bf16), ``m`` rows
against ``m`` one-row calls were bit-identical for every row with ``K = 576`` (``N`` = 192, 576, 1536,
49152), but not with ``K = 1536`` at ``m >= 7``. So nothing is assumed: :func:`rows_identical` checks a
shape ``(K, N, m)`` once per process (random inputs of several magnitudes against the one-row calls, bit
for bit on integer views) and remembers the answer; :func:`largest_identical_chunk` picks the largest
checked chunk. The answer is keyed by dtype, bias and torch's thread count (the kernel can depend on it).

:func:`threads_identical` checks the same way whether a one-row product keeps its bits at fewer torch threads
(the tree's verification forwards run at one thread: ``TreeOptions.row_threads``).

The check is empirical: equal bits on random inputs show that the two calls take the same kernel path
for that shape (a different path rounds differently on almost every random input). The verifier also
compares its first real batched call of each shape with the one-row calls and gives up batching that
shape for good if they differ (:func:`confirmed`, :func:`record`).

Example::

    if rows_identical(576, 1536, 4, torch.bfloat16, False):
        y = F.linear(x4, w)          # same bits as four F.linear(x1, w) calls
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

#: (K, N, m, dtype, bias, threads) -> found row-identical (a random check: evidence, not proof)
_PROVEN: dict[tuple, bool] = {}
#: shapes whose first real batched call was compared with its one-row calls
_CONFIRMED: set[tuple] = set()
#: the largest chunk the verifier batches (more rows than a draft tree holds are never needed)
MAX_CHUNK = 32
#: trials per shape, alternating normal and heavy-tailed inputs. Normal inputs alone are too weak: bf16 output
#: rounding hides most summation-order differences (on SmolLM2's down_proj shape, K=1536, N=576, normal inputs
#: passed m=3 and m=6 where heavy-tailed ones failed, and batching at those m changed greedy tokens)
_TRIALS = 6


def _key(k: int, n: int, m: int, dtype: torch.dtype, bias: bool) -> tuple:
    return (k, n, m, dtype, bias, torch.get_num_threads())


def unsupported(w: torch.Tensor, dtype: torch.dtype) -> bool:
    """Shapes and dtypes the check does not cover (not a 2-d floating weight of the activation's dtype)."""
    return w.dim() != 2 or not w.is_floating_point() or w.dtype != dtype or w.device.type != "cpu"


def _heavy(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Normal values times 2**U{-12..12}: products of very different sizes."""
    return torch.randn(shape, generator=g) * torch.exp2(torch.randint(-12, 13, shape, generator=g).float())


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[t.dtype])


def _same_rows(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> bool:
    """``F.linear(x)`` on ``[1, m, K]`` against ``m`` calls on ``[1, 1, K]`` tensors of their own, bit for bit."""
    full = F.linear(x, w, b)
    for i in range(x.shape[1]):
        one = F.linear(x[:, i:i + 1].clone(memory_format=torch.contiguous_format), w, b)
        if not torch.equal(bits(one), bits(full[:, i:i + 1].contiguous())):
            return False
    return True


def rows_identical(k: int, n: int, m: int, dtype: torch.dtype, bias: bool) -> bool:
    """Whether ``F.linear`` of ``m`` rows equals ``m`` one-row calls bit for bit for ``[N, K]`` weights (cached)."""
    if m <= 1:
        return True
    if dtype not in (torch.bfloat16, torch.float16, torch.float32) or m > MAX_CHUNK:
        return False
    key = _key(k, n, m, dtype, bias)
    got = _PROVEN.get(key)
    if got is None:
        g = torch.Generator().manual_seed(k * 1_000_003 + n * 101 + m)
        got = True
        for trial in range(_TRIALS):
            if trial % 2 == 0:  # magnitudes of embeddings, of normed activations, of MLP products
                scale = (0.05, 1.0, 30.0)[trial // 2 % 3]
                w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
                x = (torch.randn(1, m, k, generator=g) * scale).to(dtype)
            else:  # heavy tails: the sums cancel, so any change of summation order shows in the rounded output
                w, x = _heavy((n, k), g).to(dtype), _heavy((1, m, k), g).to(dtype)
            b = torch.randn(n, generator=g).to(dtype) if bias else None
            if not _same_rows(x, w, b):
                got = False
                break
        _PROVEN[key] = got
    return got


def threads_identical(k: int, n: int, dtype: torch.dtype, bias: bool, threads: int, ambient: int) -> bool:
    """Whether a one-row ``F.linear`` with ``[N, K]`` weights gives the same bits at ``threads`` torch threads as
    at ``ambient`` threads (the plain decode's), on the same random inputs as :func:`rows_identical` (cached).

    The verifier computes its one-row products single-threaded (no OpenMP wake-up per tiny product); a kernel
    that split the sum over ``K`` between threads would round differently on almost every heavy-tailed input.
    """
    if threads == ambient:
        return True
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    key = ("threads", k, n, dtype, bias, threads, ambient)
    got = _PROVEN.get(key)
    if got is None:
        g = torch.Generator().manual_seed(k * 1_000_003 + n * 101 + threads * 7 + ambient)
        got = True
        for trial in range(_TRIALS):
            if trial % 2 == 0:
                scale = (0.05, 1.0, 30.0)[trial // 2 % 3]
                w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
                x = (torch.randn(1, 1, k, generator=g) * scale).to(dtype)
            else:
                w, x = _heavy((n, k), g).to(dtype), _heavy((1, 1, k), g).to(dtype)
            b = torch.randn(n, generator=g).to(dtype) if bias else None
            with torch_threads(ambient):
                want = F.linear(x, w, b)
            with torch_threads(threads):
                one = F.linear(x, w, b)
            if not torch.equal(bits(one), bits(want)):
                got = False
                break
        _PROVEN[key] = got
    return got


def largest_identical_chunk(k: int, n: int, run: int, dtype: torch.dtype, bias: bool) -> int:
    """The largest ``m <= run`` whose batched product was found row-identical (1 if none)."""
    for m in range(min(run, MAX_CHUNK), 1, -1):
        if rows_identical(k, n, m, dtype, bias):
            return m
    return 1


def confirmed(w: torch.Tensor, m: int, bias: torch.Tensor | None) -> bool:
    """Whether a real batched call of this shape has already been compared with its one-row calls."""
    return _key(w.shape[1], w.shape[0], m, w.dtype, bias is not None) in _CONFIRMED


def record(w: torch.Tensor, m: int, bias: torch.Tensor | None, identical: bool) -> None:
    """The verdict of a real batched call; a mismatch rules the shape out for good."""
    key = _key(w.shape[1], w.shape[0], m, w.dtype, bias is not None)
    _CONFIRMED.add(key)
    if not identical:
        _PROVEN[key] = False


def reset() -> None:
    """Forget every answer (tests; or after changing torch's thread settings in ways the key misses)."""
    _PROVEN.clear()
    _CONFIRMED.clear()


__all__ = ["MAX_CHUNK", "bits", "confirmed", "largest_identical_chunk", "record", "reset", "rows_identical",
           "threads_identical", "torch_threads", "unsupported"]


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block at ``n`` torch threads (``None``: unchanged), then restore the previous count."""
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
