"""The blocked ``ref-ord`` decode kernel (:mod:`tpde_hf.reference.kernels`) against the fused kernel it replaced.

The previous kernel (one fused loop per chunk, two rANS lanes) is copied here as the oracle. The new one decodes
a chunk in blocks: context rows, the rANS chains alone (two chunks at once where both are full), then raw bits
and values. Every case must give the fine-tuned tensor bit for bit through each entry point (serial, numba
threads, the load's ``decode_units``), and on damaged streams exactly the oracle's status per chunk.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from numba import njit

import tpde_hf.reference.codec as C
from tpde_hf.codec.compiled_kernels import _ordinal, _wrap
from tpde_hf.codec.registry import CodecContext
from tpde_hf.reference import kernels as K
from tpde_hf.reference.batch import BatchDecode

sys.path.insert(0, str(Path(__file__).parent))
from test_reference import bits_equal, pair  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


# ==================================================================== the oracle: the previous (fused) kernel
@njit(cache=True)
def _old_chunk(c, r_bits, out, width, exp_shift, exp_mask, chunk, ctxtab, symlut, fctab, symtab, words,
               word_start, states, raw_words, raw_start):
    n = r_bits.shape[0]
    wlast = words.shape[0] - 1
    rlast = raw_words.shape[0] - 1
    lo = c * chunk
    hi = min(lo + chunk, n)
    wp, wend, rp, rend = word_start[c], word_start[c + 1], raw_start[c], raw_start[c + 1]
    if wp < 0 or wend > wlast or wp > wend or rp < 0 or rend > rlast or rp > rend:
        return 1
    xs = [np.int64(states[c, 0]), np.int64(states[c, 1])]
    ps = [symtab[0] & 0xFFFF, symtab[0] & 0xFFFF]
    acc = np.int64(0)
    nacc = np.int64(0)
    for i in range(lo, hi):
        lane = (i - lo) & 1
        x, p = xs[lane], ps[lane]
        rv = np.int64(r_bits[i])
        cb = ctxtab[(rv >> exp_shift) & exp_mask] + p
        slot = x & 0xFFF
        s = np.int64(symlut[cb + slot])
        ent = np.int64(fctab[(cb >> 5) + s])
        x = (ent & 0x1FFF) * (x >> 12) + slot - (ent >> 13)
        if x < K.STATE_LOW:
            x = (x << 16) | np.int64(words[min(wp, wlast)])
            wp += 1
        st = symtab[s]
        nb = (st >> 16) & 0x3F
        if nacc < nb:
            acc |= np.int64(raw_words[min(rp, rlast)]) << nacc
            rp += 1
            nacc += 32
        u = (st >> 22) | (acc & ((np.int64(1) << nb) - 1))
        acc >>= nb
        nacc -= nb
        xs[lane], ps[lane] = x, st & 0xFFFF
        out[i] = _ordinal(_wrap(_ordinal(rv, width) + ((u >> 1) ^ -(u & 1)), width), width)
    if xs[0] != K.STATE_LOW or xs[1] != K.STATE_LOW or wp != wend or rp != rend:
        return 4
    return 0


@njit(cache=True)
def _old_decode(r_bits, out, width, exp_shift, exp_mask, chunk, ctxtab, symlut, fctab, symtab, words, word_start,
                states, raw_words, raw_start, status):
    for c in range(status.shape[0]):
        status[c] = _old_chunk(c, r_bits, out, width, exp_shift, exp_mask, chunk, ctxtab, symlut, fctab, symtab,
                               words, word_start, states, raw_words, raw_start)


# ==================================================================== helpers
def _job(tuned: torch.Tensor, base: torch.Tensor, chunk: int, monkeypatch) -> C.OrdJob:
    monkeypatch.setattr(C, "CHUNK", chunk)
    blob = C.RefOrd().encode(tuned, CodecContext("w", base, {"force": True}))["blob"]
    return C.prepare_ord(blob, base, "w")


def _run(fn, args: tuple, n_chunks: int) -> tuple[np.ndarray, np.ndarray]:
    """(status, output bits) of one kernel on a fresh output."""
    out = np.full_like(args[1], 0x5A5A if args[1].dtype == np.int16 else 0x5A5A5A5A)
    status = np.full(n_chunks, -7, np.int64)
    fn(args[0], out, *args[2:], status)
    return status, out


def _units(args: tuple, n_chunks: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(status, output bits) through the load's ``decode_units``, in calls of ``batch`` units (so that a chunk pair
    may be cut between two calls)."""
    ref, _, width, shift, emask, chunk, ctx, lut, fc, sym, words, wstart, states, raw, rstart = args
    out = np.zeros_like(ref)
    keep = [np.ascontiguousarray(a) for a in (ctx, lut, fc, sym, words, raw, wstart, rstart, states, ref, out)]
    ctx, lut, fc, sym, words, raw, wstart, rstart, states, ref, out = keep
    table = np.array([[ref.ctypes.data, out.ctypes.data, ref.size, width, shift, emask, chunk, lut.size >> 12,
                       ctx.ctypes.data, lut.ctypes.data, fc.ctypes.data, sym.ctypes.data, words.ctypes.data,
                       words.size - 1, raw.ctypes.data, raw.size - 1, wstart.ctypes.data, rstart.ctypes.data,
                       states.ctypes.data, n_chunks]], np.int64)
    status = np.full(max(n_chunks, 1), -7, np.int64)
    unit_job, unit_chunk = np.zeros(n_chunks, np.int64), np.arange(n_chunks, dtype=np.int64)
    for lo in range(0, n_chunks, batch):
        K.decode_units(lo, min(lo + batch, n_chunks), unit_job, unit_chunk, table, status)
    return status[:n_chunks], out


