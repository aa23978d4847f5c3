"""The class-width delta code as a format option (``CodecParams(delta_code="class-width")``, version 2).

From the tensor format up: meta version 2 and its checks, bit-exact round trips on both CPU backends,
chunked encode and decode, errors that name the tensor, ``PackedWeight`` and the kernels' entry points
(torch and, under ``TRITON_INTERPRET=1``, Triton), ``TpdeLinear``, a repo loaded by transformers in
every CPU mode, and ``tpde convert --delta-code class-width`` with its verification and card.
The class-width code itself (its layout and every corruption) is tested in ``test_class_width.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():  # before anything imports triton's JIT: the kernels run interpreted
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from huggingface_hub import ModelCard  # noqa: E402
from test_triton_kernels import (  # noqa: E402
    DEVICES,
    DTYPES,
    _fast_interpreter,  # noqa: F401  (the module's autouse fixture, reused here)
    assert_bit_exact,
    assert_matmul_close,
    weight,
)
from tpde_repo_helpers import assert_bit_equal, save_pair, tiny_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from tpde_hf import TpdeConfig, TpdeLinear  # noqa: E402
from tpde_hf.codec import (  # noqa: E402
    CodecParams,
    EncodedTensor,
    class_width,
    decode_tensor,
    decode_tensors,
    encode_tensor,
    inspect_tensor,
    use_backend,
)
from tpde_hf.codec.tensor_codec import DELTA_CODES, parse_meta  # noqa: E402
from tpde_hf.conversion import convert, verify_repo  # noqa: E402
from tpde_hf.conversion.cli import build_parser  # noqa: E402
from tpde_hf.conversion.streaming import read_header  # noqa: E402
from tpde_hf.errors import TpdeFormatError  # noqa: E402
from tpde_hf.triton_kernels import PackedWeight, lossless_linear, reconstruct  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

CW = "class-width"


def cw_params(group_size: int = 128) -> CodecParams:
    return CodecParams(group_size=group_size, delta_code=CW)


def encoded_cw(shape=(37, 300), dtype=torch.bfloat16, group_size=64, seed=0, adversarial=True):
    w = weight(shape, dtype, seed, adversarial)
    return w, encode_tensor(w, cw_params(group_size), name="layer.weight")


def stored(enc: EncodedTensor) -> dict[str, torch.Tensor]:
    return enc.to_state_dict("layer")


# ==================================================================== tensor format
@pytest.mark.parametrize("backend", ["compiled", "numpy"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "group_size"), [((37, 300), 64), ((5, 1100), 128), ((17, 96), 32)])
def test_round_trip_through_stored_tensors_is_bit_exact(backend, dtype, shape, group_size):
    """NaN payloads, ±inf, ±0, subnormals and outliers; partial last groups and a second offset span.
    The base is the rANS format's base, bit for bit."""
    w = weight(shape, dtype, seed=shape[0])
    with use_backend(backend):
        enc = encode_tensor(w, cw_params(group_size), name="layer.weight")
        back = EncodedTensor.from_state_dict(stored(enc), "layer", name="layer.weight")
        assert back.delta_code == CW and back.total_bits == enc.total_bits
        assert_bit_exact(decode_tensor(back, verify=True), w)
        rans = encode_tensor(w, CodecParams(group_size=group_size), name="layer.weight")
    for part in ("qweight", "scales", "zeros"):
        assert torch.equal(getattr(enc, part).view(torch.uint8), getattr(rans, part).view(torch.uint8)), part


def test_constant_and_all_zero_groups():
    w = torch.cat((torch.full((3, 128), 0.25), torch.zeros(3, 128), torch.full((3, 128), -3.0))).to(torch.bfloat16)
    assert_bit_exact(decode_tensor(encode_tensor(w, cw_params()), verify=True), w)


