"""A conversion laid out by a base storage skips the resident delta encode, and writes the same bytes.

With ``--storage S`` the writer needs of the resident encode only the base, the checksum and the meta
(:func:`tpde_hf.codec.tensor_codec.encode_base_and_meta`); the storage codes its own delta. Checked here,
against the full encode (what the writer did before, :func:`tpde_hf.storage_format.stored_parts` of
:func:`encode_tensor`), tensor by tensor on the bytes: the base, meta and checksum (every dtype, +-0,
subnormals, inf/NaN, partial groups, both quantizers, both backends); each weight's stored parts; and the
shards of converted tiny Llamas (bf16, fp32, a class-width meta, ``narrow-rans`` and ``resident``), which
then load bit for bit in every mode. ``narrow-rans`` runs no resident encode at all; ``resident`` (which
stores the resident delta) still gets it, and class-width (whose meta records the delta's bit count) keeps
the full encode.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file
from tpde_repo_helpers import assert_bit_equal, tiny_model

import tpde_hf
from tpde_hf.codec import CodecParams, encode_tensor, storage_resident
from tpde_hf.codec.backend import use_backend
from tpde_hf.codec.registry import BASE_STORAGE, STORAGE_TOKEN
from tpde_hf.codec.tensor_codec import encode_base_and_meta, meta_needs_delta
from tpde_hf.conversion import convert, worker
from tpde_hf.format import module_prefix
from tpde_hf.storage_format import reads_resident_delta, stored_parts

pytest.importorskip("tpde_hf.codec.storage")
NARROW = "narrow-rans"
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _special_weight(shape: tuple[int, int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random weights (std 0.02) with +-0, subnormals, +-inf, NaN and an outlier at the front."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    tiny = torch.finfo(dtype).tiny
    specials = torch.tensor([0.0, -0.0, tiny / 4, -tiny / 2, float("inf"), float("-inf"), float("nan"), 3.0],
                            dtype=torch.float32).to(dtype)
    n = min(w.numel(), specials.numel())
    w.view(-1)[:n] = specials[:n]
    return w


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8).flatten()


def _assert_same_parts(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(got) == sorted(want), what
    for k, t in want.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape, (what, k)
        assert torch.equal(_bytes(got[k]), _bytes(t)), (what, k)


def _no_resident_encode(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the writer ran the resident delta encode")

    monkeypatch.setattr(worker, "encode_tensors", refuse)
    monkeypatch.setattr(storage_resident, "encode_tensor", refuse)  # where a storage would run it itself


# ==================================================================== base, meta, checksum
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["compiled", "numpy"])
def test_base_meta_and_checksum_are_the_full_encodes(dtype: torch.dtype, backend: str) -> None:
    with use_backend(backend):
        for i, (shape, group, quantizer) in enumerate([((7, 300), 128, "minmax"), ((33, 64), 32, "minmax"),
                                                       ((5, 200), 64, "search"), ((1, 1), 128, "minmax")]):
            w = _special_weight(shape, dtype, seed=i)
            params = CodecParams(group_size=group, base_quantizer=quantizer, storage=NARROW)
            base, meta, checksum = encode_base_and_meta(w, params, "w.weight")
            enc = encode_tensor(w, params, "w.weight")
            what = (backend, dtype, shape, quantizer)
            assert checksum == enc.checksum, what
            assert meta.dtype == torch.int64 and torch.equal(meta, enc.meta_tensor()), what
            for k in ("qweight", "scales", "zeros"):
                assert torch.equal(_bytes(getattr(base, k)), _bytes(getattr(enc, k))), (*what, k)


def test_a_meta_that_records_the_delta_keeps_the_full_encode() -> None:
    params = CodecParams(delta_code="class-width", storage=NARROW)
    assert meta_needs_delta(params) and not meta_needs_delta(CodecParams(storage=NARROW))
    assert not worker.skips_resident_delta(params) and worker.skips_resident_delta(CodecParams(storage=NARROW))
    assert not worker.skips_resident_delta(CodecParams())  # the resident layout writes the delta
    w = _special_weight((6, 130), torch.bfloat16, seed=9)
    with pytest.raises(ValueError, match="class-width"):
        encode_base_and_meta(w, params, "w.weight")
    with pytest.raises(ValueError, match="class-width"):
        worker.encode_written({"w.weight": w}, params, skip_delta=True)
    assert encode_tensor(w, params, "w.weight").meta_tensor()[11] > 0  # total_bits: not known before the encode


# ==================================================================== one task's parts
@pytest.mark.parametrize("dtype", DTYPES)
def test_narrow_rans_parts_equal_the_full_paths_without_a_resident_encode(
        dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = {f"m.l{i}.weight": _special_weight(shape, dtype, seed=10 + i)
               for i, shape in enumerate([(16, 300), (9, 128), (40, 70)])}
    params = CodecParams(storage=NARROW)
    want = {n: stored_parts(encode_tensor(w, params, n), w, module_prefix(n)) for n, w in weights.items()}
    full = worker.encode_written(weights, params, skip_delta=False)
    _no_resident_encode(monkeypatch)
    got = worker.encode_written(weights, params)
    for n in weights:
        _assert_same_parts(got[n].parts, want[n], n)
        _assert_same_parts(full[n].parts, want[n], n)
        _assert_same_parts(got[n].base, full[n].base, n)
        assert got[n].checksum == full[n].checksum


def test_a_storage_that_reads_the_resident_delta_gets_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """``resident`` declares that it stores the writer's delta: every task encodes in full up front, once."""
    weights = {f"m.l{i}.weight": _special_weight((12, 200), torch.bfloat16, seed=20 + i) for i in range(2)}
    params = CodecParams(storage="resident")
    want = {n: stored_parts(encode_tensor(w, params, n), w, module_prefix(n)) for n, w in weights.items()}
    calls = []
    real = worker.encode_tensors
    monkeypatch.setattr(worker, "encode_tensors", lambda ws, p: calls.append(list(ws)) or real(ws, p))
    assert reads_resident_delta("resident") and not reads_resident_delta(NARROW)
    assert not worker.skips_resident_delta(params)
    got = worker.encode_written(weights, params)
    assert calls == [list(weights)]
    for n in weights:
        _assert_same_parts(got[n].parts, want[n], n)


