"""Test fixtures: tiny random models of each supported family, saved dense and as tpde repos.

A tpde repo is built the way the converter does it, from the *files* transformers writes:
``save_pretrained`` (which drops tied weights and writes per-expert MoE weights), then every
chosen 2-D ``.weight`` tensor is replaced by its tpde tensors (``format.encode_state_dict``),
``quantization_config`` is added to ``config.json`` and ``tpde_manifest.json`` is written.

Example::

    model = tiny_model("llama")
    dense, tpde = save_pair(model, tmp_path)
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from tpde_hf.codec import CodecParams
from tpde_hf.format import encode_state_dict, quantization_config_dict
from tpde_hf.integrity import add_checksums

_COMMON = dict(vocab_size=160, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)

#: family -> (model_type, config overrides). Sizes are tiny but keep every layer kind of the family.
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("llama", dict(_COMMON, intermediate_size=96, num_key_value_heads=2, tie_word_embeddings=True)),
    "llama-untied": ("llama", dict(_COMMON, intermediate_size=96, num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen2": ("qwen2", dict(_COMMON, intermediate_size=96, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3": ("qwen3", dict(_COMMON, intermediate_size=96, num_key_value_heads=2, head_dim=16,
                            tie_word_embeddings=True)),
    "mistral": ("mistral", dict(_COMMON, intermediate_size=96, num_key_value_heads=2, sliding_window=None)),
    "gpt2": ("gpt2", dict(vocab_size=160, n_embd=64, n_layer=2, n_head=4, n_positions=256)),
    "phi3": ("phi3", dict(_COMMON, intermediate_size=96, num_key_value_heads=4, pad_token_id=0)),
    "mixtral": ("mixtral", dict(_COMMON, intermediate_size=48, num_key_value_heads=2, num_local_experts=4,
                                num_experts_per_tok=2)),
    "qwen2_moe": ("qwen2_moe", dict(_COMMON, intermediate_size=96, moe_intermediate_size=32,
                                    shared_expert_intermediate_size=48, num_key_value_heads=2, num_experts=4,
                                    num_experts_per_tok=2, decoder_sparse_step=1, tie_word_embeddings=False)),
}


def tiny_config(family: str):
    model_type, overrides = FAMILIES[family]
    return AutoConfig.for_model(model_type, **overrides)


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.bfloat16):
    """A randomly initialised tiny causal LM of ``family`` in ``dtype`` (deterministic per seed)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=dtype)
    # Spread the weights a little more than the default init, and make biases non-zero.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    return model.eval()


def _on_disk_state(folder: Path) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        sd.update(load_file(f))
    return sd


def weights_to_encode(model, keys: list[str], keep_dense=("lm_head",), experts: bool = True,
                      other: bool = False) -> list[str]:
    """Checkpoint names (as saved) of the weights to store in tpde form.

    ``nn.Linear`` and GPT-2 ``Conv1D`` weights; per-expert MoE weights (``experts``); with
    ``other``, any other module's 2-D float weight (e.g. a router). Never embeddings or norms.
    """
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    from transformers.pytorch_utils import Conv1D

    from tpde_hf.loading.ops import _model_transforms

    renamings, converters = _model_transforms(model)
    assert all(isinstance(t, (WeightRenaming, WeightConverter)) for t in renamings + converters)
    meta_sd = model.state_dict()
    chosen = []
    for key in keys:
        if not key.endswith(".weight"):
            continue
        target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_sd)
        if pattern is not None:
            if experts:
                chosen.append(key)
            continue
        if target not in meta_sd:
            continue
        module_path = target[: -len(".weight")]
        if any(module_path == k or module_path.endswith("." + k) for k in keep_dense):
            continue
        module = model.get_submodule(module_path)
        if type(module) in (torch.nn.Linear, Conv1D):
            chosen.append(key)
        elif other and meta_sd[target].dim() == 2 and not isinstance(module, torch.nn.Embedding):
            chosen.append(key)
    return chosen