# ==================================================================== exactness
# chunk sizes: the default, a chunk of one block plus two elements (a 2-element block), odd (no pairs), tiny
CHUNKS = [1 << 16, K.BLOCK + 2, 999, 2]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("chunk", CHUNKS)
def test_every_path_is_bit_exact_and_matches_the_previous_kernel(dtype: torch.dtype, chunk: int, monkeypatch) -> None:
    sizes = {1 << 16: [1, 5, 2 * (1 << 16), 3 * (1 << 16) + 4_097], K.BLOCK + 2: [2 * K.BLOCK + 4, 5 * K.BLOCK + 3],
             999: [1, 999, 4_001], 2: [1, 7, 64]}[chunk]
    for n in sizes:
        base, tuned = pair(dtype, (n,), seed=n + chunk)
        job = _job(tuned, base, chunk, monkeypatch)
        args = job.kernel_args()
        want = tuned.view(INT[dtype]).numpy()
        old_status, old_out = _run(_old_decode, args, job.n_chunks)
        assert not old_status.any() and np.array_equal(old_out, want)
        for fn in (K.rans_decode_serial, K.rans_decode):
            status, out = _run(fn, args, job.n_chunks)
            assert not status.any(), (fn, n, status)
            assert np.array_equal(out, want), (fn, n)
        for batch in (1, 3, 64):
            status, out = _units(args, job.n_chunks, batch)
            assert not status.any() and np.array_equal(out, want), (batch, n)


def test_a_tensor_without_raw_bits_reads_no_raw_word(monkeypatch) -> None:
    """Every delta below 16 ulps: no raw bits, a raw stream of only its spare word; chunk pairs included."""
    g = torch.Generator().manual_seed(5)
    base = (torch.randn(3 * 4096 + 1, generator=g) * 0.02).to(torch.bfloat16)
    tuned = (base.view(torch.int16) + torch.randint(-7, 8, base.shape, generator=g, dtype=torch.int16)).view(
        torch.bfloat16)
    job = _job(tuned, base, 4096, monkeypatch)
    args = job.kernel_args()
    assert args[13].size == 1  # only the spare word
    for fn in (K.rans_decode_serial, K.rans_decode):
        status, out = _run(fn, args, job.n_chunks)
        assert not status.any() and np.array_equal(out, tuned.view(torch.int16).numpy())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_context_rows_equal_the_exponent_table(dtype: torch.dtype) -> None:
    """The kernel's arithmetic rows equal ``ctxtab[exponent]`` for every exponent, whatever ``e_low`` the blob
    holds (it is not checked: far out of range too)."""
    width, shift, emask = C.FLOATS[dtype]
    bits = np.arange(-(1 << 15), 1 << 15, dtype=np.int16) if width == 16 else \
        np.random.default_rng(1).integers(-(1 << 31), 1 << 31, 200_000).astype(np.int32)
    freq = np.zeros((64, K.N_SYM), np.int64)
    freq[:, 0] = 4096
    for n_eb, n_prev in C.CONFIGS:
        for e_low in (-(1 << 40), -20, -3, 0, 1, 110, 120, emask - 2, emask + 5, 1 << 40):
            f = freq[: n_eb * n_prev]
            ctxtab = C.decode_tables(f, 12, n_eb, n_prev, e_low, emask)[0]
            rows = np.empty(bits.size, np.int32)
            K._rows(bits, 0, bits.size, shift, emask, ctxtab, rows, 0)
            want = ctxtab[(bits.astype(np.int64) >> shift) & emask]
            assert np.array_equal(rows, want), (n_eb, n_prev, e_low)


