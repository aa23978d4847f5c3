"""Push / pull through the real huggingface_hub client against a local Hub (tests/hub_server.py).

The client reads ``HF_ENDPOINT`` and ``HF_HUB_DISABLE_XET`` at import time, so every Hub-facing
step runs the ``tpde`` CLI (or a short script) in a subprocess wired to the server with
``LocalHubServer.client_env``. Nothing in huggingface_hub is patched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import HUB_TOKEN, HUB_USER
from huggingface_hub import ModelCard
from test_conversion import assert_bit_exact_repo, linear_names, source_tensors

from tpde_hf.conversion import convert

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def run_tpde(hub, hf_home: Path, *args: str, token: str | None = HUB_TOKEN,
             env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m tpde_hf.conversion -q ARGS`` as a client of ``hub``."""
    env = {**hub.client_env(token=token, hf_home=hf_home), **(env_extra or {})}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "tpde_hf.conversion", "-q", *args], env=env, capture_output=True,
                          text=True, timeout=300, check=False)


def run_client(hub, hf_home: Path, code: str, token: str | None = HUB_TOKEN) -> dict:
    """Run a client script (its last stdout line is JSON) wired to ``hub``."""
    out = hub.run_python(textwrap.dedent(code), hf_home=hf_home, token=token, timeout=300,
                         extra_env={"PYTHONPATH": str(ROOT)})
    return json.loads(out.strip().splitlines()[-1])


def snapshot(hf_home: Path, repo_id: str) -> Path:
    """The single snapshot of ``repo_id`` in the client's cache."""
    snaps = list((hf_home / "hub" / f"models--{repo_id.replace('/', '--')}" / "snapshots").iterdir())
    assert len(snaps) == 1, snaps
    return snaps[0]


