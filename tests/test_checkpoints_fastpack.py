"""The encoder's lighter passes (issue 21, step time): the same bytes as before, the same guarantees.

* the compiled fp32 prediction (``enc_kernels.predict_f32``) gives numpy's bit patterns (``codec.predict``, which
  the decoder keeps) on special values, with and without features; a NaN prediction falls back to numpy;
* the pack-time verify decodes its sampled chunks against numpy's prediction, so a compiled prediction that
  differs is refused before anything is stored;
* both modes' sample costs in one call equal the per-mode estimate;
* payload parts at an odd address (a view into a larger buffer) still decode exactly;
* the callback's deferred mode packs only in the wait and restores exactly; the warm-up loads the kernels;
* a pack the training thread waits for leaves its clean-up to the next pack's thread.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tpde_hf.checkpoints import codec as C
from tpde_hf.checkpoints import enc_features as EF
from tpde_hf.checkpoints import enc_kernels as E
from tpde_hf.checkpoints import kernels as K
from tpde_hf.checkpoints import store as S
from tpde_hf.codec.registry import TENSOR_CODECS, CodecContext
from tpde_hf.errors import TpdeFormatError

F32 = np.dtype(np.float32)
SPECIAL = np.array([0.0, -0.0, np.inf, -np.inf, 1e-45, -1e-45, 1e-40, -2e-39, 3.4e38, -3.4e38, 1.0, -1.0, 1e-38,
                    65504.0, 1.17549435e-38], np.float32)


def _arrays(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(3):
        a = (rng.standard_normal(n) * 10.0 ** rng.integers(-40, 38, n)).astype(np.float32)
        a[rng.integers(0, n, n // 8)] = rng.choice(SPECIAL, n // 8)
        out.append(a)
    return out


@pytest.mark.parametrize("coef", [[0.5], [-1.0000121, 0.0], [0.999, 1e-4], [1.5, 0.0, -3e-3], [0.75, 2.5, 1e-30],
                                  [3e-39, -7.0, 0.125], [-0.0001, 1e38, 1e38]])
def test_compiled_prediction_is_numpys(coef: list[float]) -> None:
    ref, f1, f2 = _arrays(20_011, len(coef))
    feats = [f1, f2]
    with np.errstate(all="ignore"):  # overflow to inf is part of the test
        want = C.predict(ref, coef, feats, ref.size, F32)
        got, compiled = C._prediction(ref, coef, feats, ref.size, F32, torch.float32)
    assert np.array_equal(got, want.view(np.int32))
    assert compiled == (not np.isnan(want).any())  # overflow inf - inf: NaN, numpy's path
    c = np.zeros(3, np.float32)
    c[:len(coef)] = coef
    p, nan = E.predict_f32(ref, f1, f2, c, len(coef) - 1)
    ok = ~np.isnan(want)
    assert nan == (~ok).sum()
    assert np.array_equal(p.view(np.int32)[ok], want.view(np.int32)[ok])


def test_a_nan_prediction_takes_numpys_path() -> None:
    ref, f1, _ = _arrays(5000, 9)
    ref[17] = np.float32(np.nan)
    bits, compiled = C._prediction(ref, [0.5, 0.25], [f1], ref.size, F32, torch.float32)
    assert not compiled
    assert np.array_equal(bits, C.predict(ref, [0.5, 0.25], [f1], ref.size, F32).view(np.int32))


def _fitted_case(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(n, generator=g)
    feat = torch.randn(n, generator=g)
    new = 0.9 * ref + 0.1 * feat + 1e-5 * torch.randn(n, generator=g)  # fitted c0 = 0.9: the compiled path
    return ref, new, feat.numpy()


def test_the_fitted_case_round_trips_through_the_compiled_prediction(monkeypatch: pytest.MonkeyPatch) -> None:
    ref, new, feat = _fitted_case(3 * C.CHUNK + 5, 1)
    calls = []
    real = EF.predict_f32
    monkeypatch.setattr(EF, "predict_f32", lambda *a: calls.append(1) or real(*a))
    codec = TENSOR_CODECS.get("ckpt-delta")
    ctx = CodecContext("w", ref, {"features": [feat], "verify": True})
    parts = codec.encode(new, ctx)
    assert calls and 0 < parts["coef"][0] < 1
    assert torch.equal(codec.decode(parts, CodecContext("w", ref, {"features": [feat]})).view(torch.int32),
                       new.view(torch.int32))


def test_verify_refuses_a_compiled_prediction_that_is_not_numpys(monkeypatch: pytest.MonkeyPatch) -> None:
    ref, new, feat = _fitted_case(3 * C.CHUNK + 5, 2)
    real = EF.predict_f32

    def off_by_one_ulp(*a):  # noqa: ANN002, ANN202
        p, nan = real(*a)
        return (p.view(np.int32) + 1).view(np.float32), nan

    monkeypatch.setattr(EF, "predict_f32", off_by_one_ulp)
    codec = TENSOR_CODECS.get("ckpt-delta")
    with pytest.raises(TpdeFormatError, match="w"):
        codec.encode(new, CodecContext("w", ref, {"features": [feat], "verify": True}))


@pytest.mark.parametrize("width,mb,view", [(32, 23, np.int32), (16, 7, np.int16), (16, 10, np.int16)])
def test_both_modes_cost_in_one_call(width: int, mb: int, view: type) -> None:
    rng = np.random.default_rng(width + mb)
    n, n_ctx = 50_000, 8
    x = rng.integers(np.iinfo(view).min, np.iinfo(view).max, n).astype(view)
    p = (x.astype(np.int64) + rng.integers(-300, 300, n)).clip(np.iinfo(view).min, np.iinfo(view).max).astype(view)
    ctx = rng.integers(0, n_ctx, n).astype(np.uint8)
    idx = np.sort(rng.choice(n, 4096, replace=False)).astype(np.int64)
    pb = p[idx]
    both = E.sample_costs(x, pb, ctx, idx, width, mb, n_ctx)
    for mode in (K.MODE_ORD, K.MODE_FLD):
        one = E.sample_cost(x, pb, ctx, idx, mode, width, mb, n_ctx, K.n_symbols(mode, width, mb))
        assert both[mode] == pytest.approx(one, rel=1e-12)


def test_payload_parts_at_an_odd_address_decode() -> None:
    g = torch.Generator().manual_seed(3)
    ref = torch.randn(70_001, generator=g)
    new = ref + 1e-4 * torch.randn(ref.shape, generator=g)
    codec = TENSOR_CODECS.get("ckpt-delta")
    parts = codec.encode(new, CodecContext("w", ref))
    moved = dict(parts)
    for name in ("words", "bits"):
        buf = torch.zeros(parts[name].numel() + 1, dtype=torch.uint8)
        buf[1:] = parts[name]
        moved[name] = buf[1:]  # a view at an odd address
        assert moved[name].data_ptr() % 2 == 1
    assert torch.equal(codec.decode(moved, CodecContext("w", ref)).view(torch.int32), new.view(torch.int32))
    odd = dict(parts, words=parts["words"][:-1])  # not a whole number of words: a clear error
    with pytest.raises(TpdeFormatError, match="w"):
        codec.decode(odd, CodecContext("w", ref))


def test_deferred_packs_run_only_in_the_wait_and_restore_exactly(tmp_path: Path) -> None:
    """``defer=True``: a pack starts only when Trainer waits for it (the next save, or the end); the run's
    checkpoints restore to exactly the files of a run without the callback."""
    from test_checkpoints import _restored_hashes, _tiny_trainer

    from tpde_hf.checkpoints.callback import TpdeCheckpointCallback

    torch.set_num_threads(1)
    plain = _tiny_trainer(tmp_path / "plain", [], save_total_limit=None)
    plain.train()
    cb = TpdeCheckpointCallback(keyframe_every=2, defer=True)
    seen: list[list[str]] = []
    real_on_save = cb.on_save

    def on_save(args, state, control, **kw):  # noqa: ANN001, ANN003, ANN202
        real_on_save(args, state, control, **kw)
        time.sleep(0.2)  # a pack would have started by now if it were not deferred
        seen.append(sorted(n for n, _ in S.entries(tmp_path / "run" / S.STORE_DIRNAME)))

    cb.on_save = on_save
    run = _tiny_trainer(tmp_path / "run", [cb], save_total_limit=None)
    run.train()
    # checkpoint-4 is packed (against 8) in the wait at step 12, not in the 0.2 s after the save of 8
    assert seen == [[], [], ["checkpoint-4"]]
    assert sorted(n for n, _ in S.entries(tmp_path / "run" / S.STORE_DIRNAME)) == ["checkpoint-4", "checkpoint-8"]
    assert len(cb.waits) == 3
    for step in (4, 8, 12):
        want = _restored_hashes(tmp_path / "plain" / f"checkpoint-{step}", tmp_path / "p")
        got = _restored_hashes(tmp_path / "run" / f"checkpoint-{step}", tmp_path / "r")
        for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
            assert got[name] == want[name], (step, name)


def test_a_helping_thread_returns_when_woken_not_at_its_next_look() -> None:
    """The training thread helps a pack until it ends; the pack wakes it as it ends (``Assist.wake``), so the wait
    does not run on to the helper's next look at ``busy()`` (made an hour here: without the wake this hangs)."""
    from tpde_hf.checkpoints.assist import Assist

    assist = Assist(workers=2)
    assist.poll_s = 3600.0
    ended = threading.Event()
    helper = threading.Thread(target=assist.help, args=(lambda: not ended.is_set(),), daemon=True)
    helper.start()
    time.sleep(0.2)  # the helper is now waiting on the condition
    assert helper.is_alive()
    ended.set()
    assist.wake()
    helper.join(timeout=30)
    assert not helper.is_alive()