def test_a_storage_that_declares_nothing_gets_the_resident_encode(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plug-in storage without ``reads_resident_delta`` may read ``context.options["encoded"]``: the writer
    assumes it does (the safe default) and hands over the full encode."""
    seen = []

    class Plain:
        name = "test-plain-storage"

        def encode(self, weight, base, context):
            enc = context.options["encoded"]
            seen.append(enc is not None and torch.equal(enc.delta, encode_tensor(weight, CodecParams(),
                                                                                 context.key).delta))
            return {"base_qweight": base["qweight"], "blob": enc.delta}

        def decode_base(self, parts, context):
            raise NotImplementedError

        def decode(self, parts, context):
            raise NotImplementedError

    monkeypatch.setitem(BASE_STORAGE._codecs, Plain.name, Plain())
    params = CodecParams(storage=Plain.name)
    assert reads_resident_delta(Plain.name) and not worker.skips_resident_delta(params)
    w = _special_weight((8, 130), torch.bfloat16, seed=40)
    worker.encode_written({"m.l.weight": w}, params)
    assert seen == [True]


# ==================================================================== converted repos
def _source(root: Path, dtype: torch.dtype) -> tuple[Path, torch.nn.Module]:
    model = tiny_model("llama-untied", dtype=dtype)
    with torch.no_grad():  # the specials in a converted weight (its logits are then not compared)
        w = model.model.layers[0].mlp.up_proj.weight
        w.copy_(_special_weight(tuple(w.shape), dtype, seed=31))
    model.save_pretrained(root / "src")
    return root / "src", model


def _shard(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _load(folder: Path, dtype: torch.dtype, **options) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, quantization_config=tpde_hf.TpdeConfig(**options)).eval()


CASES = [(torch.bfloat16, NARROW, "rans"), (torch.float32, NARROW, "rans"),
         (torch.bfloat16, "resident", "rans"), (torch.bfloat16, NARROW, "class-width")]


@pytest.mark.parametrize(("dtype", "storage", "code"), CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_converted_shards_equal_the_full_encodes_and_load_bit_exact(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, storage: str, code: str) -> None:
    src, model = _source(tmp_path, dtype)
    if storage == NARROW and code == "rans":
        _no_resident_encode(monkeypatch)  # the whole conversion runs without one
    convert(src, tmp_path / "out", storage=storage, delta_code=code)
    monkeypatch.undo()

    manifest = json.loads((tmp_path / "out" / "tpde_manifest.json").read_text())["tensors"]
    converted = sorted(n for n, e in manifest.items() if e["encoded"])
    assert len(converted) >= 2  # the never-larger rule keeps tiny weights dense in the resident layout
    assert storage == "resident" or "model.layers.0.mlp.up_proj.weight" in converted  # the specials
    source, shard = load_file(src / "model.safetensors"), _shard(tmp_path / "out")
    params = CodecParams(delta_code=code, storage=storage)
    seen = set()
    for name in converted:  # what the writer wrote before: stored_parts of the full encode
        want = stored_parts(encode_tensor(source[name], params, name), source[name], module_prefix(name))
        _assert_same_parts({k: shard[k] for k in want}, want, name)
        seen.update(want)
    rest = set(shard) - seen
    assert not any(STORAGE_TOKEN in k for k in rest)
    for k in rest:  # the dense tensors, as in the source
        assert torch.equal(_bytes(shard[k]), _bytes(source[k])), k
    if code == "class-width":
        assert all(int(shard[f"{module_prefix(n)}.{STORAGE_TOKEN}.{storage}.meta"][11]) > 0 for n in converted)

    ref = model.state_dict()
    for mode in ("dequantize", "lossless"):
        loaded = _load(tmp_path / "out", dtype, mode=mode)
        state = (loaded.dequantize() if mode == "lossless" else loaded).state_dict()
        for k, t in ref.items():
            assert_bit_equal(state[k], t, f"{k} ({mode})")
    state = _load(tmp_path / "out", dtype, mode="base").state_dict()
    for name in converted:  # base: the resident base and meta of the full encode, and no delta
        p, enc = module_prefix(name), encode_tensor(source[name], params, name)
        for k in ("qweight", "scales", "zeros"):
            assert torch.equal(_bytes(state[f"{p}.{k}"]), _bytes(getattr(enc, k))), (p, k)
        assert torch.equal(state[f"{p}.meta"], enc.meta_tensor()) and f"{p}.delta" not in state


def test_offload_host_delta_from_a_skipped_conversion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``lossless-offload`` (CUDA to load): its host-delta step rebuilds the full encode's resident delta."""
    from tpde_hf.nn.offload import host_delta, setup_offload

    src, _ = _source(tmp_path, torch.bfloat16)
    _no_resident_encode(monkeypatch)
    convert(src, tmp_path / "out", storage=NARROW)
    monkeypatch.undo()
    source = load_file(src / "model.safetensors")
    q = _load(tmp_path / "out", torch.bfloat16, mode="base").hf_quantizer
    setup_offload(q._holders, q._plan.weights, verify=True)
    assert len(q._holders) >= 7
    for prefix, holder in q._holders.items():
        enc = encode_tensor(source[f"{prefix}.weight"], CodecParams(), f"{prefix}.weight")
        for s in ("delta", "lanes", "tables"):
            assert torch.equal(_bytes(host_delta(holder)[s]), _bytes(getattr(enc, s))), (prefix, s)


def test_cli_storage_conversion_skips_the_resident_encode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tpde_hf.conversion.cli import main

    src, _ = _source(tmp_path, torch.bfloat16)
    _no_resident_encode(monkeypatch)
    assert main(["convert", str(src), str(tmp_path / "cli"), "--storage", NARROW]) == 0
    assert main(["verify", str(tmp_path / "cli")]) == 0
    with safe_open(tmp_path / "cli" / "model.safetensors", "pt") as fh:
        assert any(f".{STORAGE_TOKEN}.{NARROW}.delta_blob" in k for k in fh.keys())
