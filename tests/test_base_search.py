"""The error-minimizing 4-bit base (tpde_hf.codec.base_search): never worse than min-max, same layout, exact delta."""

from __future__ import annotations

import pytest
import torch

from tpde_hf.codec import CodecParams, base_quant, decode_tensor, encode_tensor
from tpde_hf.codec.base_search import quantize_search

G = 128


def _group_errors(weight: torch.Tensor, base: base_quant.BaseTensors) -> torch.Tensor:
    out_f, in_f = weight.shape
    pred = base_quant.predict(base, (out_f, in_f), G, torch.float32)
    err = torch.where(torch.isfinite(weight), (pred - weight.float()).square(), 0.0)
    ng = base_quant.n_groups(in_f, G)
    return torch.nn.functional.pad(err, (0, ng * G - in_f)).view(out_f, ng, G).sum(-1)


def _weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    gauss = torch.randn(64, 300, generator=g) * 0.02
    outliers = gauss.clone()
    outliers[torch.rand(outliers.shape, generator=g) < 0.01] *= 40
    special = gauss.clone()
    special[0, :5] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0, 1e-40])
    special[1] = 0.0  # an all-zero row: constant groups
    special[2] = 0.125  # a constant nonzero row
    return {"gauss": gauss, "outliers": outliers, "special": special, "one_row": gauss[:1, :77].clone()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", ["gauss", "outliers", "special", "one_row"])
def test_search_never_worse_than_minmax_per_group(case: str, dtype: torch.dtype) -> None:
    w = _weights()[case].to(dtype)
    searched, minmax = quantize_search(w, G), base_quant.quantize(w, G)
    assert searched.qweight.shape == minmax.qweight.shape and searched.qweight.dtype == torch.uint8
    assert searched.scales.shape == minmax.scales.shape and searched.scales.dtype == torch.float16
    assert searched.zeros.shape == minmax.zeros.shape
    assert torch.isfinite(searched.scales.float()).all() and (searched.scales.float() > 0).all()
    e_search, e_minmax = _group_errors(w, searched), _group_errors(w, minmax)
    assert (e_search <= e_minmax).all()


def test_search_lowers_error_on_gaussian_weights() -> None:
    w = _weights()["gauss"].to(torch.bfloat16)
    assert _group_errors(w, quantize_search(w, G)).sum() < 0.95 * _group_errors(w, base_quant.quantize(w, G)).sum()


def test_grid_without_minmax_is_refused() -> None:
    with pytest.raises(ValueError, match="1.0"):
        quantize_search(torch.randn(4, 128), G, grid=(0.9, 0.8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("delta_code", ["rans", "class-width"])
def test_searched_base_round_trips_bit_exactly(dtype: torch.dtype, delta_code: str) -> None:
    w = _weights()["special"].to(dtype)
    enc = encode_tensor(w, CodecParams(group_size=G, delta_code=delta_code, base_quantizer="search"), name="w")
    expected = quantize_search(w, G)
    assert torch.equal(enc.qweight, expected.qweight) and torch.equal(enc.zeros, expected.zeros)
    assert torch.equal(enc.scales.view(torch.int16), expected.scales.view(torch.int16))
    back = decode_tensor(enc, verify=True)
    ints = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[dtype]
    assert torch.equal(back.view(ints), w.view(ints))
