"""Architectures through the real ``tpde convert`` CLI: every linear-like weight converted or listed with a reason,
and the repo loads bit-exact.

Each case is a tiny random model built with ``from_config`` (1 layer; in_features >= 128 where the family allows,
so that most weights are smaller when encoded), saved with ``save_pretrained`` in bf16 as a user would, and
converted in-process with ``tpde_hf.conversion.cli.main``. The families cover what makes coverage hard:

* GPT-2: ``Conv1D`` instead of ``nn.Linear`` (stored transposed), lm_head tied to the embeddings;
* Mixtral, Qwen2-MoE, PhiMoE: per-expert checkpoint keys that transformers 5.x fuses into 3-D parameters, and
  routers that are not ``nn.Linear``; Mixtral and PhiMoE also rename ``block_sparse_moe`` -> ``mlp``, PhiMoE
  renames ``gate`` -> ``router`` (``.weight`` included, so the router stays dense with a reason);
* ViT: checkpoint keys (``encoder.layer.N.attention.attention.query``) renamed to other module names;
* GPT-OSS, Llama 4, GraniteMoE: expert weights stored natively as 3-D tensors, encoded one tpde weight per expert
  (GPT-OSS and Llama 4 compute ``x @ W[e]``: stored transposed; GraniteMoE renames ``input_linear.weight`` to
  ``experts.gate_up_proj``); GPT-OSS's ``down_proj`` is square, so only the stored names tell its orientation;
* BERT (MLM head tied to the embeddings), T5, SigLIP (``nn.MultiheadAttention``): model code reads ``.weight`` of
  converted layers (T5's ``wo``, MHA's ``out_proj``), which a ``TpdeLinear`` offers in every mode.

The oracle of "linear-like" is independent of the converter: transformers' own ``rename_source_key`` on the
dense model, then the module type (``tpde_repo_helpers.weights_to_encode``), plus 3-D expert parameters.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from tpde_repo_helpers import assert_bit_equal, weights_to_encode

import tpde_hf
from tpde_hf.conversion.cli import main
from tpde_hf.conversion.report import ConversionReport
from tpde_hf.format import MANIFEST_NAME, SUFFIXES, encoded_prefixes, parse_expert_slice

_LM = dict(vocab_size=256, hidden_size=128, num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=64)


@dataclass
class Case:
    cls: str  # transformers class
    model_type: str
    config: dict
    inputs: Callable[[], dict[str, torch.Tensor]]
    # reason -> how many linear-like weights this family keeps dense for it (every other one is converted)
    dense: dict[str, int] = field(default_factory=dict)
    marks: dict[str, pytest.MarkDecorator] = field(default_factory=dict)  # mode -> mark
    must_encode: tuple[str, ...] = ()  # keys that must be encoded (issue 17 found such ones left dense)


def _ids(n: int = 9, vocab: int = 256) -> Callable[[], dict[str, torch.Tensor]]:
    return lambda: {"input_ids": torch.randint(3, vocab, (2, n), generator=torch.Generator().manual_seed(1))}


def _pixels(size: int = 32) -> Callable[[], dict[str, torch.Tensor]]:
    return lambda: {"pixel_values": torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))}


def _t5_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(3, 256, (2, 7), generator=g),
            "decoder_input_ids": torch.randint(3, 256, (2, 5), generator=g)}


CASES: dict[str, Case] = {
    "llama": Case("LlamaForCausalLM", "llama", dict(_LM, intermediate_size=256, num_key_value_heads=4,
                                                    tie_word_embeddings=True), _ids()),
    "gpt2": Case("GPT2LMHeadModel", "gpt2", dict(vocab_size=256, n_embd=128, n_layer=1, n_head=4, n_positions=64),
                 _ids(), must_encode=("transformer.h.0.attn.c_attn.weight",)),
    "mixtral": Case("MixtralForCausalLM", "mixtral", dict(_LM, intermediate_size=128, num_key_value_heads=4,
                                                          num_local_experts=4, num_experts_per_tok=2),
                    _ids(), dense={"kept dense (lm_head)": 1, "larger when encoded": 1},  # the 4x128 router
                    must_encode=("model.layers.0.block_sparse_moe.experts.3.w2.weight",)),
    "qwen2_moe": Case("Qwen2MoeForCausalLM", "qwen2_moe",
                      dict(_LM, intermediate_size=128, moe_intermediate_size=128, shared_expert_intermediate_size=128,
                           num_key_value_heads=4, num_experts=4, num_experts_per_tok=2, tie_word_embeddings=False),
                      _ids(), dense={"kept dense (lm_head)": 1, "larger when encoded": 2},  # router, shared gate
                      must_encode=("model.layers.0.mlp.experts.0.gate_proj.weight",)),
    # 32 experts: the router (32 x 128) is big enough to shrink, so its lossless path (a forward hook) is
    # exercised; the experts' down_proj (in 32 < a group) grows, so that fused parameter stays dense whole.
    "olmoe": Case("OlmoeForCausalLM", "olmoe", dict(_LM, intermediate_size=32, num_key_value_heads=4, num_experts=32,
                                                    num_experts_per_tok=2, tie_word_embeddings=False),
                  _ids(), dense={"kept dense (lm_head)": 1, "larger when encoded": 32},
                  must_encode=("model.layers.0.mlp.gate.weight", "model.layers.0.mlp.experts.31.up_proj.weight")),
    "phimoe": Case("PhimoeForCausalLM", "phimoe", dict(_LM, intermediate_size=128, num_key_value_heads=4,
                                                       num_local_experts=4, num_experts_per_tok=2),
                   _ids(), dense={"kept dense (lm_head)": 1,
                                  "the model renames .weight itself, its tpde parts would not load: "
                                  "not supported yet": 1}),
    "gpt_oss": Case("GptOssForCausalLM", "gpt_oss",
                    dict(_LM, intermediate_size=128, num_key_value_heads=4, head_dim=32, num_local_experts=4,
                         num_experts_per_tok=2, layer_types=["full_attention"]),
                    _ids(), dense={"kept dense (lm_head)": 1, "larger when encoded": 1},  # the 4x128 router
                    must_encode=("model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj")),
    "granitemoe": Case("GraniteMoeForCausalLM", "granitemoe",
                       dict(_LM, intermediate_size=128, num_key_value_heads=4, num_local_experts=4,
                            num_experts_per_tok=2),
                       _ids(), dense={"kept dense (lm_head)": 1,
                                      "the model renames .weight itself, its tpde parts would not load: "
                                      "not supported yet": 1},
                       must_encode=("model.layers.0.block_sparse_moe.input_linear.weight",
                                    "model.layers.0.block_sparse_moe.output_linear.weight")),
    # 3 experts (odd), a shared expert, and experts without an is_transposed flag (torch.bmm(x, W) on all experts)
    "llama4": Case("Llama4ForCausalLM", "llama4_text",
                   dict(_LM, intermediate_size=256, intermediate_size_mlp=256, num_key_value_heads=4, head_dim=32,
                        num_local_experts=3, num_experts_per_tok=1),
                   _ids(), dense={"kept dense (lm_head)": 1, "larger when encoded": 1},  # the 3x128 router
                   must_encode=("model.layers.0.feed_forward.experts.gate_up_proj",
                                "model.layers.0.feed_forward.experts.down_proj")),
    "vit": Case("ViTModel", "vit", dict(hidden_size=128, num_hidden_layers=1, num_attention_heads=4,
                                        intermediate_size=256, image_size=32, patch_size=8), _pixels(),
                must_encode=("encoder.layer.0.attention.attention.query.weight",
                             "encoder.layer.0.output.dense.weight")),
    "bert": Case("BertForMaskedLM", "bert", dict(vocab_size=256, hidden_size=128, num_hidden_layers=1,
                                                 num_attention_heads=4, intermediate_size=256,
                                                 max_position_embeddings=64), _ids()),
    "t5": Case("T5ForConditionalGeneration", "t5", dict(vocab_size=256, d_model=128, d_kv=32, d_ff=256, num_layers=1,
                                                        num_heads=4), _t5_inputs),
    "siglip": Case("SiglipVisionModel", "siglip_vision_model",
                   dict(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                        image_size=32, patch_size=8), _pixels(),
                   dense={"nn.MultiheadAttention in_proj_weight: not supported yet": 1}),
}


@dataclass
class Converted:
    case: Case
    src: Path
    out: Path
    report: ConversionReport
    manifest: dict[str, dict]
    model: torch.nn.Module  # the original, loaded from src
    stdout: str


def _outputs(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _build(case: Case, folder: Path) -> None:
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(case.model_type, **case.config)
    model = getattr(transformers, case.cls)._from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():  # default inits leave biases at zero: make every tensor carry information
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    model.save_pretrained(folder)


@pytest.fixture(scope="module")
def converted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Converted:
    """The case's source folder and its tpde repo, made once per case (and module) through the CLI."""
    case = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    _build(case, root / "src")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["convert", str(root / "src"), str(root / "tpde")]) == 0
    report = ConversionReport.from_dict(json.loads((root / "tpde" / "tpde_conversion.json").read_text()))
    manifest = json.loads((root / "tpde" / MANIFEST_NAME).read_text())["tensors"]
    model = getattr(transformers, case.cls).from_pretrained(root / "src", dtype=torch.bfloat16).eval()
    return Converted(case, root / "src", root / "tpde", report, manifest, model, printed.getvalue())


