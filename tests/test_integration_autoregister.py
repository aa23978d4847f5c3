"""Auto-registration: an installed tpde-hf makes plain ``from_pretrained`` load tpde repos.

The package is installed (normally and editable) into a fresh virtual environment that sees this
interpreter's packages; a fresh interpreter there loads a tpde repo *without* ``import tpde_hf``.
Without the hook, transformers would only warn and build the model with random weights.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from tpde_repo_helpers import save_pair, tiny_model
from transformers import AutoModelForCausalLM

from tpde_hf import _autoregister

ROOT = Path(__file__).resolve().parents[1]
IDS = [[5, 17, 42, 99, 3]]

CHILD = """
import sys, torch
assert "tpde_hf" not in sys.modules
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
with torch.no_grad():
    logits = model(torch.tensor({ids})).logits
torch.save(logits, sys.argv[2])
print("tpde_hf" in sys.modules, getattr(model, "is_quantized", False))
"""

STARTUP = "import sys; print('tpde_hf' in sys.modules, 'torch' in sys.modules, " \
          "sum(getattr(f, '_tpde_hf_hook', False) for f in sys.meta_path))"


def _venv(tmp: Path) -> tuple[Path, Path]:
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # see this interpreter's packages (torch, transformers, pip, setuptools) without installing them again
    (site / "_parent_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python, site


def _source_copy(tmp: Path) -> Path:
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "tpde_hf", "build_backend", "model_cards", "README.md"):
        p = ROOT / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif p.exists():
            shutil.copy(p, src / name)
    if not (src / "README.md").exists():
        (src / "README.md").write_text("# tpde-hf\n")
    return src


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TPDE_HF_NO_AUTOREGISTER")}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    root = tmp_path_factory.mktemp("reg")
    dense, tpde = save_pair(tiny_model("llama"), root)
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(dense)(torch.tensor(IDS)).logits
    return tpde, ref


@pytest.mark.slow
@pytest.mark.parametrize("editable", [False, True], ids=["install", "editable"])
def test_installed_package_registers_for_plain_transformers(repo, tmp_path, editable):
    tpde, ref = repo
    python, site = _venv(tmp_path)
    src = _source_copy(tmp_path)
    cmd = [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    cmd += ["-e", str(src)] if editable else [str(src)]
    subprocess.run(cmd, check=True, cwd=tmp_path, env=_env(), capture_output=True)
    pth = site / _autoregister.PTH_NAME
    assert pth.read_text() == _autoregister.PTH_CONTENT

    # at start-up the hook costs one class on sys.meta_path: nothing imported
    out = subprocess.run([str(python), "-c", STARTUP], check=True, capture_output=True, text=True, cwd=tmp_path,
                         env=_env())
    assert out.stdout.split() == ["False", "False", "1"]

    child = tmp_path / "child.py"
    child.write_text(CHILD.format(ids=IDS))
    out = subprocess.run([str(python), str(child), str(tpde), str(tmp_path / "logits.pt")], capture_output=True,
                         text=True, cwd=tmp_path, env=_env())
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["True", "False"]  # tpde_hf imported by the hook; CPU default: dequantized
    got = torch.load(tmp_path / "logits.pt")
    assert torch.equal(got.view(torch.int16), ref.view(torch.int16))

    # the hook switched off: plain transformers only warns and loads random weights (what the hook prevents)
    out = subprocess.run([str(python), str(child), str(tpde), str(tmp_path / "bad.pt")], capture_output=True,
                         text=True, cwd=tmp_path, env=_env(TPDE_HF_NO_AUTOREGISTER="1"))
    assert out.returncode == 0 and out.stdout.split()[0] == "False"
    assert "Unknown quantization type" in out.stderr
    assert not torch.equal(torch.load(tmp_path / "bad.pt").view(torch.int16), ref.view(torch.int16))

    if not editable:
        subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", "tpde-hf"], check=True, env=_env(),
                       capture_output=True)
        assert not pth.exists()


def test_hook_registers_when_transformers_is_imported_after_tpde_hf():
    code = (
        "import sys; import tpde_hf; assert 'transformers.quantizers.auto' not in sys.modules; "
        "import transformers.quantizers.auto as a; print(a.AUTO_QUANTIZER_MAPPING.get('tpde').__name__, "
        "a.AUTO_QUANTIZATION_CONFIG_MAPPING.get('tpde').__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=_env(PYTHONPATH=str(ROOT), TPDE_HF_NO_AUTOREGISTER="1"), timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["TpdeHfQuantizer", "TpdeConfig"]


def test_pth_line_is_a_single_import_line():
    lines = _autoregister.PTH_CONTENT.splitlines()
    assert len(lines) == 1 and lines[0].startswith("import ")
    compile(lines[0], "<pth>", "exec")
