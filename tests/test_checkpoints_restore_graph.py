"""Restore speed work, part three (issue 21): the chain run parameter by parameter, files streamed, no payload copy.

Covers: :func:`tpde_hf.checkpoints.chain._group` (which tensors a decode may read); a chain of several AdamW
parameters decoded on two threads equal to link-by-link decoding, bit for bit, with a let-go group's arrays
decoded into again before its link ends; a read of a let-go tensor refused; a job that reads past what it was
queued after (the dependency list made too short on purpose) still gets its tensors; the streamed file writes
byte for byte, and nothing written when the last link is corrupt; the fused decoder reading unaligned ``words``
and ``bits`` parts in place (no copy), exact, declining a malformed payload so the codec names it; and a seeded
sweep of flips inside unaligned payload parts: each restore is exact or raises :class:`TpdeFormatError`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash
from safetensors.torch import save_file
from test_checkpoints_restore import MK, VK, WK, _adam_pair, _encode_like_a_pack

from tpde_hf.checkpoints import api, chain
from tpde_hf.checkpoints import dec_features as F
from tpde_hf.checkpoints import store as S
from tpde_hf.codec.registry import TENSOR_CODECS, CodecContext
from tpde_hf.errors import TpdeFormatError
from tpde_hf.integrity import MappedShard

CODEC = TENSOR_CODECS.get("ckpt-delta")
INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
#: three AdamW parameters, two of the same shape (so a let-go group's arrays fit the other's next link)
SHAPES = {"a": (96, 64), "b": (96, 64), "c": (5000,)}
NAMES = list(SHAPES)


def _run(out: Path, steps: list[int], seed: int = 3) -> dict[int, dict[str, str]]:
    """A fake AdamW run of :data:`SHAPES` (one optimizer state per parameter, in ``NAMES`` order) and a bias
    without optimizer state; the hashes of every checkpoint's files."""
    g = torch.Generator().manual_seed(seed)
    w = {k: torch.randn(*s, generator=g) * 0.05 for k, s in SHAPES.items()}
    m = {k: torch.zeros(*s) for k, s in SHAPES.items()}
    v = {k: torch.zeros(*s) for k, s in SHAPES.items()}
    hashes = {}
    for step in steps:
        for k, s in SHAPES.items():
            grad = torch.randn(*s, generator=g) * 1e-2
            m[k] = 0.9 * m[k] + 0.1 * grad
            v[k] = 0.999 * v[k] + 0.001 * grad * grad
            w[k] = w[k] - 1e-3 * m[k] / (v[k].sqrt() + 1e-8)
        d = out / f"checkpoint-{step}"
        d.mkdir(parents=True)
        save_file({**{k: t.clone() for k, t in w.items()}, "bias": torch.randn(4100, generator=g)},
                  d / "model.safetensors")
        state = {i: {"step": torch.tensor(float(step)), "exp_avg": m[k].clone(), "exp_avg_sq": v[k].clone()}
                 for i, k in enumerate(NAMES)}
        torch.save({"state": state, "param_groups": [{"lr": 1e-3, "params": list(range(len(NAMES)))}]},
                   d / "optimizer.pt")
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        hashes[step] = {p.name: xxhash.xxh3_64_hexdigest(p.read_bytes()) for p in d.iterdir()}
    return hashes


@pytest.fixture
def packed(tmp_path: Path) -> tuple[Path, dict[int, dict[str, str]]]:
    out = tmp_path / "run"
    hashes = _run(out, [10, 20, 30, 40, 50])
    api.pack_all(out, backward=True, keyframe_every=8, param_names=NAMES)
    return out, hashes


def _start(out: Path, name: str) -> tuple[list[Path], S.Decoded]:
    root = out / S.STORE_DIRNAME
    paths, raw = S.links(root, name)
    return paths, S.read_checkpoint(raw, name=S.raw_name(root, raw), hash_files=False)


def test_groups_follow_what_a_decode_reads() -> None:
    assert chain._group("optimizer.pt:state/3/exp_avg", NAMES) == 3
    assert chain._group("optimizer.pt:state/3/exp_avg_sq", None) == 3
    assert chain._group("model.safetensors:c", NAMES) == 2  # the optimizer's index of its parameter
    assert chain._group("model.safetensors:bias", NAMES) == ("key", "model.safetensors:bias")
    assert chain._group("model.safetensors:a", None) == ("key", "model.safetensors:a")  # no names: no features


