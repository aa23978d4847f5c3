"""Conversion coverage rules: a repo never grows, fused parameters are encoded whole, and every dense
linear-like weight is reported with its reason.

The architectures themselves (MoE experts, routers, renamed keys, ``Conv1D``...) are in
``test_architectures.py``; this file checks the rules on small, purpose-built cases.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from tpde_repo_helpers import assert_bit_equal

import tpde_hf
from tpde_hf.codec import CodecParams, encode_tensor
from tpde_hf.conversion import ConversionError, verify_repo
from tpde_hf.conversion.api import stored_cost
from tpde_hf.conversion.cli import main
from tpde_hf.conversion.report import ConversionReport
from tpde_hf.conversion.selection import LARGER, ModelLayout, WeightRole, load_layout, select_tensors
from tpde_hf.conversion.streaming import TensorInfo
from tpde_hf.format import MANIFEST_NAME, SUFFIXES


def _files_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _report(folder: Path) -> ConversionReport:
    return ConversionReport.from_dict(json.loads((folder / "tpde_conversion.json").read_text()))


def _would_be_larger(tensor: torch.Tensor, name: str) -> bool:
    """Independent of the converter: encode with the codec and compare what each form would store."""
    prefix = name[: -len(".weight")]
    parts = encode_tensor(tensor, CodecParams(), name).to_state_dict(prefix)
    encoded = sum(stored_cost(k, v.numel() * v.element_size()) for k, v in parts.items())
    return encoded >= stored_cost(name, tensor.numel() * tensor.element_size())


def test_weights_larger_when_encoded_are_stored_dense(make_tiny, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    """hidden 64 < the group size 128: most matrices would grow when encoded; only down_proj (in 256) shrinks."""
    src = make_tiny(tmp_path / "src", hidden_size=64, intermediate_size=256, num_attention_heads=2,
                    num_key_value_heads=1)
    capsys.readouterr()
    assert main(["convert", str(src), str(tmp_path / "out")]) == 0
    summary = capsys.readouterr().out
    out = tmp_path / "out"
    original = load_file(src / "model.safetensors")
    stored = load_file(out / "model.safetensors")
    manifest = json.loads((out / MANIFEST_NAME).read_text())["tensors"]
    report = _report(out)

    larger = sorted(n for n, r in report.dense_linear_reasons.items() if r == LARGER)
    assert len(larger) == 12 and not any("down_proj" in n for n in larger)
    encoded = sorted(n for n, e in manifest.items() if e["encoded"])
    assert encoded == [f"model.layers.{i}.mlp.down_proj.weight" for i in range(2)]
    for name in larger:  # stored as they were, recorded as dense
        assert _would_be_larger(original[name], name), name
        assert manifest[name]["encoded"] is False
        assert_bit_equal(stored[name], original[name], name)
        assert not any(f"{name[: -len('.weight')]}.{s}" in stored for s in SUFFIXES)
    for name in encoded:
        assert not _would_be_larger(original[name], name), name

    # The summary shows the count and the names; the repo's weights are smaller than the source's.
    assert f"{LARGER} (12): " in summary
    assert all(n.replace(".0.", ".*.").replace(".1.", ".*.") + " (x2)" in summary for n in larger)
    assert _files_bytes(out) < _files_bytes(src)
    assert report.n_encoded == 2 and report.verified_tensors == 2
    assert verify_repo(out).ok  # `tpde verify`: the dense copies match the manifest too
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert set(qc["modules_to_not_convert"]) >= {n[: -len(".weight")] for n in larger}
    assert not {n[: -len(".weight")] for n in encoded} & set(qc["modules_to_not_convert"])

    # The repo loads bit-exact in every exact mode.
    ref = transformers.LlamaForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
    ids = torch.randint(3, 500, (1, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids).logits
        for mode in ("dequantize", "lossless"):
            model = transformers.LlamaForCausalLM.from_pretrained(
                out, dtype=torch.bfloat16, quantization_config=tpde_hf.TpdeConfig(mode=mode)).eval()
            assert_bit_equal(model(ids).logits, want, mode)


def test_a_model_with_nothing_smaller_when_encoded_is_refused(make_tiny, tmp_path: Path) -> None:
    src = make_tiny(tmp_path / "src", hidden_size=32, intermediate_size=48, num_attention_heads=2,
                    num_key_value_heads=1)
    with pytest.raises(ConversionError, match="no weight is smaller when encoded"):
        tpde_hf.conversion.convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_fused_expert_inputs_are_encoded_all_or_none(tmp_path: Path) -> None:
    """Mixtral with a short expert intermediate: every w2 (in 32) grows when encoded, so each layer's fused
    down_proj stays dense whole, while gate_up_proj (w1, w3: in 128) is encoded; both load bit-exact."""
    config = transformers.MixtralConfig(vocab_size=256, hidden_size=128, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=4, num_local_experts=4,
                                        num_experts_per_tok=2, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "src")
    assert main(["-q", "convert", str(tmp_path / "src"), str(tmp_path / "out")]) == 0
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())["tensors"]
    experts = {k: e["encoded"] for k, e in manifest.items() if ".experts." in k}
    assert len(experts) == 12
    assert all(enc == (".w2." not in k) for k, enc in experts.items()), experts
    reasons = _report(tmp_path / "out").dense_linear_reasons
    assert all(reasons[k] == LARGER for k in experts if ".w2." in k)

    ref = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.bfloat16).eval()
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids).logits
        for mode in ("dequantize", "lossless"):
            model = transformers.MixtralForCausalLM.from_pretrained(
                tmp_path / "out", dtype=torch.bfloat16, quantization_config=tpde_hf.TpdeConfig(mode=mode)).eval()
            assert_bit_equal(model(ids).logits, want, mode)


def _info(name: str, shape: tuple[int, ...] = (256, 256), dtype: str = "BF16") -> TensorInfo:
    return TensorInfo(name, dtype, shape, 0, 0, Path("x.safetensors"))


def test_selection_keeps_a_fused_group_together_and_reports_every_reason() -> None:
    group = "layers.0.experts.down_proj"
    roles = {f"layers.0.experts.{e}.w2.weight": WeightRole("experts", "layers.0.experts", group, group=group)
             for e in range(3)}
    roles["layers.0.q.weight"] = WeightRole("linear", "layers.0.q", "layers.0.q.weight")
    roles["layers.0.gate.weight"] = WeightRole("router", "layers.0.gate", "layers.0.gate.weight")
    layout = ModelLayout("X", {"layers.0.experts", "layers.0.q", "layers.0.gate", "lm_head"}, "", None, None, roles)
    infos = [_info(n) for n in roles] + [_info("layers.0.norm.weight", (256,))]

    sel = select_tensors(infos, layout, exclude=r"experts\.1\.")
    assert sel.encoded == ["layers.0.q.weight", "layers.0.gate.weight"]
    assert sel.dense["layers.0.experts.1.w2.weight"] == "matched by exclude"
    assert sel.dense["layers.0.experts.0.w2.weight"].startswith("kept dense with the other inputs")
    assert sel.dense["layers.0.norm.weight"] == "not a linear-like weight"
    assert "layers.0.norm.weight" not in sel.dense_linears and len(sel.dense_linears) == 3
    assert sel.modules_to_not_convert == ["layers.0.experts", "lm_head"]

    sel = select_tensors(infos, layout)
    assert len(sel.encoded) == 5
    moved = sel.keep_dense({"layers.0.experts.2.w2.weight": LARGER, "layers.0.gate.weight": LARGER})
    assert sorted(moved) == sorted([*[f"layers.0.experts.{e}.w2.weight" for e in range(3)], "layers.0.gate.weight"])
    assert sel.encoded == ["layers.0.q.weight"] and sel.dense_linear_reasons()["layers.0.gate.weight"] == LARGER
    assert sel.modules_to_not_convert == ["layers.0.experts", "layers.0.gate", "lm_head"]

    # A dtype the codec cannot hold, and the user's keep_dense, name their reasons.
    sel = select_tensors([_info("layers.0.q.weight", dtype="F64"), _info("layers.0.gate.weight")], layout,
                         keep_dense=("gate",))
    assert sel.dense_linear_reasons() == {"layers.0.q.weight": "dtype float64 not supported by the codec",
                                          "layers.0.gate.weight": "kept dense (gate)"}


def test_layout_resolves_renamed_keys_through_transformers_mapping(tmp_path: Path) -> None:
    """ViT as saved by transformers 5.x: checkpoint names differ from module names; the layout maps them."""
    config = transformers.ViTConfig(hidden_size=128, num_hidden_layers=1, num_attention_heads=4,
                                    intermediate_size=256, image_size=32, patch_size=8)
    transformers.ViTModel(config).to(torch.bfloat16).save_pretrained(tmp_path / "vit")
    layout = load_layout(tmp_path / "vit")
    role = layout.roles["encoder.layer.0.attention.attention.query.weight"]
    assert (role.kind, role.module) == ("linear", "layers.0.attention.q_proj")
    assert layout.roles["encoder.layer.0.output.dense.weight"].module == "layers.0.mlp.fc2"
    assert "embeddings.patch_embeddings.projection.weight" not in layout.roles  # a Conv2d
    assert "embeddings.cls_token" not in layout.roles  # 3-D, but not an expert matrix


def test_summary_lists_dense_weights_by_reason_with_numbers_collapsed() -> None:
    names = [f"model.layers.{i}.mlp.gate.weight" for i in (10, 2, 1)] + ["lm_head.weight"]
    reasons = {n: LARGER for n in names[:3]} | {"lm_head.weight": "kept dense (lm_head)"}
    report = ConversionReport(source="s", output="o", source_kind="local", dense_linears=names,
                              dense_linear_reasons=reasons)
    assert report.dense_by_reason()[LARGER] == [f"model.layers.{i}.mlp.gate.weight" for i in (1, 2, 10)]
    lines = report.dense_lines(markdown=False)
    assert "linear-like weights stored dense: 4" in lines
    assert f"  {LARGER} (3): model.layers.*.mlp.gate.weight (x3)" in lines
    assert "  kept dense (lm_head) (1): lm_head.weight" in lines
    assert "- kept dense (lm_head) (1): `lm_head.weight`" in report.dense_lines(markdown=True)
    assert lines[-2:] == report.summary_table().splitlines()[-2:]
    assert ConversionReport(source="s", output="o", source_kind="local").dense_lines() == []
