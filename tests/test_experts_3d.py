"""MoE expert tensors a checkpoint stores natively as 3-D (GPT-OSS ``experts.gate_up_proj [E, H, 2I]``): stored as one
2-D tpde weight per expert, rebuilt bit for bit.

The slicing and stacking edge cases (odd expert counts, transposed slices, square matrices, every bit pattern), the
byte ranges the encoder reads, the never-larger rule on the whole tensor, and what a damaged or missing slice does: the
error names the tensor and the expert. The architectures themselves, through the CLI, are in test_architectures.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from tpde_repo_helpers import assert_bit_equal

import tpde_hf
from tpde_hf.conversion import convert
from tpde_hf.conversion.api import _keep_smaller_dense, encode_units
from tpde_hf.conversion.selection import LARGER, ModelLayout, WeightRole, select_tensors
from tpde_hf.conversion.streaming import TensorInfo, load_tensor, read_header, write_tensor_file
from tpde_hf.conversion.verify import verify_repo
from tpde_hf.errors import TpdeFormatError
from tpde_hf.format import (
    MANIFEST_NAME,
    SUFFIXES,
    as_encoded,
    expert_slice,
    expert_slice_prefix,
    parse_expert_slice,
    stack_expert_slices,
)
from tpde_hf.loading.ops import StackExperts

GATE_UP = "model.layers.0.mlp.experts.gate_up_proj"  # GPT-OSS: [E, H, 2I], the model computes x @ W[e]


def _random_bits(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Every bit pattern can occur (NaN payloads, infinities, -0.0, subnormals)."""
    g = torch.Generator().manual_seed(seed)
    int_dtype = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[dtype]
    info = torch.iinfo(int_dtype)
    return torch.randint(info.min, info.max, shape, dtype=int_dtype, generator=g).view(dtype)


# ==================================================================== names
def test_slice_names_round_trip_and_other_prefixes_are_not_slices() -> None:
    for key in (GATE_UP, "model.layers.0.block_sparse_moe.input_linear.weight", "experts.w"):
        for e in (0, 3, 10, 127):
            for transposed in (False, True):
                prefix = expert_slice_prefix(key, e, transposed)
                assert prefix.startswith(key + ".")  # the model's renamings of the key carry over to the parts
                assert parse_expert_slice(prefix) == (key, e, transposed)
    # ordinary module prefixes (an nn.Sequential's "net.0", a leading zero, a near-miss token) are not slices
    for prefix in ("net.0", "mlp.experts.3.w1", f"{GATE_UP}.tpde_expert.01", f"{GATE_UP}.tpde_experts.0",
                   f"{GATE_UP}.tpde_expert_t", "tpde_expert.0"):
        assert parse_expert_slice(prefix) is None, prefix


