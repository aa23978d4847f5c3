"""``narrow-rans`` layouts: layout 2 (two interleaved rANS states per block) is written, layout 1 (one state)
still decodes bit for bit, from a checked-in fixture written by the layout-1 writer.

``tests/fixtures/formats/narrow-rans-v1.safetensors`` holds, per case (bf16 over two rANS blocks, bf16, fp16,
fp32, fp32 on the fp16 grid; +-0, subnormals, inf/NaN payloads, outliers, a constant group, 300 columns: a
partial group), the two blobs written by layout 1 (2026-12-07, the writer of before layout 2, byte-identical
to it on MiniLM), the resident base they encode (``qweight``, ``scales``, ``zeros``), and in the file's
metadata ``tensor_checksum`` and dtype of the weight. Made with ``tests/test_storage_codec._special`` (seeds
21-25) and ``NarrowRans().encode``; it is never rewritten: if it stops decoding, the reader broke layout 1.
``narrow-rans-v2.safetensors`` holds the same cases written by the layout-2 writer (2026-12-07, before its
kernels were split and their tables rebuilt): the layout-2 reader must decode it and the writer re-write it
byte for byte, so a faster kernel cannot change the format unnoticed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from numba import njit
from safetensors import safe_open
from safetensors.torch import load_file

from tpde_hf.codec import base_quant, tensor_checksum
from tpde_hf.codec.ordinal import INT_VIEW
from tpde_hf.codec.registry import CodecContext
from tpde_hf.codec.storage import NarrowRans, bins, streams
from tpde_hf.codec.storage import codec as storage_codec
from tpde_hf.codec.storage.blob import unpack_blob
from tpde_hf.errors import TpdeFormatError

FIXTURE = Path(__file__).parent / "fixtures" / "formats" / "narrow-rans-v1.safetensors"
FIXTURE_V2 = FIXTURE.with_name("narrow-rans-v2.safetensors")
CASES = ("bf16_multiblock", "bf16", "fp16", "fp32", "fp32_coarse")
CODEC = NarrowRans()


def _fixture(path: Path = FIXTURE) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(path, "pt") as fh:
        meta = fh.metadata()
    return load_file(path), meta


def _blobs(sd: dict[str, torch.Tensor], case: str) -> dict[str, torch.Tensor]:
    return {k: sd[f"{case}.{k}"] for k in ("base_blob", "delta_blob")}


def _version(parts: dict[str, torch.Tensor]) -> tuple[int, int]:
    base, _ = unpack_blob(parts["base_blob"], storage_codec._BASE, 6, "t")
    delta, _ = unpack_blob(parts["delta_blob"], storage_codec._DELTA, 3, "t")
    return base[0], delta[0]


def _iv(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT_VIEW[t.dtype])


@pytest.mark.parametrize("case", CASES)
def test_layout1_fixture_decodes_bit_exact(case: str) -> None:
    """The checked-in layout-1 blobs decode to the original weight (its checksum) and to the exact base; the
    layout-1 writer still writes the same bytes, and layout 2 codes the same weight exactly."""
    sd, meta = _fixture()
    parts = _blobs(sd, case)
    assert _version(parts) == (1, 1)
    w = CODEC.decode(parts, CodecContext(case))
    assert str(w.dtype) == f"torch.{meta[f'{case}.dtype']}" and tensor_checksum(w) == int(meta[f"{case}.checksum"])
    base = CODEC.decode_base({"base_blob": parts["base_blob"]}, CodecContext(case))
    for k in ("qweight", "scales", "zeros"):
        assert torch.equal(_iv(base[k]) if base[k].is_floating_point() else base[k],
                           _iv(sd[f"{case}.{k}"]) if sd[f"{case}.{k}"].is_floating_point() else sd[f"{case}.{k}"]), k
    given = {k: sd[f"{case}.{k}"] for k in ("qweight", "scales", "zeros")}
    again = CODEC.encode(w, given, CodecContext(case, None, {"layout": 1}))
    assert all(torch.equal(again[k], parts[k]) for k in parts), "the layout-1 writer changed its bytes"
    new = CODEC.encode(w, given, CodecContext(case))
    assert _version(new) == (storage_codec.VERSION,) * 2 == (2, 2)
    assert torch.equal(_iv(CODEC.decode(new, CodecContext(case))), _iv(w))
    w2, b2 = CODEC.decode_with_base(new, CodecContext(case))
    assert torch.equal(_iv(w2), _iv(w)) and all(torch.equal(b2[k], base[k]) for k in ("qweight", "zeros"))


@pytest.mark.parametrize("case", CASES)
def test_layout2_fixture_decodes_and_reencodes_byte_exact(case: str) -> None:
    """The checked-in layout-2 blobs decode to the original weight and base, and the writer writes them again
    byte for byte (the tables the kernels derive are part of the format, though never stored)."""
    sd, meta = _fixture(FIXTURE_V2)
    parts = _blobs(sd, case)
    assert _version(parts) == (2, 2)
    w, base = CODEC.decode_with_base(parts, CodecContext(case))
    assert str(w.dtype) == f"torch.{meta[f'{case}.dtype']}" and tensor_checksum(w) == int(meta[f"{case}.checksum"])
    for k in ("qweight", "scales", "zeros"):
        assert torch.equal(_iv(base[k]) if base[k].is_floating_point() else base[k],
                           _iv(sd[f"{case}.{k}"]) if sd[f"{case}.{k}"].is_floating_point() else sd[f"{case}.{k}"]), k
    given = {k: sd[f"{case}.{k}"] for k in ("qweight", "scales", "zeros")}
    again = CODEC.encode(w, given, CodecContext(case))
    assert all(torch.equal(again[k], parts[k]) for k in parts), "the layout-2 writer changed its bytes"


def test_layout2_fixture_corruption_sweep() -> None:
    """Seeded bit flips and truncations of layout-2 blobs: each case decodes exactly or raises TpdeFormatError."""
    _sweep(*_fixture(FIXTURE_V2), ("bf16_multiblock", "fp16"), seed=19)


def test_layout1_fixture_corruption_sweep() -> None:
    """Seeded bit flips and truncations of layout-1 blobs: each case decodes exactly or raises TpdeFormatError."""
    _sweep(*_fixture(), ("bf16", "fp32"), seed=18)


def _sweep(sd: dict[str, torch.Tensor], meta: dict[str, str], cases: tuple[str, ...], seed: int) -> None:
    rng = np.random.default_rng(seed)
    for case in cases:
        parts = _blobs(sd, case)
        want = int(meta[f"{case}.checksum"])
        for key in parts:
            raw = parts[key].numpy()
            for i in range(40):
                bad = raw.copy()
                if i % 4 == 3:
                    bad = bad[: int(rng.integers(0, bad.size))]
                else:
                    pos = int(rng.integers(0, bad.size))
                    bad[pos] ^= np.uint8(1 << int(rng.integers(0, 8)))
                trial = {**parts, key: torch.from_numpy(bad)}
                try:
                    w = CODEC.decode(trial, CodecContext(case))
                except TpdeFormatError:
                    continue
                assert tensor_checksum(w) == want, (case, key, i)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float32))
@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (3, 129), (2, 65537)])
def test_both_layouts_roundtrip(dtype: torch.dtype, shape: tuple[int, int]) -> None:
    """Odd element counts (a last lane with one element fewer), a block of one element, blocks past 2**16."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_storage_codec import _base, _special

    w = _special(dtype, shape, seed=shape[0] * 7 + shape[1])
    for layout in (1, 2):
        parts = CODEC.encode(w, _base(w), CodecContext("w", None, {"layout": layout}))
        assert _version(parts) == (layout, layout)
        assert torch.equal(_iv(CODEC.decode(parts, CodecContext("w"))), _iv(w)), layout