def _checkpoint(folder: Path) -> dict[str, tuple[str, list[int]]]:
    out = {}
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "pt") as fh:
            for k in fh.keys():
                s = fh.get_slice(k)
                out[k] = (s.get_dtype(), s.get_shape())
    return out


def linear_like_keys(model: torch.nn.Module, keys: list[str]) -> set[str]:
    """The oracle: checkpoint keys that a linear-like module uses, found with transformers' own key mapping."""
    from transformers.core_model_loading import dot_natural_key, rename_source_key

    from tpde_hf.loading.ops import _model_transforms

    keys = sorted(keys, key=dot_natural_key)
    renamings, converters = _model_transforms(model)
    params, state = dict(model.named_parameters()), model.state_dict()
    experts_3d, others = set(), []
    for key in keys:  # expert matrices stored natively as 3-D tensors
        target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, state)
        if pattern is None and target in params and params[target].dim() == 3 and ".experts." in f".{target}":
            experts_3d.add(key)
        else:
            others.append(key)
    return experts_3d | set(weights_to_encode(model, others, keep_dense=(), experts=True, other=True))


def case_params(modes: tuple[str, ...] | None = None) -> list:
    if modes is None:
        return [pytest.param(n, id=n) for n in CASES]
    return [pytest.param(n, m, id=f"{n}-{m}", marks=[CASES[n].marks[m]] if m in CASES[n].marks else [])
            for n in CASES for m in modes]


