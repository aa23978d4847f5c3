"""Models whose code reads a converted layer's ``.weight`` run in every mode.

T5's feed-forward reads ``self.wo.weight`` (``isinstance`` and ``.dtype``) before calling ``wo``;
``nn.MultiheadAttention`` (here SigLIP's pooling head) hands ``out_proj.weight`` / ``out_proj.bias`` to
``F.multi_head_attention_forward`` and never calls ``out_proj``. Tiny random models are saved in bf16
with ``save_pretrained`` and converted through the real CLI, in-process.
"""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tpde_repo_helpers import assert_bit_equal, bits
from transformers import SiglipVisionConfig, SiglipVisionModel, T5Config, T5ForConditionalGeneration
from transformers.pytorch_utils import Conv1D

from tpde_hf import TpdeConfig, TpdeLinear
from tpde_hf.codec import SUFFIXES, encode_tensor
from tpde_hf.conversion.cli import main as tpde_main
from tpde_hf.format import read_encoded
from tpde_hf.nn import TpdeWeightStore
from tpde_hf.nn import weight_access as wa
from tpde_hf.nn.fused import HookTarget, attach_param_hook

# in_features >= 128 everywhere, so that every linear weight is worth converting
_T5 = dict(vocab_size=128, d_model=128, d_kv=32, d_ff=256, num_layers=2, num_decoder_layers=2, num_heads=4)
_SIGLIP = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4, image_size=32,
               patch_size=8)
#: family -> (class, config, the converted layer whose `.weight` the model's code reads)
FAMILIES = {
    "t5": (T5ForConditionalGeneration, T5Config(**_T5), "encoder.block.0.layer.1.DenseReluDense.wo"),
    "siglip": (SiglipVisionModel, SiglipVisionConfig(**_SIGLIP), "head.attention.out_proj"),
}


def _inputs(family: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if family == "t5":
        return dict(input_ids=torch.randint(0, 128, (2, 7), generator=g),
                    decoder_input_ids=torch.randint(0, 128, (2, 5), generator=g))
    return dict(pixel_values=torch.randn(2, 3, 32, 32, generator=g).to(torch.bfloat16))


def _outputs(model, family: str) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(**_inputs(family))
    if family == "t5":
        return [out.logits]
    return [out.last_hidden_state, out.pooler_output]  # the pooler is the MultiheadAttention head


def _stored(folder: Path) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        sd.update(load_file(f))
    return sd


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def repo(request, tmp_path_factory):
    """(family, dense folder, tpde folder made by `tpde convert`, the original model)."""
    family = request.param
    cls, config, _ = FAMILIES[family]
    torch.manual_seed(0)
    model = cls(config).to(torch.bfloat16).eval()
    root = tmp_path_factory.mktemp(family)
    model.save_pretrained(root / "dense")
    assert tpde_main(["-q", "convert", str(root / "dense"), str(root / "tpde")]) == 0
    return family, root / "dense", root / "tpde", model


def _load(repo, mode: str):
    family, _, tpde, _ = repo
    return FAMILIES[family][0].from_pretrained(tpde, quantization_config=TpdeConfig(mode=mode)).eval()


# ==================================================================== through from_pretrained
@pytest.mark.parametrize("mode", ["dequantize", "lossless"])
def test_outputs_are_bit_exact(repo, mode):
    family, _, _, original = repo
    model = _load(repo, mode)
    if mode == "lossless":
        layer = model.get_submodule(FAMILIES[family][2])
        assert isinstance(layer, TpdeLinear), "the layer whose .weight the model reads must be converted"
    for got, want in zip(_outputs(model, family), _outputs(original, family), strict=True):
        assert_bit_equal(got, want, f"{family} {mode} output")


def test_base_mode_runs(repo):
    family, _, _, original = repo
    model = _load(repo, "base")
    for got, want in zip(_outputs(model, family), _outputs(original, family), strict=True):
        assert torch.isfinite(got.float()).all()
        assert not torch.equal(bits(got), bits(want))  # really the 4-bit weights


def test_weight_is_the_original_in_lossless_mode(repo):
    family, _, _, original = repo
    model = _load(repo, "lossless")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, TpdeLinear)}
    assert FAMILIES[family][2] in layers
    for name, layer in layers.items():
        w = layer.weight
        assert type(w) is torch.Tensor and not w.requires_grad  # a plain tensor: `isinstance(..., Tensor)` holds
        assert_bit_equal(w, original.get_submodule(name).weight, f"{name}.weight")


def test_weight_is_the_base_prediction_in_base_mode(repo):
    family, _, tpde, _ = repo
    model = _load(repo, "base")
    stored = _stored(tpde)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, TpdeLinear)}
    assert FAMILIES[family][2] in layers
    for name, layer in layers.items():
        assert_bit_equal(layer.weight, read_encoded(stored, name).base_weight(), f"{name}.weight (base)")


