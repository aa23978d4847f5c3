"""The pack's faster paths (issue 21, step time): same bytes as before, same checks.

* the rANS step's exact division (Granlund-Montgomery multiply-and-shift, ``enc_kernels._flat_tables``) gives
  ``x // f`` for every frequency 1..4096 at the edges of every quotient, and the encoder's stream stays the
  reference encoder's byte for byte on tables with the extreme frequencies (1 and 4096);
* runs of chunks mapped on other threads (``encode_split`` with ``Assist.fork``) give the one-call result;
* the compiled features of ``predict.options`` (Adam ratio, contexts) are numpy's bit patterns, NaN included;
* the codec's pack path (options ``pack`` and ``fork``) writes the default path's parts for every dtype and
  the special values; ``backward.encode_entry`` (one job list) writes ``store.encode_entry``'s entry;
* the written entry's check (``entry_file.check_file``) refuses every seeded corruption of the file.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from tpde_hf.checkpoints import backward as B
from tpde_hf.checkpoints import codec as C
from tpde_hf.checkpoints import enc_kernels as E
from tpde_hf.checkpoints import kernels as K
from tpde_hf.checkpoints import predict
from tpde_hf.checkpoints import store as S
from tpde_hf.checkpoints.assist import Assist
from tpde_hf.checkpoints.entry_file import check_file
from tpde_hf.codec.registry import TENSOR_CODECS, CodecContext
from tpde_hf.errors import TpdeFormatError


def test_exact_division_for_every_frequency() -> None:
    f = np.arange(1, 4097, dtype=np.int64)
    tab = E._flat_tables(f[None, :], np.zeros((1, f.size), np.int64))
    m = tab & np.uint64(0xFFFFFFFF)
    sh = tab >> np.uint64(58)
    assert np.array_equal((tab >> np.uint64(32)) & np.uint64(0x1FFF), f.astype(np.uint64))
    rng = np.random.default_rng(0)
    for k in range(8):  # quotient edges k*f - 1, k*f across the whole 32-bit range, and random states
        q = rng.integers(0, (1 << 32) // f, f.size, dtype=np.int64) if k else (np.int64(1) << 32) // f
        for x in (q * f - 1, q * f, q * f + f - 1, rng.integers(0, 1 << 32, f.size, dtype=np.int64)):
            x = np.clip(x, 0, (1 << 32) - 1).astype(np.uint64)
            got = (((x * m) >> np.uint64(32)) + x) >> sh
            assert np.array_equal(got, x // f.astype(np.uint64))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_encoder_stream_with_extreme_frequencies(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, nsym = 20_011, 124
    freq = np.zeros((3, nsym), np.int64)
    freq[0, 5] = 4096  # one symbol holds all the mass
    freq[1, :4096 - 1] = 0
    freq[1, [0, 1, 2]] = [1, 1, 4094]  # two symbols of frequency 1
    freq[2] = rng.multinomial(4096 - nsym, np.ones(nsym) / nsym) + 1
    cum = (np.cumsum(freq, 1) - freq).astype(np.int64)
    ctx = rng.integers(0, 3, n).astype(np.uint8)
    sym = np.where(ctx == 0, 5, np.where(ctx == 1, rng.choice([0, 1, 2], n, p=[0.01, 0.01, 0.98]),
                                         rng.integers(0, nsym, n))).astype(np.uint16)
    nraw = rng.integers(0, 24, n).astype(np.uint8)
    raw = (rng.integers(0, 1 << 32, n, dtype=np.int64) & ((np.int64(1) << nraw) - 1)).astype(np.uint32)
    with K.serial(True):
        ref = K.encode_chunks(sym, nraw, raw, ctx, freq, cum, 1024)
        new = E.encode_compact(sym, nraw, raw, ctx, freq, cum, 1024)
        split = E.encode_split(sym, nraw, raw, ctx, freq, cum, 1024, lambda fn, xs: [fn(x) for x in xs], 5)
    assert new[5] == 0 and split[5] == 0
    cap = ref[3].shape[1]
    words = np.concatenate([ref[3][c, cap - ref[1][c]:] for c in range(len(ref[0]))])
    bits = np.concatenate([ref[4][c, :ref[2][c]] for c in range(len(ref[0]))])
    for got in (new, split):
        for a, b in zip((ref[0], ref[1], ref[2], words, bits), got[:5], strict=True):
            assert np.array_equal(a, b)


def test_split_runs_on_helper_threads_give_the_same_stream() -> None:
    rng = np.random.default_rng(3)
    n = 300_000
    x = rng.standard_normal(n).astype(np.float32).view(np.int32)
    p = (x.view(np.float32) * np.float32(1.001)).view(np.int32)
    ctx = rng.integers(0, 4, n).astype(np.uint8)
    sym, nraw, raw = K.symbolize(x, p, K.MODE_ORD, 32, 23)
    freq = C.CheckpointDelta._tables(K.histogram(sym, ctx, 4, K.n_symbols(K.MODE_ORD, 32, 23)))
    cum = (np.cumsum(freq, 1) - freq).astype(np.int64)
    with K.serial(True):
        want = E.encode_compact(sym, nraw, raw, ctx, freq, cum, 4096)
    assist = Assist(workers=3)
    done = threading.Event()
    out: list = []

    def owner() -> None:
        with K.serial(True):
            out.append(assist.map(lambda _: E.encode_split(sym, nraw, raw, ctx, freq, cum, 4096, assist.fork, 16),
                                  [0, 1]))
        done.set()

    t = threading.Thread(target=owner)
    t.start()
    assist.help(lambda: not done.is_set())
    t.join()
    for got in out[0]:
        assert got[5] == 0
        for a, b in zip(want[:5], got[:5], strict=True):
            assert np.array_equal(a, b)


def test_fork_keeps_order_and_raises_errors() -> None:
    assist = Assist()
    assert assist.fork(lambda v: v * 2, range(7)) == [0, 2, 4, 6, 8, 10, 12]

    def boom(v: int) -> int:
        if v == 3:
            raise ValueError("job 3")
        return v

    with pytest.raises(ValueError, match="job 3"):
        assist.fork(boom, range(5))
    assert assist(lambda v: v + 1, [1, 2]) == [2, 3]  # a runner: runner(fn, items)


_SPECIALS = np.array([0.0, -0.0, 1e-45, -1e-45, 1e-40, 1e-38, np.inf, -np.inf, np.nan, 3.4e38, -3.4e38, 1.0],
                     np.float32)


def _mix(rng: np.random.Generator, n: int) -> np.ndarray:
    a = (rng.standard_normal(n) * 10.0 ** rng.uniform(-12, 2, n)).astype(np.float32)
    at = rng.random(n) < 0.05
    a[at] = rng.choice(_SPECIALS, int(at.sum()))
    return a


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's own formula on infinities and NaN
def test_compiled_features_are_numpys_bits() -> None:
    rng = np.random.default_rng(4)
    n = 50_001
    m, v, w = _mix(rng, n), np.abs(_mix(rng, n)), _mix(rng, n)
    v[rng.random(n) < 0.05] = 0.0
    exp = lambda a: C.exponent(a, torch.float32)  # noqa: E731
    assert np.array_equal(E.half_exponent(v), exp(v) // 2) and E.half_exponent(v).dtype == np.int16
    m2, ctx = E.square_ctx(m, v)
    assert np.array_equal(m2.view(np.int32), (m * m).view(np.int32))
    want = exp(m * m).astype(np.int32) - exp(v)
    assert np.array_equal(ctx, want) and ctx.dtype == want.dtype
    want = exp(w).astype(np.int32)
    want[v == 0] = -1000
    assert np.array_equal(E.weight_ctx(w, v, -1000), want)
    vf = np.abs(v[np.isfinite(v)])[:1000]
    mf = m[:vf.size]
    r, nan = E.ratio_f32(mf, vf, predict._EPS_ARR)
    ok = ~np.isnan(mf / (np.sqrt(vf) + predict.EPS))
    assert np.array_equal(r.view(np.int32)[ok], (mf / (np.sqrt(vf) + predict.EPS)).view(np.int32)[ok])
    assert nan == (~ok).sum()
    # with NaNs the numpy formula itself is used: its bits, payloads included
    assert np.array_equal(predict._ratio(m, v).view(np.int32), (m / (np.sqrt(v) + predict.EPS)).view(np.int32))


def _parts_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8))
        for k in a)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # predictions from infinities and NaN
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [4099, 70_001])
def test_pack_path_writes_the_default_paths_parts(dtype: torch.dtype, n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(C, "FORK_RUN", 4096)  # small runs: the 70001-element tensor is coded in 16 runs
    rng = np.random.default_rng(n)
    ref = torch.from_numpy(_mix(rng, n)).to(dtype)
    new = (ref.float() * (1 + 1e-3 * torch.from_numpy(rng.standard_normal(n).astype(np.float32)))).to(dtype)
    new[:: 97] = torch.from_numpy(rng.choice(_SPECIALS, new[:: 97].numel())).to(dtype)
    new = new.reshape(-1, 1) if n % 2 else new
    ref = ref.reshape(new.shape)
    feat = torch.from_numpy(_mix(rng, n)).to(dtype)
    codec = TENSOR_CODECS.get("ckpt-delta")
    assist = Assist()
    for opts in ({}, {"features": [feat]}):
        base = codec.encode(new, CodecContext("t", ref, {**opts, "verify": True}))
        with K.serial(True):
            fast = codec.encode(new, CodecContext("t", ref, {**opts, "verify": True, "pack": True,
                                                            "fork": assist.fork}))
        assert _parts_equal(base, fast)
        got = codec.decode(fast, CodecContext("t", ref, opts))
        assert torch.equal(got.view(torch.int16 if dtype != torch.float32 else torch.int32),
                           new.view(torch.int16 if dtype != torch.float32 else torch.int32))


def _checkpoint(rng: np.random.Generator, name: str, base: dict | None) -> S.Decoded:
    dec = S.Decoded(name)
    shapes = {"w.a": 5000, "w.b": 300_007, "w.c": 4096}
    files: dict[str, list] = {"model.safetensors": [], "optimizer.pt": []}
    for i, (k, n) in enumerate(shapes.items()):
        for key, scale in ((f"model.safetensors:{k}", 1.0), (f"optimizer.pt:state/{i}/exp_avg", 1e-4),
                           (f"optimizer.pt:state/{i}/exp_avg_sq", 1e-8)):
            prev = base.tensors[key].numpy() if base else None
            step = rng.standard_normal(n).astype(np.float32) * np.float32(scale)
            val = np.abs(step) if key.endswith("_sq") else step
            t = (prev * np.float32(0.99) + val) if prev is not None else val
            dec.tensors[key] = torch.from_numpy(t.astype(np.float32))
            files[key.split(":")[0]].append(key)
    recs = []
    for fname, keys in files.items():
        skel = rng.integers(0, 255, 999).astype(np.uint8).tobytes()
        dec.skeletons[fname] = skel
        off, ranges = len(skel), []
        for k in keys:
            nb = dec.tensors[k].numel() * 4
            ranges.append([k, off, nb, "F32"])
            off += nb
        recs.append({"name": fname, "size": off, "xxh3": None, "ranges": ranges})
    dec.manifest = {"files": recs}
    for rec in recs:  # a file is its skeleton, then its tensors: its recorded hash
        pieces = [np.frombuffer(dec.skeletons[rec["name"]], np.uint8)]
        pieces += [dec.tensors[k].numpy().view(np.uint8) for k, *_ in rec["ranges"]]
        rec["xxh3"] = S.file_hash(np.concatenate(pieces).tobytes())
    return dec


def test_backward_encode_entry_matches_the_store_encoder(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    older = _checkpoint(rng, "checkpoint-10", None)
    newer = _checkpoint(rng, "checkpoint-20", older)
    names = ["w.a", "w.b", "w.c"]
    want = S.encode_entry(older, newer, step=10, depth=1, param_names=names, verify=True, backward=True)
    assist = Assist()
    with K.serial(True):
        got = B.encode_entry(older, newer, step=10, depth=1, param_names=names, verify=True, runner=assist)
    assert got[1] == want[1]
    assert _parts_equal(got[0], want[0])
    dec = S.decode_entry(_written(tmp_path, got), newer)
    for k, t in older.tensors.items():
        assert torch.equal(dec.tensors[k].view(torch.int32), t.view(torch.int32))


def _written(tmp_path: Path, entry: tuple) -> Path:
    path = tmp_path / "e.tpde"
    S.write_entry(path, *entry)
    return path


def test_check_file_refuses_every_corruption(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    tensors = {f"p{i}": torch.from_numpy(rng.integers(0, 255, int(rng.integers(1, 5000)), dtype=np.uint8))
               for i in range(6)}
    tensors["m"] = torch.arange(17, dtype=torch.int64)
    tensors["c"] = torch.tensor([1.5, -0.0], dtype=torch.float32)
    manifest = {"format": S.FORMAT, "files": []}
    path = tmp_path / "x.tpde"
    S.write_entry(path, tensors, manifest)
    good = path.read_bytes()
    assert check_file(path, tensors) is None
    assert check_file(path, tensors, Assist()) is None
    for case in range(60):
        data = bytearray(good)
        if case % 3 == 0:
            data = data[:int(rng.integers(0, len(data)))]
        else:
            at = int(rng.integers(0, len(data)))
            data[at] ^= 1 << int(rng.integers(0, 8))
        path.write_bytes(bytes(data))
        try:
            bad = check_file(path, tensors)
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, OSError):
            bad = "refused"
        assert bad is not None or bytes(data) == good, case


def test_write_checked_keeps_nothing_of_a_corrupt_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(9)
    older = _checkpoint(rng, "checkpoint-10", None)
    newer = _checkpoint(rng, "checkpoint-20", older)
    with K.serial(True):
        tensors, manifest = B.encode_entry(older, newer, step=10, depth=1, param_names=None, verify=True)
    real = S.write_entry

    def flip(path: Path, t: dict, m: dict) -> None:
        real(path, t, m)
        data = bytearray(path.read_bytes())
        data[-7] ^= 4  # inside the last part's bytes
        path.write_bytes(bytes(data))

    monkeypatch.setattr(S, "write_entry", flip)
    with pytest.raises(TpdeFormatError):
        B.write_checked(tmp_path, "checkpoint-10", tensors, manifest, older, newer, True, runner=Assist())
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- the fused path (symbols never stored)
_WIDTHS = [(np.float32, np.int32, 32, 23), (np.float16, np.int16, 16, 10), (None, np.int16, 16, 7)]  # None: bf16


def _pairs(rng: np.random.Generator, n: int, dt: type | None, it: type) -> tuple[np.ndarray, np.ndarray]:
    """Bit patterns of a value and its prediction: close values, far ones, every special, random patterns."""
    if dt is None:  # bf16: the top half of float32 patterns
        ref = (_mix(rng, n).view(np.int32) >> 16).astype(np.int16)
        new = ((_mix(rng, n) * np.float32(1e-3) + ref.astype(np.int32).__lshift__(16).view(np.float32))
               .view(np.int32) >> 16).astype(np.int16)
    else:
        ref = _mix(rng, n).astype(dt)
        new = (ref.astype(np.float32) * np.float32(1 + 1e-3) + _mix(rng, n) * np.float32(1e-6)).astype(dt)
        ref, new = ref.view(it), new.view(it)
    wild = rng.random(n) < 0.02
    info = np.iinfo(it)
    new[wild] = rng.integers(info.min, info.max, int(wild.sum()), dtype=it, endpoint=True)
    return new, ref


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 1023, 4097, 70_001])
@pytest.mark.parametrize("width", range(3))
def test_fused_encoder_writes_the_symbol_array_stream(n: int, width: int) -> None:
    """``encode_fused`` (symbols made chunk by chunk in cache) writes ``encode_compact``'s bytes from the
    symbol arrays, in both modes, on one thread and as runs of chunks; ``sym_histogram`` counts what
    ``symbolize`` + ``histogram`` count."""
    dt, it, w, mb = _WIDTHS[width]
    rng = np.random.default_rng(n + 7 * width)
    x, p = _pairs(rng, n, dt, it)
    for mode in (K.MODE_ORD, K.MODE_FLD):
        n_ctx = 1 if n < 50 else 8
        ctx = rng.integers(0, n_ctx, n).astype(np.uint8)
        nsym = K.n_symbols(mode, w, mb)
        sym, nraw, raw = K.symbolize(x, p, mode, w, mb)
        hist = K.histogram(sym, ctx, n_ctx, nsym)
        assert np.array_equal(E.sym_histogram(x, p, ctx, mode, w, mb, n_ctx, nsym), hist)
        freq = C.CheckpointDelta._tables(hist)
        cum = (np.cumsum(freq, 1) - freq).astype(np.int64)
        with K.serial(True):
            want = E.encode_compact(sym, nraw, raw, ctx, freq, cum, 1024)
            got = [E.encode_fused(x, p, ctx, freq, cum, mode, w, mb, 1024),
                   E.encode_fused(x, p, ctx, freq, cum, mode, w, mb, 1024, False),
                   E.encode_fused(x, p, ctx, freq, cum, mode, w, mb, 1024, True, lambda fn, xs: [fn(v) for v in xs], 5)]
        assert want[5] == 0
        for g in got:
            assert g[5] == 0
            for a, b in zip(want[:5], g[:5], strict=True):
                assert a.dtype == b.dtype and np.array_equal(a, b)


def test_fused_encoder_refuses_a_symbol_without_mass() -> None:
    """A table without mass for a symbol that occurs (an encoder bug) is counted, never coded silently."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal(5000).astype(np.float32)
    p = x * np.float32(1.0001)
    x, p = x.view(np.int32), p.view(np.int32)
    ctx = np.zeros(x.size, np.uint8)
    nsym = K.n_symbols(K.MODE_ORD, 32, 23)
    hist = E.sym_histogram(x, p, ctx, K.MODE_ORD, 32, 23, 1, nsym)
    freq = C.CheckpointDelta._tables(hist)
    used = np.flatnonzero(hist[0])
    s0, s1 = used[0], used[-1]
    freq[0, s1] += freq[0, s0]  # the mass of an occurring symbol moved to another: still 2**12 in all
    freq[0, s0] = 0
    cum = (np.cumsum(freq, 1) - freq).astype(np.int64)
    with K.serial(True):
        assert E.encode_fused(x, p, ctx, freq, cum, K.MODE_ORD, 32, 23, 1024)[5] > 0