# ==================================================================== coverage
@pytest.mark.parametrize("converted", [pytest.param(n, id=n) for n in CASES], indirect=True)
def test_every_linear_like_weight_is_converted_or_listed_with_a_reason(converted: Converted) -> None:
    stored = _checkpoint(converted.src)
    expected = linear_like_keys(converted.model, list(stored))
    assert expected, "the oracle found no linear-like weight"
    encoded = {k for k, e in converted.manifest.items() if e["encoded"]}
    reasons = converted.report.dense_linear_reasons
    assert set(converted.manifest) == set(stored)
    missing = sorted(k for k in expected if k not in encoded and k not in reasons)
    assert not missing, f"linear-like weights left dense without a reason: {missing}"
    assert encoded <= expected and not (encoded & set(reasons))
    # Every reason is one this family is known to need, with its count; all the rest are converted.
    counts: dict[str, int] = {}
    for r in reasons.values():
        counts[r] = counts.get(r, 0) + 1
    assert counts == {r: n for r, n in converted.case.dense.items() if n}, reasons
    # The printed summary names each of them (numbers as * where several share a pattern) with its reason.
    for name, reason in reasons.items():
        pattern = re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)
        assert (name in converted.stdout or pattern in converted.stdout) and f"{reason} (" in converted.stdout
    assert all(k in encoded for k in converted.case.must_encode)
    sizes = [sum(f.stat().st_size for f in d.glob("*.safetensors")) for d in (converted.out, converted.src)]
    assert sizes[0] < sizes[1], sizes  # the weights take less room than the source's, headers included
    # What was stored follows the manifest (a 3-D expert tensor: one tpde weight per expert, all of them).
    repo = _checkpoint(converted.out)
    slices: dict[str, set[int]] = {}
    stored_as = set()
    for p in encoded_prefixes(repo):
        if (parsed := parse_expert_slice(p)) is not None:
            slices.setdefault(parsed[0], set()).add(parsed[1])
        stored_as.add(parsed[0] if parsed else f"{p}.weight")
    assert stored_as == encoded
    assert all(e == set(range(stored[k][1][0])) for k, e in slices.items()), slices
    assert not any(f"{k[: -len('.weight')]}.{s}" in repo for k in set(stored) - encoded for s in SUFFIXES
                   if k.endswith(".weight"))


