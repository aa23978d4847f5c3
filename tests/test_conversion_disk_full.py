"""``tpde convert`` on a disk that fills up part way (the project's "bad input loses nothing": no raw traceback, no
half-written output that looks complete, and what was finished is kept for ``--resume``).

A seeded sweep of byte budgets (:mod:`disk_budget`): every file the conversion writes from Python (task files and
shards through ``tpde_hf.files.atomic_file``, the shard spill file, the resume journal) stops with ``ENOSPC`` once
the budget is spent. After each failure the command exits 1 with one line naming the error and the output folder, no
traceback; the
output folder does not exist, and the conversion finishes (``--resume`` when it kept a partial folder) to a repo
whose weight files are byte-identical to an undisturbed conversion's and that verifies.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from disk_budget import Disk, budgets, limit_open
from test_conversion_disk import _files

from tpde_hf import files as files_module
from tpde_hf.conversion import convert, verify_repo
from tpde_hf.conversion import encoding as conversion_encoding
from tpde_hf.conversion import streaming as conversion_streaming
from tpde_hf.conversion.cli import main
from tpde_hf.conversion.partial import partial_dir


def test_a_conversion_that_fills_the_disk_fails_cleanly_and_resumes(
    tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(conversion_encoding, "TASK_ELEMENTS", 40_000)  # several task files, so there is a middle
    disk = Disk(None)
    limit_open(monkeypatch, disk, [files_module, conversion_encoding, conversion_streaming])
    want = tmp_path / "want"
    convert(tiny_llama_dir, want, workers=1)
    total = disk.written
    assert total > 100_000
    want_weights = _files(want)
    capsys.readouterr()  # that conversion's progress bars
    resumed = 0
    for budget in budgets(total, seed=18, n=7):
        out = tmp_path / f"out-{budget}"
        disk.left, disk.written = budget, 0
        assert main(["-q", "convert", str(tiny_llama_dir), str(out), "--workers", "1"]) == 1, budget
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.startswith("tpde convert:")]
        assert "Traceback" not in err and len(lines) == 1, err
        assert "No space left" in lines[0] and f"(writing {out})" in lines[0], err
        assert not out.exists(), budget  # nothing that could pass for a finished repo
        disk.left = None
        kept = partial_dir(out).is_dir()
        assert (f"kept in {partial_dir(out)}" in err) == kept, err
        args = ["-q", "convert", str(tiny_llama_dir), str(out), "--workers", "1"] + (["--resume"] if kept else [])
        assert main(args) == 0, budget
        resumed += kept
        assert _files(out) == want_weights, budget
        assert verify_repo(out).ok and not partial_dir(out).exists()
    assert resumed > 0  # some budgets ran out after a task was finished: that work was kept and used


def test_other_errors_without_a_file_name_do_not_blame_the_output(
    tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a full disk (or quota) is reported as "writing <output>": an OSError from elsewhere that names no
    file (e.g. a download's connection error) keeps its own message alone."""
    from tpde_hf.conversion import api as conversion_api

    def broken(*_: object, **__: object):
        raise OSError("Connection reset by peer")

    monkeypatch.setattr(conversion_api, "convert", broken)
    out = tmp_path / "out"
    assert main(["-q", "convert", str(tiny_llama_dir), str(out)]) == 1
    err = capsys.readouterr().err
    assert "tpde convert: error: Connection reset by peer" in err and "(writing" not in err, err