def test_meta_is_version_2_and_rans_stays_version_1():
    w = weight((16, 256), torch.bfloat16, seed=1)
    cw_meta = stored(encode_tensor(w, cw_params()))["layer.meta"]
    rans_meta = stored(encode_tensor(w, CodecParams()))["layer.meta"]
    assert rans_meta.numel() == 10 and int(rans_meta[0]) == 1  # readable by tpde-hf releases before version 2
    assert cw_meta.numel() == 12 and int(cw_meta[0]) == 2
    assert DELTA_CODES[int(cw_meta[10])] == CW
    meta = parse_meta(cw_meta, "w")
    assert meta.params == cw_params() and meta.shape == (16, 256) and meta.total_bits == int(cw_meta[11]) > 0
    assert parse_meta(rans_meta, "w").params == CodecParams()
    # version 2 can hold a rANS delta too (code 0, no payload bit count)
    v2_rans = torch.cat((rans_meta, torch.tensor([0, 0])))
    v2_rans[0] = 2
    assert parse_meta(v2_rans, "w").params == CodecParams()


def _with_meta(sd: dict, index: int, value: int) -> dict:
    sd = dict(sd)
    meta = sd["layer.meta"].clone()
    meta[index] = value
    sd["layer.meta"] = meta
    return sd


@pytest.mark.parametrize(("index", "value", "message"), [
    (0, 3, "newer than this tpde-hf supports"),
    (10, 2, "unknown delta code 2"),
    (10, -1, "unknown delta code"),
    (5, 512, "class-width meta fields"),
    (6, 12, "class-width meta fields"),
    (11, -5, "invalid payload bit count"),
    (4, 48, "group size 48"),
])
def test_bad_meta_is_refused_naming_the_tensor(index, value, message):
    _, enc = encoded_cw()
    with pytest.raises(TpdeFormatError, match=message) as err:
        EncodedTensor.from_state_dict(_with_meta(stored(enc), index, value), "layer", name="layer.weight")
    assert err.value.tensor_name == "layer.weight"


def test_rans_meta_with_a_payload_bit_count_is_refused():
    w = weight((16, 256), torch.bfloat16, seed=1)
    meta = stored(encode_tensor(w, CodecParams()))["layer.meta"]
    v2 = torch.cat((meta, torch.tensor([0, 77])))
    v2[0] = 2
    with pytest.raises(TpdeFormatError, match="payload bit count"):
        parse_meta(v2, "w")


def test_truncated_or_mistyped_parts_are_refused_before_decoding():
    _, enc = encoded_cw()
    sd = stored(enc)
    for key, bad, message in [
        ("layer.delta", sd["layer.delta"][:-1], "words"),
        ("layer.delta", sd["layer.delta"].view(torch.uint8), "words"),
        ("layer.tables", sd["layer.tables"][:, :-1], "header"),
        ("layer.lanes", sd["layer.lanes"].to(torch.int64), "offsets"),
    ]:
        with pytest.raises(TpdeFormatError, match=message) as err:
            EncodedTensor.from_state_dict({**sd, key: bad}, "layer", name="layer.weight")
        assert err.value.tensor_name == "layer.weight"


def test_inconsistent_layout_fails_the_decode_and_the_packing():
    """A header whose widths do not add up to the stored offsets passes the cheap check at load, and is
    caught before any read: by the decoder and by ``PackedWeight`` (whose kernels trust the widths)."""
    _, enc = encoded_cw((20, 300))
    header = enc.tables.clone()
    header[3, 1, 0] ^= 0x1  # one class's width code changes by one
    bad = dataclasses.replace(enc, tables=header)
    bad.validate()
    for build in (lambda: decode_tensor(bad), lambda: PackedWeight.from_encoded(bad)):
        with pytest.raises(TpdeFormatError, match="disagree|add up") as err:
            build()
        assert err.value.tensor_name == "layer.weight"


def test_checksum_catches_a_flipped_payload_bit():
    _, enc = encoded_cw()
    words = enc.delta.clone()
    words[5] ^= 1 << 7
    bad = dataclasses.replace(enc, delta=words)
    decode_tensor(bad)  # the layout is intact, so only the checksum can tell
    with pytest.raises(TpdeFormatError, match="checksum"):
        decode_tensor(bad, verify=True)