def test_parameter_by_parameter_equals_link_by_link_and_reuses_early(
        packed: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch) -> None:
    out, hashes = packed
    paths, start = _start(out, "checkpoint-10")
    assert len(paths) == 4
    by_link = start
    for p in paths:
        by_link = chain.decode_links([p], by_link, threads=1)
    events: list[tuple[str, int, str]] = []
    real_take, real_go = chain.ChainDecode._take, chain.ChainDecode._let_go

    def take(self, n):  # noqa: ANN001, ANN202
        got = real_take(self, n)
        if got is not None:
            got.fill(-1)  # whatever a spare held, the decode overwrites it
            events.append(("take", n, ""))
        return got

    def let_go(self, i, g):  # noqa: ANN001, ANN202
        events.append(("go", i, str(g)))
        return real_go(self, i, g)

    monkeypatch.setattr(chain.ChainDecode, "_take", take)
    monkeypatch.setattr(chain.ChainDecode, "_let_go", let_go)
    for threads in (1, 2):
        events.clear()
        dec = chain.ChainDecode(paths, start, threads)
        graph = dec.result()
        assert list(graph.tensors) == list(by_link.tensors)
        for k, t in graph.tensors.items():
            assert torch.equal(t.view(INT[t.dtype]), by_link.tensors[k].view(INT[t.dtype])), k
        for f in graph.manifest["files"]:
            S.file_digest(graph, f["name"])
        assert sum(e[0] == "take" for e in events) >= 3 * (len(paths) - 2)
        assert all(not f for f in dec.futures[:-1])  # every link but the last let go, group by group
        if threads == 1:  # in order: group 0 goes through every link before group 1 starts, and is let go
            first_go = next(k for k, e in enumerate(events) if e[0] == "go")
            assert events[first_go] == ("go", 0, "0") and first_go < len(events) - 3 * len(paths)
        # a let-go tensor (its array now another's) is never read back
        prev = dec._jobs[1][MK.replace("state/0", "state/1")].prev
        with pytest.raises(RuntimeError, match="reused"):
            prev[MK.replace("state/0", "state/1")]


