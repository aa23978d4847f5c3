"""Conversion at real tensor sizes (issue #18): the compiled rANS codec walks its lanes in cache-sized blocks.

A 5120 x 13824 weight has 69,120 lanes; sweeping them all at every step cost 3 to 5 times the CPU per
byte of a small weight (see BENCHMARKS.md, conversion at real sizes). :data:`compiled.LANE_BLOCK` cuts
each kernel call into runs of lanes. These tests check behaviour only (no timing): any block size,
with every path of the encoder (packed fields or recomputed, one chunk or many, one thread or two),
writes the same bytes and decodes to the same bits, for every float dtype and special values.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tpde_hf.codec import CodecParams, compiled, decode_tensors, encode_tensors, limit_codec_threads
from tpde_hf.codec.backend import use_backend
from tpde_hf.errors import TpdeFormatError

pytestmark = pytest.mark.skipif(not hasattr(compiled, "LANE_BLOCK"), reason="codec without lane blocks")

PARTS = ("qweight", "scales", "zeros", "delta", "lanes", "tables")
INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def _weight(shape: tuple[int, int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """N(0, 0.02) weights with +-0, subnormals, +-inf and NaN scattered in (seeded)."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    flat = w.view(-1)
    tiny = torch.finfo(dtype).tiny
    specials = torch.tensor([0.0, -0.0, tiny / 4, -tiny / 8, float("inf"), float("-inf"), float("nan")]).to(dtype)
    idx = torch.randint(0, flat.numel(), (3 * specials.numel(),), generator=g)
    flat[idx] = specials.repeat(3)
    return w


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _encode(weights: dict[str, torch.Tensor], params: CodecParams, threads: int) -> dict:
    limit_codec_threads(threads)
    try:
        return encode_tensors(weights, params)
    finally:
        limit_codec_threads(None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "recomputed"])
def test_lane_blocks_write_the_same_bytes(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, packed: bool) -> None:
    # 131 x 520 = 68,120 weights: 67 lanes of 1024, above MIN_PARALLEL_ELEMENTS (two thread blocks), odd sizes.
    weights = {"a.weight": _weight((131, 520), dtype, 1), "b.weight": _weight((3, 7), dtype, 2)}
    params = CodecParams(group_size=64)
    monkeypatch.setattr(compiled, "CHUNK_ELEMENTS", 1 << 14)  # several step chunks, each cut into lane blocks
    if not packed:
        monkeypatch.setattr(compiled, "PACKED_MAX_ELEMENTS", 1)  # the path a real-size weight takes
    with use_backend("compiled"):
        monkeypatch.setattr(compiled, "LANE_BLOCK", 1 << 30)
        whole = _encode(weights, params, threads=2)
        for block in (1, 7, 16):
            monkeypatch.setattr(compiled, "LANE_BLOCK", block)
            for threads in (1, 2):
                blocked = _encode(weights, params, threads)
                for name, enc in blocked.items():
                    for part in PARTS:
                        assert torch.equal(_bits(getattr(enc, part)), _bits(getattr(whole[name], part))), (
                            name, part, block, threads)
        for block in (1, 7, 1 << 30):
            monkeypatch.setattr(compiled, "LANE_BLOCK", block)
            for name, out in zip(whole, decode_tensors(list(whole.values()), verify=True), strict=True):
                assert torch.equal(out.view(INT_VIEW[dtype]), weights[name].view(INT_VIEW[dtype])), (name, block)


def test_lane_blocks_match_the_numpy_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    w = {"w.weight": _weight((97, 1000), torch.bfloat16, 3)}
    params = CodecParams(group_size=128, lane_len=256)  # 379 lanes
    monkeypatch.setattr(compiled, "LANE_BLOCK", 5)
    with use_backend("numpy"):
        ref = encode_tensors(w, params)["w.weight"]
    with use_backend("compiled"):
        enc = encode_tensors(w, params)["w.weight"]
        out = decode_tensors([ref], verify=True)[0]
    for part in PARTS:
        assert torch.equal(_bits(getattr(enc, part)), _bits(getattr(ref, part))), part
    assert torch.equal(out.view(torch.int16), w["w.weight"].view(torch.int16))


def test_a_corrupt_delta_is_still_refused_with_lane_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Seeded bit flips in the delta: each one either decodes to the same bits or raises TpdeFormatError."""
    w = _weight((64, 512), torch.bfloat16, 4)
    monkeypatch.setattr(compiled, "LANE_BLOCK", 3)
    g = torch.Generator().manual_seed(5)
    with use_backend("compiled"):
        enc = encode_tensors({"w.weight": w}, CodecParams())["w.weight"]
        refused = 0
        for _ in range(20):
            bad = copy.copy(enc)
            bad.delta = enc.delta.clone()
            bad._compiled_lut = None
            i = int(torch.randint(0, bad.delta.numel(), (1,), generator=g))
            bad.delta[i] ^= 1 << int(torch.randint(0, 8, (1,), generator=g))
            try:
                out = decode_tensors([bad], verify=True)[0]
            except TpdeFormatError:
                refused += 1
                continue
            assert torch.equal(out.view(torch.int16), w.view(torch.int16))
    assert refused > 0
