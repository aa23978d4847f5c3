"""Restore speed work (issue 21): the fast ``ckpt-delta`` decoder and the chain decoded as one job graph.

Covers: :mod:`tpde_hf.checkpoints.dec_kernels` against the reference decoder (``kernels.decode_chunks``) bit for
bit, every dtype, both modes, special values, odd sizes, the float32 prediction formed in the loop (0, 1, 2
features; ``c0`` 0, 1 or fitted) on one thread and on numba's; a NaN prediction falling back to numpy's; a
seeded corruption sweep where both decoders agree chunk by chunk and the codec either gives the tensor back or
raises :class:`TpdeFormatError`; and :mod:`tpde_hf.checkpoints.chain`: a chain decoded as one graph equals the
original files on one and two threads, a corrupt link fails clearly with no file written (all or nothing).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash
from test_checkpoints import _fake_run, _restored_hashes

from tpde_hf.checkpoints import api, chain
from tpde_hf.checkpoints import dec_kernels as D
from tpde_hf.checkpoints import kernels as K
from tpde_hf.checkpoints import store as S
from tpde_hf.checkpoints.codec import CheckpointDelta, _as_dtype_bits, _buckets, _np_float, predict
from tpde_hf.codec.registry import TENSOR_CODECS, CodecContext
from tpde_hf.errors import TpdeFormatError

CODEC = TENSOR_CODECS.get("ckpt-delta")
INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _special(n: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A reference and a new tensor close to it, with +-0, subnormals, inf and NaN sprinkled in."""
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(n, generator=g) * 0.05
    new = old * 0.999 + torch.randn(n, generator=g) * 1e-4
    tiny = torch.finfo(dtype).tiny
    for t in (old, new):
        t[: min(n, 7)] = torch.tensor([0.0, -0.0, tiny / 4, -tiny / 8, float("inf"), -float("inf"), 3.0])[: min(n, 7)]
    new[n // 2] = float("nan")
    return old.to(dtype), new.to(dtype)


def _both(parts: dict, ref: torch.Tensor | None, opts: dict, key: str = "t") -> tuple[np.ndarray | None, np.ndarray]:
    """``(fast decoder's bits or None, reference decoder's bits)`` of a coded tensor."""
    pp = CheckpointDelta._parse(parts, key)
    dtype = pp["dtype"]
    refn = ref.reshape(-1).float().numpy() if ref is not None and dtype == torch.bfloat16 else (
        ref.reshape(-1).numpy() if ref is not None else None)
    feats = [np.asarray(f, dtype=np.float32 if dtype != torch.float16 else np.float16).reshape(-1)
             for f in opts.get("features", ())]
    src = CheckpointDelta._ctx_source(refn, CodecContext(key, ref, opts), dtype, pp["n"])
    ctx = _buckets(src, pp["lo"], pp["n_ctx"])
    fast = CheckpointDelta._fast_payload(pp, refn, pp["coef"], feats, ctx)
    pbits = _as_dtype_bits(predict(refn, pp["coef"], feats, pp["n"], _np_float(dtype)), dtype)
    return fast, CheckpointDelta._payload(pp, pbits, ctx, key)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", [K.MODE_ORD, K.MODE_FLD])
@pytest.mark.parametrize("n", [1, 4099, 70001])
def test_fast_decoder_equals_reference_every_dtype_and_mode(dtype: torch.dtype, mode: int, n: int) -> None:
    old, new = _special(n, dtype, seed=n + mode)
    for serial in (True, False):
        with K.serial(serial):
            for ref in (old, None):
                parts = CODEC.encode(new, CodecContext("t", ref, {"modes": (mode,)}))
                fast, slow = _both(parts, ref, {})
                assert fast is not None and np.array_equal(fast, slow)
                assert np.array_equal(slow, new.view(INT[dtype]).numpy())
                got = CODEC.decode(parts, CodecContext("t", ref, {}))
                assert torch.equal(got.view(INT[dtype]), new.view(INT[dtype]))


@pytest.mark.parametrize("n_feat", [0, 1, 2])
@pytest.mark.parametrize("fit", [True, False])
def test_fused_f32_prediction_is_numpy_bit_for_bit(n_feat: int, fit: bool) -> None:
    g = torch.Generator().manual_seed(n_feat)
    n = 3 * K.LANES * 1000 + 3  # a partial last group of lanes
    old = torch.randn(n, generator=g)
    feats = [torch.randn(n, generator=g).numpy() for _ in range(n_feat)]
    new = old * 0.9993 + sum((np.float32(0.01 * (i + 1)) * torch.from_numpy(f) for i, f in enumerate(feats)),
                             torch.zeros(n))
    new[:4] = torch.tensor([0.0, -0.0, 1e-42, -1e-45])
    opts = {"features": feats, "fit": fit}
    parts = CODEC.encode(new, CodecContext("t", old, opts))
    coef = parts["coef"].tolist()
    assert fit or coef[0] in (0.0, 1.0)  # without a fit: p = 0 or p = reference (kinds 0 and 1)
    fast, slow = _both(parts, old, opts)
    assert fast is not None and np.array_equal(fast, slow) and np.array_equal(slow, new.view(torch.int32).numpy())
    # a prediction of zeros plus terms, and one that is the reference itself
    for c in ([0.0, *[0.25] * n_feat], [1.0, *[0.5] * n_feat], [1.0, *[0.0] * n_feat]):
        ref = old.numpy()
        p = predict(ref, c, feats, n, np.dtype(np.float32)).view(np.int32)
        out = np.empty(n, np.int32)
        c3 = np.zeros(3, np.float32)
        c3[:len(c)] = c
        fs = [*feats, None, None]
        pp = CheckpointDelta._parse(parts, "t")
        _, _, ws, w, bs, b, st = CheckpointDelta._decoder_inputs(pp, tables=False)
        tab = D.slot_table(pp["freq"], pp["mode"], 23)
        ctx = _buckets(CheckpointDelta._ctx_source(ref, CodecContext("t", old, {}), torch.float32, n), pp["lo"],
                       pp["n_ctx"])
        bad_f, nan = D.decode_f32(ref, fs[0], fs[1], c3, ctx, tab, st, ws, w, bs, b, pp["mode"], pp["chunk"], out)
        want = np.empty(n, np.int32)
        bad_b = D.decode_bits(p, ctx, tab, st, ws, w, bs, b, pp["mode"], 32, pp["chunk"], want)
        assert nan == 0 and np.array_equal(bad_f, bad_b) and np.array_equal(out, want)


def test_a_nan_prediction_falls_back_to_numpy() -> None:
    g = torch.Generator().manual_seed(3)
    old = torch.randn(20000, generator=g)
    new = old * 0.999
    old[5], new[5] = float("nan"), 1.0
    f = torch.randn(20000, generator=g).numpy()
    f[9] = np.float32("nan")
    for opts in ({}, {"features": [f]}):
        parts = CODEC.encode(new, CodecContext("t", old, opts))
        fast, slow = _both(parts, old, opts)
        if parts["coef"].numel() and float(parts["coef"][0]) not in (0.0,):
            assert fast is None  # the compiled prediction declined: numpy's NaN payloads are the format's
        got = CODEC.decode(parts, CodecContext("t", old, opts))
        assert torch.equal(got.view(torch.int32), new.view(torch.int32))


def test_corruption_sweep_both_decoders_agree_and_errors_are_clear() -> None:
    rng = np.random.default_rng(21)
    old, new = _special(50000, torch.float32, seed=5)
    feats = [torch.randn(50000, generator=torch.Generator().manual_seed(1)).numpy()]
    clean = CODEC.encode(new, CodecContext("w", old, {"features": feats}))
    exact = raised = 0
    for case in range(60):
        parts = {k: v.clone() for k, v in clean.items()}
        name = ["words", "bits", "chunks", "tables", "coef", "meta"][case % 6]
        buf = parts[name].view(torch.uint8).reshape(-1).numpy()
        for _ in range(1 + case % 3):
            buf[rng.integers(buf.size)] ^= np.uint8(1 << rng.integers(8))
        if case % 11 == 0:  # truncated
            parts[name] = parts[name].view(torch.uint8).reshape(-1)[: rng.integers(buf.size)].clone()
        try:
            pp = CheckpointDelta._parse(parts, "w")
        except TpdeFormatError:
            raised += 1
            continue
        ref = old.numpy()
        ctx = _buckets(CheckpointDelta._ctx_source(ref, CodecContext("w", old, {}), torch.float32, pp["n"]),
                       pp["lo"], pp["n_ctx"])
        lut, cum, ws, w, bs, b, st = CheckpointDelta._decoder_inputs(pp)
        p = _as_dtype_bits(predict(ref, pp["coef"], feats, pp["n"], np.dtype(np.float32)), torch.float32)
        o1, o2 = np.empty(pp["n"], np.int32), np.empty(pp["n"], np.int32)
        with K.serial(True):
            bad_ref = K.decode_chunks(p, ctx, lut, pp["freq"], cum, st, ws, w, bs, b, pp["mode"], 32, 23, pp["chunk"],
                                      o1)
        bad_fast = D.decode_bits(p, ctx, D.slot_table(pp["freq"], pp["mode"], 23), st, ws, w, bs, b, pp["mode"], 32,
                                 pp["chunk"], o2)
        assert np.array_equal(bad_ref != 0, bad_fast != 0), (case, name)
        ok = bad_ref == 0
        ch = pp["chunk"]
        for c in np.flatnonzero(ok):
            assert np.array_equal(o1[c * ch:(c + 1) * ch], o2[c * ch:(c + 1) * ch]), (case, name, c)
        try:
            got = CODEC.decode(parts, CodecContext("w", old, {"features": feats}))
        except TpdeFormatError as exc:
            assert "w" in str(exc)
            raised += 1
            continue
        assert torch.equal(got.view(torch.int32), new.view(torch.int32))
        exact += 1
    assert raised >= 30 and exact + raised == 60


def _chain_run(tmp: Path) -> tuple[Path, dict[int, dict[str, str]]]:
    out = tmp / "run"
    hashes = _fake_run(out, [10, 20, 30, 40, 50], seed=4)
    api.pack_all(out, backward=True, keyframe_every=8, param_names=["w"])
    return out, hashes


def test_chain_as_one_graph_restores_every_checkpoint_exactly(tmp_path: Path) -> None:
    out, hashes = _chain_run(tmp_path)
    root = out / S.STORE_DIRNAME
    assert len(S.chain(root, "checkpoint-10")) == 4  # 40, 30, 20, 10 against the plain 50
    for s in (10, 20, 30, 40):
        assert _restored_hashes(out / f"checkpoint-{s}", tmp_path) == hashes[s]
    paths, raw = S.links(root, "checkpoint-10")
    start = S.read_checkpoint(raw, name=S.raw_name(root, raw), hash_files=False)
    by_link = start
    for p in paths:  # link by link, one thread, against the graph on two threads
        by_link = chain.decode_links([p], by_link, threads=1)
    graph = chain.decode_links(paths, start, threads=2)
    assert list(graph.tensors) == list(by_link.tensors)
    for k, t in graph.tensors.items():
        assert torch.equal(t.view(INT[t.dtype]), by_link.tensors[k].view(INT[t.dtype])), k
    for f in graph.manifest["files"]:
        S.file_digest(graph, f["name"])
    api.restore(out / "checkpoint-10", files=["optimizer.pt"])  # in place, only what was asked
    assert xxhash.xxh3_64_hexdigest((out / "checkpoint-10" / "optimizer.pt").read_bytes()) == \
        hashes[10]["optimizer.pt"]
    assert not (out / "checkpoint-10" / "model.safetensors").exists()


@pytest.mark.parametrize("threads", [1, 2])
def test_a_corrupt_link_fails_clearly_and_writes_nothing(tmp_path: Path, threads: int,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    out, _ = _chain_run(tmp_path)
    entry = out / S.STORE_DIRNAME / "checkpoint-30.tpde"
    data = bytearray(entry.read_bytes())
    data[-200] ^= 0x04  # inside a tensor's payload, not the header
    entry.write_bytes(bytes(data))
    monkeypatch.setattr("numba.get_num_threads", lambda: threads)
    dst = tmp_path / "restored"
    with pytest.raises(TpdeFormatError, match="checkpoint-30"):
        api.restore(out / "checkpoint-10", out=dst)
    assert not dst.exists() or not any(dst.iterdir())  # all or nothing: no file, no staging leftover
    with pytest.raises(TpdeFormatError, match="checkpoint-30"):
        api.restore(out / "checkpoint-20")  # in place: the packed folder keeps only its pointer and small files
    assert sorted(p.name for p in (out / "checkpoint-20").iterdir()) == [S.POINTER, "trainer_state.json"]
    assert json.loads((out / "checkpoint-20" / S.POINTER).read_text())["format"] == S.FORMAT


def test_seeded_flips_of_a_middle_entry_restore_exactly_or_raise(tmp_path: Path) -> None:
    out, hashes = _chain_run(tmp_path)
    entry = out / S.STORE_DIRNAME / "checkpoint-30.tpde"
    clean = entry.read_bytes()
    rng = np.random.default_rng(7)
    exact = 0
    for _ in range(12):
        data = bytearray(clean)
        data[rng.integers(len(data))] ^= np.uint8(1 << rng.integers(8))
        entry.write_bytes(bytes(data))
        try:
            got = _restored_hashes(out / "checkpoint-20", tmp_path)
        except TpdeFormatError:
            continue
        assert got == hashes[20]  # a flip in padding or an unused byte: still exact
        exact += 1
    entry.write_bytes(clean)
    assert _restored_hashes(out / "checkpoint-20", tmp_path) == hashes[20]
    shutil.rmtree(tmp_path / "restored-checkpoint-20", ignore_errors=True)


# ------------------------------------------------------------- Adam's features formed inside the decoder
MK, VK, WK = "optimizer.pt:state/0/exp_avg", "optimizer.pt:state/0/exp_avg_sq", "model.safetensors:w"


def _adam_pair(n: int, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Two checkpoints of one AdamW parameter (``m``, ``v``, ``w``), with zeros, -0, subnormals and a ``v == 0``
    (never touched) sprinkled into both."""
    g = torch.Generator().manual_seed(seed)
    m0 = torch.randn(n, generator=g) * 1e-3
    v0 = m0 * m0 + torch.rand(n, generator=g) * 1e-7
    w0 = torch.randn(n, generator=g) * 0.05
    grad = torch.randn(n, generator=g) * 1e-3
    m1 = 0.9 * m0 + 0.1 * grad
    v1 = 0.999 * v0 + 0.001 * grad * grad
    w1 = w0 - 1e-3 * m1 / (v1.sqrt() + 1e-8) - 1e-5 * w0
    for w in (w0, w1):
        w[:4] = torch.tensor([0.0, -0.0, 1e-42, -1e-45])
    v0[5] = v1[5] = 0.0
    m0[6], m1[7], m0[8], v1[9] = -0.0, 1e-40, -1e-41, 1e-44
    return {MK: m0, VK: v0, WK: w0}, {MK: m1, VK: v1, WK: w1}


def _encode_like_a_pack(target: dict, prev: dict, backward: bool) -> dict[str, dict]:
    """Each tensor of ``target`` coded as a pack codes it (``predict.options`` of the earlier stages)."""
    from tpde_hf.checkpoints import predict

    parts, cur = {}, {}
    for key in (MK, VK, WK):
        opts = predict.options(key, cur, prev, ["w"], backward=backward)
        assert opts, key  # every tensor has its Adam recipe
        parts[key] = CODEC.encode(target[key], CodecContext(key, prev[key], {**opts, "verify": True}))
        cur[key] = target[key]
    return parts


@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("n", [70001, 4099])
def test_adam_recipes_in_the_decoder_equal_the_codec_bit_for_bit(backward: bool, n: int) -> None:
    from tpde_hf.checkpoints import dec_features as F
    from tpde_hf.checkpoints import predict

    a, b = _adam_pair(n, seed=n + backward)
    prev, target = (b, a) if backward else (a, b)
    parts = _encode_like_a_pack(target, prev, backward)
    for serial in (True, False):
        with K.serial(serial):
            cur: dict[str, torch.Tensor] = {}
            for key in (MK, VK, WK):
                recipe = F.plan(key, cur, prev, ["w"], backward)[0]
                assert recipe == {MK: D.RECIPE_M, VK: D.RECIPE_V, WK: D.RECIPE_W}[key]
                fast = F.decode(key, parts[key], cur, prev, ["w"], backward)
                assert fast is not None, key  # the fused path took it
                opts = predict.options(key, cur, prev, ["w"], backward=backward)
                slow = CODEC.decode(parts[key], CodecContext(key, prev[key], opts))
                assert torch.equal(fast.view(torch.int32), target[key].view(torch.int32)), key
                assert torch.equal(slow.view(torch.int32), target[key].view(torch.int32)), key
                cur[key] = fast


def test_adam_recipe_declines_where_it_must_and_never_raises() -> None:
    from tpde_hf.checkpoints import dec_features as F

    a, b = _adam_pair(20000, seed=9)
    b[VK][11] = float("nan")  # a NaN second moment: the weight's ratio feature, hence its prediction, is NaN
    parts = _encode_like_a_pack(b, a, False)
    coef = parts[WK]["coef"].tolist()
    assert coef[1] != 0  # the ratio's coefficient is used, so the compiled prediction is NaN there
    cur = {MK: b[MK], VK: b[VK]}
    assert F.decode(WK, parts[WK], cur, a, ["w"]) is None  # declined: numpy's NaN payloads are the format's
    # corrupt payloads: the fused path gives None (the ordinary decode names the fault), never a wrong tensor
    rng = np.random.default_rng(3)
    for case in range(24):
        bad = {k: v.clone() for k, v in parts[VK].items()}
        name = ["words", "bits", "chunks", "coef", "meta", "tables"][case % 6]
        buf = bad[name].view(torch.uint8).reshape(-1).numpy()
        buf[rng.integers(buf.size)] ^= np.uint8(1 << rng.integers(8))
        out = F.decode(VK, bad, {MK: b[MK]}, a, ["w"])
        assert out is None or torch.equal(out.view(torch.int32), b[VK].view(torch.int32))
    # not an Adam tensor, or inputs that options would not use: no plan
    assert F.plan("model.safetensors:other", cur, a, ["w"]) is None
    assert F.plan(MK, cur, {MK: a[MK], VK: a[VK][:-1]}, ["w"]) is None
    assert F.plan(WK, {MK: b[MK]}, a, ["w"]) is None


def test_decode_adam_checks_its_inputs() -> None:
    a, b = _adam_pair(5000, seed=2)
    parts = _encode_like_a_pack(b, a, False)
    pp = CheckpointDelta._parse(parts[WK], WK)
    _, _, ws, w, bs, bits, st = CheckpointDelta._decoder_inputs(pp, tables=False)
    tab = D.slot_table(pp["freq"], pp["mode"], 23)
    npa = {k: t.numpy() for k, t in a.items()}
    m1, v1 = b[MK].numpy(), b[VK].numpy()
    out = np.empty(pp["n"], np.int32)
    args = (pp["coef"], pp["lo"], pp["n_ctx"], tab, st, ws, w, bs, bits, pp["mode"], pp["chunk"], out)
    bad, nan = D.decode_adam(D.RECIPE_W, npa[WK], m1, v1, npa[MK], npa[VK], *args)
    assert not bad.any() and nan == 0 and np.array_equal(out, b[WK].view(torch.int32).numpy())
    with pytest.raises(ValueError, match="elements"):
        D.decode_adam(D.RECIPE_W, npa[WK], m1[:-1], v1, npa[MK], npa[VK], *args)
    with pytest.raises(ValueError, match="float32"):
        D.decode_adam(D.RECIPE_W, npa[WK], m1, None, npa[MK], npa[VK], *args)
    with pytest.raises(ValueError, match="coefficient"):
        D.decode_adam(D.RECIPE_M, npa[MK], npa[VK], None, None, None, [1.0, 0.5], *args[1:])
    with pytest.raises(ValueError, match="coefficient"):
        D.decode_f32(npa[WK], None, None, np.array([1.0, 0.5, 0.0], np.float32), np.zeros(pp["n"], np.uint8), tab,
                     st, ws, w, bs, bits, pp["mode"], pp["chunk"], out)


def test_chain_takes_the_fused_path_for_adam_tensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tpde_hf.checkpoints import dec_features as F

    out, hashes = _chain_run(tmp_path)
    taken: list[str] = []
    real = F._decode_planned

    def counted(key, *args):  # noqa: ANN001, ANN202
        res = real(key, *args)
        if res is not None:
            taken.append(key)
        return res

    monkeypatch.setattr(F, "_decode_planned", counted)
    assert _restored_hashes(out / "checkpoint-20", tmp_path) == hashes[20]  # three links: 40, 30, 20
    assert sorted(set(taken)) == sorted([f"optimizer.pt:state/0/{k}" for k in ("exp_avg", "exp_avg_sq")]
                                        + ["model.safetensors:w"])
    assert len(taken) == 9


class _KeysOnly(dict):
    """A mapping whose values must not be read: a job that reads one would wait for its decode."""

    def __getitem__(self, key: str) -> torch.Tensor:
        raise AssertionError(f"{key} was read")

    def get(self, key: str, default: object = None) -> torch.Tensor:
        raise AssertionError(f"{key} was read")


def test_backward_exp_avg_sq_needs_only_the_stored_size_of_its_exp_avg() -> None:
    from tpde_hf.checkpoints import dec_features as F

    a, b = _adam_pair(4099, seed=5)
    parts = _encode_like_a_pack(a, b, True)
    cur = _KeysOnly({MK: None})
    stored = F.stored_sizes({k: p["meta"].numpy() for k, p in parts.items()})
    assert stored[MK] == (torch.float32, 4099)
    got = F.decode(VK, parts[VK], cur, b, ["w"], backward=True, stored=stored)
    assert got is not None and torch.equal(got.view(torch.int32), a[VK].view(torch.int32))
    # what options would refuse, this refuses too: another size, another dtype, no exp_avg in the checkpoint
    for bad in ({MK: (torch.float32, 4098)}, {MK: (torch.bfloat16, 4099)}, {MK: (None, -1)}):
        assert F.plan(VK, cur, b, ["w"], True, stored=bad) is None
    assert F.plan(VK, _KeysOnly(), b, ["w"], True, stored=stored) is None