def test_batch_decode_pairs_chunks_across_tensors_and_batches(monkeypatch) -> None:
    """The load's batch decode with small batches (pairs cut between claims) over tensors of every dtype."""
    monkeypatch.setattr(C, "CHUNK", 1024)
    cases = [pair(torch.bfloat16, (5 * 1024 + 3,), seed=1), pair(torch.float32, (4 * 1024,), seed=2),
             pair(torch.float16, (3 * 1024 - 1,), seed=3), pair(torch.bfloat16, (1,), seed=4)]
    jobs = [C.prepare_ord(C.RefOrd().encode(t, CodecContext("w", b, {"force": True}))["blob"], b, "w")
            for b, t in cases]
    batch = BatchDecode(batch_weights=3 * 1024)
    ids = batch.add(jobs)
    batch.close()
    batch.work()
    for i, (_, tuned) in zip(ids, cases, strict=True):
        assert bits_equal(batch.result(i), tuned)


# ==================================================================== damaged streams
def _damage(args: tuple, rng: np.random.Generator) -> tuple[tuple, str]:
    """A copy of the kernel arguments with one seeded change to words, raw bits, final states or chunk starts."""
    args = list(args)
    what = rng.choice(["words", "raw", "states", "word_start", "raw_start"])
    i = {"words": 10, "raw": 13, "states": 12, "word_start": 11, "raw_start": 14}[what]
    a = args[i].copy()
    flat = a.reshape(-1)
    k = int(rng.integers(flat.size))
    if what in ("words", "raw"):
        flat[k] ^= flat.dtype.type(1 << int(rng.integers(8 * flat.itemsize)))
    elif what == "states":
        flat[k] = int(rng.integers(0, 1 << 32)) if rng.random() < 0.5 else flat[k] ^ (1 << int(rng.integers(32)))
    else:
        flat[k] += int(rng.choice([-1, 1, -(1 << 40), 1 << 40, 3]))
    args[i] = a
    return tuple(args), what


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_corruption_sweep_gives_the_previous_kernels_status(dtype: torch.dtype, monkeypatch) -> None:
    """Seeded damage to words, raw bits, states and chunk starts: per chunk exactly the previous kernel's status
    (0 only where that chunk still decodes exactly), through every entry point; never a read out of bounds (every
    read is clamped; a crash would end the test run)."""
    base, tuned = pair(dtype, (6 * 1024 + 5,), seed=11)
    job = _job(tuned, base, 1024, monkeypatch)
    clean = job.kernel_args()
    want = tuned.view(INT[dtype]).numpy()
    rng = np.random.default_rng(43)
    failed = 0
    for _ in range(150):
        args, what = _damage(clean, rng)
        old_status, old_out = _run(_old_decode, args, job.n_chunks)
        failed += int(old_status.any())
        for name, (status, out) in {"serial": _run(K.rans_decode_serial, args, job.n_chunks),
                                    "threads": _run(K.rans_decode, args, job.n_chunks),
                                    "units": _units(args, job.n_chunks, 3)}.items():
            assert np.array_equal(status, old_status), (what, name, status, old_status)
            lo = np.repeat(status == 0, 1024)[: want.size]
            assert np.array_equal(out[lo], old_out[lo]), (what, name)
    assert failed > 50  # the sweep does damage most streams
