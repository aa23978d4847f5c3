"""The real SmolLM2-135M-Instruct (bf16 built from the bundled Q4_1 GGUF), converted and loaded back.

Slow: building the bf16 checkpoint, converting it and decoding every weight take about a minute
each on two cores; a ``lossless`` CPU forward decodes all 106 M linear weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tpde_repo_helpers import assert_bit_equal
from transformers import AutoModelForCausalLM, AutoTokenizer

from tpde_hf import TpdeConfig, TpdeLinear

pytestmark = pytest.mark.slow
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf: Path, tmp_path_factory) -> tuple[Path, Path]:
    from transformers import GgufConfig

    from tpde_hf.conversion import convert

    root = tmp_path_factory.mktemp("smollm2")
    dense = root / "dense"
    folder, name = str(smollm2_gguf.parent), smollm2_gguf.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16,
                                                 quantization_config=GgufConfig(dequantize=True))
    model.save_pretrained(dense)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(dense)
    convert(dense, root / "tpde", workers=1)
    return dense, root / "tpde"


@pytest.fixture(scope="module")
def reference(smollm2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dense, _ = smollm2
    tok = AutoTokenizer.from_pretrained(dense)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    model = AutoModelForCausalLM.from_pretrained(dense)
    with torch.no_grad():
        logits = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=8, do_sample=False)
    return ids, logits, tokens


def test_smollm2_pipeline_default_mode_is_bit_exact(smollm2, reference):
    from transformers import pipeline

    dense, tpde = smollm2
    ids, logits, tokens = reference
    pipe = pipeline("text-generation", model=str(tpde))  # CPU default: dequantize
    assert not any(isinstance(m, TpdeLinear) for m in pipe.model.modules())
    with torch.no_grad():
        assert_bit_equal(pipe.model(ids).logits, logits, "SmolLM2 dequantize logits")
        assert torch.equal(pipe.model.generate(ids, max_new_tokens=8, do_sample=False), tokens)
    expected = pipeline("text-generation", model=str(dense))(PROMPT, max_new_tokens=8, do_sample=False)
    assert pipe(PROMPT, max_new_tokens=8, do_sample=False) == expected


def test_smollm2_lossless_logits_are_bit_exact(smollm2, reference):
    _, tpde = smollm2
    ids, logits, _ = reference
    model = AutoModelForCausalLM.from_pretrained(tpde, quantization_config=TpdeConfig(mode="lossless"))
    assert sum(isinstance(m, TpdeLinear) for m in model.modules()) == 210
    with torch.no_grad():
        assert_bit_equal(model(ids).logits, logits, "SmolLM2 lossless logits")


def test_smollm2_base_is_a_working_4bit_model(smollm2, reference):
    _, tpde = smollm2
    ids, logits, tokens = reference
    model = AutoModelForCausalLM.from_pretrained(tpde, quantization_config=TpdeConfig(mode="base"))
    with torch.no_grad():
        got = model(ids).logits
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    rel = ((got.float() - logits.float()).norm() / logits.float().norm()).item()
    # Plain RTN w4g128 on every linear of a 135M model: measured 0.77 relative logit error here (demo: 62% top-1
    # agreement). Bound it so a broken base (random or zero weights gives >= 1) still fails.
    assert 0 < rel < 0.9, rel
    # the next-token choice after the prompt survives 4-bit rounding
    assert torch.equal(got[0, -1].argmax(), logits[0, -1].argmax())
    assert out.shape == tokens.shape
