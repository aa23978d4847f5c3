"""Repos whose converted weights a base storage lays out on disk (``tpde convert --storage NAME``).

A test storage, ``test-raw``, stores the resident base under ``base_*`` and the weight's raw bits: the
simplest codec that follows :class:`~tpde_hf.codec.registry.BaseStorage`. The repos converted end to end
use the built-in ``resident`` storage (test-raw is larger than the source, so the converter would keep
every weight dense). Together they hold the format, writer, loader and verifier to the protocol
whatever the real storages do. Checked here: the
parts and keys written, each mode's load bit for bit (``base``: the same base as the resident layout,
without reading the other parts), ``tpde verify``, a fused-expert model and a 3-D expert model, and
seeded corruption of every stored part (each case loads exactly or raises a clear error).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from tpde_repo_helpers import assert_bit_equal, tiny_model

import tpde_hf
from tpde_hf.codec import CodecParams, encode_tensor
from tpde_hf.codec.ordinal import INT_VIEW
from tpde_hf.codec.registry import BASE_STORAGE, CodecContext, storage_key
from tpde_hf.conversion import convert
from tpde_hf.conversion.streaming import read_header
from tpde_hf.conversion.verify import verify_repo
from tpde_hf.errors import TpdeFormatError
from tpde_hf.format import CONFIG_NAME
from tpde_hf.storage_format import (
    decode_base,
    decode_weight,
    resident_parts,
    storage_weights,
    stored_parts,
    stored_sizes,
)

RAW = "test-raw"


class RawStorage:
    """The resident base as ``base_*``, the weight's bits as ``bits``."""

    name = RAW

    def encode(self, weight: torch.Tensor, base: dict, context: CodecContext) -> dict[str, torch.Tensor]:
        assert context.options["shape"] == tuple(weight.shape) and context.options["dtype"] == weight.dtype
        return {"base_qweight": base["qweight"], "base_scales": base["scales"], "base_zeros": base["zeros"],
                "bits": weight.contiguous().view(INT_VIEW[weight.dtype])}

    def decode_base(self, parts: dict, context: CodecContext) -> dict[str, torch.Tensor]:
        assert not any(not p.startswith("base_") for p in parts), "base mode must see only base_* parts"
        return {"qweight": parts["base_qweight"], "scales": parts["base_scales"], "zeros": parts["base_zeros"]}

    def decode(self, parts: dict, context: CodecContext) -> torch.Tensor:
        bits, dtype = parts["bits"], context.options["dtype"]
        if bits.dtype != INT_VIEW[dtype] or tuple(bits.shape) != context.options["shape"]:
            raise ValueError(f"bits is {bits.dtype}{list(bits.shape)}")
        return bits.view(dtype)


BASE_STORAGE.register(RawStorage)


def _special_weight(shape: tuple[int, int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    flat = w.view(-1)
    tiny = torch.finfo(dtype).tiny
    specials = torch.tensor([0.0, -0.0, tiny / 4, -tiny / 2, float("inf"), float("-inf"), float("nan"), 1e-3],
                            dtype=torch.float32).to(dtype)
    flat[: min(flat.numel(), specials.numel())] = specials[: flat.numel()]
    return w


def _parts(weight: torch.Tensor, params: CodecParams, prefix: str = "w") -> dict[str, torch.Tensor]:
    enc = encode_tensor(weight, params, f"{prefix}.weight")
    keys = stored_parts(enc, weight, prefix)
    return {k.rsplit(".", 1)[1]: t for k, t in keys.items()}


# ==================================================================== the layout and its decodes
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(3, 5), (17, 300), (64, 256)])
@pytest.mark.parametrize("code", ["rans", "class-width"])
@pytest.mark.parametrize("storage", [RAW, "resident"])
def test_storage_parts_decode_bit_exact(dtype: torch.dtype, shape: tuple[int, int], code: str, storage: str) -> None:
    w = _special_weight(shape, dtype, seed=shape[0])
    params = CodecParams(group_size=32 if shape[1] < 100 else 128, delta_code=code, storage=storage)
    enc = encode_tensor(w, params, "w.weight")
    stored = stored_parts(enc, w, "w")
    others = ("bits",) if storage == RAW else ("delta", "lanes", "tables")
    assert set(stored) == {storage_key("w", storage, p) for p in ("meta", "base_qweight", "base_scales",
                                                                 "base_zeros", *others)}
    parts = {k.rsplit(".", 1)[1]: t for k, t in stored.items()}
    assert_bit_equal(decode_weight("w.weight", storage, parts, verify=True), w, "decoded weight")
    base = decode_base("w.weight", storage, {p: t for p, t in parts.items() if p not in others})
    for k in ("qweight", "scales", "zeros", "meta"):
        assert torch.equal(base[k], getattr(enc, k) if k != "meta" else enc.meta_tensor()), k
    resident = resident_parts("w.weight", storage, parts)
    for k, t in enc.to_state_dict("x").items():
        assert torch.equal(resident[k[2:]], t), k
    sizes = stored_sizes(stored)
    assert sizes["meta"] == enc.meta_tensor().numel() * 8
    if storage == RAW:
        assert sizes["delta"] == w.numel() * w.element_size()
    else:  # the same bytes as the resident layout
        assert {k: sizes[k] for k in ("base", "delta", "meta")} == {k: enc.nbytes()[k] for k in ("base", "delta",
                                                                                                 "meta")}