# ==================================================================== loading
@pytest.mark.parametrize(("converted", "mode"), case_params(("dequantize", "lossless", "base")),
                         indirect=["converted"])
def test_converted_repo_loads(converted: Converted, mode: str) -> None:
    """``dequantize`` and ``lossless``: bit-exact outputs (and every dequantized parameter and buffer);
    ``base``: runs, finite outputs."""
    cls = getattr(transformers, converted.case.cls)
    model = cls.from_pretrained(converted.out, dtype=torch.bfloat16,
                                quantization_config=tpde_hf.TpdeConfig(mode=mode)).eval()
    inputs = converted.case.inputs()
    got, want = _outputs(model, inputs), _outputs(converted.model, inputs)
    if mode == "base":
        assert got.shape == want.shape and torch.isfinite(got.float()).all()
        return
    assert_bit_equal(got, want, f"{converted.case.cls} outputs ({mode})")
    ref = converted.model.state_dict()
    state = model.state_dict()
    if mode == "dequantize":
        assert set(state) == set(ref)
    for name, tensor in state.items():
        if name in ref:
            assert_bit_equal(tensor, ref[name], name)
        else:  # lossless: the tpde parts of a converted weight
            assert name.rpartition(".")[2] in SUFFIXES, name
    if mode == "lossless":  # the converted weights themselves, rebuilt from base + delta
        state = model.dequantize().state_dict()
        assert set(state) == set(ref)
        for name, tensor in state.items():
            assert_bit_equal(tensor, ref[name], name)


# ==================================================================== include / exclude names
def test_include_matches_checkpoint_and_module_names(tmp_path: Path) -> None:
    """ViT: ``--include encoder`` (checkpoint names) and ``--include q_proj`` (module names) both select."""
    _build(CASES["vit"], tmp_path / "src")
    assert main(["-q", "convert", str(tmp_path / "src"), str(tmp_path / "a"), "--include", "encoder"]) == 0
    by_ckpt = json.loads((tmp_path / "a" / MANIFEST_NAME).read_text())["tensors"]
    assert sum(e["encoded"] for e in by_ckpt.values()) == 6  # q, k, v, o, fc1, fc2
    assert main(["-q", "convert", str(tmp_path / "src"), str(tmp_path / "b"), "--include", r"\.q_proj$"]) == 0
    by_module = json.loads((tmp_path / "b" / MANIFEST_NAME).read_text())["tensors"]
    assert [k for k, e in by_module.items() if e["encoded"]] == ["encoder.layer.0.attention.attention.query.weight"]
    report = ConversionReport.from_dict(json.loads((tmp_path / "b" / "tpde_conversion.json").read_text()))
    assert report.dense_linear_reasons["encoder.layer.0.attention.attention.key.weight"] == "not matched by include"