@pytest.fixture
def converted(tiny_llama_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "tiny-tpde"
    convert(tiny_llama_dir, out, workers=1)
    return out


def test_push_download_and_decode_end_to_end(local_hub, converted: Path, tiny_llama_dir: Path,
                                             tmp_path: Path) -> None:
    repo = f"{HUB_USER}/tiny-tpde"
    home = tmp_path / "hf_home"
    proc = run_tpde(local_hub, home, "push", str(converted), repo)
    assert proc.returncode == 0, proc.stderr
    assert "pushed" in proc.stdout and local_hub.commit_count(repo) == 1
    assert local_hub.is_lfs(repo, "model.safetensors")
    remote = set(local_hub.list_files(repo))
    assert remote == {p.name for p in converted.iterdir()} | {".gitattributes"}
    # The README on the Hub names the target repo in its snippets.
    card = local_hub.file_content(repo, "README.md").decode()
    assert f'from_pretrained(\n    "{repo}"' in card

    # Download back (through the HF cache) and re-verify with `tpde verify REPO`.
    proc = run_tpde(local_hub, home, "verify", repo, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["ok"] is True
    downloaded = snapshot(home, repo)
    assert assert_bit_exact_repo(downloaded, source_tensors(tiny_llama_dir)) == linear_names()

    # A second push of the same folder changes nothing and makes no commit.
    proc = run_tpde(local_hub, home, "push", str(converted), repo)
    assert proc.returncode == 0 and "already up to date" in proc.stdout
    assert local_hub.commit_count(repo) == 1


@pytest.mark.parametrize("when", ["before", "after"])
def test_failed_commit_is_retried_without_duplicate(local_hub, converted: Path, tmp_path: Path, when: str) -> None:
    repo = f"{HUB_USER}/retry-{when}"
    # "before": the server fails the commit; "after": the commit lands but the client sees a 500.
    local_hub.fail_next(1, path_substring=f"/api/models/{repo}/commit/", status=500, method="POST", when=when)
    proc = run_tpde(local_hub, tmp_path / "hf_home", "push", str(converted), repo)
    assert proc.returncode == 0, proc.stderr
    assert local_hub.pending_failures() == 0
    assert local_hub.commit_count(repo) == 1
    # "after": the retry saw the remote already held the files and sent no second commit.
    assert local_hub.count_requests(f"/api/models/{repo}/commit/", "POST") == (2 if when == "before" else 1)
    assert set(local_hub.list_files(repo)) >= {"model.safetensors", "config.json", "tpde_manifest.json"}


def test_push_to_private_branch_and_pull_request(local_hub, converted: Path, tmp_path: Path) -> None:
    repo = f"{HUB_USER}/branchy"
    home = tmp_path / "hf_home"
    proc = run_tpde(local_hub, home, "push", str(converted), repo, "--private", "--revision", "v1",
                    "--commit-message", "tpde v1")
    assert proc.returncode == 0, proc.stderr
    refs = local_hub.refs(repo)
    assert set(refs["branches"]) == {"main", "v1"}
    assert local_hub.list_files(repo, revision="main") == [".gitattributes"]
    assert "model.safetensors" in local_hub.list_files(repo, revision="v1")
    assert local_hub.commits(repo, revision="v1")[0]["title"] == "tpde v1"

    info = run_client(local_hub, home, f"""
        import json
        from huggingface_hub import HfApi
        print(json.dumps({{"private": HfApi().model_info({repo!r}).private}}))
    """)
    assert info["private"] is True

    proc = run_tpde(local_hub, home, "push", str(converted), repo, "--create-pr")
    assert proc.returncode == 0, proc.stderr
    assert "discussions/1" in proc.stdout
    assert list(local_hub.refs(repo)["pulls"]) == ["refs/pr/1"]
    assert "model.safetensors" in local_hub.list_files(repo, revision="refs/pr/1")
    assert local_hub.list_files(repo, revision="main") == [".gitattributes"]  # main untouched until merged


def test_bad_token_and_missing_repo_are_clear_errors(local_hub, converted: Path, tmp_path: Path) -> None:
    home = tmp_path / "hf_home"
    proc = run_tpde(local_hub, home, "push", str(converted), f"{HUB_USER}/x", token="hf_wrong")
    assert proc.returncode == 1
    assert "rejected the token" in proc.stderr and "Traceback" not in proc.stderr
    assert not local_hub.repo_exists(f"{HUB_USER}/x")

    proc = run_tpde(local_hub, home, "verify", f"{HUB_USER}/does-not-exist")
    assert proc.returncode == 1
    assert f"{HUB_USER}/does-not-exist not found" in proc.stderr and "Traceback" not in proc.stderr

    proc = run_tpde(local_hub, home, "convert", f"{HUB_USER}/does-not-exist", str(tmp_path / "out"))
    assert proc.returncode == 1 and "source repo" in proc.stderr and "not found" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_convert_from_hub_source_and_push(local_hub, tiny_llama_dir: Path, tmp_path: Path) -> None:
    """A Hub source (pinned revision, token, cache) converted and pushed in one command; the card validates."""
    home = tmp_path / "hf_home"
    src_repo = f"{HUB_USER}/tiny-llama"
    info = run_client(local_hub, home, f"""
        import json
        from huggingface_hub import HfApi
        api = HfApi()
        api.create_repo({src_repo!r}, private=True)
        first = api.upload_folder(repo_id={src_repo!r}, folder_path={str(tiny_llama_dir)!r})
        api.upload_file(repo_id={src_repo!r}, path_or_fileobj=b"---\\npipeline_tag: text-generation\\nlicense: mit\\n"
                        b"tags: [llama]\\n---\\n# tiny", path_in_repo="README.md")
        print(json.dumps({{"first": first.oid}}))
    """)
    out = tmp_path / "out"
    proc = run_tpde(local_hub, home, "convert", src_repo, str(out), "--push-to-hub", f"{HUB_USER}/tiny-llama-tpde",
                    "--group-size", "64", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["source_kind"] == "hub" and report["pushed_to"] == f"{HUB_USER}/tiny-llama-tpde"
    assert report["commit"] and report["commit"] != info["first"]  # the latest commit (README added)
    assert_bit_exact_repo(out, source_tensors(tiny_llama_dir))

    card = ModelCard.load(out / "README.md").data.to_dict()
    assert card["base_model"] == src_repo and card["base_model_relation"] == "quantized"
    assert card["license"] == "mit" and card["pipeline_tag"] == "text-generation" and "llama" in card["tags"]
    checked = run_client(local_hub, home, f"""
        import json
        from huggingface_hub import ModelCard, hf_hub_download
        card = ModelCard.load({f"{HUB_USER}/tiny-llama-tpde"!r})
        card.validate()  # the Hub's /api/validate-yaml
        print(json.dumps({{"base_model": card.data.base_model}}))
    """)
    assert checked["base_model"] == src_repo

    # Offline, the same source converts from the cache alone.
    proc = run_tpde(local_hub, home, "convert", src_repo, str(tmp_path / "offline"), env_extra={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "offline" / "tpde_conversion.json").read_text())["commit"] == report["commit"]

    # Pinned revision: the first commit has no README, so no license is copied.
    proc = run_tpde(local_hub, home, "convert", src_repo, str(tmp_path / "old"), "--revision", info["first"])
    assert proc.returncode == 0, proc.stderr
    assert "license" not in ModelCard.load(tmp_path / "old" / "README.md").data.to_dict()


def test_load_pushed_repo_with_from_pretrained(local_hub, converted: Path, tiny_llama_dir: Path,
                                               tmp_path: Path) -> None:
    import tpde_hf

    if not hasattr(tpde_hf, "TpdeConfig"):
        pytest.skip("tpde_hf.TpdeConfig (the transformers quantizer) is not available yet")
    home = tmp_path / "hf_home"
    repo = f"{HUB_USER}/tiny-load"
    assert run_tpde(local_hub, home, "push", str(converted), repo).returncode == 0
    result = run_client(local_hub, home, f"""
        import json, torch, tpde_hf
        from transformers import AutoModelForCausalLM
        ids = torch.tensor([[1, 5, 9, 42, 7]])
        ref = AutoModelForCausalLM.from_pretrained({str(tiny_llama_dir)!r})
        out = {{}}
        with torch.no_grad():
            want = ref(ids).logits
            for mode in ("lossless", "dequantize", "base"):
                m = AutoModelForCausalLM.from_pretrained({repo!r}, quantization_config=tpde_hf.TpdeConfig(mode=mode))
                out[mode] = bool(torch.equal(m(ids).logits, want))
        print(json.dumps(out))
    """)
    assert result == {"lossless": True, "dequantize": True, "base": False}
