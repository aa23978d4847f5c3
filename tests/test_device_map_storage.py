"""accelerate's ``device_map`` plans a storage-laid repo's rebuilt delta with its stored size, not 0 bytes.

A repo written with ``--storage`` holds the delta in the storage's own layout; ``lossless`` rebuilds the
resident delta at load, so the plan (made on the meta-device skeleton, before any byte is read) only has
an estimate: the stored delta bytes. These tests build that skeleton the way ``from_pretrained`` does and
compare its planned size with the size of the loaded model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from accelerate.utils import compute_module_sizes
from tpde_repo_helpers import tiny_model

import tpde_hf
from tpde_hf.conversion import convert
from tpde_hf.quantizer import TpdeHfQuantizer


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("device_map_storage")
    tiny_model("llama-untied").eval().save_pretrained(root / "src")
    out = {}
    for storage in ("resident", "narrow-rans"):
        convert(root / "src", root / storage, storage=storage)
        out[storage] = root / storage
    return out


def _planned_and_loaded(folder: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[int, int, int]:
    """(bytes accelerate plans for the skeleton, bytes of the loaded model, bytes of its delta parts)."""
    planned: list[int] = []
    original = TpdeHfQuantizer._process_model_before_weight_loading

    def spy(self, model, *args, **kwargs):
        model = original(self, model, *args, **kwargs)
        planned.append(compute_module_sizes(model)[""])  # what infer_auto_device_map sees
        return model

    monkeypatch.setattr(TpdeHfQuantizer, "_process_model_before_weight_loading", spy)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.bfloat16, quantization_config=tpde_hf.TpdeConfig(mode="lossless"))
    deltas = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                 if n.rsplit(".", 1)[-1] in ("delta", "lanes", "tables"))
    return planned[0], compute_module_sizes(model)[""], deltas


def test_storage_repo_plans_its_delta(repos: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    planned, loaded, deltas = _planned_and_loaded(repos["narrow-rans"], monkeypatch)
    assert deltas > 0.2 * loaded  # the rebuilt delta is a large share of the model: planning it as 0 would not do
    # the stored delta bytes stand in for the rebuilt delta: within a fifth of the loaded total either way
    assert abs(planned - loaded) < 0.2 * deltas, (planned, loaded, deltas)


def test_resident_layout_plans_exactly(repos: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    planned, loaded, _ = _planned_and_loaded(repos["resident"], monkeypatch)
    assert planned == loaded
