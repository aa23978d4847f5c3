"""Repos written by earlier tpde-hf versions still load bit for bit (tests/fixtures/formats/README.md).

Each fixture was written by the ``tpde_hf`` of an earlier commit (format version 1 rANS, version 2
class-width, before per-tensor checksums). Every mode loads it; ``dequantize`` and ``lossless`` give
tensors whose checksums equal the manifest's checksums of the original tensors, and ``tpde verify``
passes. A fixture is never rewritten: if one stops loading, the reader broke compatibility.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

import tpde_hf
from tpde_hf.codec import tensor_checksum
from tpde_hf.conversion.verify import verify_repo
from tpde_hf.format import MANIFEST_NAME, dtype_name

FIXTURES = Path(__file__).parent / "fixtures" / "formats"
NAMES = sorted(p.name for p in FIXTURES.iterdir() if (p / "config.json").is_file())  # the repos (not ckpt-*)


def _load(folder: Path, mode: str) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=tpde_hf.TpdeConfig(mode=mode)).eval()


def _check_against_manifest(state: dict[str, torch.Tensor], folder: Path) -> int:
    manifest = json.loads((folder / MANIFEST_NAME).read_text())["tensors"]
    encoded = 0
    for name, entry in manifest.items():
        t = state[name]
        assert dtype_name(t.dtype) == entry["dtype"] and list(t.shape) == entry["shape"], name
        assert tensor_checksum(t) == entry["checksum"], f"{folder.name}: {name} differs from the original"
        encoded += entry["encoded"]
    return encoded


def test_the_fixtures_are_there() -> None:
    assert NAMES == ["v1-rans-4a6059a", "v1-rans-g64-3cb2347", "v2-class-width-3cb2347"]
    for name in NAMES:
        size = sum(f.stat().st_size for f in (FIXTURES / name).iterdir())
        assert size < 400_000, (name, size)


@pytest.mark.parametrize("name", NAMES)
def test_an_earlier_repo_loads_bit_exact_in_every_mode(name: str, tmp_path: Path) -> None:
    folder = tmp_path / name
    shutil.copytree(FIXTURES / name, folder)  # a load never writes, but keep the checked-in copy untouched
    cfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert "integrity" not in cfg  # written before per-tensor checksums
    assert _check_against_manifest(_load(folder, "dequantize").state_dict(), folder) == 7
    lossless = _load(folder, "lossless")
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = lossless(input_ids=ids).logits
    assert _check_against_manifest(lossless.dequantize().state_dict(), folder) == 7
    with torch.no_grad():
        dense_logits = _load(folder, "dequantize")(input_ids=ids).logits
    assert torch.equal(logits.view(torch.int16 if logits.element_size() == 2 else torch.int32),
                       dense_logits.view(torch.int16 if logits.element_size() == 2 else torch.int32))
    with torch.no_grad():
        base = _load(folder, "base")(input_ids=ids).logits
    assert torch.isfinite(base.float()).all()
    report = verify_repo(folder)
    assert report.ok and report.n_encoded == 7 and report.checksums == "absent"