def test_a_storage_must_write_base_parts_and_no_meta() -> None:
    class NoBase(RawStorage):
        name = "test-nobase"

        def encode(self, weight, base, context):
            return {"bits": weight.view(INT_VIEW[weight.dtype])}

    class Meta(RawStorage):
        name = "test-meta"

        def encode(self, weight, base, context):
            return {**super().encode(weight, base, context), "meta": torch.zeros(1)}

    BASE_STORAGE.register(NoBase)
    BASE_STORAGE.register(Meta)
    w = torch.randn(8, 64).to(torch.bfloat16)
    for name, msg in (("test-nobase", "no base_"), ("test-meta", "'meta'")):
        with pytest.raises(ValueError, match=msg):
            _parts(w, CodecParams(group_size=32, storage=name))
    with pytest.raises(TpdeFormatError, match="base storage 'nope'"):
        CodecParams(storage="nope").validate("x.weight")


def test_seeded_corruption_of_every_part_loads_exactly_or_raises() -> None:
    """Flip bits / truncate each stored part: the lossless rebuild and a verified decode are exact or refuse."""
    w = _special_weight((24, 200), torch.bfloat16, seed=7)
    params = CodecParams(group_size=64, storage=RAW)
    good = _parts(w, params)
    want = resident_parts("w.weight", RAW, good)
    rng = random.Random(1234)
    outcomes = {"exact": 0, "refused": 0}
    for case in range(120):
        part = rng.choice(sorted(good))
        raw = good[part].contiguous().view(torch.uint8).flatten().clone()
        if case % 4 == 3:  # truncate
            cut = rng.randrange(raw.numel())
            bad_t = raw[:cut]
        else:
            for _ in range(rng.randint(1, 3)):
                i = rng.randrange(raw.numel())
                raw[i] ^= 1 << rng.randrange(8)
            bad_t = raw.view(good[part].dtype).view(good[part].shape)
        bad = {**good, part: bad_t}
        try:
            got = resident_parts("w.weight", RAW, bad)
        except TpdeFormatError as exc:
            assert "w.weight" in str(exc)
            outcomes["refused"] += 1
        else:
            for k, t in want.items():
                assert torch.equal(got[k], t), (case, part, k)
            outcomes["exact"] += 1
        try:
            dec = decode_weight("w.weight", RAW, bad, verify=True)
        except TpdeFormatError:
            pass
        else:
            assert_bit_equal(dec, w, f"case {case} ({part})")
    assert outcomes["refused"] > 30 and outcomes["exact"] > 10  # the base parts are not read by the rebuild


# ==================================================================== end to end through transformers
@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, torch.nn.Module]:
    root = tmp_path_factory.mktemp("storage_llama")
    model = tiny_model("llama-untied").eval()
    model.save_pretrained(root / "src")
    convert(root / "src", root / "stored", storage="resident")  # test-raw is larger: the converter keeps it dense
    convert(root / "src", root / "resident")
    return root / "src", root / "stored", root / "resident", model