# ==================================================================== slicing and stacking
@pytest.mark.parametrize("transposed", [False, True], ids=["as-stored", "transposed"])
@pytest.mark.parametrize("shape", [(3, 5, 7), (1, 4, 4), (5, 6, 6), (7, 2, 9)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_slices_stack_back_bit_exact(shape: tuple[int, int, int], transposed: bool, dtype: torch.dtype) -> None:
    w = _random_bits(shape, dtype)
    slices = [expert_slice(w, e, transposed) for e in range(shape[0])]
    for e, s in enumerate(slices):
        assert s.is_contiguous() and s.shape == ((shape[2], shape[1]) if transposed else shape[1:])
        assert_bit_equal(s, w[e].mT if transposed else w[e], f"expert {e}")
    # the loader's op: the original tensor, bit for bit, as a contiguous tensor of its own
    got = StackExperts("w", shape[0], transposed).convert({"p": slices}, target_patterns=["w"])["w"]
    assert got.is_contiguous() and got.data_ptr() != w.data_ptr()
    assert_bit_equal(got, w, "stacked")
    assert_bit_equal(stack_expert_slices(slices, transposed), w, "stack_expert_slices")


def test_stacking_refuses_a_wrong_number_of_slices() -> None:
    slices = [torch.zeros(2, 3) for _ in range(2)]
    with pytest.raises(TpdeFormatError, match=r"^mlp\.experts\.down_proj: 2 expert slices loaded, expected 3"):
        StackExperts("mlp.experts.down_proj", 3, False).convert({"p": slices}, target_patterns=["down_proj"])


# ==================================================================== what the encoder reads
def _layout(roles: dict[str, WeightRole]) -> ModelLayout:
    return ModelLayout("X", {r.module for r in roles.values()}, "", None, None, roles)


@pytest.mark.parametrize("transposed", [False, True], ids=["as-stored", "transposed"])
def test_encode_units_read_each_expert_from_the_source(tmp_path: Path, transposed: bool) -> None:
    """Each expert is a byte range of the source tensor; the worker encodes it in the stored orientation."""
    w = _random_bits((5, 3, 130), torch.bfloat16, seed=1)  # odd E, rows longer than a group
    other = _random_bits((4, 128), torch.bfloat16, seed=2)
    path = tmp_path / "model.safetensors"
    save_file({"a.experts.w": w, "a.proj.weight": other}, str(path))
    infos = read_header(path)
    roles = {"a.experts.w": WeightRole("experts-3d", "a.experts", "a.experts.w", transposed=transposed),
             "a.proj.weight": WeightRole("linear", "a.proj", "a.proj.weight")}
    sel = select_tensors(infos.values(), _layout(roles), keep_dense=())
    assert sorted(sel.encoded) == ["a.experts.w", "a.proj.weight"]
    units = encode_units(sel, infos)
    assert [u.name for u in units["a.proj.weight"]] == ["a.proj.weight"]
    assert [u.name for u in units["a.experts.w"]] == [f"{expert_slice_prefix('a.experts.w', e, transposed)}.weight"
                                                      for e in range(5)]
    for e, unit in enumerate(units["a.experts.w"]):
        assert_bit_equal(as_encoded(unit.name, load_tensor(unit)), expert_slice(w, e, transposed), f"expert {e}")
    assert_bit_equal(as_encoded("a.proj.weight", load_tensor(units["a.proj.weight"][0])), other, "2-D weight")


def test_a_3d_tensor_stays_dense_whole_when_its_experts_together_are_larger() -> None:
    """The never-larger rule weighs all the experts' parts against the whole 3-D tensor."""
    dense = TensorInfo("a.experts.w", "BF16", (4, 64, 256), 0, 4 * 64 * 256 * 2, Path("x"))
    roles = {"a.experts.w": WeightRole("experts-3d", "a.experts", "a.experts.w")}
    for part_bytes, kept in ((dense.nbytes // 40, True), (dense.nbytes // 20, False)):
        sel = select_tensors([dense], _layout(roles), keep_dense=())
        parts = {"a.experts.w": [TensorInfo(f"{expert_slice_prefix('a.experts.w', e, False)}.{s}", "U8",
                                            (part_bytes,), 0, part_bytes, Path("x"))
                                 for e in range(4) for s in SUFFIXES]}
        assert all(p.nbytes < dense.nbytes for p in parts["a.experts.w"])  # each part alone is always smaller
        moved = _keep_smaller_dense(sel, {"a.experts.w": None}, parts, {"a.experts.w": dense})
        assert (sel.encoded, moved) == ((["a.experts.w"], []) if kept else ([], ["a.experts.w"]))
        if not kept:
            assert sel.dense_linear_reasons() == {"a.experts.w": LARGER}


# ==================================================================== end to end, odd expert count
@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, torch.nn.Module]:
    """A 1-layer GPT-OSS with 3 experts (square down_proj) and its tpde repo."""
    root = tmp_path_factory.mktemp("gpt_oss_3d")
    config = transformers.AutoConfig.for_model(
        "gpt_oss", vocab_size=256, hidden_size=128, num_hidden_layers=1, num_attention_heads=4, head_dim=32,
        num_key_value_heads=4, intermediate_size=128, num_local_experts=3, num_experts_per_tok=2,
        max_position_embeddings=64, layer_types=["full_attention"])
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM._from_config(config, dtype=torch.bfloat16).eval()
    model.save_pretrained(root / "src")
    convert(root / "src", root / "tpde")
    return root / "src", root / "tpde", model


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).logits


def _load(folder: Path, **options) -> torch.nn.Module:
    return transformers.GptOssForCausalLM.from_pretrained(
        folder, dtype=torch.bfloat16, quantization_config=tpde_hf.TpdeConfig(**options)).eval()


def test_odd_expert_count_is_stored_transposed_and_loads_bit_exact(gpt_oss) -> None:
    src, repo, model = gpt_oss
    manifest = json.loads((repo / MANIFEST_NAME).read_text())["tensors"]
    assert manifest[GATE_UP]["encoded"] and manifest[GATE_UP]["shape"] == [3, 128, 256]
    with safe_open(repo / "model.safetensors", "pt") as fh:
        keys = set(fh.keys())
        assert GATE_UP not in keys
        # GPT-OSS computes x @ W[e]: each expert is stored as W[e].T, [2I, H], so the 4-bit groups run along H
        for e in range(3):
            meta = fh.get_tensor(f"{expert_slice_prefix(GATE_UP, e, True)}.meta")
            assert [int(v) for v in meta[2:4]] == [256, 128]
    assert not any(parse_expert_slice(k.rpartition(".")[0]) == (GATE_UP, 0, False) for k in keys)
    want = _logits(model)
    ref = model.state_dict()
    for mode in ("dequantize", "lossless"):
        loaded = _load(repo, mode=mode)
        assert_bit_equal(_logits(loaded), want, f"logits ({mode})")
        state = (loaded.dequantize() if mode == "lossless" else loaded).state_dict()
        assert set(state) == set(ref)
        for name, tensor in state.items():
            assert_bit_equal(tensor, ref[name], f"{name} ({mode})")
    base = _logits(_load(repo, mode="base"))
    assert base.shape == want.shape and torch.isfinite(base.float()).all()
    assert verify_repo(repo).ok


def test_lossless_decodes_only_the_experts_the_router_picked(gpt_oss, monkeypatch: pytest.MonkeyPatch) -> None:
    """One token, 2 of 3 experts: the others are never decoded (left as zeros the forward does not read)."""
    import tpde_hf.nn.fused as fused

    _, repo, model = gpt_oss
    loaded = _load(repo, mode="lossless")
    built: list[tuple[str, set[int] | None]] = []
    original = fused.build_param

    def spy(host, target, device, hit=None):
        built.append((target.param_name, hit))
        return original(host, target, device, hit)

    monkeypatch.setattr(fused, "build_param", spy)
    ids = torch.tensor([[7]])
    with torch.no_grad():
        got, want = loaded(input_ids=ids).logits, model(input_ids=ids).logits
    assert_bit_equal(got, want, "logits of one token")
    assert sorted(name for name, _ in built) == ["down_proj", "gate_up_proj"]
    assert all(hit is not None and len(hit) == 2 for _, hit in built), built


def test_lossless_model_saves_the_same_repo(gpt_oss, tmp_path: Path) -> None:
    """save_pretrained of a lossless model writes the slices back and a manifest entry for the whole 3-D tensor."""
    _, repo, _ = gpt_oss
    _load(repo, mode="lossless").save_pretrained(tmp_path / "again")
    manifests = [json.loads((folder / MANIFEST_NAME).read_text()) for folder in (tmp_path / "again", repo)]
    assert manifests[0] == manifests[1]
    assert verify_repo(tmp_path / "again").ok


def _flip_byte(path: Path, tensor: str) -> None:
    info = read_header(path)[tensor]
    with open(path, "r+b") as f:
        f.seek((info.begin + info.end) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x10]))


