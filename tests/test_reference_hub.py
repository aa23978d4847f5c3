"""Delta repos and the Hub: ``from_pretrained(token=...)`` reaches the reference download, ``--push-revision`` /
``--create-pr`` with ``--reference``, and a reference that is itself a delta repo (a clear error naming it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_reference import bits_equal, make_pair

from tpde_hf.errors import TpdeFormatError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_from_pretrained_token_and_cache_dir_reach_the_reference_download(tmp_path: Path, monkeypatch) -> None:
    """The delta repo names a Hub reference; ``snapshot_download`` (mocked: no network) must get the load's token
    and cache_dir, and the pinned commit."""
    import huggingface_hub
    from transformers import AutoModelForCausalLM

    from tpde_hf.reference.convert import convert_with_reference

    base, ft, tensors = make_pair("llama", tmp_path)
    snap = tmp_path / "snapshots" / COMMIT  # laid out as a Hub cache snapshot: the folder name is the commit
    shutil.copytree(base, snap)
    calls: list[dict] = []

    def fake_snapshot_download(repo_id: str, **kw):
        calls.append({"repo_id": repo_id, **kw})
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    convert_with_reference(ft, tmp_path / "out", "org/base@main", workers=1)
    info = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["reference"]
    assert (info["model"], info["commit"]) == ("org/base", COMMIT)
    calls.clear()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", token="hf_secret_123", cache_dir=tmp_path / "c")
    assert calls, "the reference was never downloaded"
    assert all(c["repo_id"] == "org/base" and c["revision"] == COMMIT for c in calls)
    assert all(c["token"] == "hf_secret_123" and Path(c["cache_dir"]) == tmp_path / "c" for c in calls)
    sd = model.state_dict()
    for k, v in tensors.items():
        assert bits_equal(sd[k], v), k


def test_a_delta_repo_as_reference_is_a_clear_error_naming_it(tmp_path: Path) -> None:
    from tpde_hf.conversion import convert

    base, ft, _ = make_pair("llama", tmp_path)
    convert(ft, tmp_path / "delta", reference=base, workers=1)
    with pytest.raises(TpdeFormatError, match="itself a delta repo") as err:
        convert(ft, tmp_path / "delta2", reference=tmp_path / "delta", workers=1)
    assert str(tmp_path / "delta") in str(err.value)
    assert not (tmp_path / "delta2").exists()  # nothing half-written


def run_tpde(hub, hf_home: Path, *args: str) -> subprocess.CompletedProcess:
    from conftest import HUB_TOKEN

    env = hub.client_env(token=HUB_TOKEN, hf_home=hf_home)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "tpde_hf.conversion", "-q", *args], env=env, capture_output=True,
                          text=True, timeout=300, check=False)


@pytest.mark.slow
def test_cli_reference_push_revision_and_create_pr(local_hub, tmp_path: Path) -> None:
    from conftest import HUB_USER

    base, ft, _ = make_pair("llama", tmp_path)
    home = tmp_path / "hf_home"
    repo = f"{HUB_USER}/ft-delta"
    proc = run_tpde(local_hub, home, "convert", str(ft), str(tmp_path / "a"), "--reference", str(base),
                    "--workers", "1", "--push-to-hub", repo, "--push-revision", "v1", "--commit-message", "delta v1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "v1" in local_hub.refs(repo)["branches"]
    assert "model.safetensors" in local_hub.list_files(repo, revision="v1")
    assert "model.safetensors" not in local_hub.list_files(repo, revision="main")  # the branch, not main
    assert local_hub.commits(repo, revision="v1")[0]["title"] == "delta v1"

    proc = run_tpde(local_hub, home, "convert", str(ft), str(tmp_path / "b"), "--reference", str(base),
                    "--workers", "1", "--push-to-hub", repo, "--create-pr")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "discussions/1" in proc.stdout
    assert list(local_hub.refs(repo)["pulls"]) == ["refs/pr/1"]
    assert "model.safetensors" in local_hub.list_files(repo, revision="refs/pr/1")
    assert "model.safetensors" not in local_hub.list_files(repo, revision="main")  # main untouched until merged


def test_load_decodes_on_the_pool_and_without_it_bit_exact(tmp_path: Path, monkeypatch) -> None:
    """The load's pool (:mod:`tpde_hf.reference.prefetch`) serves every reference-coded tensor; with
    ``TPDE_REFERENCE_WORKERS=0`` the loading thread decodes them; both rebuild the fine-tune bit for bit."""
    from transformers import AutoModelForCausalLM

    import tpde_hf.reference.prefetch as P
    from tpde_hf.conversion import convert

    base, ft, tensors = make_pair("llama", tmp_path)
    report = convert(ft, tmp_path / "out", reference=base, workers=1)
    coded = sum(n for k, n in report.reference["reference"]["stored_as"].items() if k.startswith("ref-"))
    served = []
    take = P.Prefetch.take

    def counting_take(self, header):
        out = take(self, header)
        served.append(out is not None)
        return out

    monkeypatch.setattr(P.Prefetch, "take", counting_take)
    for workers in ("2", "0"):
        monkeypatch.setenv("TPDE_REFERENCE_WORKERS", workers)
        served.clear()
        sd = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
        for k, v in tensors.items():
            assert bits_equal(sd[k], v), (workers, k)
        assert served == ([True] * coded if workers == "2" else [])