def _load(folder: Path, cls=transformers.AutoModelForCausalLM, **options) -> torch.nn.Module:
    return cls.from_pretrained(folder, dtype=torch.bfloat16,
                               quantization_config=tpde_hf.TpdeConfig(**options)).eval()


def _logits(model: torch.nn.Module, vocab: int = 160) -> torch.Tensor:
    ids = torch.randint(3, vocab, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_converted_repo_stores_every_weight_by_the_storage(llama) -> None:
    _, repo, resident, _ = llama
    cfg = json.loads((repo / CONFIG_NAME).read_text())["quantization_config"]
    assert cfg["storage"] == "resident" and "storage" not in json.loads((resident / CONFIG_NAME).read_text())[
        "quantization_config"]
    with safe_open(repo / "model.safetensors", "pt") as fh:
        keys = set(fh.keys())
    stored = storage_weights(keys)

    def encoded(folder: Path) -> set[str]:
        manifest = json.loads((folder / "tpde_manifest.json").read_text())["tensors"]
        return {n[: -len(".weight")] for n, e in manifest.items() if e["encoded"]}

    # the same weights as the resident layout (the never-larger rule sees the same bytes)
    assert set(stored) == encoded(repo) == encoded(resident) and len(stored) >= 2
    assert not any(k.endswith((".qweight", ".delta")) and ".tpde_storage." not in k for k in keys)
    assert verify_repo(repo).ok


def test_every_mode_loads_bit_exact(llama) -> None:
    _, repo, resident, model = llama
    want, ref = _logits(model), model.state_dict()
    for mode in ("dequantize", "lossless"):
        loaded = _load(repo, mode=mode)
        assert_bit_equal(_logits(loaded), want, f"logits ({mode})")
        state = (loaded.dequantize() if mode == "lossless" else loaded).state_dict()
        for name, tensor in ref.items():
            assert_bit_equal(state[name], tensor, f"{name} ({mode})")
    # base: the same 4-bit model as the resident layout's
    assert_bit_equal(_logits(_load(repo, mode="base")), _logits(_load(resident, mode="base")), "base logits")
    assert _check_base(_load(repo, mode="base"), model) >= 2


def test_lossless_holds_the_resident_layout_and_saves_it(llama, tmp_path: Path) -> None:
    _, repo, resident, model = llama
    a, b = _load(repo, mode="lossless"), _load(resident, mode="lossless")
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        if sa[k].is_floating_point():
            assert_bit_equal(sa[k], sb[k], k)
        else:  # the resident parts, rebuilt at load: the resident repo's bytes
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    a.save_pretrained(tmp_path / "saved")
    assert "storage" not in json.loads((tmp_path / "saved" / CONFIG_NAME).read_text())["quantization_config"]
    assert_bit_equal(_logits(_load(tmp_path / "saved", mode="dequantize")), _logits(model), "saved repo")


def _corrupt(repo: Path, dest: Path, suffix: str) -> str:
    import shutil

    shutil.copytree(repo, dest)
    header = read_header(dest / "model.safetensors")
    key = sorted(k for k in header if k.endswith(suffix))[0]
    with open(dest / "model.safetensors", "r+b") as fh:
        fh.seek(header[key].begin + 3)
        byte = fh.read(1)
        fh.seek(header[key].begin + 3)
        fh.write(bytes([byte[0] ^ 0x10]))
    return key.split(".tpde_storage.")[0] + ".weight"


def test_base_mode_never_reads_the_other_parts(llama, tmp_path: Path) -> None:
    _, repo, _, _ = llama
    name = _corrupt(repo, tmp_path / "bad", ".delta")
    base = _load(tmp_path / "bad", mode="base")  # the damaged part is neither read nor checked
    assert_bit_equal(_logits(base), _logits(_load(repo, mode="base")), "base logits")
    for mode in ("dequantize", "lossless"):
        with pytest.raises(TpdeFormatError, match="checksum"):
            _load(tmp_path / "bad", mode=mode)
        with pytest.raises(TpdeFormatError, match=re.escape(name)):  # the codec's own checks name the weight
            _load(tmp_path / "bad", mode=mode, check_integrity=False, verify=True)
    report = verify_repo(tmp_path / "bad", raise_on_error=False)
    assert not report.ok and any(name in f for f in report.failures)


def test_fused_experts_load_bit_exact(tmp_path: Path) -> None:
    config = transformers.AutoConfig.for_model(
        "mixtral", vocab_size=160, hidden_size=128, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=3, num_experts_per_tok=2,
        max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM._from_config(config, dtype=torch.bfloat16).eval()
    model.save_pretrained(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "stored", storage="resident")
    with safe_open(tmp_path / "stored" / "model.safetensors", "pt") as fh:
        assert any(".experts.2." in k and ".tpde_storage." in k for k in fh.keys())
    want = _logits(model)
    for mode in ("dequantize", "lossless"):
        assert_bit_equal(_logits(_load(tmp_path / "stored", mode=mode)), want, f"mixtral logits ({mode})")
    base = _load(tmp_path / "stored", mode="base")
    assert torch.isfinite(_logits(base).float()).all()
    from safetensors.torch import load_file

    ref = load_file(tmp_path / "src" / "model.safetensors")  # the per-expert stores hold each expert's base
    stores = {k[: -len(".qweight")]: v for k, v in base.state_dict().items() if k.endswith(".qweight")}
    expert = re.compile(r"layers\.(\d+)\..*experts\.(\d+)\.(w\d)")  # the checkpoint and the model name them apart
    by_expert = {m.groups(): w for k, w in ref.items() if (m := expert.search(k)) and k.endswith(".weight")}
    checked = 0
    for prefix, q in stores.items():
        if (m := expert.search(prefix)) is not None:
            assert torch.equal(q, encode_tensor(by_expert[m.groups()], CodecParams(), prefix).qweight), prefix
            checked += 1
    assert checked == 3 * 3
    assert verify_repo(tmp_path / "stored").ok


def test_3d_expert_slices_load_bit_exact(tmp_path: Path) -> None:
    config = transformers.AutoConfig.for_model(
        "gpt_oss", vocab_size=256, hidden_size=128, num_hidden_layers=1, num_attention_heads=4, head_dim=32,
        num_key_value_heads=4, intermediate_size=128, num_local_experts=3, num_experts_per_tok=2,
        max_position_embeddings=64, layer_types=["full_attention"])
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM._from_config(config, dtype=torch.bfloat16).eval()
    model.save_pretrained(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "stored", storage="resident")
    with safe_open(tmp_path / "stored" / "model.safetensors", "pt") as fh:
        assert any(".tpde_expert" in k and ".tpde_storage." in k for k in fh.keys())
    want = _logits(model, 256)
    for mode in ("dequantize", "lossless"):
        loaded = _load(tmp_path / "stored", transformers.GptOssForCausalLM, mode=mode)
        assert_bit_equal(_logits(loaded, 256), want, f"gpt-oss logits ({mode})")
    assert torch.isfinite(_logits(_load(tmp_path / "stored", transformers.GptOssForCausalLM, mode="base"),
                                  256).float()).all()
    assert verify_repo(tmp_path / "stored").ok


def test_offload_builds_the_host_delta_from_the_storage(llama) -> None:
    """``lossless-offload`` needs CUDA to load; its host-delta step runs here on the holders of a base load."""
    from tpde_hf.nn.holder import encoded_of
    from tpde_hf.nn.offload import host_delta, setup_offload

    src, repo, resident, model = llama
    stored, plain = _load(repo, mode="base"), _load(resident, mode="lossless")
    q = stored.hf_quantizer
    setup_offload(q._holders, q._plan.weights, verify=True)
    ref = model.state_dict()
    plain_sd = plain.state_dict()
    for prefix, holder in q._holders.items():
        for s in ("delta", "lanes", "tables"):
            assert torch.equal(host_delta(holder)[s], plain_sd[f"{prefix}.{s}"]), (prefix, s)
        w = encoded_of(holder)
        from tpde_hf.codec import decode_tensor

        assert_bit_equal(decode_tensor(w, verify=True), ref[f"{prefix}.weight"], prefix)
        # with the kernels, only the shard and the stored parts are remembered: read back through the storage
        source = (str(repo / "model.safetensors"), prefix, "resident", tuple(q._plan.weights[prefix].parts))
        holder.__dict__["_tpde_delta_source"] = source
        del holder.__dict__["_tpde_host_delta"]
        for s in ("delta", "lanes", "tables"):
            assert torch.equal(host_delta(holder)[s], plain_sd[f"{prefix}.{s}"]), (prefix, s)


def test_cli_storage_option_and_manifest(llama, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tpde_hf.conversion.cli import main
    from tpde_hf.loading.ops import write_manifest

    src, repo, _, _ = llama
    assert main(["convert", str(src), str(tmp_path / "cli"), "--storage", "resident"]) == 0
    assert json.loads((tmp_path / "cli" / CONFIG_NAME).read_text())["quantization_config"]["storage"] == "resident"
    written = json.loads((tmp_path / "cli" / "tpde_manifest.json").read_text())
    assert write_manifest(str(tmp_path / "cli")) == written  # the loader's manifest writer reads the layout too
    assert main(["verify", str(tmp_path / "cli")]) == 0
    assert main(["convert", str(src), str(tmp_path / "nope"), "--storage", "no-such-storage"]) == 1
    assert "base storage 'no-such-storage'" in capsys.readouterr().err and not (tmp_path / "nope").exists()


# ==================================================================== the built-in storages, where present
def _narrow_rans() -> str:
    pytest.importorskip("tpde_hf.codec.storage")
    if "narrow-rans" not in BASE_STORAGE:
        pytest.skip("no narrow-rans storage in this tree")
    return "narrow-rans"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_narrow_rans_through_the_format(dtype: torch.dtype) -> None:
    storage = _narrow_rans()
    w = _special_weight((33, 300), dtype, seed=5)
    enc = encode_tensor(w, CodecParams(storage=storage), "w.weight")
    parts = {k.rsplit(".", 1)[1]: t for k, t in stored_parts(enc, w, "w").items()}
    assert_bit_equal(decode_weight("w.weight", storage, parts, verify=True), w, "decoded weight")
    base = decode_base("w.weight", storage, {p: t for p, t in parts.items() if p == "meta" or p.startswith("base_")})
    for k in ("qweight", "scales", "zeros"):
        assert torch.equal(base[k], getattr(enc, k)), k
    resident = resident_parts("w.weight", storage, parts)
    for k, t in enc.to_state_dict("x").items():
        assert torch.equal(resident[k[2:]], t), k


def test_narrow_rans_repo_loads_in_every_mode(llama, tmp_path: Path) -> None:
    storage = _narrow_rans()
    src, _, resident, model = llama
    convert(src, tmp_path / "nr", storage=storage)
    with safe_open(tmp_path / "nr" / "model.safetensors", "pt") as fh:
        assert any(f".tpde_storage.{storage}." in k for k in fh.keys())
    want = _logits(model)
    for mode in ("dequantize", "lossless"):
        assert_bit_equal(_logits(_load(tmp_path / "nr", mode=mode)), want, f"logits ({mode})")
    assert _check_base(_load(tmp_path / "nr", mode="base"), model) >= 2
    assert verify_repo(tmp_path / "nr").ok


def _check_base(loaded: torch.nn.Module, model: torch.nn.Module) -> int:
    """Every base-mode layer holds the resident base of the original weight (and no delta); returns how many."""
    ref, state = model.state_dict(), loaded.state_dict()
    prefixes = [k[: -len(".qweight")] for k in state if k.endswith(".qweight")]
    for p in prefixes:
        enc = encode_tensor(ref[f"{p}.weight"], CodecParams(), f"{p}.weight")
        for k in ("qweight", "scales", "zeros"):
            assert torch.equal(state[f"{p}.{k}"], getattr(enc, k)), (p, k)
        assert torch.equal(state[f"{p}.meta"], enc.meta_tensor()) and f"{p}.delta" not in state
    return len(prefixes)


def test_a_storage_repo_read_without_the_quantizer_is_refused(llama, tmp_path: Path) -> None:
    """config.json damaged so that it no longer names tpde: the load raises instead of random weights."""
    import shutil

    _, repo, _, _ = llama
    shutil.copytree(repo, tmp_path / "r")
    cfg = json.loads((tmp_path / "r" / CONFIG_NAME).read_text())
    del cfg["quantization_config"]
    (tmp_path / "r" / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(TpdeFormatError, match="config.json"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "r")