def test_state_dict_holds_only_the_stored_tensors(repo):
    """The original model's keys, each converted ``X.weight`` replaced by its stored parts ``X.qweight``, ..."""
    _, _, _, original = repo
    model = _load(repo, "lossless")
    keys = set(model.state_dict())
    converted = {n for n, m in model.named_modules() if isinstance(m, TpdeLinear)}
    parts = {f"{n}.{s}" for n in converted for s in SUFFIXES}
    assert keys == set(original.state_dict()) - {f"{n}.weight" for n in converted} | parts
    assert not {f"{n}.weight" for n in converted} & {n for n, _ in model.named_parameters()}


def test_save_pretrained_of_a_lossless_model_round_trips(repo, tmp_path):
    family, _, tpde, original = repo
    model = _load(repo, "lossless")
    _outputs(model, family)  # after a forward: nothing it read or cached may leak into the save
    model.save_pretrained(tmp_path / "saved")
    before, after = _stored(tpde), _stored(tmp_path / "saved")
    assert set(after) == set(before)
    for k in before:
        assert before[k].dtype == after[k].dtype, k
        assert torch.equal(before[k].view(torch.uint8), after[k].view(torch.uint8)), k
    again = FAMILIES[family][0].from_pretrained(tmp_path / "saved", quantization_config=TpdeConfig(mode="lossless"))
    for got, want in zip(_outputs(again, family), _outputs(original, family), strict=True):
        assert_bit_equal(got, want, f"{family} reloaded output")


def test_dequantize_after_reads(repo):
    """``model.dequantize()`` after forwards that read ``.weight``: plain layers, the same outputs."""
    family, _, _, original = repo
    model = _load(repo, "lossless")
    _outputs(model, family)
    model.dequantize()
    assert not [n for n, m in model.named_modules() if isinstance(m, TpdeLinear)]
    for got, want in zip(_outputs(model, family), _outputs(original, family), strict=True):
        assert_bit_equal(got, want, f"{family} dequantized output")


def test_reads_in_a_forward_share_one_decode(repo, monkeypatch):
    """A forward decodes each converted layer once, however often the model's code reads its `.weight`."""
    family = repo[0]
    model = _load(repo, "lossless")
    names = {id(m): n for n, m in model.named_modules()}
    counts: collections.Counter[str] = collections.Counter()
    decode = wa.reconstruct_exact

    def counting(holder, device):
        counts[names[id(holder)]] += 1
        return decode(holder, device)

    monkeypatch.setattr(wa, "reconstruct_exact", counting)
    _outputs(model, family)  # the first reads install the windows that make later reads share
    counts.clear()
    _outputs(model, family)
    converted = {n for n, m in model.named_modules() if isinstance(m, TpdeLinear)}
    assert set(counts) == converted and set(counts.values()) == {1}, counts
    assert not [n for n, m in model.named_modules() if "_tpde_weight_cache" in m.__dict__]  # nothing kept
    # outside a forward, a read decodes and keeps nothing either
    layer = model.get_submodule(FAMILIES[family][2])
    counts.clear()
    _ = (layer.weight, layer.weight)
    assert counts[FAMILIES[family][2]] == 2 and "_tpde_weight_cache" not in layer.__dict__


def test_weight_is_read_only(repo):
    model = _load(repo, "lossless")
    layer = model.get_submodule(FAMILIES[repo[0]][2])
    for value in (torch.nn.Parameter(layer.weight.clone()), layer.weight.clone()):
        with pytest.raises(AttributeError, match="read-only"):
            layer.weight = value
    with pytest.raises(AttributeError, match="read-only"):
        del layer.weight


# ==================================================================== the modules alone
def test_linear_and_conv1d_weight_in_every_mode():
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 48, dtype=torch.bfloat16)
    conv = Conv1D(48, 128).to(torch.bfloat16)  # weight [in, out]
    for layer in (lin, conv):
        enc = encode_tensor(layer.weight.detach())
        t = TpdeLinear.from_dense(layer)
        assert t.weight.shape == layer.weight.shape
        assert_bit_equal(t.weight, layer.weight, f"{type(layer).__name__} lossless")
        b = TpdeLinear.from_dense(layer, mode="base")
        assert_bit_equal(b.weight, enc.base_weight(), f"{type(layer).__name__} base")


@pytest.mark.parametrize("mode", ["lossless", "base"])
def test_kernel_path_after_a_read_gives_the_same_bits(mode):
    """The GPU forward (run here with the kernels' torch backend) uses a weight a `.weight` read just rebuilt
    only where that is what it computes anyway, and never keeps it."""
    from tpde_hf import triton_kernels as tk
    from tpde_hf.nn.linear import _kernel_linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 64, dtype=torch.bfloat16)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    layer = TpdeLinear.from_dense(lin, mode=mode)
    plain = _kernel_linear(layer, tk, x)
    layer.__dict__[wa._CACHE] = (wa._cache_key(layer, x.device), wa.holder_weight(layer, x.device))
    assert_bit_equal(_kernel_linear(layer, tk, x), plain, f"{mode} kernel path after a read")
    assert wa._CACHE not in layer.__dict__
    if mode == "lossless":
        assert_bit_equal(plain, lin(x), "lossless kernel path")