def test_a_job_reading_past_its_dependencies_still_gets_them(packed: tuple[Path, dict],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """With the weights' wait for their own link's optimizer state dropped, a weight may start first: its read
    runs that job on the reading thread, or waits for the thread running it; no deadlock, the same bits."""
    out, hashes = packed
    paths, start = _start(out, "checkpoint-10")
    want = chain.decode_links(paths, start, threads=1)
    monkeypatch.setattr(chain, "_role", lambda key: (0, None, None))  # every job waits only for the link before
    for threads in (1, 2):
        got = chain.decode_links(paths, start, threads=threads)
        for k, t in got.tensors.items():
            assert torch.equal(t.view(INT[t.dtype]), want.tensors[k].view(INT[t.dtype])), k


@pytest.mark.parametrize("threads", [1, 2])
def test_streamed_files_are_exact_and_a_corrupt_last_link_writes_nothing(
        packed: tuple[Path, dict], tmp_path: Path, threads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    out, hashes = packed
    monkeypatch.setattr("numba.get_num_threads", lambda: threads)
    dst = tmp_path / "restored"
    api.restore(out / "checkpoint-10", out=dst)
    assert {p.name: xxhash.xxh3_64_hexdigest(p.read_bytes()) for p in dst.iterdir()} == hashes[10]
    entry = out / S.STORE_DIRNAME / "checkpoint-10.tpde"  # the last link of the chain
    data = bytearray(entry.read_bytes())
    data[-100] ^= 0x10
    entry.write_bytes(bytes(data))
    dst2 = tmp_path / "restored2"
    with pytest.raises(TpdeFormatError, match="checkpoint-10"):
        api.restore(out / "checkpoint-10", out=dst2)
    assert not dst2.exists() or not any(dst2.iterdir())  # all or nothing: no file, no staging leftover


def _unaligned(t: torch.Tensor, shift: int) -> torch.Tensor:
    """``t``'s bytes as a uint8 tensor starting ``shift`` bytes past an aligned address."""
    buf = torch.zeros(t.numel() + 8, dtype=torch.uint8)
    base = (-buf.data_ptr()) % 8
    out = buf[base + shift: base + shift + t.numel()]
    out.copy_(t)
    assert out.data_ptr() % 4 == shift % 4
    return out


@pytest.mark.parametrize("shift", [1, 2, 3])
def test_unaligned_payload_parts_decode_in_place(shift: int) -> None:
    a, b = _adam_pair(70001, seed=11)
    parts = _encode_like_a_pack(b, a, False)
    cur = {MK: b[MK], VK: b[VK]}
    for key in (MK, VK, WK):
        moved = {**parts[key], "words": _unaligned(parts[key]["words"], shift),
                 "bits": _unaligned(parts[key]["bits"], shift)}
        pp = F._parse(moved)
        assert pp is not None and pp["words"].ctypes.data == moved["words"].data_ptr()  # a view, not a copy
        assert pp["bitw"].ctypes.data == moved["bits"].data_ptr()
        got = F.decode(key, moved, {k: v for k, v in cur.items() if k < key or key == WK}, a, ["w"])
        assert got is not None and torch.equal(got.view(torch.int32), b[key].view(torch.int32)), key
    # a payload part that is not whole words, or one word short: the fused path declines, the codec names it
    opts_cur = {MK: b[MK], VK: b[VK]}
    from tpde_hf.checkpoints import predict
    for cut in (1, 2):
        bad = {**parts[WK], "words": _unaligned(parts[WK]["words"], shift)[:-cut]}
        assert F._parse(bad) is None
        assert F.decode(WK, bad, opts_cur, a, ["w"]) is None
        with pytest.raises(TpdeFormatError, match=WK):
            CODEC.decode(bad, CodecContext(WK, a[WK], predict.options(WK, opts_cur, a, ["w"])))


def test_flips_inside_unaligned_payload_parts_restore_exactly_or_raise(packed: tuple[Path, dict],
                                                                      tmp_path: Path) -> None:
    out, hashes = packed
    entry = out / S.STORE_DIRNAME / "checkpoint-30.tpde"
    clean = entry.read_bytes()
    shard = MappedShard(entry)
    spans = [(t.begin, t.end) for k, t in shard.header.tensors.items()
             if (k.endswith(".words") or k.endswith(".bits") or "words" in k or "bits" in k) and t.end > t.begin
             and t.begin % 4]
    del shard
    assert spans, "no unaligned payload part in this entry"
    rng = np.random.default_rng(5)
    raised = 0
    for _ in range(10):
        lo, hi = spans[rng.integers(len(spans))]
        data = bytearray(clean)
        data[int(rng.integers(lo, hi))] ^= np.uint8(1 << rng.integers(8))
        entry.write_bytes(bytes(data))
        dst = tmp_path / "flip"
        try:
            api.restore(out / "checkpoint-20", out=dst)
        except TpdeFormatError:
            raised += 1
            assert not dst.exists() or not any(dst.iterdir())
            continue
        finally:
            pass
        assert {p.name: xxhash.xxh3_64_hexdigest(p.read_bytes()) for p in dst.iterdir()} == hashes[20]
        for p in dst.iterdir():
            p.unlink()
    assert raised >= 8  # a flip in a payload word changes the tensor: nearly always caught
    entry.write_bytes(clean)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_bad_later_link_read_while_the_first_decodes_fails_clearly(packed: tuple[Path, dict], tmp_path: Path,
                                                                   threads: int) -> None:
    """The first link's jobs start before the next links are read: a later link that cannot be read still
    fails with its own error, the workers stop, and nothing is left waiting."""
    import gc

    out, _ = packed
    paths, start = _start(out, "checkpoint-10")
    bad = tmp_path / "bad.tpde"
    bad.write_bytes(paths[2].read_bytes()[:100])  # a truncated entry
    was = gc.isenabled()
    with pytest.raises(TpdeFormatError, match="bad.tpde"):
        chain.decode_links([paths[0], paths[1], bad], start, threads=threads)
    assert gc.isenabled() == was
    with pytest.raises(TpdeFormatError, match="decoded against"):  # a link out of order: its parent is named
        chain.decode_links([paths[0], paths[2]], start, threads=threads)
