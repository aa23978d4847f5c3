"""The load workers' ``narrow-rans`` decode: one compiled call per weight (:mod:`tpde_hf.codec.storage.fused`), bin
tables shared by every worker of a load (:mod:`tpde_hf.codec.storage.table`), and the workers' GIL-free reads
(:mod:`tpde_hf.loading.storage_prefetch`, :func:`tpde_hf.storage_format.decode_weight_ahead`).

Checked: the one-call decode equals the block-by-block decode bit for bit (bf16/fp16/fp32, +-0, subnormals,
inf/NaN, odd shapes, several rANS blocks, layouts 1 and 2, both layout fixtures); two threads decoding through one
shared table, which grows under them, decode exactly; seeded corruption through the one-call decode gives an exact
weight or a clear error; the workers' file reader reads what safetensors reads, and the content key is the same
through numpy and through torch; a meta that fails to parse is never remembered; a worker's result whose meta
disagrees with it is refused by the loading thread.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tpde_hf.codec import base_quant, tensor_checksum
from tpde_hf.codec.ordinal import INT_VIEW
from tpde_hf.codec.registry import CodecContext
from tpde_hf.errors import TpdeFormatError
from tpde_hf.loading import storage_prefetch as P

pytest.importorskip("tpde_hf.codec.storage")
from tpde_hf import storage_format as F  # noqa: E402
from tpde_hf.codec.storage import NarrowRans  # noqa: E402
from tpde_hf.codec.storage import codec as C  # noqa: E402
from tpde_hf.codec.storage import table as T  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_storage_codec import _special  # noqa: E402

CODEC = NarrowRans()
FORMATS = Path(__file__).parent / "fixtures" / "formats"


def _iv(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT_VIEW[t.dtype])


def _encode(w: torch.Tensor, layout: int = 2, g: int = 128) -> dict[str, torch.Tensor]:
    b = base_quant.quantize(w, g)
    return CODEC.encode(w, {"qweight": b.qweight, "scales": b.scales, "zeros": b.zeros},
                        CodecContext("w", None, {"layout": layout}))


def _fused(parts: dict[str, torch.Tensor], name: str = "w", tables: dict | None = None) -> torch.Tensor:
    with T.shared_bins(tables):
        out = C.decode_weight_fused(parts, name)
    assert out is not None  # inside the block: the one-call path
    return out[0]


CASES = [(torch.bfloat16, (7, 300), 2), (torch.bfloat16, (3, 40000), 1), (torch.bfloat16, (2, 70001), 2),
         (torch.float16, (5, 129), 2), (torch.float16, (1, 5), 1), (torch.float32, (3, 260), 2),
         (torch.float32, (2, 33000), 1)]


@pytest.mark.parametrize(("dtype", "shape", "layout"), CASES)
def test_one_call_decode_equals_block_decode(dtype: torch.dtype, shape: tuple[int, int], layout: int) -> None:
    """Specials, odd shapes (a partial group, a single row of 5), tensors of several rANS blocks (the last one
    partial), both layouts: the one-call decode is bit for bit the weight, as the block-by-block decode is."""
    w = _special(dtype, shape, seed=sum(shape))
    parts = _encode(w, layout)
    assert C.decode_weight_fused(parts, "w") is None  # outside shared_bins: the caller decodes block by block
    assert torch.equal(_iv(C.decode_weight(parts, "w")), _iv(w))
    assert torch.equal(_iv(_fused(parts)), _iv(w))


def test_one_call_decode_on_the_coarse_grid() -> None:
    """fp16 values stored as fp32 (a coarse grid, its own table) decode exactly in one call."""
    w = _special(torch.float16, (4, 256), seed=5).to(torch.float32)
    assert torch.equal(_iv(_fused(_encode(w))), _iv(w))


@pytest.mark.parametrize("fixture", ["narrow-rans-v1.safetensors", "narrow-rans-v2.safetensors"])
def test_layout_fixtures_decode_in_one_call(fixture: str) -> None:
    """Every case of the checked-in layout-1 and layout-2 fixtures decodes in one call to the original weight."""
    sd = load_file(FORMATS / fixture)
    with safe_open(FORMATS / fixture, "pt") as fh:
        meta = fh.metadata()
    cases = sorted({k.rsplit(".", 1)[0] for k in sd if k.endswith(".delta_blob")})
    assert len(cases) == 5
    for case in cases:
        w = _fused({k: sd[f"{case}.{k}"] for k in ("base_blob", "delta_blob")}, case)
        assert str(w.dtype) == f"torch.{meta[f'{case}.dtype']}"
        assert tensor_checksum(w) == int(meta[f"{case}.checksum"]), case


def test_threads_sharing_one_table_decode_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two threads decode different tensors through one dict of tables, started together, while the table grows
    (a first capacity of 64 scales): every weight is exact, and the table was shared and grew."""
    monkeypatch.setattr(T, "FIRST_CAPACITY", 64)
    gen = torch.Generator().manual_seed(3)
    weights = [(torch.randn(r, 256, generator=gen) * torch.logspace(-5, 0, r).unsqueeze(1)).to(torch.bfloat16)
               for r in (300, 200, 250, 180, 320, 90)]
    encoded = [_encode(w) for w in weights]
    tables: dict = {}
    got: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def work(ids: list[int]) -> None:
        try:
            start.wait()
            for i in ids:
                got[i] = _fused(encoded[i], f"w{i}", tables)
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(ids,)) for ids in ([0, 2, 4], [1, 3, 5])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(tables) == 1 and next(iter(tables.values())).capacity > 64
    for i, w in enumerate(weights):
        assert torch.equal(_iv(got[i]), _iv(w)), i


