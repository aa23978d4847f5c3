"""A disk that fills up part way through a checkpoint pack or restore (issue 21's "a crash mid-write never
corrupts an earlier checkpoint"; the project's "bad input loses nothing").

A seeded sweep of byte budgets: every write through the store's files (``tpde_hf.files.atomic_file``: restored
files, pointers) and the pack's entry writer (``entry_file._pwrite_all``) stops with ``ENOSPC`` once the budget is
spent, after writing the part that still fits, as a full disk does. After each failure:

* the error is the ``OSError`` with ``errno.ENOSPC`` (nothing swallowed, nothing reported as done);
* a failed restore leaves the checkpoint folder and the store exactly as they were (no half-written file, no
  temporary, the pointer still there), and a later restore gives every file byte for byte;
* a failed pack leaves every checkpoint restorable to its original bytes and no temporary in the store, and the
  next pack carries on.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest
import xxhash
from disk_budget import Disk, budgets, limit_open, limit_pwrite
from test_checkpoints import _fake_run, _restored_hashes

from tpde_hf import files as files_module
from tpde_hf.checkpoints import api, entry_file
from tpde_hf.checkpoints import store as S


def _limit(monkeypatch: pytest.MonkeyPatch, disk: Disk) -> None:
    limit_open(monkeypatch, disk, [files_module])
    limit_pwrite(monkeypatch, disk, entry_file, "_pwrite_all")


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones included) and its hash."""
    return {str(p.relative_to(root)): xxhash.xxh3_64_hexdigest(p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_restore_that_fills_the_disk_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    hashes = _fake_run(out, [1, 2, 3])
    api.pack_all(out, backward=True, keyframe_every=8, param_names=["w"])  # 1 -> 2 -> plain 3: two links
    ckpt = out / "checkpoint-1"
    disk = Disk(None)
    _limit(monkeypatch, disk)
    before = _snapshot(out)
    api.restore(ckpt)  # how many bytes a whole restore in place writes
    total = disk.written
    assert total > 10_000
    api.compact(ckpt)  # packed again: the files go, the entry stays
    assert _snapshot(out) == before
    for budget in budgets(total, seed=21, n=14):
        disk.left, disk.written = budget, 0
        with pytest.raises(OSError) as exc:
            api.restore(ckpt)
        assert exc.value.errno == errno.ENOSPC, budget
        assert _snapshot(out) == before, budget  # no file, temporary or pointer change anywhere
        assert api.is_packed(ckpt)
    disk.left = None
    assert _restored_hashes(ckpt, tmp_path) == hashes[1]
    api.restore(ckpt)  # in place, as Trainer would read it
    assert {p.name: xxhash.xxh3_64_hexdigest(p.read_bytes()) for p in ckpt.iterdir() if p.name != S.POINTER} \
        == hashes[1]


def test_a_pack_that_fills_the_disk_keeps_every_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    steps = [1, 2, 3]
    clean = tmp_path / "clean"
    hashes = _fake_run(clean, steps)
    disk = Disk(None)
    _limit(monkeypatch, disk)
    api.pack_all(clean, backward=True, keyframe_every=8, param_names=["w"])
    total = disk.written
    assert total > 10_000
    want = _snapshot(clean)
    for budget in budgets(total, seed=7, n=10):
        out = tmp_path / f"b{budget}"
        _fake_run(out, steps)  # seeded: the same files as ``clean``
        disk.left, disk.written = budget, 0
        with pytest.raises(OSError) as exc:
            api.pack_all(out, backward=True, keyframe_every=8, param_names=["w"])
        assert exc.value.errno == errno.ENOSPC, budget
        left = [p.name for p in (out / S.STORE_DIRNAME).iterdir() if p.name.endswith((".new", ".tmp"))]
        assert left == [], budget  # no temporary that could pass for an entry
        disk.left = None
        for s in steps:  # every checkpoint, right after the failure, restores to its original bytes
            assert _restored_hashes(out / f"checkpoint-{s}", tmp_path) == hashes[s], (budget, s)
        api.pack_all(out, backward=True, keyframe_every=8, param_names=["w"])  # the next pack carries on
        api.collect(out)
        assert _snapshot(out).keys() == want.keys(), budget
        for s in steps:
            assert _restored_hashes(out / f"checkpoint-{s}", tmp_path) == hashes[s], (budget, s)
        shutil.rmtree(out)