def test_unknown_layout_is_refused() -> None:
    w = torch.zeros(2, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="layouts"):
        CODEC.encode(w, base_quant.quantize(w).__dict__, CodecContext("w", None, {"layout": 3}))
    sd, _ = _fixture()
    parts = _blobs(sd, "bf16")
    bad = parts["delta_blob"].clone()
    bad[0] = 9
    with pytest.raises(TpdeFormatError, match="layout 9"):
        CODEC.decode({**parts, "delta_blob": bad}, CodecContext("w"))


def test_reciprocal_division_is_exact() -> None:
    """``_div(a, _magic(b)) == a // b`` for every ``a < 2**16`` and divisors across ``[1, 2**16]``; ``_magic``
    (a float division) is ``2**32 // b + 1`` for every divisor."""
    a = np.arange(1 << 16, dtype=np.int64)
    for b in (1, 2, 3, 5, 7, 255, 256, 257, 4095, 32767, 32768, 40503, 65535, 65536):
        magic = bins._magic(np.int64(b))
        assert np.array_equal((a * magic) >> 32, a // b), b
    divisors = np.arange(1, (1 << 16) + 1, dtype=np.int64)
    assert np.array_equal(_magics(divisors), (1 << 32) // divisors + 1)


@njit(cache=False)
def _magics(bs: np.ndarray) -> np.ndarray:
    out = np.empty_like(bs)
    for i in range(bs.size):
        out[i] = bins._magic(bs[i])
    return out


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (40, 300)])
def test_scale_ids_and_code_packing_match_numpy(shape: tuple[int, int]) -> None:
    """The counting ``scale_ids`` is ``np.unique(..., return_inverse=True)``; ``pack_codes`` is ``pack4`` of the
    codes padded with each group's zero point (odd widths, a partial group, a single element)."""
    rng = np.random.default_rng(shape[1])
    s16 = rng.choice(np.array([0, 1, 0x3C00, 0x8001, 0xFFFF, 1234], dtype=np.uint16), size=shape)
    uniq, ids = streams.scale_ids(s16)
    want_u, want_i = np.unique(s16, return_inverse=True)
    assert np.array_equal(uniq, want_u) and np.array_equal(ids, want_i.ravel())
    g = 128
    ng = -(-shape[1] // g)
    q = rng.integers(0, 16, size=shape, dtype=np.uint8)
    z = rng.integers(0, 16, size=(shape[0], ng), dtype=np.uint8)
    got = np.empty((shape[0], ng * g // 2), dtype=np.uint8)
    streams.pack_codes(q, z, g, got)
    full = np.repeat(z, g, axis=1)
    full[:, : shape[1]] = q
    assert np.array_equal(got, storage_codec.pack4(full))