def test_chunked_encode_and_decode_equal_one_chunk(monkeypatch):
    """Rows are coded in chunks whose bit streams join mid-word; the result must not depend on the chunking."""
    w = weight((41, 2100), torch.float32, seed=3)
    whole = encode_tensor(w, cw_params(64))
    monkeypatch.setattr(class_width, "CHUNK_ELEMENTS", 2100 * 4)  # 4 rows per chunk, 11 chunks
    chunked = encode_tensor(w, cw_params(64))
    for part in ("delta", "lanes", "tables"):
        assert torch.equal(getattr(whole, part), getattr(chunked, part)), part
    assert_bit_exact(decode_tensor(whole, verify=True), w)


def test_decode_tensors_keeps_order_across_codes():
    ws = [weight((12 + i, 200), torch.bfloat16, seed=i) for i in range(4)]
    encs = [encode_tensor(w, cw_params() if i % 2 else CodecParams(), name=f"w{i}") for i, w in enumerate(ws)]
    for backend in ("compiled", "numpy"):
        with use_backend(backend):
            for w, back in zip(ws, decode_tensors(encs, verify=True), strict=True):
                assert_bit_exact(back, w)


def test_sizes_and_inspect():
    w, enc = encoded_cw((64, 1024), adversarial=False)
    sizes = enc.nbytes()
    assert sizes["delta"] == sum(t.numel() * t.element_size() for t in (enc.delta, enc.lanes, enc.tables))
    assert sizes["meta"] == 12 * 8
    info = inspect_tensor(enc, w)
    assert info["delta_code"] == CW and info["spans"] == 1 and "lanes" not in info
    rans = encode_tensor(w, CodecParams(group_size=64))
    # the class-width delta is larger than rANS, but far below the 16 bits of the source
    assert rans.nbytes()["delta"] < sizes["delta"] < w.numel() * 2 * 0.75
    with pytest.raises(ValueError, match="no rANS lanes"):
        enc.lane_fields()


def test_unknown_delta_code_is_refused():
    with pytest.raises(TpdeFormatError, match="delta code"):
        encode_tensor(torch.zeros(4, 128, dtype=torch.bfloat16), CodecParams(delta_code="huffman"))


# ==================================================================== PackedWeight and the kernels' entry points
def test_packed_weight_holds_the_stored_parts_and_moves_them():
    w, enc = encoded_cw()
    pw = PackedWeight.from_encoded(enc)
    assert pw.delta_code == CW and pw.has_delta and pw.words is None
    assert pw.delta_tensors().keys() == {"cw_words", "cw_offsets", "cw_header"}
    assert pw.delta_nbytes == enc.nbytes()["delta"]
    assert "class-width" in repr(pw)
    base_only = pw.drop_delta()
    assert not base_only.has_delta
    with pytest.raises(ValueError, match="only the 4-bit base"):
        reconstruct(base_only, backend="torch")
    moved = pw.delta_to("meta")
    with pytest.raises(ValueError, match="the delta is on meta"):
        moved.require_delta()
    assert_bit_exact(reconstruct(PackedWeight.from_encoded(enc, delta=True).to("cpu"), backend="torch"), w)


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_entry_points_are_bit_exact(dtype):
    w, enc = encoded_cw(dtype=dtype)
    pw = PackedWeight.from_encoded(enc)
    assert_bit_exact(reconstruct(pw, backend="torch"), w)
    out = torch.empty_like(w)
    assert reconstruct(pw, out, backend="torch") is out
    assert_bit_exact(out, w)
    w_fin = weight((37, 300), dtype, seed=0, adversarial=False)
    pw = PackedWeight.from_encoded(encode_tensor(w_fin, cw_params(64)))
    x = torch.randn(2, 3, 300).to(dtype)
    assert torch.equal(lossless_linear(x, pw, backend="torch"), torch.nn.functional.linear(x, w_fin))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_reconstruct_is_bit_exact(device, dtype):
    w, enc = encoded_cw((19, 1100), dtype=dtype, group_size=64, seed=2)
    pw = PackedWeight.from_encoded(enc, device)
    assert_bit_exact(reconstruct(pw, backend="triton"), w)
    out = torch.empty(w.shape, dtype=dtype, device=device)
    assert reconstruct(pw, out, backend="triton") is out
    assert_bit_exact(out, w)
    for bad in (torch.empty(w.shape[::-1], dtype=dtype, device=device), out.t().contiguous().t(),
                torch.empty(w.shape, dtype=dtype, device="meta")):
        with pytest.raises(ValueError, match="out must be"):
            reconstruct(pw, bad, backend="triton")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("dtype", "rows"), [(torch.bfloat16, 1), (torch.float16, 3), (torch.float32, 13),
                                             (torch.float32, 17)])
