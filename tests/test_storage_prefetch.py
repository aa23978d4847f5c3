"""The load's decode of storage-laid weights ahead of transformers (:mod:`tpde_hf.loading.storage_prefetch`) and the
``narrow-rans`` bin tables kept across tensors (:mod:`tpde_hf.codec.storage.table`).

Checked: bins shared across tensors (dtypes, a coarse grid, a table that grows past its capacity) decode bit for
bit like per-tensor bins; a ``narrow-rans`` repo loads bit for bit in every mode with the prefetch serving every
weight, and the same without it; a corrupt weight is reported by the loading thread under its own name; a
weight asked for before a worker started it, and a full window, fall back to the loading thread's decode.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import tpde_hf
from tpde_hf.codec import base_quant
from tpde_hf.codec.backend import limit_codec_threads
from tpde_hf.codec.ordinal import INT_VIEW
from tpde_hf.codec.registry import CodecContext
from tpde_hf.conversion import convert
from tpde_hf.errors import TpdeFormatError
from tpde_hf.loading import storage_prefetch

pytest.importorskip("tpde_hf.codec.storage")
from tpde_hf.codec.storage import NarrowRans  # noqa: E402
from tpde_hf.codec.storage import table as T  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_storage_codec import _special  # noqa: E402
from tpde_repo_helpers import assert_bit_equal, tiny_model  # noqa: E402

CODEC = NarrowRans()


def _iv(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT_VIEW[t.dtype])


def _many_scales(dtype: torch.dtype, rows: int, seed: int) -> torch.Tensor:
    """A weight whose groups span many magnitudes: more distinct scales than a table's first capacity."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, 256, generator=gen) * torch.logspace(-6, 1, rows).unsqueeze(1)
    return w.to(dtype)


