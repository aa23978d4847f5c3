"""transformers integration, per architecture: every family loads in every CPU mode.

For each tiny random model (Llama tied/untied, Qwen2, Qwen3, Mistral, GPT-2, Phi-3, Mixtral,
Qwen2-MoE), saved by transformers and rewritten as a tpde repo:

* ``lossless`` and ``dequantize``: logits equal the original model's bit for bit, greedy
  ``generate`` gives the same tokens, and ``dequantize`` leaves a plain model whose every tensor
  equals the original's;
* ``base``: the delta is never read (the loader never touches a delta key, and a repo whose delta
  bytes are garbage loads the same), every 4-bit weight is within its rounding bound of the
  original, and the logits equal those of the original model with its weights replaced by the
  4-bit base (bit for bit, where the family has no fused experts);
* no ``mode``: the CPU default (``dequantize``) is used.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tpde_repo_helpers import FAMILIES, assert_bit_equal, save_pair, tiny_model
from transformers import AutoModelForCausalLM

import tpde_hf
from tpde_hf import TpdeConfig, TpdeLinear
from tpde_hf.codec import EncodedTensor
from tpde_hf.nn.linear import reconstruct_base

IDS = torch.tensor([[5, 17, 42, 99, 3, 77, 120, 8, 61, 33, 150, 12]])
NEW_TOKENS = 6


class Family:
    """A family's tiny model, its dense and tpde folders and the reference outputs."""

    def __init__(self, name: str, root: Path):
        self.name = name
        model = tiny_model(name)
        keep = () if name == "llama-untied" else ("lm_head",)  # untied: the lm_head is converted too
        self.dense, self.tpde = save_pair(model, root, keep_dense=keep)
        self.ref = AutoModelForCausalLM.from_pretrained(self.dense)
        with torch.no_grad():
            self.logits = self.ref(IDS).logits
        self.tokens = _greedy(self.ref)

    def load(self, mode: str | None, **kwargs) -> torch.nn.Module:
        if mode is not None:  # (an explicit quantization_config=None would erase the stored one)
            kwargs["quantization_config"] = TpdeConfig(mode=mode)
        return AutoModelForCausalLM.from_pretrained(self.tpde, **kwargs)


def _greedy(model) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(IDS, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory) -> Family:
    return Family(request.param, tmp_path_factory.mktemp(request.param))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def test_lossless_is_bit_exact(family: Family):
    model = family.load("lossless")
    assert any(isinstance(m, TpdeLinear) for m in model.modules())
    assert model.is_quantized and model.config.quantization_config.mode == "lossless"
    assert_bit_equal(_logits(model), family.logits, f"{family.name} lossless logits")
    assert torch.equal(_greedy(model), family.tokens)


def test_dequantize_is_bit_exact_and_plain(family: Family):
    model = family.load("dequantize")
    assert not any("Tpde" in type(m).__name__ for m in model.modules())
    assert not getattr(model, "is_quantized", False)
    assert getattr(model.config, "quantization_config", None) is None
    ref_sd = family.ref.state_dict()
    sd = model.state_dict()
    assert sd.keys() == ref_sd.keys()
    for k in ref_sd:
        assert_bit_equal(sd[k], ref_sd[k], k)
    assert_bit_equal(_logits(model), family.logits, f"{family.name} dequantize logits")
    assert torch.equal(_greedy(model), family.tokens)


def test_cpu_default_mode_is_dequantize(family: Family):
    model = family.load(None)
    assert not any("Tpde" in type(m).__name__ for m in model.modules())
    assert_bit_equal(_logits(model), family.logits, f"{family.name} auto-mode logits")


def _stored_encodings(folder: Path) -> dict[str, EncodedTensor]:
    sd = {}
    for f in folder.glob("*.safetensors"):
        with safe_open(f, framework="pt") as fh:
            sd.update({k: fh.get_tensor(k) for k in fh.keys()})
    prefixes = [k[: -len(".meta")] for k in sd if k.endswith(".meta")]
    return {p: EncodedTensor.from_state_dict(sd, p, name=f"{p}.weight") for p in prefixes}


def test_base_within_4bit_error_and_never_reads_delta(family: Family, monkeypatch):
    from transformers.core_model_loading import WeightTransform

    touched: list[str] = []
    original = WeightTransform.add_tensor

    def spy(self, target_key, source_key, source_pattern, future):
        touched.append(source_key)
        return original(self, target_key, source_key, source_pattern, future)

    monkeypatch.setattr(WeightTransform, "add_tensor", spy)
    model = family.load("base")
    monkeypatch.undo()
    assert touched and not [k for k in touched if k.endswith((".delta", ".lanes", ".tables"))]
    assert not [n for n, _ in model.named_parameters() if n.endswith((".delta", ".lanes", ".tables"))]

    # every 4-bit weight is the round-to-nearest of the original: |W - P| <= scale/2 (+ P's own rounding)
    encs = _stored_encodings(family.tpde)
    holders = {m._tpde_name: m for m in model.modules() if "_tpde_name" in m.__dict__}
    assert len(holders) == len(encs)
    for enc in encs.values():
        exact = tpde_hf.decode_tensor(enc).float()
        base = reconstruct_base(holders[enc.name], torch.device("cpu"))
        assert_bit_equal(base, enc.base_weight(), enc.name)
        scale = enc.scales.float().repeat_interleave(enc.params.group_size, dim=1)[:, : enc.shape[1]]
        ulp = base.float().abs() * 2.0**-7 + 1e-30
        assert bool(((exact - base.float()).abs() <= scale / 2 + ulp).all()), enc.name

    logits = _logits(model)
    rel = ((logits.float() - family.logits.float()).norm() / family.logits.float().norm()).item()
    assert 0 < rel < 0.25, f"{family.name}: base-mode logits relative error {rel}"
    if not any(".experts." in p for p in encs):
        # the same model with its weights replaced by the 4-bit base gives these logits exactly
        ref = AutoModelForCausalLM.from_pretrained(family.dense)
        sd = ref.state_dict()
        with torch.no_grad():
            for prefix, enc in encs.items():
                sd[f"{prefix}.weight"].copy_(enc.base_weight())
        assert_bit_equal(logits, _logits(ref), f"{family.name} base logits vs dense-with-base-weights")
    out = model.generate(IDS, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    assert out.shape == family.tokens.shape


def test_base_loads_with_a_garbage_delta(family: Family, tmp_path: Path):
    """The delta bytes are never read in base mode: overwriting them changes nothing."""
    if family.name not in ("llama", "gpt2", "mixtral"):
        pytest.skip("one dense, one Conv1D and one MoE family are enough")
    from tpde_hf.loading.ops import read_safetensors_header

    repo = tmp_path / "repo"
    shutil.copytree(family.tpde, repo)
    path = repo / "model.safetensors"
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        import json

        header = json.loads(fh.read(n))
    raw = bytearray(path.read_bytes())
    for name, entry in header.items():
        if name.endswith((".delta", ".lanes", ".tables")):
            start, end = entry["data_offsets"]
            raw[8 + n + start : 8 + n + end] = b"\xa5" * (end - start)
    path.write_bytes(bytes(raw))
    read_safetensors_header(str(path))
    good = family.load("base")
    bad = AutoModelForCausalLM.from_pretrained(repo, quantization_config=TpdeConfig(mode="base"))
    assert_bit_equal(_logits(bad), _logits(good), "base logits with a garbage delta")
    with pytest.raises(tpde_hf.TpdeFormatError):
        AutoModelForCausalLM.from_pretrained(repo, quantization_config=TpdeConfig(mode="dequantize"))