def test_triton_lossless_linear(device, dtype, rows):
    """Fused (up to 16 rows: within the ``F.linear`` bound; fp32 at 13 rows takes two programs of 8 batch rows)
    and unfused (bit-identical to the dense matmul)."""
    w = weight((21, 300), dtype, seed=rows, adversarial=False)
    pw = PackedWeight.from_encoded(encode_tensor(w, cw_params(64)), device)
    x = torch.randn(rows, 300, generator=torch.Generator().manual_seed(rows)).to(dtype).to(device)
    bias = torch.randn(21).to(dtype).to(device)
    y = lossless_linear(x, pw, bias, backend="triton")
    assert_matmul_close(y, x, w, bias)
    exact = lossless_linear(x, pw, bias, backend="triton", fused=False)
    assert torch.equal(exact.cpu(), torch.nn.functional.linear(x, w.to(device), bias).cpu())


# ==================================================================== the nn layer and a repo in transformers
def test_tpde_linear_from_dense_is_bit_exact():
    torch.manual_seed(0)
    lin = torch.nn.Linear(300, 40, dtype=torch.bfloat16)
    layer = TpdeLinear.from_dense(lin, params=cw_params(64))
    x = torch.randn(2, 300, dtype=torch.bfloat16)
    assert torch.equal(layer(x), lin(x))
    assert_bit_exact(layer.weight_tensor(), lin.weight.detach())
    assert parse_meta(layer.meta, "w").params.delta_code == CW


@pytest.fixture(scope="module", params=["llama-untied", "gpt2", "mixtral"])
def cw_repo(request, tmp_path_factory) -> tuple[Path, Path]:
    """A dense family with its lm_head converted, GPT-2's transposed Conv1D, and fused MoE experts."""
    keep = () if request.param == "llama-untied" else ("lm_head",)
    model = tiny_model(request.param)
    return save_pair(model, tmp_path_factory.mktemp(request.param), keep_dense=keep, params=cw_params(32))


IDS = torch.tensor([[5, 17, 42, 99, 3, 77, 120, 8, 61, 33, 150, 12]])


@pytest.mark.parametrize("mode", ["lossless", "dequantize"])
def test_repo_loads_bit_exact_in_transformers(cw_repo, mode):
    dense, tpde = cw_repo
    qc = json.loads((tpde / "config.json").read_text())["quantization_config"]
    assert qc["delta_code"] == CW and qc["format_version"] == 2
    ref = AutoModelForCausalLM.from_pretrained(dense)
    model = AutoModelForCausalLM.from_pretrained(tpde, quantization_config=TpdeConfig(mode=mode, verify=True))
    assert any(isinstance(m, TpdeLinear) for m in model.modules()) == (mode == "lossless")
    with torch.no_grad():
        assert_bit_equal(model(IDS).logits, ref(IDS).logits, f"{mode} logits")
        assert torch.equal(model.generate(IDS, max_new_tokens=4, do_sample=False, pad_token_id=0),
                           ref.generate(IDS, max_new_tokens=4, do_sample=False, pad_token_id=0))


def test_repo_base_mode_is_the_rans_repos_base(cw_repo, tmp_path):
    """The base does not depend on the delta code, so ``base`` mode gives the same logits either way."""
    dense, tpde = cw_repo
    from tpde_repo_helpers import make_tpde_repo

    keep = () if "llama" in dense.parent.name else ("lm_head",)
    rans = make_tpde_repo(dense, tmp_path / "rans", keep_dense=keep, params=CodecParams(group_size=32))
    cfg = TpdeConfig(mode="base")
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(tpde, quantization_config=cfg)(IDS).logits
        b = AutoModelForCausalLM.from_pretrained(rans, quantization_config=TpdeConfig(mode="base"))(IDS).logits
    assert_bit_equal(a, b, "base logits")