@pytest.mark.parametrize("threads", [1, 2])
def test_shared_bins_decode_like_per_tensor_bins(threads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensors of every dtype, one on a coarse grid (fp16 values as fp32), and one with more distinct scales
    than the table's first capacity (it grows mid-way, keeping every bin built), decoded in one
    ``shared_bins`` block: bit for bit what per-tensor bins decode, on 1 and 2 codec threads."""
    weights = [_special(torch.bfloat16, (7, 300), seed=1), _many_scales(torch.bfloat16, 1400, seed=2),
               _special(torch.float16, (5, 129), seed=3), _special(torch.float32, (3, 260), seed=4),
               _special(torch.float16, (4, 256), seed=5).to(torch.float32), _special(torch.bfloat16, (9, 300), seed=6),
               _many_scales(torch.float16, 600, seed=7)]
    encoded = []
    for i, w in enumerate(weights):
        b = base_quant.quantize(w)
        encoded.append(CODEC.encode(w, {"qweight": b.qweight, "scales": b.scales, "zeros": b.zeros},
                                    CodecContext(f"w{i}", None, {"layout": 1 if i % 2 else 2})))
    monkeypatch.setattr(T, "FIRST_CAPACITY", 512)
    limit_codec_threads(threads)
    try:
        with T.shared_bins():
            got = [CODEC.decode(p, CodecContext(f"w{i}")) for i, p in enumerate(encoded)]
            tables = T._local.tables
            assert any(t.capacity > 512 for t in tables.values())  # grew
            assert {k[2] for k in tables} >= {0, 13}  # its own table for the coarse grid
        assert T.table_for(16, 7, 0, np.zeros(1, np.float32)) is None  # only inside the block
    finally:
        limit_codec_threads(None)
    for i, (w, g) in enumerate(zip(weights, got, strict=True)):
        assert torch.equal(_iv(g), _iv(w)), i
        assert torch.equal(_iv(CODEC.decode(encoded[i], CodecContext(f"w{i}"))), _iv(w)), i


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, torch.nn.Module]:
    root = tmp_path_factory.mktemp("storage_prefetch")
    model = tiny_model("llama-untied").eval()
    model.save_pretrained(root / "src")
    convert(root / "src", root / "nr", storage="narrow-rans")
    return root / "src", root / "nr", model


def _load(folder: Path, mode: str) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.bfloat16, quantization_config=tpde_hf.TpdeConfig(mode=mode)).eval()


def _count_takes(monkeypatch: pytest.MonkeyPatch) -> dict[tuple[str, bool], int]:
    counts: dict[tuple[str, bool], int] = {}
    take = storage_prefetch.take

    def counted(kind: str, storage: str, parts: dict) -> tuple[bool, object]:
        found, result = take(kind, storage, parts)
        counts[(kind, found)] = counts.get((kind, found), 0) + 1
        return found, result

    monkeypatch.setattr(storage_prefetch, "take", counted)
    return counts


def _stored_count(repo: Path) -> int:
    from tpde_hf.storage_format import storage_weights

    with safe_open(repo / "model.safetensors", "pt") as fh:
        return len(storage_weights(list(fh.keys())))


def test_every_mode_loads_bit_exact_from_the_prefetch(repos, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every weight of a ``dequantize`` or ``lossless`` load is served by the workers; every mode's load is bit
    for bit the same without them."""
    _, repo, model = repos
    n = _stored_count(repo)
    ref = model.state_dict()
    loaded = {}
    for use in ("1", "0"):
        monkeypatch.setenv("TPDE_STORAGE_PREFETCH", use)
        for mode, kind in (("dequantize", "weight"), ("lossless", "resident"), ("base", "base")):
            counts = _count_takes(monkeypatch)
            loaded[(use, mode)] = _load(repo, mode).state_dict()
            # base mode decodes on the loading thread (its decode is too cheap for the workers to pay)
            assert counts.get((kind, True), 0) == (n if use == "1" and mode != "base" else 0), (mode, counts)
            assert not storage_prefetch._active  # closed after the load
    for name, t in ref.items():
        assert_bit_equal(loaded[("1", "dequantize")][name], t, name)
    for mode in ("lossless", "base"):
        a, b = loaded[("1", mode)], loaded[("0", mode)]
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), (mode, k)


