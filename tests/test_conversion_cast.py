"""``tpde convert --dtype``: every source is cast (floating tensors only) before encoding, and the repo is exact
with respect to the cast model; its summary, config, card and ``tpde verify`` say so.

The bundled fp32 MiniLM goes through the real CLI in-process and is compared, bit for bit, with
``from_pretrained(dtype=torch.bfloat16)`` of the source. Tiny Llamas cover the other cases: a .bin source, the
fp16 overflow refusal, a cast that changes nothing, and resume.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_conversion import assert_bit_exact_repo, source_tensors
from tpde_repo_helpers import bits

import tpde_hf
from tpde_hf.conversion import ConversionError, convert, verify_repo
from tpde_hf.conversion import encoding as conversion_encoding
from tpde_hf.conversion.cast import Cast, cast_tensor
from tpde_hf.conversion.cli import main
from tpde_hf.conversion.partial import kept_partial, partial_dir
from tpde_hf.conversion.report import ConversionReport


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (integer views: NaN payloads and -0 count)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(bits(a), bits(b)) if a.is_floating_point() else torch.equal(a, b)


def _fp32_llama(make_tiny: Callable[..., Path], path: Path, **kwargs: object) -> Path:
    return make_tiny(path, dtype=torch.float32, **kwargs)


# ==================================================================== the bundled fp32 MiniLM, through the CLI
@pytest.mark.slow
def test_minilm_fp32_cast_to_bf16_is_exact_for_the_cast_model(minilm_dir: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    from transformers import AutoModel, AutoTokenizer

    out = tmp_path / "minilm-bf16"
    assert main(["-q", "convert", str(minilm_dir), str(out), "--dtype", "bfloat16"]) == 0
    printed = capsys.readouterr().out
    assert "exact copy of the source cast to bfloat16 (the source is float32)" in printed

    # The repo holds the source's tensors cast to bf16, bit for bit (the manifest describes those).
    original = source_tensors(minilm_dir)
    assert {v.dtype for v in original.values() if v.is_floating_point()} == {torch.float32}
    assert len(assert_bit_exact_repo(out, _cast(original, torch.bfloat16))) == 6 * 6 + 1

    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["cast_from"] == "float32" and qc["source_dtype"] == "bfloat16" and config["dtype"] == "bfloat16"
    report = ConversionReport.from_dict(json.loads((out / "tpde_conversion.json").read_text()))
    n_float = sum(v.is_floating_point() for v in original.values())  # not the int64 position_ids
    assert report.cast == {"dtype": "bfloat16", "cast_from": ["float32"], "tensors": n_float, "floating": n_float}
    assert report.source_dtype == "bfloat16" and report.bits_per_weight()["source"] == 16
    card = (out / "README.md").read_text()
    assert "exact copy of the source cast to bfloat16, not of its float32 original" in card
    assert "base + delta = the source's\nweight cast to bfloat16, bit for bit" in card
    checked = verify_repo(out)
    assert checked.ok and checked.cast_from == "float32" and "cast from float32" in checked.summary()

    # Loaded, it is the source loaded with dtype=bfloat16: every parameter and buffer, and the outputs.
    want = AutoModel.from_pretrained(minilm_dir, dtype=torch.bfloat16).eval()
    dense = AutoModel.from_pretrained(out, quantization_config=tpde_hf.TpdeConfig(mode="dequantize")).eval()
    exact = AutoModel.from_pretrained(out, quantization_config=tpde_hf.TpdeConfig(mode="lossless")).eval()
    want_sd, dense_sd = want.state_dict(), dense.state_dict()
    assert set(want_sd) == set(dense_sd)
    assert all(_same(dense_sd[k], v) for k, v in want_sd.items()), [k for k, v in want_sd.items()
                                                                      if not _same(dense_sd[k], v)]
    manifest = json.loads((out / "tpde_manifest.json").read_text())["tensors"]
    linears = {n.removesuffix(".weight") for n, entry in manifest.items() if entry["encoded"]}
    for name, p in want.named_parameters():
        module = name.rsplit(".", 1)[0]
        got = exact.get_submodule(module).weight if name.endswith(".weight") and module in linears else \
            exact.get_parameter(name)
        assert _same(got, p), name  # lossless mode: each converted weight rebuilt from base + delta
    batch = AutoTokenizer.from_pretrained(out)(["tpde keeps every bit", "of the cast model"], padding=True,
                                              return_tensors="pt")
    with torch.no_grad():
        outs = [m(**batch).last_hidden_state for m in (want, dense, exact)]
    assert outs[0].dtype == torch.bfloat16
    assert _same(outs[1], outs[0]) and _same(outs[2], outs[0])


# ==================================================================== other sources and options
def test_bin_source_is_cast_while_staged(make_tiny: Callable[..., Path], tmp_path: Path) -> None:
    src = _fp32_llama(make_tiny, tmp_path / "bin", safe_serialization=False)
    original = torch.load(src / "pytorch_model.bin", weights_only=True)
    with pytest.warns(UserWarning, match=r"\.bin checkpoint"):
        report = convert(src, tmp_path / "out", dtype="float16")
    assert report.cast == {"dtype": "float16", "cast_from": ["float32"], "tensors": len(original),
                           "floating": len(original)}
    assert assert_bit_exact_repo(tmp_path / "out", _cast(original, torch.float16))
    assert json.loads((tmp_path / "out/config.json").read_text())["quantization_config"]["cast_from"] == "float32"


def test_fp16_overflow_is_refused_naming_the_tensor(make_tiny: Callable[..., Path], tmp_path: Path) -> None:
    src = _fp32_llama(make_tiny, tmp_path / "src")
    sd = load_file(src / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    sd[name][3, 5] = 1e5  # beyond float16's 65504; fine in bfloat16
    sd["model.norm.weight"][0] = float("inf")  # an inf of the source is no overflow
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})

    with pytest.raises(ConversionError, match=rf"'{name}': 1 value\(s\) beyond float16's range \(largest "
                                              r"magnitude 100000.*cast to bfloat16"):
        convert(src, tmp_path / "out", dtype="float16")
    assert not (tmp_path / "out").exists() and not partial_dir(tmp_path / "out").exists()  # bad input: no partial

    report = convert(src, tmp_path / "out", dtype="bfloat16")
    assert report.cast["cast_from"] == ["float32"]
    assert assert_bit_exact_repo(tmp_path / "out", _cast(sd, torch.bfloat16))


def test_cast_tensor_refuses_only_finite_values_that_become_inf() -> None:
    t = torch.tensor([1.0, -65504.0, 65519.0, float("inf"), float("-inf"), float("nan"), 1e-10])
    out = cast_tensor("ok", t, torch.float16)  # 65519 rounds down to 65504; inf stays inf; 1e-10 underflows to 0
    assert torch.equal(bits(out), bits(t.to(torch.float16)))
    for value, dtype in ((65520.0, torch.float16), (-1e6, torch.float16), (3.4e38, torch.bfloat16)):
        with pytest.raises(ConversionError, match=r"'w': 1 value\(s\) beyond"):
            cast_tensor("w", torch.tensor([0.5, value]), dtype)
        with pytest.raises(ConversionError, match=r"'w': 1 value\(s\) beyond"):  # a NaN beside it hides nothing
            cast_tensor("w", torch.tensor([float("nan"), value, float("inf")]), dtype)
    ints = torch.arange(4)
    assert cast_tensor("ids", ints, torch.float16) is ints  # integer tensors are never cast


def test_cast_descriptions() -> None:
    assert Cast.of(torch.bfloat16, [torch.bfloat16, torch.bfloat16]) is None
    partial = Cast.of(torch.bfloat16, [torch.bfloat16, torch.float32, torch.float16])
    assert partial is not None and partial.config_value == "float16,float32"
    assert partial.describe() == ("exact copy of the source cast to bfloat16 (2 of its 3 floating tensors were "
                                  "float16, float32, the others bfloat16 already)")


def test_a_cast_that_changes_nothing_is_no_cast(tiny_llama_dir: Path, tmp_path: Path) -> None:
    plain = convert(tiny_llama_dir, tmp_path / "plain")
    same = convert(tiny_llama_dir, tmp_path / "same", dtype="bfloat16")  # the tiny Llama is bf16 already
    assert plain.cast is None and same.cast is None
    assert "cast_from" not in json.loads((tmp_path / "same/config.json").read_text())["quantization_config"]
    assert (tmp_path / "plain/model.safetensors").read_bytes() == (tmp_path / "same/model.safetensors").read_bytes()
    assert "cast" not in same.summary_table()


def test_resume_keeps_the_cast_and_refuses_another_dtype(make_tiny: Callable[..., Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conversion_encoding, "TASK_ELEMENTS", 40_000)  # several tasks, so there is a middle
    src = _fp32_llama(make_tiny, tmp_path / "src")
    out = tmp_path / "out"
    seen: list[object] = []

    def stop_after_two(result: object) -> None:
        seen.append(result)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as info:
        convert(src, out, dtype="bfloat16", on_tensor=stop_after_two)
    assert kept_partial(info.value) == partial_dir(out)
    with pytest.raises(ConversionError, match=r"cannot resume, the options changed.*bfloat16.*float16"):
        convert(src, out, dtype="float16", resume=True)
    with pytest.raises(ConversionError, match="cannot resume, the options changed"):
        convert(src, out, resume=True)  # no cast either is another conversion

    report = convert(src, out, dtype="bfloat16", resume=True)
    assert report.resumed_tensors >= 2 and report.cast is not None and report.cast["cast_from"] == ["float32"]
    assert assert_bit_exact_repo(out, _cast(source_tensors(src), torch.bfloat16))
    assert verify_repo(out).ok and not partial_dir(out).exists()


def test_cast_repo_loads_as_the_cast_model_and_unknown_fields_do_not_break_it(make_tiny: Callable[..., Path],
                                                                              tmp_path: Path) -> None:
    """``cast_from`` is a format field here; a reader that does not know a field (as an older tpde-hf does not know
    ``cast_from``) keeps it and loads the repo."""
    from transformers import AutoModelForCausalLM

    src = _fp32_llama(make_tiny, tmp_path / "src")
    out = tmp_path / "out"
    convert(src, out, dtype="bfloat16")
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["some_field_from_a_newer_tpde"] = {"x": 1}
    (out / "config.json").write_text(json.dumps(config))

    want = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    got = AutoModelForCausalLM.from_pretrained(out, quantization_config=tpde_hf.TpdeConfig(mode="dequantize"))
    qc = tpde_hf.TpdeConfig.from_dict(config["quantization_config"])  # what a load reads (dequantize then drops it)
    assert qc.cast_from == "float32" and qc.to_dict()["some_field_from_a_newer_tpde"] == {"x": 1}
    got_sd = got.state_dict()
    assert all(_same(got_sd[k], v) for k, v in want.state_dict().items())
    ids = torch.tensor([[1, 5, 9, 200, 7]])
    with torch.no_grad():
        assert _same(got(ids).logits, want(ids).logits)