def test_symbol_map_inverse_on_every_bit_pattern_class() -> None:
    """The fused symbol map and the decoder's inverse it is checked with: every pair of 16-bit patterns
    from a grid (signs, zeros, subnormals, infinities, NaN payloads) and random 32-bit pairs give 0 failures
    and ``symbolize``'s symbols."""
    grid = np.unique(np.concatenate([np.arange(-40, 40), np.arange(0x7B00, 0x7C10, 7), -np.arange(0x7B00, 0x7C10, 7),
                                     [0x7FFF, -0x8000, 0x0001, -0x7FFF, 0x7C00, -0x0400]])).astype(np.int16)
    x = np.repeat(grid, grid.size)
    p = np.tile(grid, grid.size)
    rng = np.random.default_rng(10)
    x32 = rng.integers(-(1 << 31), (1 << 31) - 1, 200_000, dtype=np.int64).astype(np.int32)
    p32 = np.where(rng.random(x32.size) < 0.5, x32 + rng.integers(-9, 9, x32.size).astype(np.int32),
                   rng.integers(-(1 << 31), (1 << 31) - 1, x32.size, dtype=np.int64).astype(np.int32))
    for xs, ps, w, mb in ((x, p, 16, 10), (x, p, 16, 7), (x32, p32, 32, 23)):
        for mode in (K.MODE_ORD, K.MODE_FLD):
            nsym = K.n_symbols(mode, w, mb)
            idx = np.empty(xs.size, np.uint16)
            nraw, raw = np.empty(xs.size, np.uint8), np.empty(xs.size, np.uint32)
            ctx = np.zeros(xs.size, np.uint8)
            assert E._symbols_block(xs, ps, ctx, 0, xs.size, mode, w, mb, nsym, True, idx, nraw, raw) == 0
            sym, nraw0, raw0 = K.symbolize(xs, ps, mode, w, mb)
            assert np.array_equal(idx, sym) and np.array_equal(nraw, nraw0) and np.array_equal(raw, raw0)