def test_a_damaged_expert_slice_names_the_tensor_and_the_expert(gpt_oss, tmp_path: Path) -> None:
    _, repo, _ = gpt_oss
    bad = tmp_path / "bad"
    shutil.copytree(repo, bad)
    part = f"{expert_slice_prefix(GATE_UP, 1, True)}.delta"
    _flip_byte(bad / "model.safetensors", part)
    # default load: the stored bytes' checksums name the damaged part, i.e. the tensor and the expert
    for mode in ("dequantize", "lossless"):
        with pytest.raises(TpdeFormatError) as err:
            _load(bad, mode=mode)
        assert part in str(err.value)
    # without those checksums, the decode check of verify=True names the 3-D tensor and the expert
    for mode in ("dequantize", "lossless"):
        with pytest.raises(TpdeFormatError, match=rf"{GATE_UP} \[expert 1\]"):
            _load(bad, mode=mode, verify=True, check_integrity=False)
    report = verify_repo(bad, raise_on_error=False)
    assert any(f.startswith(f"{GATE_UP} [expert 1]") for f in report.failures), report.failures


def test_a_missing_expert_slice_is_refused(gpt_oss, tmp_path: Path) -> None:
    _, repo, _ = gpt_oss
    bad = tmp_path / "bad"
    shutil.copytree(repo, bad)
    shard = bad / "model.safetensors"
    gone = {f"{expert_slice_prefix(GATE_UP, 2, True)}.{s}" for s in SUFFIXES}
    with safe_open(shard, "pt") as fh:
        kept = {k: fh.get_tensor(k) for k in fh.keys() if k not in gone}
    write_tensor_file(shard, kept)  # a consistent shard (with its checksums) that lacks expert 2
    for mode in ("dequantize", "lossless"):
        with pytest.raises(TpdeFormatError, match=rf"^{GATE_UP}: expert slice\(s\) \[2\] missing"):
            _load(bad, mode=mode)
    report = verify_repo(bad, raise_on_error=False)
    assert any(f.startswith(f"{GATE_UP}: missing stored tensors") and sorted(gone)[0] in f for f in report.failures)
