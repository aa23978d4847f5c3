"""The pack's faster paths (issue 21, step time): same bytes as before, same checks.

* the rANS step's exact division (Granlund-Montgomery multiply-and-shift, ``enc_tables.flat_tables``) gives
  ``x // f`` for every frequency 1..4096 at the edges of every quotient, and the encoder's stream stays the
  reference encoder's byte for byte on tables with the extreme frequencies (1 and 4096);
* runs of chunks mapped on other threads (``encode_fused`` with ``Assist.fork``) give the one-call result;
* the compiled features of ``predict.options`` (Adam ratio, contexts) are numpy's bit patterns, NaN included;
* the codec's runs of chunks on other threads (option ``fork``, inside ``scratch()``) write the one-call parts for
  every dtype and the special values; ``backward.encode_entry`` (one job list) writes ``store.encode_entry``'s entry;
* the written entry's check (``entry_file.check_file``) refuses every seeded corruption of the file.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tpde_hf.checkpoints import backward as B
from tpde_hf.checkpoints import codec as C
from tpde_hf.checkpoints import enc_features as EF
from tpde_hf.checkpoints import enc_kernels as E
from tpde_hf.checkpoints import enc_stream as ES
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
    assert new[5] == 0
    cap = ref[3].shape[1]
    words = np.concatenate([ref[3][c, cap - ref[1][c]:] for c in range(len(ref[0]))])
    bits = np.concatenate([ref[4][c, :ref[2][c]] for c in range(len(ref[0]))])
    for a, b in zip((ref[0], ref[1], ref[2], words, bits), new[:5], strict=True):
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
            out.append(assist.map(lambda _: E.encode_fused(x, p, ctx, freq, cum, K.MODE_ORD, 32, 23, 4096, True,
                                                           assist.fork, 16), [0, 1]))
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


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's own formula on infinities and NaN
@pytest.mark.parametrize("coef", [(0.999, 1e-4, -2e-4), (0.999, 0.0, 3e-3), (1.001, -1e-4, 0.0), (0.5, 0.0, 0.0)])
def test_inline_ratio_prediction_is_numpys_bits(coef: tuple) -> None:
    """The prediction with the Adam ratios formed inline (vectorised: LLVM's IEEE square root, numpy's error model
    for the division) gives numpy's bits for each combination of used features, on every special value: ±0,
    subnormals, infinities, a negative second moment (NaN), odd lengths; a NaN prediction is counted."""
    rng = np.random.default_rng(11)
    n = 40_003
    ref, m1, m0 = _mix(rng, n), _mix(rng, n), _mix(rng, n)
    v1, v0 = np.abs(_mix(rng, n)), np.abs(_mix(rng, n))
    v1[rng.random(n) < 0.05] = 0.0
    v0[::101] = -1.0  # sqrt of a negative: NaN
    c = np.array(coef, np.float32)
    p = np.empty(n, np.float32)
    nan = EF._predict_ratio_into(ref, m1, v1, m0, v0, c, np.int64(2), predict._EPS_ARR, p)
    r1, r0 = m1 / (np.sqrt(v1) + predict.EPS), m0 / (np.sqrt(v0) + predict.EPS)
    want = C.predict(ref, [float(x) for x in c], [r1, r0], n, np.dtype(np.float32))
    ok = ~np.isnan(want)
    assert np.array_equal(p.view(np.int32)[ok], want.view(np.int32)[ok])
    assert nan == (~ok).sum() and nan > 0


def test_least_squares_fit_matches_the_svd_fit() -> None:
    """The normal-equations fit gives the SVD fit's float32 coefficients on well-conditioned samples (rows with an
    infinity or NaN left out), and gives way to the SVD solver (its minimum-norm answer) for a zero or repeated
    column; fewer than 16 finite rows: no fit."""
    from tpde_hf.checkpoints import enc_estimate as EE

    rng = np.random.default_rng(12)
    same = 0
    for trial in range(40):
        n = int(rng.integers(100, 9000))
        k = 1 + trial % 3
        cols = [(rng.standard_normal(n) * 10.0 ** rng.uniform(-8, 0)).astype(np.float32) for _ in range(k)]
        coef = rng.standard_normal(k)
        target = sum(c * a.astype(np.float64) for c, a in zip(coef, cols, strict=True))
        target += 1e-3 * np.abs(target).mean() * rng.standard_normal(n)
        target[rng.integers(0, n, 3)] = np.nan
        cols[0][rng.integers(0, n, 3)] = np.inf
        got, want = C._fit(target, cols[0], cols[1:]), C._fit_svd(target, cols)
        want = [float(np.float32(w)) for w in want]
        assert np.allclose(got, want, rtol=1e-5, atol=0)  # the coefficients only decide the size: not bit-exact
        same += got == want
    assert same >= 30  # float32 rounding hides the solvers' last-bit differences almost always
    x = rng.standard_normal(500).astype(np.float32)
    t = 2.0 * x.astype(np.float64)
    assert EE.least_squares([x, np.zeros_like(x)], t) is None  # a zero column: the SVD solver's turn
    assert EE.least_squares([x, x], t) is None
    assert C._fit(t, x, [np.zeros_like(x)]) == [2.0, 0.0]
    assert C._fit(t, x, [x]) == [1.0, 1.0]  # minimum norm
    few = t.copy()
    few[15:] = np.nan
    assert EE.least_squares([x], few) is None and C._fit(few, x, []) is None


def test_parallel_read_gives_the_serial_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint read in pieces on several threads (the pack's runner) is the serial read: tensors, skeletons
    and manifest; a file shorter than its size when read is refused, naming it."""
    monkeypatch.setattr(S, "READ_STEP", 4096)
    rng = np.random.default_rng(13)
    folder = tmp_path / "checkpoint-5"
    folder.mkdir()
    save_file({"w": torch.from_numpy(rng.standard_normal(30_011).astype(np.float32)),
               "b": torch.from_numpy(rng.standard_normal(7).astype(np.float32))}, folder / "model.safetensors")
    (folder / "trainer_state.json").write_text('{"global_step": 5}')
    (folder / "empty.bin").write_bytes(b"")
    want = S.read_checkpoint(folder)
    assist = Assist(workers=3)
    done = threading.Event()
    got: list = []

    def owner() -> None:
        got.append(S.read_checkpoint(folder, runner=assist))
        done.set()

    t = threading.Thread(target=owner)
    t.start()
    assist.help(lambda: not done.is_set())
    t.join()
    assert got[0].manifest == want.manifest and got[0].skeletons == want.skeletons
    assert list(got[0].tensors) == list(want.tensors)
    for k, v in want.tensors.items():
        assert torch.equal(got[0].tensors[k].view(torch.int32), v.view(torch.int32))
    real_stat = Path.stat

    def longer(self, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        st = real_stat(self, *a, **k)
        if self.name == "model.safetensors":
            return os.stat_result((st.st_mode, st.st_ino, st.st_dev, st.st_nlink, st.st_uid, st.st_gid,
                                   st.st_size + 5000, st.st_atime, st.st_mtime, st.st_ctime))
        return st

    monkeypatch.setattr(Path, "stat", longer)  # the file shrank between its size and its read
    with pytest.raises(TpdeFormatError, match="model.safetensors"):
        S.read_checkpoint(folder)


def _parts_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8))
        for k in a)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # predictions from infinities and NaN
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [4099, 70_001])
def test_runs_on_other_threads_write_the_one_call_parts(dtype: torch.dtype, n: int,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A tensor coded in runs of chunks (``fork``) inside ``scratch()`` gives the parts of one call outside it, and
    they decode to the tensor bit for bit."""
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
            with E.scratch():
                fast = codec.encode(new, CodecContext("t", ref, {**opts, "verify": True, "fork": assist.fork}))
        assert _parts_equal(base, fast)
        got = codec.decode(fast, CodecContext("t", ref, opts))
        assert torch.equal(got.view(torch.int16 if dtype != torch.float32 else torch.int32),
                           new.view(torch.int16 if dtype != torch.float32 else torch.int32))


def test_outside_serial_runs_of_chunks_go_to_every_core(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside ``kernels.serial`` (the CLI's pack) a large tensor's runs of chunks go to a thread pool; the parts
    are those of the serial encode."""
    monkeypatch.setattr(C, "FORK_RUN", 4096)
    rng = np.random.default_rng(14)
    ref = torch.from_numpy(_mix(rng, 70_001))
    new = ref * (1 + 1e-3 * torch.from_numpy(rng.standard_normal(70_001).astype(np.float32)))
    codec = TENSOR_CODECS.get("ckpt-delta")
    calls: list[int] = []
    real = C._pool_map
    monkeypatch.setattr(C, "_pool_map", lambda fn, items: calls.append(len(items)) or real(fn, items))
    with K.serial(True):
        want = codec.encode(new, CodecContext("t", ref, {"verify": True}))
    assert not calls
    got = codec.encode(new, CodecContext("t", ref, {"verify": True}))
    assert calls == [3] and _parts_equal(want, got)  # 3 chunks: a run each


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
    from tpde_hf.checkpoints import entry_file

    real = entry_file._pwrite_all
    size = sum(t.numel() * t.element_size() for t in tensors.values())

    def flip(fd: int, view: np.ndarray, off: int) -> None:
        real(fd, view, off)
        if off + view.size >= size:  # the piece that ends the file: a bit of it changed on disk after writing
            os.pwrite(fd, bytes([view[-7] ^ 4]), off + view.size - 7)

    monkeypatch.setattr(entry_file, "_pwrite_all", flip)
    with pytest.raises(TpdeFormatError):
        B.write_checked(tmp_path, "checkpoint-10", tensors, manifest, older, newer, True, runner=Assist())
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("verify", [True, False, "full"])
def test_write_checked_syncs_before_the_entry_takes_its_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             verify: bool | str) -> None:
    """The entry is on disk (``fsync``) before it is moved into place, whether the sync runs beside the check's
    comparisons (``verify=True``) or inside the write."""
    rng = np.random.default_rng(10)
    older = _checkpoint(rng, "checkpoint-10", None)
    newer = _checkpoint(rng, "checkpoint-20", older)
    with K.serial(True):
        tensors, manifest = B.encode_entry(older, newer, step=10, depth=1, param_names=None, verify=True)
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("sync") or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(f"replace {Path(b).name}") or real_replace(a, b))
    entry = B.write_checked(tmp_path, "checkpoint-10", tensors, manifest, older, newer, verify, runner=Assist())
    final = events.index(f"replace {entry.name}")
    assert "sync" in events[:final]
    assert S.decode_entry(entry, newer).tensors.keys() == older.tensors.keys()


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