def test_warm_up_loads_the_pack_kernels() -> None:
    """In a fresh process no pack kernel is loaded; after ``warm_up()`` the packing thread's are."""
    code = ("from tpde_hf.checkpoints import codec as C, enc_kernels as E, kernels as K\n"
            "from tpde_hf.checkpoints import enc_features as F\n"
            "fns = [E._predict_f32_into, F._predict_ratio_into, E.sample_costs, E.decode_some, K.exponents, "
            "E._ratio_into, K.buckets_into, E._half_exponent_into, E._square_ctx_into, E._weight_ctx_into, "
            "E.sym_histogram, E._fused_range, E.quantize_tables, E.slot_symbols, E._flat_tables_into]\n"
            "assert not any(f.signatures for f in fns)\n"
            "C.warm_up()\n"
            "assert all(f.signatures for f in fns), [f for f in fns if not f.signatures]\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


@pytest.mark.parametrize("seed", [0, 1])
def test_entry_writer_writes_save_files_bytes(tmp_path: Path, seed: int) -> None:
    """The entry writer (writeback started as it goes) writes exactly ``save_file``'s bytes, for the entry's
    dtypes in any name order, empty parts, 0-d parts and metadata with quotes, newlines and non-ASCII;
    other dtypes go through safetensors itself."""
    from safetensors.torch import save_file

    from tpde_hf.checkpoints import entry_file

    rng = np.random.default_rng(seed)
    names = [f"{rng.choice(['w', 'optimizer.pt:state', 'skeleton', 'Z'])}.{i}.{rng.integers(1e6)}" for i in range(40)]
    kinds = [torch.int64, torch.float32, torch.uint8]
    tensors = {n: torch.from_numpy(rng.integers(0, 255, int(rng.integers(0, 3000)), dtype=np.uint8)).view(torch.uint8)
               .clone()[: (int(rng.integers(0, 100)) // 8) * 8].view(kinds[i % 3]) for i, n in enumerate(names)}
    tensors["scalar"] = torch.tensor(3.5)
    tensors["empty"] = torch.zeros(0, dtype=torch.int64)
    meta = {"tpde-ckpt": '{"name": "checkpoint-7", "note": "a \\"quoted\\"\\nline, \u00e9\u4e2d, \\u0001"}'
                         + "\x01\x1f\x7f\u2028"}
    save_file(tensors, tmp_path / "want.safetensors", metadata=meta)
    with open(tmp_path / "got.safetensors", "wb") as f:
        entry_file.write_tensors(f, tensors, meta)
    assert (tmp_path / "got.safetensors").read_bytes() == (tmp_path / "want.safetensors").read_bytes()
    other = {"h": torch.arange(5, dtype=torch.int16), "m": torch.zeros(3, dtype=torch.int64)}
    save_file(other, tmp_path / "want2.safetensors", metadata=meta)
    with open(tmp_path / "got2.safetensors", "wb") as f:
        entry_file.write_tensors(f, other, meta)
    assert (tmp_path / "got2.safetensors").read_bytes() == (tmp_path / "want2.safetensors").read_bytes()
    # written and checked piece by piece (pieces of 100 bytes: parts cut and joined), on one thread or two
    from tpde_hf.checkpoints.assist import Assist

    for piece, runner in ((entry_file._PIECE, None), (100, None), (100, Assist()), (7, Assist())):
        entry_file._PIECE = piece
        try:
            for got, want, parts in (("got3", "want", tensors), ("got4", "want2", other)):
                assert entry_file.write_checked_file(tmp_path / got, parts, meta, runner) is None
                assert (tmp_path / got).read_bytes() == (tmp_path / f"{want}.safetensors").read_bytes()
        finally:
            entry_file._PIECE = 8 << 20


@pytest.mark.parametrize("where", ["header", "first", "last"])
def test_checked_write_refuses_a_piece_the_disk_got_wrong(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          where: str) -> None:
    """A piece that lands on disk other than written (a flipped bit in the header, the first or the last part) is
    named by :func:`entry_file.write_checked_file`, on one thread or two, pieces of 64 bytes or whole parts."""
    from tpde_hf.checkpoints import entry_file
    from tpde_hf.checkpoints.assist import Assist

    rng = np.random.default_rng(3)
    tensors = {f"p{i}": torch.from_numpy(rng.integers(0, 255, 5000 + i, dtype=np.uint8)) for i in range(5)}
    tensors["m"] = torch.arange(9, dtype=torch.int64)
    meta = {"k": "v"}
    start = len(entry_file.header(tensors, meta)[0])
    total = start + sum(t.numel() * t.element_size() for t in tensors.values())
    real = entry_file._pwrite_all

    def bad_write(fd: int, view: np.ndarray, off: int) -> None:
        hit = {"header": off == 0, "first": off == start, "last": off + view.size == total}[where]
        if hit:
            view = view.copy()
            view[view.size // 2] ^= 0x10
        real(fd, view, off)

    monkeypatch.setattr(entry_file, "_pwrite_all", bad_write)
    for piece in (64, 8 << 20):
        monkeypatch.setattr(entry_file, "_PIECE", piece)
        for runner in (None, Assist()):
            bad = entry_file.write_checked_file(tmp_path / "x.tpde", tensors, meta, runner)
            assert bad == {"header": "the header on disk differs from the one written",
                           "first": "part m on disk differs from the one written",
                           "last": "part p4 on disk differs from the one written"}[where], (piece, runner)