def test_weight_of_unloaded_parts_is_a_meta_tensor():
    t = TpdeLinear(128, 48, True, {s: (torch.uint8, (1,)) for s in SUFFIXES}, compute_dtype=torch.bfloat16)
    assert t.weight.device.type == "meta" and t.weight.shape == (48, 128) and t.weight.dtype == torch.bfloat16


def test_weight_store_weight():
    torch.manual_seed(0)
    w = torch.randn(48, 128, dtype=torch.bfloat16)
    sd = encode_tensor(w).to_state_dict("x")
    for mode in ("lossless", "base"):
        store = TpdeWeightStore("x.weight", {k[2:]: (v.dtype, tuple(v.shape)) for k, v in sd.items()}, mode,
                                device="cpu")
        store.load_state_dict({k[2:]: v for k, v in sd.items()}, strict=False)
        want = w if mode == "lossless" else read_encoded(sd, "x").base_weight()
        assert_bit_equal(store.weight, want, f"store {mode}")


@pytest.mark.parametrize("mode", ["lossless", "base"])
def test_multihead_attention_in_proj_weight_hooked_on_the_attention(mode):
    """MHA's own 2-D ``in_proj_weight`` in tpde form: a hook on the MHA, whose forward runs, rebuilds it;
    ``out_proj`` is a TpdeLinear whose ``.weight`` the MHA reads."""
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(128, 4, batch_first=True, dtype=torch.bfloat16).eval()
    q, kv = torch.randn(2, 3, 128, dtype=torch.bfloat16), torch.randn(2, 5, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        want = mha(q, kv, kv)[0]
    dense_in = mha.in_proj_weight.detach().clone()
    sd = encode_tensor(dense_in).to_state_dict("x")
    specs = {k[2:]: (v.dtype, tuple(v.shape)) for k, v in sd.items() if mode == "lossless" or k[2:] in
             ("qweight", "scales", "zeros", "meta")}
    store = TpdeWeightStore("attention.in_proj_weight", specs, mode, torch.bfloat16, device="cpu")
    store.load_state_dict({k[2:]: v for k, v in sd.items() if k[2:] in specs})
    mha.add_module("in_proj", store)
    attach_param_hook(mha, [HookTarget("in_proj_weight", None, [("in_proj_weight", ["in_proj"])], torch.bfloat16)])
    mha.out_proj = TpdeLinear.from_dense(mha.out_proj, mode=mode)
    wa.remember_parent(mha.out_proj, mha)
    assert "in_proj_weight" not in dict(mha.named_parameters()) and "out_proj.weight" not in mha.state_dict()
    with torch.no_grad():
        got = [mha(q, kv, kv)[0] for _ in range(2)]  # the second call runs with the read window installed
    if mode == "lossless":
        for g in got:
            assert_bit_equal(g, want, "MultiheadAttention output")
    else:
        assert torch.isfinite(got[0].float()).all() and torch.equal(bits(got[0]), bits(got[1]))
    assert "in_proj_weight" not in mha.__dict__  # the rebuilt weight is dropped after the forward


def test_offload_prefetcher_order_survives_a_weight_read_before_the_forward():
    """In lossless-offload a `.weight` read fetches the delta, and the forward (first pass) fetches it again."""
    from tpde_hf.nn.offload import DeltaPrefetcher

    layers = [torch.nn.Module() for _ in range(3)]
    copies: list[int] = []

    def copier(holder, device):
        copies.append(layers.index(holder))
        return {"id": layers.index(holder)}

    pf = DeltaPrefetcher(layers[::-1], copier=copier, streams=False)  # module order differs from forward order
    for i in (0, 0, 1, 2):  # layer 0 is read, then run
        assert pf.fetch(layers[i], torch.device("cpu"))["id"] == i
    copies.clear()
    for layer in layers * 2:
        pf.fetch(layer, torch.device("cpu"))
    assert pf.order == layers and pf.stats["sync"] == 3  # the first pass only: from then on, all prefetched
    assert copies == [2, 0, 1, 2, 0]  # each copy one layer ahead, in forward order


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["lossless", "lossless-offload"])
def test_cuda_modes_are_bit_exact(repo, mode):
    family, dense, tpde, _ = repo
    cls = FAMILIES[family][0]
    original = cls.from_pretrained(dense, device_map="cuda").eval()
    model = cls.from_pretrained(tpde, device_map="cuda", quantization_config=TpdeConfig(mode=mode)).eval()
    inputs = {k: v.cuda() for k, v in _inputs(family).items()}
    for _ in range(2):  # the second pass with the read windows (and the prefetcher's recorded order)
        with torch.no_grad():
            got, want = model(**inputs), original(**inputs)
        assert_bit_equal(got[0], want[0], f"{family} {mode} cuda output")
    layer = model.get_submodule(FAMILIES[family][2])
    assert_bit_equal(layer.weight, original.get_submodule(FAMILIES[family][2]).weight, "cuda .weight")