def test_codec_refuses_a_table_missing_a_symbol_of_an_unsampled_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """An encoder bug in a chunk the sampled verify does not decode (a symbol that occurs only there, left out of
    the tables) is caught by the fused encoder's inline checks: the codec names the tensor and stores nothing."""
    g = torch.Generator().manual_seed(5)
    ref = torch.randn(40 * C.CHUNK, generator=g)
    new = ref + 1e-4 * torch.randn(ref.shape, generator=g)
    at = 20 * C.CHUNK + 11  # chunk 20: not among the sampled ones (0, 39)
    assert 20 % C.VERIFY_EVERY != 0
    new[at] = -ref[at] * 1e6  # a far-off value: its symbol occurs nowhere else
    real = ES.sym_histogram
    seen = []

    def dropped(x, p, ctx, mode, width, mb, n_ctx, nsym):  # noqa: ANN001, ANN202
        h = real(x, p, ctx, mode, width, mb, n_ctx, nsym)
        c, s = np.argwhere(real(x[at:at + 1], p[at:at + 1], ctx[at:at + 1], mode, width, mb, n_ctx, nsym))[0]
        seen.append(int(h[c, s]))
        h[c, s] = 0  # the bug: the symbol of element ``at`` gets no mass
        return h

    monkeypatch.setattr(ES, "sym_histogram", dropped)
    codec = TENSOR_CODECS.get("ckpt-delta")
    with pytest.raises(TpdeFormatError, match="w"):
        codec.encode(new, CodecContext("w", ref, {"verify": True}))
    assert 1 in seen  # the symbol was that element's alone


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
    real = EF.predict_ratio_f32

    def spy(*a):  # noqa: ANN002, ANN202
        out = real(*a)
        nans.append(int(out[1]))
        return out

    monkeypatch.setattr(EF, "predict_ratio_f32", spy)  # the codec's compiled prediction
    ref = torch.from_numpy(w0)
    with K.serial(True):
        made = codec.encode(torch.from_numpy(new), CodecContext("w", ref, {"features": [r1, r0], "ctx": ctx,
                                                                           "verify": True}))
        with E.scratch():
            got = codec.encode(torch.from_numpy(new), CodecContext("w", ref, {"features": lazy, "ctx": ctx,
                                                                              "verify": True}))
    assert _parts_equal(made, got)
    assert made["coef"].numel() == 3 and bool((made["coef"][1:] != 0).all())  # both features are used
    assert nans and (nans[-1] > 0) == nan  # the inline path ran; with a NaN it fell back to numpy's


