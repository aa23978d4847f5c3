"""A conversion's disk use: encode task files are released as their shards are written and re-read.

Without the release a conversion holds its output twice at the end (task files + shards); a 22.7 GB
checkpoint ran out of disk that way. The release must never cost a byte of the result: a run
interrupted after some task files are gone resumes (re-encoding those) to the identical repo.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tpde_hf.conversion import assembly as conversion_assembly
from tpde_hf.conversion import convert
from tpde_hf.conversion import encoding as conversion_encoding
from tpde_hf.conversion.api import partial_dir


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def _watch_shard_writes(monkeypatch: pytest.MonkeyPatch, tasks: Path, crash_at: int | None = None) -> list[int]:
    """Record how many task files exist before each shard write (after giving earlier re-reads time to
    finish); raise KeyboardInterrupt before write number ``crash_at``."""
    counts: list[int] = []
    write = conversion_assembly.write_planned_shard

    def watched(*args, **kwargs):
        if counts:
            time.sleep(0.3)  # the re-read of the previous shard runs on a thread: let it finish
        counts.append(len(list(tasks.glob("task-*.safetensors"))))
        if crash_at is not None and len(counts) == crash_at:
            raise KeyboardInterrupt
        return write(*args, **kwargs)

    monkeypatch.setattr(conversion_assembly, "write_planned_shard", watched)
    return counts


def test_task_files_are_released_as_shards_are_written(make_tiny, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conversion_encoding, "TASK_ELEMENTS", 40_000)  # several task files
    src = make_tiny(tmp_path / "src")
    plain = tmp_path / "plain"
    convert(src, plain, workers=1, max_shard_size="100KB")

    out = tmp_path / "out"
    counts = _watch_shard_writes(monkeypatch, partial_dir(out) / "tensors")
    report = convert(src, out, workers=1, max_shard_size="100KB")
    assert report.n_shards == len(counts) > 2
    assert counts[0] > 1 and counts[-1] < counts[0]  # released while later shards were still being written
    assert _files(out) == _files(plain)
    assert not partial_dir(out).exists()


def test_interrupted_assembly_after_a_release_resumes_to_the_same_repo(
        make_tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conversion_encoding, "TASK_ELEMENTS", 40_000)
    src = make_tiny(tmp_path / "src")
    plain = tmp_path / "plain"
    n_shards = convert(src, plain, workers=1, max_shard_size="100KB").n_shards

    out = tmp_path / "out"
    tasks = partial_dir(out) / "tensors"
    counts = _watch_shard_writes(monkeypatch, tasks, crash_at=n_shards)  # before the last shard
    with pytest.raises(KeyboardInterrupt):
        convert(src, out, workers=1, max_shard_size="100KB")
    assert not out.exists()
    assert counts[-1] < counts[0]  # some task files were released before the interruption
    monkeypatch.undo()
    monkeypatch.setattr(conversion_encoding, "TASK_ELEMENTS", 40_000)  # the same tasks as the interrupted run
    redone: list[str] = []
    report = convert(src, out, workers=1, max_shard_size="100KB", resume=True, on_tensor=lambda r: redone.append(r))
    assert report.resumed_tensors > 0 and redone  # kept tasks reused, released ones encoded again
    assert _files(out) == _files(plain)
    assert not partial_dir(out).exists()
