"""Conversion of local checkpoints: bit-exactness, repo layout, selection, safety, resume, CLI.

Everything here is offline and fast (tiny models); Hub tests are in test_conversion_hub.py and the
real models in test_conversion_real.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tpde_hf.codec import decode_tensor, tensor_checksum
from tpde_hf.conversion import (
    ConversionError,
    ConversionReport,
    TpdeOptimumQuantizer,
    VerificationError,
    convert,
    verify_repo,
)
from tpde_hf.conversion import encoding as conversion_encoding
from tpde_hf.conversion.api import parse_size, partial_dir
from tpde_hf.conversion.cli import build_parser, main
from tpde_hf.conversion.streaming import (
    ShardWriter,
    bytes_checksum,
    read_header,
    verify_file_hashes,
    write_planned_shard,
)
from tpde_hf.errors import TpdeFormatError
from tpde_hf.format import MANIFEST_NAME, QUANT_METHOD, SUFFIXES, encoded_prefixes, read_encoded

ROOT = Path(__file__).resolve().parents[1]


# ==================================================================== helpers
def source_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def repo_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return source_tensors(folder)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
    )


def assert_bit_exact_repo(repo: Path, original: dict[str, torch.Tensor]) -> set[str]:
    """Every original tensor is in ``repo``: decoded (converted) or as stored (dense). Returns converted names."""
    stored = repo_tensors(repo)
    prefixes = encoded_prefixes(stored)
    converted = {f"{p}.weight" for p in prefixes}
    manifest = json.loads((repo / MANIFEST_NAME).read_text())
    assert manifest["format_version"] == 1
    assert set(manifest["tensors"]) == set(original)
    for name, tensor in original.items():
        entry = manifest["tensors"][name]
        assert entry["checksum"] == tensor_checksum(tensor), name
        assert entry["shape"] == list(tensor.shape) and entry["dtype"] == str(tensor.dtype)[6:]
        assert entry["encoded"] == (name in converted)
        if name in converted:
            w = decode_tensor(read_encoded(stored, name[: -len(".weight")]), verify=True)
            assert same_bits(w, tensor), name
        else:
            assert same_bits(stored[name], tensor), name
    expected_keys = {f"{p}.{s}" for p in prefixes for s in SUFFIXES} | (set(original) - converted)
    assert set(stored) == expected_keys
    return converted


def linear_names(n_layers: int = 2) -> set[str]:
    mods = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj"]
    return {f"model.layers.{i}.{m}.weight" for i in range(n_layers) for m in mods}


@pytest.fixture
def quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")


# ==================================================================== the main path
def test_convert_tiny_llama_is_bit_exact_and_complete(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiny-tpde"
    report = convert(tiny_llama_dir, out, workers=1)

    converted = assert_bit_exact_repo(out, source_tensors(tiny_llama_dir))
    assert converted == linear_names()  # every nn.Linear but the lm_head (kept dense by default)
    assert report.verified and report.verified_tensors == report.n_encoded == 14
    assert report.n_tensors == 14 + 2 + 5  # + embed_tokens, lm_head, 5 norms

    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == QUANT_METHOD and qc["group_size"] == 128 and qc["source_dtype"] == "bfloat16"
    assert "lm_head" in qc["modules_to_not_convert"]
    src_config = json.loads((tiny_llama_dir / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "quantization_config"} == src_config

    # Non-weight files carried over byte for byte; nothing of the run left behind.
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                 "LICENSE"):
        assert (out / name).read_bytes() == (tiny_llama_dir / name).read_bytes(), name
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "LICENSE", "README.md", "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
        "tokenizer.json", "tokenizer_config.json", "tpde_conversion.json", "tpde_manifest.json"])
    assert not partial_dir(out).exists()
    saved = ConversionReport.from_dict(json.loads((out / "tpde_conversion.json").read_text()))
    assert saved.n_encoded == 14 and saved.verified

    assert verify_repo(out).ok


def test_report_figures_are_consistent(tiny_llama_dir: Path, tmp_path: Path) -> None:
    report = convert(tiny_llama_dir, tmp_path / "out", workers=1)
    d = json.loads(report.to_json())
    lin = report.classes["linear (tpde)"]
    assert lin.output_bytes == lin.base_bytes + lin.delta_bytes + lin.meta_bytes
    bpw = d["bits_per_weight"]
    assert bpw["total"] == pytest.approx(bpw["base"] + bpw["delta"]) and bpw["source"] == 16
    assert report.source_bytes == sum(t.numel() * t.element_size() for t in source_tensors(tiny_llama_dir).values())
    assert report.output_bytes == sum(c.output_bytes for c in report.classes.values())
    # >=: in a warm process the streaming stage may reuse freed memory and never rise above its start;
    # the next test holds the measurement to an allocation of known size.
    assert report.largest_tensor_bytes == 512 * 128 * 2 and report.peak_rss_bytes >= report.baseline_rss_bytes > 0
    assert d["throughput_mb_s"]["end_to_end"] > 0 and d["seconds"]["total"] > 0
    table = report.summary_table()
    for needle in ("linear (tpde)", "embedding", "bits per converted weight", "throughput", "peak memory"):
        assert needle in table


def test_peak_memory_captures_what_the_streaming_stage_allocates(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mmap

    import numpy as np

    from tpde_hf.conversion import worker

    extra = 64 << 20
    real_encode = worker.encode_tensors

    def encode_with_a_big_buffer(weights, params):
        # A fresh anonymous mapping, written: malloc could hand back pages that are already resident.
        with mmap.mmap(-1, extra) as block:
            view = np.frombuffer(block, dtype=np.uint8)
            view[:] = 1
            del view
            return real_encode(weights, params)

    monkeypatch.setattr(worker, "encode_tensors", encode_with_a_big_buffer)
    report = convert(tiny_llama_dir, tmp_path / "out", workers=1)
    assert report.peak_rss_bytes > report.baseline_rss_bytes > 0
    assert report.peak_above_baseline_bytes >= extra * 0.95  # page-granular; the buffer itself is 64 MiB


def test_model_card_renders_with_valid_metadata(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(tiny_llama_dir, out, workers=1, base_model="org/tiny-llama", push_to_hub=None)
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == "org/tiny-llama" and data["base_model_relation"] == "quantized"
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert "tpde" in data["tags"]
    for mode in ("lossless", "lossless-offload", "base", "dequantize"):
        assert f'tpde_hf.TpdeConfig(mode="{mode}")' in card.text
    assert "AutoModelForCausalLM.from_pretrained(" in card.text and "import tpde_hf" in card.text
    assert "bit-exact" in card.text or "bit for bit" in card.text
    assert str(tmp_path) not in card.text  # no local paths in a card meant for the Hub


def test_sharded_source_and_sharded_output(make_tiny, tmp_path: Path) -> None:
    src = make_tiny(tmp_path / "src", max_shard_size="150KB")
    assert (src / "model.safetensors.index.json").is_file() and len(list(src.glob("*.safetensors"))) > 2
    out = tmp_path / "out"
    report = convert(src, out, workers=1, max_shard_size="100KB")
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert report.n_shards == len(shards) > 2 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for key, shard in index["weight_map"].items():
        with safe_open(out / shard, "pt") as f:
            assert key in f.keys()
    assert index["metadata"]["total_size"] == sum(s.stat().st_size for s in shards)
    assert_bit_exact_repo(out, source_tensors(src))
    assert verify_repo(out).ok


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_fp16_and_fp32_sources_keep_their_dtype(make_tiny, tmp_path: Path, dtype: torch.dtype) -> None:
    src = make_tiny(tmp_path / "src", dtype=dtype)
    report = convert(src, tmp_path / "out", workers=1, group_size=64)
    assert report.source_dtype == str(dtype)[6:]
    assert json.loads((tmp_path / "out/config.json").read_text())["quantization_config"]["group_size"] == 64
    assert_bit_exact_repo(tmp_path / "out", source_tensors(src))


def test_parallel_workers_give_identical_repo(tiny_llama_dir: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conversion_encoding, "TASK_ELEMENTS", 40_000)  # several tasks to share out
    one = convert(tiny_llama_dir, tmp_path / "one", workers=1)
    two = convert(tiny_llama_dir, tmp_path / "two", workers=2)
    assert two.workers == 2 and two.worker_peak_rss_bytes > 0 and one.worker_peak_rss_bytes == 0
    assert (tmp_path / "one/model.safetensors").read_bytes() == (tmp_path / "two/model.safetensors").read_bytes()
    assert verify_repo(tmp_path / "two", workers=2).ok


# ==================================================================== choosing modules
def test_keep_dense_include_exclude(tiny_llama_dir: Path, tmp_path: Path) -> None:
    original = source_tensors(tiny_llama_dir)
    r = convert(tiny_llama_dir, tmp_path / "a", workers=1, exclude=r"\.mlp\.")
    assert assert_bit_exact_repo(tmp_path / "a", original) == {n for n in linear_names() if ".mlp." not in n}
    assert r.dense_reasons["matched by exclude"] == 6
    qc = json.loads((tmp_path / "a/config.json").read_text())["quantization_config"]
    assert "model.layers.0.mlp.up_proj" in qc["modules_to_not_convert"]

    convert(tiny_llama_dir, tmp_path / "b", workers=1, include=r"layers\.1\.self_attn")
    assert assert_bit_exact_repo(tmp_path / "b", original) == {
        n for n in linear_names() if "layers.1.self_attn" in n}

    convert(tiny_llama_dir, tmp_path / "c", workers=1, keep_dense=())  # untied lm_head converted on request
    assert assert_bit_exact_repo(tmp_path / "c", original) == linear_names() | {"lm_head.weight"}

    convert(tiny_llama_dir, tmp_path / "d", workers=1, keep_dense=("lm_head", "o_proj"))
    assert assert_bit_exact_repo(tmp_path / "d", original) == {n for n in linear_names() if "o_proj" not in n}


def test_tied_lm_head_stays_dense(make_tiny, tmp_path: Path) -> None:
    src = make_tiny(tmp_path / "src", tie_word_embeddings=True)
    original = source_tensors(src)
    assert "lm_head.weight" not in original  # saved once, as the embedding
    convert(src, tmp_path / "out", workers=1, keep_dense=())
    assert assert_bit_exact_repo(tmp_path / "out", original) == linear_names()
    qc = json.loads((tmp_path / "out/config.json").read_text())["quantization_config"]
    assert "lm_head" in qc["modules_to_not_convert"]


def test_nothing_to_convert_is_an_error(tiny_llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="no tensor selected"):
        convert(tiny_llama_dir, tmp_path / "out", include="no_such_module")
    assert not (tmp_path / "out").exists()


# ==================================================================== other sources
def test_bin_source_loads_safely_with_a_warning(make_tiny, tmp_path: Path) -> None:
    src = make_tiny(tmp_path / "src", safe_serialization=False)
    assert (src / "pytorch_model.bin").is_file() and not list(src.glob("*.safetensors"))
    original = torch.load(src / "pytorch_model.bin", weights_only=True)
    with pytest.warns(UserWarning, match=r"weights_only=True"):
        report = convert(src, tmp_path / "out", workers=1)
    assert any(".bin" in w for w in report.warnings)
    assert_bit_exact_repo(tmp_path / "out", {k: v.contiguous() for k, v in original.items()})
    assert not list((tmp_path / "out").glob("*.bin"))


class NotATensor:
    """An arbitrary object: torch.load(weights_only=True) must refuse to unpickle it."""


def test_bin_with_arbitrary_pickle_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "evil"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2), "payload": NotATensor()}, src / "pytorch_model.bin")
    with pytest.raises(ConversionError, match=r"pytorch_model\.bin.*weights_only=True"), pytest.warns(UserWarning):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_in_memory_model_through_optimum_quantizer(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from optimum.quantization_base import OptimumQuantizer
    from transformers import AutoModelForCausalLM

    q = TpdeOptimumQuantizer.from_pretrained(tiny_llama_dir, group_size=64, workers=1)
    assert isinstance(q, OptimumQuantizer)
    report = q.quantize(tmp_path / "q1")
    assert report.group_size == 64 and verify_repo(tmp_path / "q1").ok

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    TpdeOptimumQuantizer.from_pretrained(model, workers=1).quantize(tmp_path / "q2")
    assert_bit_exact_repo(tmp_path / "q2", source_tensors(tiny_llama_dir))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q1", "q2"]  # the temporary save is gone


# ==================================================================== safety
def test_existing_output_is_refused_then_replaced_atomically(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(ConversionError, match=r"already exists.*--overwrite"):
        convert(tiny_llama_dir, out)
    assert (out / "precious.txt").read_text() == "keep me"

    def fail(_):
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):  # a failed overwrite leaves the old folder intact
        convert(tiny_llama_dir, out, overwrite=True, on_tensor=fail)
    assert (out / "precious.txt").read_text() == "keep me"

    convert(tiny_llama_dir, out, overwrite=True, workers=1)
    assert not (out / "precious.txt").exists() and verify_repo(out).ok

    empty = tmp_path / "empty"
    empty.mkdir()
    convert(tiny_llama_dir, empty, workers=1)  # an empty folder is not "existing output"
    assert (empty / "config.json").is_file()


def test_interrupted_run_leaves_nothing_complete_and_resume_finishes(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(conversion_encoding, "TASK_ELEMENTS", 40_000)  # about 8 tasks, so there is a middle
    out = tmp_path / "out"
    seen: list[str] = []

    def crash_midway(result):
        seen.append(result.name)
        if len(seen) == 5:
            raise KeyboardInterrupt  # what Ctrl-C raises

    with pytest.raises(KeyboardInterrupt):
        convert(tiny_llama_dir, out, workers=1, on_tensor=crash_midway)
    assert not out.exists()  # nothing that looks like a repo
    partial = partial_dir(out)
    assert partial.is_dir() and partial.name.startswith(".")
    assert not list(partial.rglob("config.json")) and not list(partial.rglob(MANIFEST_NAME))

    with pytest.raises(ConversionError, match="cannot resume.*options"):  # other options: refused
        convert(tiny_llama_dir, out, workers=1, resume=True, group_size=64)

    redone: list[str] = []
    report = convert(tiny_llama_dir, out, workers=1, resume=True, on_tensor=lambda r: redone.append(r.name))
    assert report.resumed_tensors >= 4 and len(redone) == 14 - report.resumed_tensors
    assert not set(redone) & set(seen[:4])
    assert_bit_exact_repo(out, source_tensors(tiny_llama_dir))
    assert not partial.exists()


def test_resume_refuses_a_task_file_changed_after_its_verification(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(conversion_encoding, "TASK_ELEMENTS", 40_000)
    out = tmp_path / "out"

    def crash_after_three(result, seen=[]):  # noqa: B006 - a counter local to this test
        seen.append(result.name)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(tiny_llama_dir, out, workers=1, on_tensor=crash_after_three)
    task = sorted((partial_dir(out) / "tensors").glob("task-*.safetensors"))[0]
    info = next(i for i in read_header(task).values() if i.name.endswith(".delta"))
    data = bytearray(task.read_bytes())
    data[info.begin] ^= 0x01  # one bit of a verified delta payload
    task.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match="changed since verified"):
        convert(tiny_llama_dir, out, workers=1, resume=True)
    assert not out.exists()


def test_rerun_without_resume_starts_over(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"

    def crash(_):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        convert(tiny_llama_dir, out, workers=1, on_tensor=crash)
    report = convert(tiny_llama_dir, out, workers=1)
    assert report.resumed_tensors == 0 and verify_repo(out).ok


def test_bad_sources_give_clear_errors(tiny_llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="no-such-dir: no such file or folder"):
        convert(tmp_path / "no-such-dir", tmp_path / "o1")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConversionError, match=r"empty: no weights found"):
        convert(empty, tmp_path / "o2")

    noconfig = tmp_path / "noconfig"
    noconfig.mkdir()
    save_file({"a.weight": torch.zeros(4, 4)}, noconfig / "model.safetensors")
    with pytest.raises(ConversionError, match=r"noconfig: no config\.json"):
        convert(noconfig, tmp_path / "o3")

    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_llama_dir, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(TpdeFormatError, match=r"truncated/model\.safetensors"):
        convert(truncated, tmp_path / "o4")

    quantized = tmp_path / "quantized"
    shutil.copytree(tiny_llama_dir, quantized)
    cfg = json.loads((quantized / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (quantized / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match=r"already quantized \(quant_method=gptq\)"):
        convert(quantized, tmp_path / "o5")

    with pytest.raises(ConversionError, match="exclude regex"):
        convert(tiny_llama_dir, tmp_path / "o6", exclude="(")
    with pytest.raises(ConversionError, match="dtype 'int8' not supported"):
        convert(tiny_llama_dir, tmp_path / "o7", dtype="int8")
    with pytest.raises(ConversionError, match="group size"):
        convert(tiny_llama_dir, tmp_path / "o8", group_size=100)
    with pytest.raises(ConversionError, match="would replace the source"):
        convert(tiny_llama_dir, tiny_llama_dir, overwrite=True)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 9))


# ==================================================================== verify catches corruption
def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def test_verify_names_a_corrupted_tensor(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(tiny_llama_dir, out, workers=1)
    header = read_header(out / "model.safetensors")
    good = (out / "model.safetensors").read_bytes()

    for key, expect in [
        ("model.layers.1.mlp.up_proj.qweight", "model.layers.1.mlp.up_proj.weight"),  # the base (prediction)
        ("model.layers.0.self_attn.q_proj.delta", "model.layers.0.self_attn.q_proj.weight"),
        ("model.norm.weight", "model.norm.weight: checksum mismatch"),
    ]:
        info = header[key]
        _flip_byte(out / "model.safetensors", (info.begin + info.end) // 2)
        result = verify_repo(out, raise_on_error=False)
        assert not result.ok and any(f.startswith(expect) for f in result.failures), result.failures
        with pytest.raises(VerificationError):
            verify_repo(out)
        (out / "model.safetensors").write_bytes(good)
    assert verify_repo(out).ok

    manifest = json.loads((out / MANIFEST_NAME).read_text())
    del manifest["tensors"]["model.norm.weight"]
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    result = verify_repo(out, raise_on_error=False)
    assert any("not in the manifest" in f and "model.norm.weight" in f for f in result.failures)


# ==================================================================== streaming writer
def test_shard_writer_matches_safetensors(tmp_path: Path) -> None:
    tensors = {
        "a": torch.arange(7, dtype=torch.uint8), "b": torch.randn(3, 5).to(torch.bfloat16),
        "c": torch.arange(6, dtype=torch.int64).view(2, 3), "d": torch.tensor(3.5), "e": torch.zeros(0, 4),
        "f": torch.randn(4, 4).t(),  # non-contiguous
    }
    with ShardWriter(tmp_path / "x.safetensors") as w:
        for k, v in tensors.items():
            w.add_tensor(k, v)
    back = load_file(tmp_path / "x.safetensors")
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert same_bits(back[k], v.contiguous()), k
    itemsize = {"U8": 1, "BF16": 2, "F32": 4, "I64": 8}
    for info in read_header(tmp_path / "x.safetensors").values():
        assert info.begin % itemsize[info.dtype] == 0, info  # every tensor aligned to its element size
    assert not list(tmp_path.glob("*.spill"))


def test_planned_shard_copies_exactly_and_leaves_nothing_on_failure(tmp_path: Path) -> None:
    tensors = {"a": torch.arange(7, dtype=torch.uint8), "b": torch.randn(3, 5).to(torch.bfloat16),
               "c": torch.arange(6, dtype=torch.int64).view(2, 3), "e": torch.zeros(0, 4)}
    with ShardWriter(tmp_path / "src.safetensors") as w:
        for k, v in tensors.items():
            w.add_tensor(k, v)
    planned = list(read_header(tmp_path / "src.safetensors").values())
    hashes = write_planned_shard(tmp_path / "out.safetensors", planned)
    back = load_file(tmp_path / "out.safetensors")
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert same_bits(back[k], v), k
        assert hashes[k] == bytes_checksum([v.contiguous().view(torch.uint8).numpy().tobytes()])
    assert verify_file_hashes(tmp_path / "out.safetensors", hashes) == []
    for info in read_header(tmp_path / "out.safetensors").values():
        assert info.begin % {"U8": 1, "BF16": 2, "F32": 4, "I64": 8}[info.dtype] == 0

    (tmp_path / "src.safetensors").write_bytes((tmp_path / "src.safetensors").read_bytes()[:-8])  # truncated
    with pytest.raises(TpdeFormatError):
        write_planned_shard(tmp_path / "bad.safetensors", planned)
    assert not list(tmp_path.glob("bad.safetensors*"))


def test_parse_size() -> None:
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size(123) == 123
    with pytest.raises(ConversionError):
        parse_size("lots")


# ==================================================================== CLI
def test_cli_help_documents_every_option() -> None:
    parser = build_parser()
    sub = {a.dest: a for a in parser._actions}["command"].choices
    assert set(sub) == {"convert", "verify", "push", "examples", "ckpt"}
    for name, p in sub.items():
        for action in p._actions:
            assert action.help, f"tpde {name}: {action.option_strings or action.dest} has no help"
    text = sub["convert"].format_help()
    for opt in ("--push-to-hub", "--group-size", "--include", "--exclude", "--keep-dense", "--workers",
                "--overwrite", "--resume", "--revision", "--token", "--private", "--create-pr", "--dtype",
                "--storage", "--base-quantizer", "--reference"):
        assert opt in text


def test_cli_convert_and_verify(tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    assert main(["-q", "convert", str(tiny_llama_dir), str(out), "--workers", "1", "--group-size", "64",
                 "--exclude", "k_proj"]) == 0
    printed = capsys.readouterr().out
    assert "linear (tpde)" in printed and "bits per converted weight" in printed
    assert verify_repo(out).ok
    assert main(["-q", "convert", str(tiny_llama_dir), str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err

    assert main(["-q", "verify", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    _flip_byte(out / "model.safetensors", (out / "model.safetensors").stat().st_size - 10)
    assert main(["-q", "verify", str(out)]) == 1
    assert "FAILED" in capsys.readouterr().out

    assert main(["-q", "push", str(tiny_llama_dir), "user/x"]) == 1  # not a converted folder
    assert "not a converted tpde folder" in capsys.readouterr().err


def test_python_dash_m_entry_point() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "tpde_hf.conversion", "convert", "--help"], capture_output=True,
                          text=True, env=env, check=False, timeout=120)
    assert proc.returncode == 0 and "--push-to-hub" in proc.stdout


# ==================================================================== load with transformers (quantizer)
def test_converted_repo_loads_with_from_pretrained(tiny_llama_dir: Path, tmp_path: Path) -> None:
    tpde_hf = pytest.importorskip("tpde_hf")
    if not hasattr(tpde_hf, "TpdeConfig"):
        pytest.skip("tpde_hf.TpdeConfig (the transformers quantizer) is not available yet")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    convert(tiny_llama_dir, out, workers=1)
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        want = ref(ids).logits
        for mode in ("dequantize", "lossless"):
            model = AutoModelForCausalLM.from_pretrained(out, quantization_config=tpde_hf.TpdeConfig(mode=mode))
            assert torch.equal(model(ids).logits, want), mode
        base = AutoModelForCausalLM.from_pretrained(out, quantization_config=tpde_hf.TpdeConfig(mode="base"))
        assert not torch.equal(base(ids).logits, want)  # lossy, but a working model
        assert torch.isfinite(base(ids).logits).all()