def test_compiled_tables_are_the_reference_tables() -> None:
    """``quantize_tables`` is ``rans.quantize_frequencies`` entry for entry (ties, empty contexts, surplus and
    deficit); ``slot_symbols`` is the decoder's slot lookup; ``_flat_tables`` refuses tables out of range."""
    from tpde_hf.codec.rans import quantize_frequencies

    rng = np.random.default_rng(11)
    for t in range(400):
        nc, ns = int(rng.integers(1, 33)), int(rng.choice([4, 60, 124, 512]))
        h = [rng.integers(0, 5, (nc, ns)), (rng.pareto(1.0, (nc, ns)) * 1e4).astype(np.int64),
             rng.integers(0, 2, (nc, ns)) * rng.integers(0, 10**8, (nc, ns)),
             np.where(rng.random((nc, ns)) < 0.9, 1, rng.integers(0, 10**5, (nc, ns)))][t % 4].astype(np.int64)
        h[int(rng.integers(0, nc))] = 0  # a context that never occurs
        want = quantize_frequencies(torch.from_numpy(h), K.PROB_BITS).numpy()
        got = E.quantize_tables(h, K.PROB_BITS)
        assert np.array_equal(want, got)
        lut = np.concatenate([np.repeat(np.arange(ns, dtype=np.uint16), want[c]) for c in range(nc)])
        assert np.array_equal(E.slot_symbols(want), lut)
    for bad in ([[4096, 1, 0, 0]], [[-1, 4097, 0, 0]]):
        f = np.array(bad, np.int64)
        with pytest.raises(ValueError, match="tables out of range"):
            E._flat_tables(f, np.cumsum(f, 1) - f)