@pytest.mark.parametrize("kind", ["text", "random"])
def test_a_skeleton_equal_to_its_parents_is_stored_small_and_exact(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A skeleton equal to the parent's tries zstd -3 first, and keeps it only where it finds the one long match
    (a 700 KB text of repeated lines); else -10 (a random-looking 3 MB skeleton: -3 alone stores 2 MB or more).
    Either way the blob is small and decompresses exactly with the parent's skeleton; a skeleton that differs,
    or a short one, is -10's frame as before."""
    import zstandard

    rng = np.random.default_rng(5)
    if kind == "text":
        data = b"".join(b'{"token_%d": %d, "merge": "%s"},\n' % (i, i * 7, b"ab" * (i % 13)) for i in range(16000))
    else:
        data = rng.integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()
    parent = {"f": data}
    levels: list[int] = []
    real = zstandard.ZstdCompressor

    def spy(*a, **k):  # noqa: ANN002, ANN003, ANN202
        levels.append(k.get("level"))
        return real(*a, **k)

    monkeypatch.setattr(zstandard, "ZstdCompressor", spy)
    blob = S.compress_skeleton(data, parent, "f")
    assert len(blob) <= 64 + len(data) // 4096
    assert levels == ([3] if kind == "text" else [3, 10])
    rec = {"name": "f", "size": len(data)}
    assert S.skeleton_bytes(blob, parent, rec) == data
    changed = data[:1000] + bytes([data[1000] ^ 1]) + data[1001:]
    levels.clear()
    blob = S.compress_skeleton(changed, parent, "f")
    assert levels == [10] and S.skeleton_bytes(blob, parent, rec) == changed
    levels.clear()
    assert S.skeleton_bytes(S.compress_skeleton(data[:100], {"f": data[:100]}, "f"), {"f": data[:100]},
                            {"name": "f", "size": 100}) == data[:100] and levels == [10]
