"""transformers integration: round trips, accelerate, generation, compile, config merging, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tpde_repo_helpers import assert_bit_equal, make_tpde_repo, save_pair, tiny_model
from transformers import AutoModelForCausalLM

import tpde_hf
from tpde_hf import TpdeConfig, TpdeFormatError, TpdeLinear
from tpde_hf.codec import CodecParams, encode_tensor
from tpde_hf.integrity import add_checksums
from tpde_hf.nn.linear import base_weight_torch

IDS = torch.tensor([[5, 17, 42, 99, 3, 77, 120, 8]])


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[Path, Path, torch.nn.Module]:
    root = tmp_path_factory.mktemp("llama")
    dense, tpde = save_pair(tiny_model("llama"), root)
    return dense, tpde, AutoModelForCausalLM.from_pretrained(dense)


def _load(path, mode=None, **kwargs):
    if mode is not None:
        kwargs["quantization_config"] = TpdeConfig(mode=mode, **kwargs.pop("cfg", {}))
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _copy_repo(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ==================================================================== round trips
def test_save_pretrained_writes_a_valid_tpde_repo(llama, tmp_path):
    dense, tpde, ref = llama
    model = _load(tpde, "lossless")
    out = tmp_path / "saved"
    model.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "tpde" and "mode" not in cfg and cfg["format_version"] == 1
    # the saved tensors are the stored ones, byte for byte
    original = load_file(tpde / "model.safetensors")
    saved = {}
    for f in out.glob("*.safetensors"):
        saved.update(load_file(f))
    assert saved.keys() == original.keys()
    for k in original:
        assert original[k].dtype == saved[k].dtype and torch.equal(original[k].view(torch.uint8),
                                                                   saved[k].view(torch.uint8)), k
    manifest = json.loads((out / "tpde_manifest.json").read_text())
    assert manifest == json.loads((tpde / "tpde_manifest.json").read_text())
    from tpde_hf.conversion import verify_repo

    assert verify_repo(out).ok
    again = _load(out, "lossless")
    assert_bit_equal(_logits(again), _logits(ref), "reloaded logits")


def test_save_pretrained_refused_in_base_mode(llama, tmp_path):
    model = _load(llama[1], "base")
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "x")


@pytest.mark.parametrize("family", ["llama", "gpt2", "mixtral"])
def test_dequantize_returns_the_original_dense_model(family, tmp_path):
    dense, tpde = save_pair(tiny_model(family), tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(dense)
    model = _load(tpde, "lossless")
    model = model.dequantize()
    assert not any("Tpde" in type(m).__name__ for m in model.modules())
    assert not model.is_quantized and getattr(model, "hf_quantizer", None) is None
    sd, ref_sd = model.state_dict(), ref.state_dict()
    assert sd.keys() == ref_sd.keys()
    for k in ref_sd:
        assert_bit_equal(sd[k], ref_sd[k], k)
    assert [type(m).__name__ for m in model.modules()] == [type(m).__name__ for m in ref.modules()]
    # ... which saves as a plain checkpoint that plain transformers loads
    model.save_pretrained(tmp_path / "plain")
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    assert_bit_equal(_logits(again), _logits(ref), "dequantized-then-saved logits")


def test_dequantize_mode_saves_a_plain_checkpoint(tmp_path):
    dense, tpde = save_pair(tiny_model("mixtral"), tmp_path)
    model = _load(tpde, "dequantize")
    model.save_pretrained(tmp_path / "plain")
    a, b = load_file(dense / "model.safetensors"), load_file(tmp_path / "plain" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert_bit_equal(a[k], b[k], k)


def test_dequantize_refused_in_base_mode(llama):
    with pytest.raises(ValueError, match="mode='base'"):
        _load(llama[1], "base").dequantize()


def test_sharded_repo_and_float32_load(tmp_path):
    model = tiny_model("qwen2")
    dense, tpde = save_pair(model, tmp_path, max_shard_bytes=20_000)
    assert len(list(tpde.glob("*.safetensors"))) > 2
    for mode in ("lossless", "dequantize"):
        ref = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
        got = _load(tpde, mode, dtype=torch.float32)
        assert got.dtype == torch.float32
        assert_bit_equal(_logits(got), _logits(ref), f"fp32 {mode} logits")


def test_router_weights_in_tpde_form(tmp_path):
    """A 2-D weight of a module that is not nn.Linear (the MoE router) is rebuilt by a hook."""
    model = tiny_model("mixtral")
    dense, tpde = save_pair(model, tmp_path, other=True)
    with safe_open(tpde / "model.safetensors", framework="pt") as fh:
        assert "model.layers.0.block_sparse_moe.gate.qweight" in fh.keys()
    ref = AutoModelForCausalLM.from_pretrained(dense)
    for mode in ("lossless", "dequantize"):
        assert_bit_equal(_logits(_load(tpde, mode)), _logits(ref), f"router {mode}")


# ==================================================================== accelerate
@pytest.mark.parametrize("mode", ["lossless", "dequantize", "base"])
def test_device_map_auto_with_max_memory_offloads(llama, tmp_path, mode):
    dense, tpde, ref = llama
    model = _load(tpde, mode, device_map="auto", max_memory={"cpu": 40_000}, offload_folder=str(tmp_path / "off"))
    assert "disk" in set(model.hf_device_map.values())
    assert any(p.device.type == "meta" for p in model.parameters())  # really offloaded
    logits = _logits(model)
    if mode == "base":
        assert_bit_equal(logits, _logits(_load(tpde, "base")), "offloaded base logits")
    else:
        assert_bit_equal(logits, _logits(ref), f"offloaded {mode} logits")


def test_device_map_plans_with_the_stored_sizes(llama):
    """accelerate sees the real (compressed) sizes: the tpde skeleton is smaller than the dense one."""
    from accelerate.utils import compute_module_sizes

    dense, tpde, ref = llama
    lossless = compute_module_sizes(_load(tpde, "lossless"))[""]
    base = compute_module_sizes(_load(tpde, "base"))[""]
    dense_size = compute_module_sizes(ref)[""]
    assert base < lossless
    linear = sum(m.weight.numel() * 2 for m in ref.modules() if isinstance(m, torch.nn.Linear))
    linear -= ref.lm_head.weight.numel() * 2
    assert dense_size - base > 0.5 * linear


# ==================================================================== generation
def test_generate_cache_sampling_beams_and_padded_batches(llama):
    dense, tpde, ref = llama
    model = _load(tpde, "lossless")
    ids = torch.tensor([[0, 0, 5, 17, 42, 99], [3, 77, 120, 8, 61, 33]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    runs = [
        dict(do_sample=False, use_cache=True),
        dict(do_sample=False, use_cache=False),
        dict(do_sample=True, top_k=20, temperature=0.9),
        dict(do_sample=False, num_beams=3),
    ]
    for kw in runs:
        outs = []
        for m in (ref, model):
            torch.manual_seed(123)
            with torch.no_grad():
                outs.append(m.generate(ids, attention_mask=mask, max_new_tokens=5, pad_token_id=0, **kw))
        assert torch.equal(outs[0], outs[1]), kw


def test_pipeline_from_a_saved_local_tpde_repo(make_tiny, tmp_path):
    from transformers import pipeline

    dense = make_tiny(tmp_path / "dense")
    tpde = make_tpde_repo(dense, tmp_path / "tpde")
    shutil.copytree(tpde, tmp_path / "saved")  # a local tpde repo on disk, tokenizer included
    prompt = "w5 w17 w42"
    expected = pipeline("text-generation", model=str(dense))(prompt, max_new_tokens=6, do_sample=False)
    for kwargs in ({}, {"model_kwargs": {"quantization_config": TpdeConfig(mode="lossless")}}):
        pipe = pipeline("text-generation", model=str(tmp_path / "saved"), **kwargs)
        got = pipe(prompt, max_new_tokens=6, do_sample=False)
        assert got == expected, kwargs


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lossless", "base"])
def test_torch_compile(llama, mode):
    dense, tpde, ref = llama
    model = _load(tpde, mode)
    eager = _logits(model)
    compiled = torch.compile(model)
    with torch.no_grad():
        out = compiled(IDS).logits
    # The weight is rebuilt outside the graph (a graph break), so the compiled model runs the exact
    # (or 4-bit) weight; inductor's fused kernels may round activations differently from eager ones.
    assert torch.allclose(out.float(), eager.float(), atol=2e-2, rtol=2e-2)
    with torch.no_grad():
        tokens = compiled.generate(IDS, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert tokens.shape == (1, IDS.shape[1] + 3)


# ==================================================================== config merging
def test_runtime_options_merge_over_the_stored_config(llama):
    model = _load(llama[1], "base")
    qc = model.config.quantization_config
    assert isinstance(qc, TpdeConfig) and qc.mode == "base" and qc.group_size == 128
    assert qc.to_dict()["source_dtype"] == "bfloat16" and "mode" not in qc.to_dict()


def test_stored_format_fields_cannot_be_overridden(llama):
    with pytest.raises(ValueError, match="cannot be overridden"):
        AutoModelForCausalLM.from_pretrained(llama[1], quantization_config=TpdeConfig(mode="base", group_size=64))


def test_unsupported_mode_is_rejected():
    with pytest.raises(ValueError, match="unsupported mode 'fast'"):
        TpdeConfig(mode="fast")


def test_offload_mode_says_it_needs_cuda(llama):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="needs|CUDA") as err:
        _load(llama[1], "lossless-offload")
    assert "mode='dequantize'" in str(err.value) and "GPU" in str(err.value)


def test_verify_is_refused_in_base_mode(llama):
    with pytest.raises(ValueError, match="never"):
        _load(llama[1], "base", cfg={"verify": True})


def test_tpde_config_on_a_dense_checkpoint_says_to_convert(llama):
    with pytest.raises(ValueError, match="convert"):
        AutoModelForCausalLM.from_pretrained(llama[0], quantization_config=TpdeConfig(mode="lossless"))


# ==================================================================== damaged repos
def _rewrite(repo: Path, fn) -> None:
    path = repo / "model.safetensors"
    sd = load_file(path)
    fn(sd)
    save_file(sd, path, metadata={"format": "pt"})
    add_checksums(path)  # a consistently rewritten shard: the checks below are not the checksums'


def test_newer_format_version_in_config(llama, tmp_path):
    repo = _copy_repo(llama[1], tmp_path / "r")
    cfg = json.loads((repo / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 99
    (repo / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TpdeFormatError, match=r"config\.json.*newer.*upgrade"):
        _load(repo)


@pytest.mark.parametrize("mode", ["lossless", "base", "dequantize"])
def test_newer_format_version_in_a_tensor(llama, tmp_path, mode):
    repo = _copy_repo(llama[1], tmp_path / "r")
    name = "model.layers.1.mlp.up_proj"

    def bump(sd):
        sd[f"{name}.meta"] = sd[f"{name}.meta"].clone()
        sd[f"{name}.meta"][0] = 7

    _rewrite(repo, bump)
    with pytest.raises(TpdeFormatError, match=rf"{name}\.weight.*newer"):
        _load(repo, mode)


@pytest.mark.parametrize("damage", ["truncated", "garbage-header"])
def test_corrupt_shard_names_the_file(llama, tmp_path, damage):
    repo = _copy_repo(llama[1], tmp_path / "r")
    path = repo / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 1000] if damage == "truncated" else b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(TpdeFormatError, match=r"model\.safetensors.*(truncated|corrupt)"):
        _load(repo, "lossless")


@pytest.mark.parametrize("mode", ["lossless", "dequantize"])
def test_checksum_mismatch_with_verify(llama, tmp_path, mode):
    repo = _copy_repo(llama[1], tmp_path / "r")
    name = "model.layers.0.self_attn.k_proj"

    def wrong_checksum(sd):
        sd[f"{name}.meta"] = sd[f"{name}.meta"].clone()
        sd[f"{name}.meta"][9] += 1

    _rewrite(repo, wrong_checksum)
    with pytest.raises(TpdeFormatError, match=rf"{name}\.weight.*checksum mismatch"):
        _load(repo, mode, cfg={"verify": True})
    _load(repo, mode)  # without verify the (intact) weights load


def test_corrupt_delta_is_caught_naming_the_tensor(llama, tmp_path):
    repo = _copy_repo(llama[1], tmp_path / "r")
    name = "model.layers.1.self_attn.o_proj"

    def flip(sd):
        d = sd[f"{name}.delta"].clone()
        d[: d.numel() // 2] ^= 0x5A
        sd[f"{name}.delta"] = d

    _rewrite(repo, flip)
    with pytest.raises(TpdeFormatError, match=rf"{name}\.weight"):
        _load(repo, "dequantize")
    model = _load(repo, "lossless")  # structure is valid: the damage shows when decoding
    with pytest.raises(TpdeFormatError, match=rf"{name}\.weight"):
        _logits(model)


# ==================================================================== TpdeLinear and helpers
@pytest.mark.parametrize("in_f,group", [(100, 32), (256, 64), (300, 128)])
def test_base_weight_torch_matches_the_codec(in_f, group):
    w = (torch.randn(24, in_f) * 0.05).to(torch.bfloat16)
    enc = encode_tensor(w, CodecParams(group_size=group))
    got = base_weight_torch(enc.qweight, enc.scales, enc.zeros, enc.shape, group, torch.bfloat16)
    assert_bit_equal(got, enc.base_weight(), "base weight")


def test_tpde_linear_from_dense_linear_and_conv1d():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    x = torch.randn(3, 5, 96, dtype=torch.bfloat16)
    lin = torch.nn.Linear(96, 40, dtype=torch.bfloat16)
    conv = Conv1D(40, 96).to(torch.bfloat16)
    for layer in (lin, conv):
        t = TpdeLinear.from_dense(layer)
        assert_bit_equal(t(x), layer(x), type(layer).__name__)
        dense = t.dense_module()
        assert type(dense) is type(layer)
        assert_bit_equal(dense.weight, layer.weight, "dense_module weight")
        b = TpdeLinear.from_dense(layer, mode="base")
        assert "delta" not in dict(b.named_parameters())
        y, yb = layer(x).float(), b(x).float()
        assert 0 < ((yb - y).norm() / y.norm()).item() < 0.1


def test_dtype_casts_move_but_never_cast_the_stored_parts():
    lin = torch.nn.Linear(64, 16, dtype=torch.bfloat16)
    t = TpdeLinear.from_dense(lin)
    t.to(torch.float32)
    assert t.scales.dtype == torch.float16 and t.bias.dtype == torch.float32
    x = torch.randn(2, 64)
    assert_bit_equal(t(x), torch.nn.functional.linear(x, lin.weight.float(), lin.bias.float()), "fp32 compute")


def test_prefetcher_stays_one_layer_ahead():
    from tpde_hf.nn.offload import DeltaPrefetcher

    layers = [torch.nn.Module() for _ in range(4)]
    copies: list[int] = []

    def copier(holder, device):
        copies.append(layers.index(holder))
        return {"id": layers.index(holder)}

    pf = DeltaPrefetcher(layers, copier=copier, streams=False)
    for _ in range(3):  # three "tokens"
        for i, layer in enumerate(layers):
            assert pf.fetch(layer, torch.device("cpu"))["id"] == i
    assert pf.stats["sync"] == 1 and pf.stats["prefetched"] == 11
    assert copies == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0]  # each copy issued one layer ahead


def test_import_tpde_hf_is_cheap_and_registers_lazily():
    import subprocess
    import sys

    code = (
        "import sys, tpde_hf; assert 'transformers' not in sys.modules; "
        "from transformers.quantizers import auto; "
        "from tpde_hf.quantizer import TpdeHfQuantizer; "
        "assert auto.AUTO_QUANTIZER_MAPPING['tpde'] is TpdeHfQuantizer; print('ok')"
    )
    root = Path(tpde_hf.__file__).parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "TPDE_HF_NO_AUTOREGISTER": "1"})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