def test_scratch_buffers_are_reused_inside_and_fresh_outside() -> None:
    """Inside ``scratch()`` a thread's large temporaries come from buffers earlier blocks gave back (two live
    ones never share memory); outside, and after ``release_scratch()``, they are fresh."""
    E.release_scratch()
    n = (2 << 20) // 4
    with E.scratch():
        a, b = E.empty(n, np.float32), E.empty(n, np.int32)
        assert not np.shares_memory(a, b)
        base_a = a.base if a.base is not None else a
    with E.scratch():
        c = E.empty(n - 5, np.int32)
        assert np.shares_memory(c, base_a) or np.shares_memory(c, b)  # a buffer given back, not a fresh one
    small = E.empty(10, np.float32)
    outside = E.empty(n, np.float32)
    assert small.base is None and outside.base is None
    assert E.release_scratch() >= 2 * n * 4
    with E.scratch():
        assert not np.shares_memory(E.empty(n, np.float32), b)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's own formula on infinities and NaN
@pytest.mark.parametrize("nan", [False, True])
def test_lazy_ratio_features_give_the_made_features_parts(nan: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A weight's Adam ratios left lazy (``predict.Ratio``, formed inside the compiled prediction) give the
    parts of the same features made as arrays; any slice or index of one is ``predict._ratio``'s bits; a NaN
    prediction falls back to numpy's arithmetic on the made features (the same parts again)."""
    rng = np.random.default_rng(12 + nan)
    n = 70_001
    w0 = rng.standard_normal(n).astype(np.float32) * np.float32(0.05)
    m1, m0 = (rng.standard_normal((2, n)) * 1e-3).astype(np.float32)
    v1, v0 = (rng.standard_normal((2, n)) ** 2 * 1e-6).astype(np.float32)
    v1[rng.random(n) < 0.05] = 0.0
    finite = _SPECIALS[~np.isnan(_SPECIALS)]
    m0[::997] = rng.choice(finite, m0[::997].size)  # zeros, subnormals, infinities (NaN below)
    if nan:
        m1[::1001] = np.nan
    r1, r0 = predict._ratio(m1, v1), predict._ratio(m0, v0)
    new = w0 * np.float32(0.9999) - np.float32(5e-5) * r1 + np.float32(1e-6) * rng.standard_normal(n).astype(np.float32)
    new[np.isnan(new)] = 0.0
    lazy = [predict.Ratio(m1, v1), predict.Ratio(m0, v0)]
    for f, r in zip(lazy, (r1, r0), strict=True):
        idx = np.sort(rng.integers(0, n, 999))
        assert np.array_equal(f[idx].view(np.int32), r[idx].view(np.int32))
        assert np.array_equal(f[100:5000].view(np.int32), r[100:5000].view(np.int32))
        assert np.array_equal(f.array().view(np.int32), r.view(np.int32))
    codec = TENSOR_CODECS.get("ckpt-delta")
    ctx = E.weight_ctx(w0, v1, -1000)
    nans: list[int] = []
    real = E.predict_ratio_f32

    def spy(*a):  # noqa: ANN002, ANN202
        out = real(*a)
        nans.append(int(out[1]))
        return out

    monkeypatch.setattr(E, "predict_ratio_f32", spy)
    ref = torch.from_numpy(w0)
    with K.serial(True):
        made = codec.encode(torch.from_numpy(new), CodecContext("w", ref, {"features": [r1, r0], "ctx": ctx,
                                                                           "verify": True, "pack": True}))
        with E.scratch():
            got = codec.encode(torch.from_numpy(new), CodecContext("w", ref, {"features": lazy, "ctx": ctx,
                                                                              "verify": True, "pack": True}))
    assert _parts_equal(made, got)
    assert made["coef"].numel() == 3 and bool((made["coef"][1:] != 0).all())  # both features are used
    assert nans and (nans[-1] > 0) == nan  # the inline path ran; with a NaN it fell back to numpy's