@pytest.mark.parametrize(("fields", "message"), [
    ({"delta_code": "huffman"}, "delta_code='huffman' is unknown"),
    ({"delta_code": CW, "format_version": 1}, "needs format_version 2"),
    ({"format_version": 3}, "newer than this tpde-hf"),
])
def test_config_refuses_what_it_cannot_read(fields, message):
    cfg = TpdeConfig(**{"format_version": 2, "bits": 4, "group_size": 128, **fields})
    with pytest.raises(TpdeFormatError, match=message):
        cfg.check_format()


# ==================================================================== conversion
def test_convert_with_class_width_is_verified_and_documented(tiny_llama_dir: Path, tmp_path: Path):
    out = tmp_path / "cw"
    report = convert(tiny_llama_dir, out, workers=1, delta_code=CW)
    assert report.verified and report.codec["delta_code"] == CW and "class-width delta" in report.summary_table()
    assert verify_repo(out).ok
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["delta_code"] == CW and qc["format_version"] == 2
    assert not {"lane_len", "prob_bits", "sym_k", "sym_m"} & set(qc)  # rANS parameters mean nothing here
    card = ModelCard.load(out / "README.md")
    assert "class-width" in card.text and "format version 2" in card.text
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(out, quantization_config=TpdeConfig(mode="lossless"))
    ids = torch.tensor([[1, 5, 9, 200, 31]])
    with torch.no_grad():
        assert_bit_equal(model(ids).logits, ref(ids).logits, "converted class-width logits")
    rans = convert(tiny_llama_dir, tmp_path / "rans", workers=1)
    assert rans.bits_per_weight()["total"] < report.bits_per_weight()["total"]

    # a corrupt class-width delta: verification names the tensor
    shard = out / "model.safetensors"
    info = read_header(shard)["model.layers.0.mlp.down_proj.delta"]
    data = bytearray(shard.read_bytes())
    data[(info.begin + info.end) // 2] ^= 0x5A
    shard.write_bytes(bytes(data))
    result = verify_repo(out, raise_on_error=False)
    assert not result.ok and any(f.startswith("model.layers.0.mlp.down_proj.weight") for f in result.failures)


def test_cli_takes_the_delta_code():
    args = build_parser().parse_args(["convert", "src", "out", "--delta-code", CW])
    assert args.delta_code == CW
    assert build_parser().parse_args(["convert", "src", "out"]).delta_code == "rans"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["convert", "src", "out", "--delta-code", "zip"])



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("delta_code", ["rans", CW])
def test_cuda_model_through_the_kernels(tmp_path, delta_code):
    """On CUDA, every converted linear runs through the Triton kernels: ``lossless`` and ``lossless-offload``
    give the dense model's logits bit for bit; the fused GEMV (``fused_gemv=True``) within matmul tolerance."""
    params = CodecParams(group_size=32, delta_code=delta_code)
    dense, tpde = save_pair(tiny_model("llama-untied"), tmp_path, keep_dense=(), params=params)
    ids = IDS.cuda()
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(dense, device_map="cuda")(ids).logits
        for mode in ("lossless", "lossless-offload"):
            cfg = TpdeConfig(mode=mode)
            model = AutoModelForCausalLM.from_pretrained(tpde, device_map="cuda", quantization_config=cfg)
            assert_bit_equal(model(ids).logits, ref, f"{delta_code} {mode} logits on CUDA")
        fused = AutoModelForCausalLM.from_pretrained(tpde, device_map="cuda",
                                                     quantization_config=TpdeConfig(mode="lossless", fused_gemv=True))
        step = fused(ids[:, :1]).logits  # one token: a batch of 1, the fused path
        ref_step = AutoModelForCausalLM.from_pretrained(dense, device_map="cuda")(ids[:, :1]).logits
    torch.testing.assert_close(step.float(), ref_step.float(), atol=2e-2, rtol=2e-2)
