"""Backward deltas (issue 21): the newest checkpoint stays plain, each older one is a delta against the next.

Covers: the layout and its keyframes (no restore decodes more than ``keyframe_every`` entries), byte-exact
restores, rotation of the oldest (no rebase) and of one in the middle or the newest (rebase), a crash
at every file-system step of a save, a checkpoint written again by a resumed run, the forward layout's
fixture, the helper that lets the waiting thread finish a pack, and Trainer resume (no call needed for
the newest checkpoint).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
import xxhash
from test_checkpoints import _fake_run, _losses, _restored_hashes, _tiny_trainer

from tpde_hf.checkpoints import api
from tpde_hf.checkpoints import backward as B
from tpde_hf.checkpoints import store as S
from tpde_hf.checkpoints.assist import Assist
from tpde_hf.errors import TpdeFormatError

FIXTURE = Path(__file__).parent / "fixtures/formats/ckpt-forward-v1"
STEPS = [10, 20, 30, 40, 50]


def _all_restore(out: Path, hashes: dict[int, dict[str, str]], tmp: Path) -> None:
    for s, want in hashes.items():
        d = out / f"checkpoint-{s}"
        if d.is_dir():
            assert _restored_hashes(d, tmp) == want, d.name


def _mans(out: Path) -> dict[str, dict]:
    return dict(S.entries(out / S.STORE_DIRNAME))


def test_layout_keyframes_and_byte_exact_restore(tmp_path: Path) -> None:
    out = tmp_path / "run"
    hashes = _fake_run(out, STEPS)
    res = api.pack_all(out, backward=True, keyframe_every=3, param_names=["w"])
    assert [r.name for r in res] == [f"checkpoint-{s}" for s in STEPS[:-1]]
    assert all(r.stored_bytes < r.raw_bytes for r in res)
    mans = _mans(out)
    # 10 -> 20 -> 30 (keyframe: 10 and 20 would otherwise chain through it), 40 -> 50 (plain)
    assert {n: m["parent"] for n, m in mans.items()} == {
        "checkpoint-10": "checkpoint-20", "checkpoint-20": "checkpoint-30", "checkpoint-30": None,
        "checkpoint-40": "checkpoint-50"}
    assert all(m["version"] == S.BACKWARD_VERSION for m in mans.values())
    assert not api.is_packed(out / "checkpoint-50") and (out / "checkpoint-50" / "optimizer.pt").exists()
    assert B.holds(out / S.STORE_DIRNAME) == ["checkpoint-50"]
    held = S.raw_path(out / S.STORE_DIRNAME, "checkpoint-50") / "optimizer.pt"
    assert os.path.samefile(held, out / "checkpoint-50" / "optimizer.pt")  # a hard link: no second copy
    for s in STEPS:  # at most keyframe_every entries decoded for any checkpoint
        assert len(S.chain(out / S.STORE_DIRNAME, f"checkpoint-{s}")) <= 3
    _all_restore(out, hashes, tmp_path)
    assert api.restore(out / "checkpoint-50") == []  # the newest is plain: nothing to do
    api.restore(out / "checkpoint-20")
    assert xxhash.xxh3_64_hexdigest((out / "checkpoint-20" / "optimizer.pt").read_bytes()) == \
        hashes[20]["optimizer.pt"]
    assert api.compact(out / "checkpoint-20") == ["model.safetensors", "optimizer.pt"]


def test_forward_layout_still_packs_and_mixes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "run"
    hashes = _fake_run(out, STEPS[:3])
    api.pack_all(out, keyframe_every=3, param_names=["w"])  # forward, as before
    assert [m["version"] for m in _mans(out).values()] == [S.VERSION] * 3
    _all_restore(out, hashes, tmp_path)


def test_forward_fixture_restores_bit_exactly(tmp_path: Path) -> None:
    """Entries written by the forward-only code (commit 63047bf) still restore, byte for byte."""
    out = tmp_path / "run"
    shutil.copytree(FIXTURE / "run", out)
    want = json.loads((FIXTURE / "expected_xxh3.json").read_text())
    assert {n: m["parent"] for n, m in _mans(out).items()} == {
        "checkpoint-1": None, "checkpoint-2": "checkpoint-1", "checkpoint-3": "checkpoint-2"}
    for name, hashes in want.items():
        assert _restored_hashes(out / name, tmp_path) == hashes
    again = tmp_path / "again"  # the forward layout is still written (the encoder's choices may differ since)
    for name in want:
        api.restore(out / name, out=again / name)
        (again / name / S.POINTER).unlink(missing_ok=True)
    api.pack_all(again, keyframe_every=3, param_names=["w"])
    for name, hashes in want.items():
        assert S.read_manifest(S.entry_path(again / S.STORE_DIRNAME, name))["version"] == S.VERSION
        assert _restored_hashes(again / name, tmp_path) == hashes
    entry = out / S.STORE_DIRNAME / "checkpoint-2.tpde"
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0x10
    entry.write_bytes(bytes(data))
    with pytest.raises(TpdeFormatError, match="checkpoint-2"):
        _restored_hashes(out / "checkpoint-3", tmp_path)


def test_rotation_of_the_oldest_needs_no_rebase(tmp_path: Path) -> None:
    out = tmp_path / "run"
    hashes = _fake_run(out, STEPS)
    api.pack_all(out, backward=True, keyframe_every=8, param_names=["w"])
    shutil.rmtree(out / "checkpoint-10")  # Trainer's save_total_limit
    (out / S.STORE_DIRNAME / ".checkpoint-60.tpde.new").write_bytes(b"half")  # what a kill mid-write leaves
    (out / S.STORE_DIRNAME / ".checkpoint-60.abc.rawtmp").mkdir()
    assert api.collect(out) == {"rebased": [], "deleted": ["checkpoint-10"]}
    assert not list((out / S.STORE_DIRNAME).glob(".*"))
    _all_restore(out, hashes, tmp_path)


@pytest.mark.parametrize("gone", [30, 50])
def test_deletion_in_the_middle_or_of_the_newest_rebases(tmp_path: Path, gone: int) -> None:
    """load_best_model_at_end keeps the best: a later one may go first (50: Trainer's final clean-up with
    save_total_limit=1 deletes the newest)."""
    out = tmp_path / "run"
    hashes = _fake_run(out, STEPS)
    api.pack_all(out, backward=True, keyframe_every=8, param_names=["w"])
    shutil.rmtree(out / f"checkpoint-{gone}")
    res = api.collect(out)
    assert res["rebased"] == [f"checkpoint-{gone - 10}"]
    mans = _mans(out)
    assert f"checkpoint-{gone}" not in mans and not S.raw_path(out / S.STORE_DIRNAME, f"checkpoint-{gone}").exists()
    assert mans[f"checkpoint-{gone - 10}"]["parent"] == (None if gone == 50 else f"checkpoint-{gone + 10}")
    del hashes[gone]
    _all_restore(out, hashes, tmp_path)


class _Crash(BaseException):
    """A kill: nothing catches it."""


class _CrashingOs:
    """``os`` / ``shutil`` / ``store`` for the backward module, raising at the k-th mutating call."""

    def __init__(self, real: object, names: tuple[str, ...], counter: list[int], k: int):
        self._real, self._names, self._counter, self._k = real, names, counter, k

    def __getattr__(self, name: str) -> object:
        attr = getattr(self._real, name)
        if name not in self._names:
            return attr

        def call(*a: object, **kw: object) -> object:
            self._counter[0] += 1
            if self._counter[0] == self._k:
                raise _Crash(name)
            return attr(*a, **kw)

        return call


def _with_crash_at(monkeypatch: pytest.MonkeyPatch, k: int) -> list[int]:
    counter = [0]
    monkeypatch.setattr(B, "os", _CrashingOs(os, ("link", "rename", "replace", "unlink", "utime"), counter, k))
    monkeypatch.setattr(B, "shutil", _CrashingOs(shutil, ("rmtree", "copy2"), counter, k))
    monkeypatch.setattr(B, "S", _CrashingOs(S, ("write_entry", "atomic_write"), counter, k))
    return counter


def test_a_crash_at_any_step_leaves_every_checkpoint_restorable(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    steps = [1, 2, 3]  # with keyframe_every=2: 1 a delta against 2, 2 a keyframe, 3 plain
    clean = tmp_path / "clean"
    hashes = _fake_run(clean, steps)
    calls = _with_crash_at(monkeypatch, 0)
    api.pack_all(clean, backward=True, keyframe_every=2, param_names=["w"])
    total, want = calls[0], {n: m["parent"] for n, m in _mans(clean).items()}
    assert total > 12 and want == {"checkpoint-1": "checkpoint-2", "checkpoint-2": None}
    for k in range(1, total + 1):
        out = tmp_path / f"k{k}"
        _fake_run(out, steps)  # seeded: the same files as ``clean``
        _with_crash_at(monkeypatch, k)
        with pytest.raises(_Crash):
            api.pack_all(out, backward=True, keyframe_every=2, param_names=["w"])
        monkeypatch.undo()
        _all_restore(out, hashes, tmp_path)  # every checkpoint, right after the crash
        api.pack_all(out, backward=True, keyframe_every=2, param_names=["w"])  # the next run carries on
        api.collect(out)
        assert {n: m["parent"] for n, m in _mans(out).items()} == want, k
        assert B.holds(out / S.STORE_DIRNAME) == ["checkpoint-3"]
        assert sorted(p.name for p in (out / S.STORE_DIRNAME).iterdir()) == \
            ["checkpoint-1.tpde", "checkpoint-2.tpde", "checkpoint-3.raw"]  # no temporaries
        _all_restore(out, hashes, tmp_path)
        shutil.rmtree(out)


def test_a_checkpoint_written_again_is_forgotten_first(tmp_path: Path) -> None:
    """A run resumed from an earlier checkpoint writes checkpoint-3 again: the callback calls forget() before
    Trainer writes it, so nothing stays coded against the old checkpoint-3 and its hold goes."""
    out = tmp_path / "run"
    hashes = _fake_run(out, [1, 2, 3])
    api.pack_all(out, backward=True, keyframe_every=8, param_names=["w"])
    new = _fake_run(tmp_path / "other", [3], seed=5)[3]

    def write_again() -> None:
        shutil.rmtree(out / "checkpoint-3")
        shutil.copytree(tmp_path / "other" / "checkpoint-3", out / "checkpoint-3")

    B.forget(out, "checkpoint-3")
    assert _mans(out)["checkpoint-2"]["parent"] is None  # re-coded alone: its later neighbour is going
    assert not S.raw_path(out / S.STORE_DIRNAME, "checkpoint-3").exists()
    write_again()
    B.advance(out / "checkpoint-3", keyframe_every=8, param_names=["w"])
    hashes[3] = new
    _all_restore(out, hashes, tmp_path)
    # without forget(), new files under a held name are refused, never mixed up with the old ones
    _fake_run(tmp_path / "x", [1, 2, 3])
    api.pack_all(tmp_path / "x", backward=True, keyframe_every=8, param_names=["w"])
    out = tmp_path / "x"
    write_again()
    with pytest.raises(TpdeFormatError, match="written again"):
        B.advance(out / "checkpoint-3", keyframe_every=8, param_names=["w"])


def test_assist_runs_jobs_on_the_waiting_thread() -> None:
    assist = Assist(workers=2)
    seen: dict[int, str] = {}
    gate = threading.Event()

    def job(i: int) -> int:
        seen[i] = threading.current_thread().name
        if i == 0:
            gate.wait(5)  # the owner is stuck on the first job: the helper must take the rest
        return i * i

    result: list[list[int]] = []
    owner = threading.Thread(target=lambda: result.append(assist.map(job, range(6))), name="owner")
    owner.start()
    time.sleep(0.05)
    helper = threading.Thread(target=assist.help, args=(owner.is_alive,), name="helper")
    helper.start()
    while len(seen) < 6:
        time.sleep(0.01)
    gate.set()
    owner.join(5)
    helper.join(5)
    assert result == [[i * i for i in range(6)]]
    assert seen[0] == "owner" and {seen[i] for i in range(1, 6)} == {"helper"} and assist.helped == 5

    def bad(i: int) -> int:
        raise ValueError(f"job {i}")

    with pytest.raises(ValueError, match="job"):
        Assist().map(bad, [1, 2])


def test_trainer_resumes_from_the_newest_without_any_call(tmp_path: Path) -> None:
    """Default callback (backward): the newest checkpoint is plain, so ``train(resume_from_checkpoint=...)``
    needs nothing; an older one is restored by one call; both continue exactly as the uninterrupted run."""
    from tpde_hf.checkpoints.callback import TpdeCheckpointCallback

    torch.set_num_threads(1)
    kw = {"lr_scheduler_type": "constant", "save_total_limit": 3}
    full = _tiny_trainer(tmp_path / "a", [TpdeCheckpointCallback(keyframe_every=2)], **kw)
    full.train()
    a = tmp_path / "a"
    assert sorted(_mans(a)) == ["checkpoint-4", "checkpoint-8"] and B.holds(a / S.STORE_DIRNAME) == ["checkpoint-12"]
    assert not api.is_packed(a / "checkpoint-12") and api.is_packed(a / "checkpoint-8")
    want = {p.name: xxhash.xxh3_64_hexdigest(p.read_bytes()) for p in (a / "checkpoint-12").iterdir()}

    def same_as_full(resumed: object) -> None:
        la, lb = _losses(full), _losses(resumed)
        assert [lb[s] for s in range(9, 13)] == [la[s] for s in range(9, 13)]
        for (n, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters(), strict=True):
            assert torch.equal(p.detach().view(torch.int32), q.detach().view(torch.int32)), n

    short = _tiny_trainer(tmp_path / "b", [TpdeCheckpointCallback(keyframe_every=2)], max_steps=8, **kw)
    short.train()
    b = tmp_path / "b"
    assert not api.is_packed(b / "checkpoint-8")
    resumed = _tiny_trainer(b, [TpdeCheckpointCallback(keyframe_every=2)], **kw)
    resumed.train(resume_from_checkpoint=str(b / "checkpoint-8"))  # no restore call
    same_as_full(resumed)
    assert api.is_packed(b / "checkpoint-8")  # re-coded against 12 at the save of 12
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        assert xxhash.xxh3_64_hexdigest((b / "checkpoint-12" / name).read_bytes()) == want[name], name

    c = tmp_path / "c"  # an older, packed one: one call, and the run writes checkpoint-12 again
    shutil.copytree(a, c)
    api.restore(c / "checkpoint-8")
    again = _tiny_trainer(c, [TpdeCheckpointCallback(keyframe_every=2)], **kw)
    again.train(resume_from_checkpoint=str(c / "checkpoint-8"))
    same_as_full(again)
    assert not (c / "checkpoint-8" / "optimizer.pt").exists()  # compacted again
    assert _restored_hashes(c / "checkpoint-4", tmp_path)["optimizer.pt"] == \
        _restored_hashes(a / "checkpoint-4", tmp_path)["optimizer.pt"]


def test_cli_pack_backward_ls_restore(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tpde_hf.conversion.cli import main as tpde_main

    out = tmp_path / "run"
    hashes = _fake_run(out, [1, 2, 3])
    assert tpde_main(["ckpt", "pack", str(out), "--backward"]) == 0
    assert "delta of checkpoint-2" in capsys.readouterr().out
    assert tpde_main(["ckpt", "ls", str(out), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["state"], r["parent"]) for r in rows] == [
        ("checkpoint-1", "packed", "checkpoint-2"), ("checkpoint-2", "packed", "checkpoint-3"),
        ("checkpoint-3", "plain", None)]
    assert tpde_main(["ckpt", "restore", str(out / "checkpoint-1"), "--out", str(tmp_path / "plain")]) == 0
    assert {p.name: xxhash.xxh3_64_hexdigest(p.read_bytes()) for p in (tmp_path / "plain").iterdir()} == hashes[1]
    assert tpde_main(["ckpt", "pack", str(out / "checkpoint-3"), "--backward"]) == 1  # one folder: a clear error
    assert "--backward" in capsys.readouterr().err


def test_a_crash_while_rebasing_keeps_every_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A deletion in the middle re-codes the older neighbour; a crash at any write of that leaves both
    the old entry (until ``os.replace``) or the new one, never neither."""
    src = tmp_path / "src"
    hashes = _fake_run(src, STEPS[:4])
    api.pack_all(src, backward=True, keyframe_every=8, param_names=["w"])
    shutil.rmtree(src / "checkpoint-30")
    del hashes[30]
    calls = _with_crash_at(monkeypatch, 0)
    probe = tmp_path / "probe"
    shutil.copytree(src, probe)
    api.collect(probe)
    total = calls[0]
    monkeypatch.undo()
    assert total >= 2
    for k in range(1, total + 1):
        out = tmp_path / f"k{k}"
        shutil.copytree(src, out)
        _with_crash_at(monkeypatch, k)
        with pytest.raises(_Crash):
            api.collect(out)
        monkeypatch.undo()
        _all_restore(out, hashes, tmp_path)
        api.collect(out)
        assert _mans(out)["checkpoint-20"]["parent"] == "checkpoint-40" and "checkpoint-30" not in _mans(out)
        _all_restore(out, hashes, tmp_path)


@pytest.mark.skipif(not hasattr(os, "sched_setscheduler") or not os.path.exists("/proc/self/task"),
                    reason="per-thread scheduling is Linux")
def test_waiting_for_a_pack_returns_it_to_normal_priority() -> None:
    from tpde_hf.checkpoints.callback import _lower_priority

    assist, seen, go = Assist(), {}, threading.Event()

    def packer() -> None:
        tid = assist.owner_tid = threading.get_native_id()
        _lower_priority(19, idle=True)
        seen["low"] = (os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid))
        go.wait(5)
        seen["waited"] = (os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid))

    t = threading.Thread(target=packer)
    t.start()
    while "low" not in seen:
        time.sleep(0.01)
    threading.Timer(0.2, go.set).start()
    assist.help(t.is_alive)  # what wait() does on the training thread
    t.join()
    assert seen["low"] == (os.SCHED_IDLE, 19)
    if os.geteuid() == 0:  # raising a priority back needs CAP_SYS_NICE
        assert seen["waited"] == (os.SCHED_OTHER, 0)