def test_a_corrupt_weight_is_reported_by_its_name(repos, tmp_path: Path) -> None:
    """A flipped bit in one weight's delta: the worker's decode fails, the loading thread decodes that weight
    again and raises the clear error naming it (no weight loads wrong)."""
    _, repo, _ = repos
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in repo.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            (bad / f.name).write_bytes(f.read_bytes())
    with safe_open(repo / "model.safetensors", "pt") as fh:
        meta = fh.metadata()
    sd = load_file(repo / "model.safetensors")
    key = sorted(k for k in sd if k.endswith(".tpde_storage.narrow-rans.delta_blob"))[0]
    blob = sd[key].clone()
    blob[blob.numel() // 2] ^= 0x10
    sd[key] = blob
    save_file(sd, bad / "model.safetensors", metadata=meta)
    with pytest.raises(TpdeFormatError, match=key.split(".tpde_storage.")[0].rsplit(".", 1)[-1]):
        _load(bad, "dequantize")


def test_take_falls_back_when_no_worker_will_decode_it(repos, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full window (0 bytes: the workers give up at once) and an unknown weight: ``take`` finds nothing,
    claims the weight (no worker decodes it after), and the loads still come out exact."""
    _, repo, model = repos
    monkeypatch.setattr(storage_prefetch, "WINDOW_BYTES", 0)
    monkeypatch.setattr(storage_prefetch, "IDLE_S", 0.01)
    counts = _count_takes(monkeypatch)
    state = _load(repo, "dequantize").state_dict()
    assert counts.get(("weight", True), 0) == 0 and counts.get(("weight", False), 0) == _stored_count(repo)
    for name, t in model.state_dict().items():
        assert_bit_equal(state[name], t, name)
    monkeypatch.setattr(storage_prefetch, "WINDOW_BYTES", 1 << 30)
    pf = storage_prefetch.StoragePrefetch([], "dequantize", workers=1)
    try:
        key = storage_prefetch.content_key("weight", "narrow-rans", {"meta": torch.zeros(3, dtype=torch.int64)})
        assert pf.take(key) == (False, None) and key in pf._claimed
        assert pf.take(("base", "narrow-rans", 0)) == (False, None)  # another kind: never this prefetch's
    finally:
        pf.close()


def test_every_weight_asked_at_once_is_served(repos) -> None:
    """All weights asked for before the workers reach them (a queued weight is waited for, not claimed): each is
    served by the workers, bit for bit what the loading thread would decode."""
    from tpde_hf.storage_format import decode_weight, storage_weights

    _, repo, _ = repos
    with safe_open(repo / "model.safetensors", "pt") as fh:
        weights = [(w, {p: fh.get_tensor(k) for p, k in w.parts.items()})
                   for w in storage_weights(list(fh.keys())).values()]
    keys = [storage_prefetch.content_key("weight", w.storage, parts) for w, parts in weights]
    pf = storage_prefetch.StoragePrefetch([str(repo / "model.safetensors")], "dequantize", workers=2)
    try:
        got = [pf.take(k) for k in reversed(keys)][::-1]
    finally:
        pf.close()
    assert all(found for found, _ in got)
    for (w, parts), (_, t) in zip(weights, got, strict=True):
        want = decode_weight(w.name, w.storage, parts, use_prefetch=False)
        assert torch.equal(_iv(t), _iv(want)), w.name


@pytest.mark.parametrize("check_integrity", [True, False])
def test_seeded_bit_flips_never_load_a_wrong_weight_through_the_workers(repos, tmp_path: Path,
                                                                         check_integrity: bool) -> None:
    """Seeded single-bit flips anywhere in the stored ``narrow-rans`` parts, loaded in ``dequantize`` and
    ``lossless`` mode with the workers on: every load raises :class:`TpdeFormatError` or is bit-exact, with the
    shard checksums checked (the default) and without them (the decode's own checks alone)."""
    import json
    import random

    src, repo, model = repos
    ref = model.state_dict()
    shard = (repo / "model.safetensors").read_bytes()
    header_len = int.from_bytes(shard[:8], "little")
    header = json.loads(shard[8:8 + header_len])
    spans = [(8 + header_len + v["data_offsets"][0], 8 + header_len + v["data_offsets"][1])
             for k, v in header.items() if ".tpde_storage." in k]
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in repo.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            (bad / f.name).write_bytes(f.read_bytes())
    rng = random.Random(2026)
    outcomes = {"error": 0, "exact": 0}
    for _ in range(8):
        b, e = rng.choice(spans)
        data = bytearray(shard)
        data[rng.randrange(b, e)] ^= 1 << rng.randrange(8)
        (bad / "model.safetensors").write_bytes(bytes(data))
        for mode in ("dequantize", "lossless"):
            try:
                m = transformers.AutoModelForCausalLM.from_pretrained(
                    bad, dtype=torch.bfloat16,
                    quantization_config=tpde_hf.TpdeConfig(mode=mode, check_integrity=check_integrity))
            except TpdeFormatError:
                outcomes["error"] += 1
                continue
            if mode == "dequantize":
                for name, t in ref.items():
                    assert_bit_equal(m.state_dict()[name], t, name)
            else:
                torch.manual_seed(0)
                ids = torch.randint(0, model.config.vocab_size, (1, 12))
                with torch.no_grad():
                    assert torch.equal(m(ids).logits.view(torch.int16), model(ids).logits.view(torch.int16))
            outcomes["exact"] += 1
        assert not storage_prefetch._active  # every load, failed or not, closed its workers
    assert outcomes["error"] > 0  # the sweep did reach the decode's checks