def _flips(data: np.ndarray, rng: np.random.Generator, n_flips: int, n_cuts: int):
    for _ in range(n_flips):
        bad = data.copy()
        bad[int(rng.integers(0, data.size))] ^= np.uint8(1 << int(rng.integers(0, 8)))
        yield torch.from_numpy(bad)
    for _ in range(n_cuts):
        yield torch.from_numpy(data[: int(rng.integers(0, data.size))].copy())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_one_call_decode_corruption_sweep(dtype: torch.dtype) -> None:
    """Seeded bit flips and truncations of both blobs (a tensor of two rANS blocks), decoded in one call through a
    table shared with earlier tensors: every case is the exact weight or a TpdeFormatError naming the tensor."""
    w = _special(dtype, (2, 40000), seed=11)
    parts = _encode(w)
    rng = np.random.default_rng(30)
    tables: dict = {}
    _fused(_encode(_special(dtype, (5, 300), seed=12)), "warm", tables)  # the table holds other tensors' bins
    outcomes = {"exact": 0, "error": 0}
    for part in ("base_blob", "delta_blob"):
        for bad in _flips(parts[part].numpy(), rng, n_flips=40, n_cuts=10):
            try:
                back = _fused({**parts, part: bad}, "model.layers.0.mlp.up_proj.weight", tables)
            except TpdeFormatError as exc:
                assert "model.layers.0.mlp.up_proj.weight" in str(exc)
                outcomes["error"] += 1
                continue
            assert torch.equal(_iv(back), _iv(w))
            outcomes["exact"] += 1
    assert outcomes["error"] >= 80, outcomes


