"""Real checkpoints (bundled MiniLM fp32 and SmolLM2 GGUF) and the streaming memory bound. All slow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_conversion import assert_bit_exact_repo, source_tensors

from tpde_hf.conversion import convert, verify_repo
from tpde_hf.conversion.streaming import ShardWriter

pytestmark = pytest.mark.slow


def test_minilm_fp32(minilm_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "minilm-tpde"
    report = convert(minilm_dir, out)  # default workers: all cores for a model this size
    original = source_tensors(minilm_dir)
    converted = assert_bit_exact_repo(out, original)
    assert len(converted) == 6 * 6 + 1  # 6 linears per layer + the pooler
    assert report.source_dtype == "float32" and report.architecture == "BertModel"
    assert report.ratio_to_source()["linear"] < 0.95
    for rel in ("tokenizer.json", "vocab.txt", "modules.json", "1_Pooling/config.json"):
        assert (out / rel).read_bytes() == (minilm_dir / rel).read_bytes(), rel
    assert not list(out.glob("*.bin")) and verify_repo(out).ok

    tpde_hf = pytest.importorskip("tpde_hf")
    if hasattr(tpde_hf, "TpdeConfig"):
        from transformers import AutoModel

        ids = torch.tensor([[101, 7592, 2088, 102]])
        with torch.no_grad():
            want = AutoModel.from_pretrained(minilm_dir)(ids).last_hidden_state
            model = AutoModel.from_pretrained(out, quantization_config=tpde_hf.TpdeConfig(mode="dequantize"))
            assert torch.equal(model(ids).last_hidden_state, want)


def test_smollm2_gguf_source(smollm2_gguf: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "smollm2-tpde"
    # Layers 0-1 only: the GGUF load dominates; the full model is converted in benchmarks/.
    report = convert(smollm2_gguf, out, dtype="bfloat16", include=r"layers\.[01]\.", workers=1)
    assert report.source_kind == "gguf" and report.n_encoded == 14 and report.architecture == "LlamaForCausalLM"

    reference = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                     dtype=torch.float32).state_dict()
    reference = {k: v.to(torch.bfloat16) for k, v in reference.items() if k != "lm_head.weight"}  # tied
    assert assert_bit_exact_repo(out, reference) == {
        k for k in reference if ("layers.0." in k or "layers.1." in k) and "proj" in k}

    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "tpde" and config["tie_word_embeddings"] is True
    assert (out / "tokenizer.json").is_file() and (out / "chat_template.jinja").is_file()
    card = (out / "README.md").read_text()
    assert "license: apache-2.0" in card and not list(out.glob("*.gguf"))
    assert verify_repo(out).ok


def test_peak_memory_follows_the_largest_tensor_not_the_model(tmp_path: Path) -> None:
    """A 200 MB model of 1.5 MB tensors in 4 shards converts in a small fraction of its size.

    Two layers are encoded (encode tasks hold one batch at a time by construction); the other
    190 MB take the dense path, which must stream too (shards, copies, checksums).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1536, num_hidden_layers=32,
                         num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=True)
    src = tmp_path / "src"
    src.mkdir()
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(src)
    with torch.device("meta"):
        names = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items() if k != "lm_head.weight"}
    gen = torch.Generator().manual_seed(0)
    shards, total = [], 0
    keys = list(names)
    for i in range(4):  # written one tensor at a time, so this test itself stays small
        with ShardWriter(src / f"model-{i + 1:05d}-of-00004.safetensors") as w:
            for k in keys[i::4]:
                t = (torch.randn(names[k], generator=gen) * 0.02).to(torch.bfloat16)
                w.add_tensor(k, t)
                total += t.numel() * 2
                shards.append((k, f"model-{i + 1:05d}-of-00004.safetensors"))
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(shards)}))

    # Two workers: encoding runs in them, so the main process's memory is that of the streaming alone.
    # The conversion runs in a fresh interpreter, as `tpde convert` does: the peak RSS of this long-lived
    # test process depends on what earlier tests left behind (it flaked at +199 MB inside the full suite).
    import subprocess
    import sys

    from tpde_hf.conversion.report import ConversionReport

    code = ("import sys; from tpde_hf.conversion import convert; "
            "print(convert(sys.argv[1], sys.argv[2], workers=2, include=r'layers\\.[01]\\.').to_json())")
    done = subprocess.run([sys.executable, "-c", code, str(src), str(tmp_path / "out")], capture_output=True,
                          text=True, check=False, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = ConversionReport.from_dict(json.loads(done.stdout[done.stdout.index("{"):]))
    assert report.source_bytes == total > 190e6
    assert report.largest_tensor_bytes == 1536 * 512 * 2
    streaming = report.peak_rss_bytes - report.baseline_rss_bytes
    assert streaming < 32e6, report.summary_table()  # 220 MB went through, a few 8 MB chunks at a time
    # Workers hold one encode task (about 1M weights) at a time; the codec's working memory per weight
    # sets that figure (see benchmarks/results/conversion.json), not the model size.
    assert 0 < report.worker_peak_rss_bytes
    assert verify_repo(tmp_path / "out").ok
