"""Damaged or crafted tpde tensors: a clear TpdeFormatError naming the tensor, never a crash or wrong weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tpde_hf.codec import FORMAT_VERSION, CodecParams, EncodedTensor, decode_tensor, encode_tensor
from tpde_hf.codec.backend import use_backend
from tpde_hf.errors import TpdeFormatError


@pytest.fixture(params=["compiled", "numpy"], autouse=True)
def codec_backend(request):
    """Every test here runs on both CPU codecs: the compiled one and the numpy reference."""
    with use_backend(request.param):
        yield request.param


NAME = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def weight() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(48, 200, generator=g) * 0.02).to(torch.bfloat16)
    w[0, 0] = float("nan")
    return w


@pytest.fixture(scope="module")
def stored(weight) -> dict[str, torch.Tensor]:
    return encode_tensor(weight, name=NAME).to_state_dict("p")


def load(sd: dict[str, torch.Tensor]) -> torch.Tensor:
    return decode_tensor(EncodedTensor.from_state_dict(sd, "p", name=NAME), verify=True)


def with_(sd, key, value):
    out = {k: v.clone() for k, v in sd.items()}
    out[f"p.{key}"] = value
    return out


def expect_error(sd, match: str) -> None:
    with pytest.raises(TpdeFormatError, match=match) as info:
        load(sd)
    assert NAME in str(info.value)


def test_intact_tensor_decodes(stored, weight):
    assert torch.equal(load(stored).view(torch.int16), weight.view(torch.int16))


def test_newer_format_version_is_refused(stored):
    meta = stored["p.meta"].clone()
    meta[0] = FORMAT_VERSION + 1
    expect_error(with_(stored, "meta", meta), "newer than this tpde-hf supports")


@pytest.mark.parametrize("index,value,match", [(1, 9, "dtype code"), (2, 0, "invalid shape"),
                                               (4, 48, "group size"), (5, 100, "lane length"),
                                               (6, 40, "prob_bits")])
def test_bad_meta_fields_are_refused(stored, index, value, match):
    meta = stored["p.meta"].clone()
    meta[index] = value
    expect_error(with_(stored, "meta", meta), match)


def test_truncated_delta_is_refused(stored):
    expect_error(with_(stored, "delta", stored["p.delta"][:-3]), "truncated or corrupt")


def test_missing_tensor_is_refused(stored):
    sd = dict(stored)
    del sd["p.lanes"]
    expect_error(sd, "missing tensors")


def test_wrong_dtype_or_shape_is_refused(stored):
    expect_error(with_(stored, "scales", stored["p.scales"].float()), "scales")
    expect_error(with_(stored, "qweight", stored["p.qweight"][:, :-1]), "qweight")


def test_corrupt_tables_are_refused(stored):
    expect_error(with_(stored, "tables", stored["p.tables"][:5]), "code tables")


def test_checksum_mismatch_is_refused(stored):
    meta = stored["p.meta"].clone()
    meta[-1] ^= 1
    expect_error(with_(stored, "meta", meta), "checksum mismatch")


def test_flipped_base_bit_is_caught(stored):
    scales = stored["p.scales"].clone()
    scales.view(torch.int16)[3, 1] ^= 1
    expect_error(with_(stored, "scales", scales), "checksum mismatch")


def test_non_finite_scale_is_refused(stored):
    scales = stored["p.scales"].clone()
    scales[0, 0] = float("inf")
    expect_error(with_(stored, "scales", scales), "inf or NaN")


def test_lane_state_out_of_range_is_refused(stored):
    lanes = stored["p.lanes"].clone()
    lanes[0, 0] = 5
    expect_error(with_(stored, "lanes", lanes), "state is out of range")


def test_unsupported_source_dtype_is_refused():
    with pytest.raises(TpdeFormatError, match="unsupported dtype"):
        encode_tensor(torch.zeros(4, 4, dtype=torch.float64), name="x.weight")
    with pytest.raises(TpdeFormatError, match="2-D"):
        encode_tensor(torch.zeros(4, dtype=torch.bfloat16), name="x.weight")


def _mutated(t: torch.Tensor, flips: list[tuple[int, int]], cut: int | None) -> torch.Tensor:
    """``t`` with bits flipped (byte position, bit) and, for a 1-D tensor, ``cut`` elements dropped."""
    raw = t.view(torch.uint8).flatten() if t.dtype != torch.uint8 else t.flatten()
    data = raw.numpy().copy()
    for pos, bit in flips:
        data[pos % data.size] ^= np.uint8(1 << bit)
    if cut is not None and t.dim() == 1:
        data = data[: max(0, data.size - cut * t.element_size())]
    mutated = torch.from_numpy(data).view(t.dtype)
    return mutated if t.dim() == 1 else mutated.view(t.shape)


def _fails_cleanly_or_decodes_exactly(sd: dict[str, torch.Tensor], weight: torch.Tensor) -> None:
    try:
        out = load(sd)
    except TpdeFormatError:
        return
    assert torch.equal(out.view(torch.int16), weight.view(torch.int16))


_FLIPS = st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 7)), min_size=1, max_size=8)
_FUZZ = settings(max_examples=150, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@_FUZZ
@given(key=st.sampled_from(["delta", "lanes", "tables", "qweight", "zeros", "scales"]), flips=_FLIPS,
       cut=st.one_of(st.none(), st.integers(0, 64)))
def test_fuzzed_payloads_fail_cleanly_or_decode_exactly(stored, weight, key, flips, cut):
    """Random bit flips and truncations: either TpdeFormatError or the exact original weight."""
    _fails_cleanly_or_decodes_exactly(with_(stored, key, _mutated(stored[f"p.{key}"], flips, cut)), weight)


@pytest.fixture(scope="module")
def stored_class_width(weight) -> dict[str, torch.Tensor]:
    return encode_tensor(weight, CodecParams(delta_code="class-width"), name=NAME).to_state_dict("p")


@_FUZZ
@given(key=st.sampled_from(["delta", "lanes", "tables", "meta", "qweight", "zeros", "scales"]), flips=_FLIPS,
       cut=st.one_of(st.none(), st.integers(0, 16)))
def test_fuzzed_class_width_tensors_fail_cleanly_or_decode_exactly(stored_class_width, weight, key, flips, cut):
    """The same for a class-width delta (format version 2), its meta included."""
    sd = stored_class_width
    _fails_cleanly_or_decodes_exactly(with_(sd, key, _mutated(sd[f"p.{key}"], flips, cut)), weight)