def test_shard_reader_reads_what_safetensors_reads(tmp_path: Path) -> None:
    """The workers' reader gives every tensor of a file (uint8, int64, fp16, fp32, bf16, an empty one, a 0-d one)
    with safetensors' dtype, shape and bytes, and the same content key."""
    sd = {"a.tpde_storage.narrow-rans.base_blob": torch.arange(300, dtype=torch.uint8),
          "a.tpde_storage.narrow-rans.meta": torch.arange(12, dtype=torch.int64) - 5,
          "h": torch.randn(3, 5).half(), "f": torch.randn(2, 7), "b": torch.randn(4, 3).bfloat16(),
          "e": torch.zeros(0, 3), "s": torch.tensor(2.5)}
    save_file(sd, tmp_path / "x.safetensors")
    with P._Shard(str(tmp_path / "x.safetensors")) as mine, safe_open(tmp_path / "x.safetensors", "pt") as ref:
        assert sorted(mine.keys()) == sorted(ref.keys())
        for k in ref.keys():
            a, b = mine.get_tensor(k), ref.get_tensor(k)
            assert a.dtype == b.dtype and a.shape == b.shape, k
            assert torch.equal(a.view(torch.uint8) if a.dim() else a, b.view(torch.uint8) if b.dim() else b), k
            assert P.content_key("weight", "s", {"p": a}) == P.content_key("weight", "s", {"p": b}), k


def test_content_key_is_the_same_through_numpy_and_torch() -> None:
    """A tensor numpy can read (the fast path) and its copies that it cannot (one that needs grad, a
    non-contiguous one) hash alike; another byte in the head changes the key."""
    parts = {"meta": torch.arange(12, dtype=torch.int64), "base_blob": torch.arange(600, dtype=torch.int32)[::2]}
    key = P.content_key("weight", "narrow-rans", parts)
    same = {"meta": parts["meta"].clone(), "base_blob": parts["base_blob"].contiguous()}
    assert P.content_key("weight", "narrow-rans", same) == key
    f = torch.arange(8, dtype=torch.float32)
    grad = f.clone().requires_grad_()
    assert P.content_key("weight", "x", {"meta": f}) == P.content_key("weight", "x", {"meta": grad})
    other = {**same, "base_blob": same["base_blob"].clone()}
    other["base_blob"][3] += 1
    assert P.content_key("weight", "narrow-rans", other) != key


def test_a_meta_that_fails_to_parse_is_never_remembered() -> None:
    """A corrupt meta raises every time; a good one parses to what ``parse_meta`` gives."""
    from tpde_hf.codec.encoded import parse_meta

    w = (torch.randn(4, 256) * 0.02).to(torch.bfloat16)
    parts = F.stored_parts(_enc(w), w, "m")
    meta = parts["m.tpde_storage.narrow-rans.meta"]
    assert F._parse(meta, "m.weight") == parse_meta(meta, "m.weight")
    bad = meta.clone()
    bad[2] = -1  # an invalid shape
    for _ in range(2):
        with pytest.raises(TpdeFormatError, match="m.weight"):
            F._parse(bad, "m.weight")


def _enc(w: torch.Tensor):
    from tpde_hf.codec import CodecParams, encode_tensor

    return encode_tensor(w, CodecParams(storage="narrow-rans"), "m.weight")


def test_the_loading_thread_refuses_a_worker_result_its_meta_disagrees_with(tmp_path: Path) -> None:
    """The workers decode without reading the meta: a weight stored with the meta of another shape decodes in a
    worker, and the loading thread refuses it by its meta, naming it; the workers end."""
    w = (torch.randn(4, 256) * 0.02).to(torch.bfloat16)
    other = (torch.randn(8, 128) * 0.02).to(torch.bfloat16)
    parts = F.stored_parts(_enc(w), w, "m")
    key = "m.tpde_storage.narrow-rans.meta"
    parts[key] = F.stored_parts(_enc(other), other, "m")[key]
    save_file(parts, tmp_path / "model.safetensors")
    pf = P.StoragePrefetch([str(tmp_path / "model.safetensors")], "dequantize")
    try:
        got = {k.rsplit(".", 1)[1]: v for k, v in parts.items()}
        assert torch.equal(_iv(F.decode_weight_ahead("m.weight", "narrow-rans", got)), _iv(w))
        with pytest.raises(TpdeFormatError, match="m.weight"):
            F.decode_weight("m.weight", "narrow-rans", got)
    finally:
        pf.close()