def make_tpde_repo(dense_dir: str | os.PathLike, out_dir: str | os.PathLike, model=None, keep_dense=("lm_head",),
                   params: CodecParams | None = None, experts: bool = True, other: bool = False,
                   max_shard_bytes: int | None = None) -> Path:
    """Turn a dense ``save_pretrained`` folder into a tpde repo (what ``tpde convert`` produces)."""
    from tpde_hf.loading.ops import write_manifest

    dense_dir, out_dir = Path(dense_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(dense_dir)
    sd = _on_disk_state(dense_dir)
    names = weights_to_encode(model, list(sd), keep_dense, experts, other)
    params = params or CodecParams()
    source_dtype = next(sd[n].dtype for n in names)
    enc = encode_state_dict(sd, names, params)
    _write_shards(enc, out_dir, max_shard_bytes)
    for shard in out_dir.glob("*.safetensors"):
        add_checksums(shard)  # per-tensor checksums in each header, as `tpde convert` writes them
    for extra in dense_dir.iterdir():
        if extra.suffix != ".safetensors" and extra.name != "model.safetensors.index.json" and extra.is_file():
            shutil.copy(extra, out_dir / extra.name)
    cfg = json.loads((dense_dir / "config.json").read_text())
    modules = sorted({n[: -len(".weight")] for n in sd if n.endswith(".weight") and n not in names})
    cfg["quantization_config"] = quantization_config_dict(params, source_dtype, modules)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    write_manifest(str(out_dir))
    return out_dir


def _write_shards(sd: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int | None) -> None:
    sd = {k: v.contiguous() for k, v in sd.items()}
    if max_shard_bytes is None:
        save_file(sd, out_dir / "model.safetensors", metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    # keep the parts of one weight together, like a real converter does
    for k in sorted(sd, key=lambda k: re.sub(r"\.(qweight|scales|zeros|delta|lanes|tables|meta)$", "", k)):
        nbytes = sd[k].numel() * sd[k].element_size()
        if size + nbytes > max_shard_bytes and shards[-1] and not k.endswith(("scales", "zeros", "delta", "lanes",
                                                                                 "tables", "meta")):
            shards.append({})
            size = 0
        shards[-1][k] = sd[k]
        size += nbytes
    n = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(shard, out_dir / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def save_pair(model, root: str | os.PathLike, **kwargs) -> tuple[Path, Path]:
    """Save ``model`` densely to ``root/dense`` and as a tpde repo to ``root/tpde``."""
    root = Path(root)
    dense = root / "dense"
    model.save_pretrained(dense)
    tpde = make_tpde_repo(dense, root / "tpde", model=model, **kwargs)
    return dense, tpde


def bits(t: torch.Tensor) -> torch.Tensor:
    """A float tensor's bit pattern as integers, for exact comparisons with ``torch.equal``."""
    t = t.detach().cpu().contiguous()
    view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.view(view)


def assert_bit_equal(a: torch.Tensor, b: torch.Tensor, what: str = "tensor") -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
    if not torch.equal(bits(a), bits(b)):
        diff = (a.float() - b.float()).abs().max().item()
        raise AssertionError(f"{what} differs (max abs diff {diff})")


def modified_reference(repo: Path, base: Path, dest: Path, name: str, mutate) -> Path:
    """Copy reference ``base`` to ``dest`` with its tensor ``name`` changed by ``mutate(tensor)`` (on a clone), and
    point delta repo ``repo``'s ``quantization_config.reference.model`` at the copy. Returns ``dest``."""
    shutil.copytree(base, dest)
    sd = load_file(dest / "model.safetensors")
    sd[name] = sd[name].clone()
    mutate(sd[name])
    save_file(sd, dest / "model.safetensors", metadata={"format": "pt"})
    cfg_path = Path(repo) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"]["reference"]["model"] = str(dest)
    cfg_path.write_text(json.dumps(cfg))
    return dest
