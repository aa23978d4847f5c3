"""Bit-exactness of the codec on every 16-bit pattern, random fp32 patterns and adversarial tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tpde_hf.codec import CodecParams, EncodedTensor, decode_tensor, decode_tensors, encode_tensor, inspect_tensor
from tpde_hf.codec.backend import use_backend
from tpde_hf.codec.base_quant import predict, quantize
from tpde_hf.codec.ordinal import from_ordinal, to_ordinal
from tpde_hf.codec.tensor_codec import encode_tensors


@pytest.fixture(params=["compiled", "numpy"], autouse=True)
def codec_backend(request):
    """Every test here runs on both CPU codecs: the compiled one and the numpy reference."""
    with use_backend(request.param):
        yield request.param


INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
DTYPES = list(INT_VIEW)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT_VIEW[t.dtype])


def assert_bit_exact(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(bits(a), bits(b))


def roundtrip(w: torch.Tensor, params: CodecParams | None = None) -> torch.Tensor:
    """Encode, serialize to plain tensors, validate, decode with checksum verification."""
    enc = encode_tensor(w, params, name="w")
    sd = {k: v.clone() for k, v in enc.to_state_dict("layer").items()}
    back = decode_tensor(EncodedTensor.from_state_dict(sd, "layer", name="layer.weight"), verify=True)
    assert_bit_exact(back, w)
    return back


def all_16bit_patterns(dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)


# ---------------------------------------------------------------- ordinals
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ordinal_is_a_monotonic_bijection_on_every_16bit_pattern(dtype):
    x = all_16bit_patterns(dtype)
    o = to_ordinal(x)
    assert torch.equal(torch.sort(o).values, torch.arange(-(1 << 15), 1 << 15))
    assert torch.equal(bits(from_ordinal(o, dtype)), bits(x))
    finite = torch.isfinite(x)
    order = torch.argsort(o[finite])
    vals = x[finite][order].float()
    assert bool((vals[1:] >= vals[:-1]).all())  # ordinal order is float order (-0 just below +0)
    assert int(to_ordinal(torch.tensor([-0.0], dtype=dtype))) == -1
    assert int(to_ordinal(torch.tensor([0.0], dtype=dtype))) == 0


def test_ordinal_fp32_random_patterns_roundtrip():
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(-(1 << 31), 1 << 31, (1 << 20,), generator=g, dtype=torch.int64).to(torch.int32)
    x = raw.view(torch.float32)
    assert torch.equal(from_ordinal(to_ordinal(x), torch.float32).view(torch.int32), raw)


# ---------------------------------------------------------------- exhaustive patterns
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_every_16bit_pattern_roundtrips(dtype, group_size):
    """All 65,536 patterns (±0, subnormals, ±inf, every NaN payload), in shuffled and sorted layouts."""
    x = all_16bit_patterns(dtype)
    roundtrip(x.view(256, 256), CodecParams(group_size=group_size))
    perm = torch.randperm(x.numel(), generator=torch.Generator().manual_seed(group_size))
    roundtrip(x[perm].view(128, 512), CodecParams(group_size=group_size, lane_len=256))


def test_fp32_random_bit_patterns_roundtrip():
    g = torch.Generator().manual_seed(1)
    raw = torch.randint(-(1 << 31), 1 << 31, (1 << 20,), generator=g, dtype=torch.int64).to(torch.int32)
    roundtrip(raw.view(torch.float32).view(1024, 1024))


# ---------------------------------------------------------------- adversarial tensors
def _specials(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    fi = torch.finfo(dtype)
    g = torch.Generator().manual_seed(2)
    base = (torch.randn(37, 300, generator=g) * 0.02).to(dtype)
    cases = {}
    t = base.clone()
    t[:, :128] = 0.0
    cases["all_zero_groups"] = t
    t = base.clone()
    t[:, 128:256] = 0.0123
    cases["constant_groups"] = t
    t = base.clone()
    t[3, 5] = fi.max
    t[4, 7] = -fi.max
    t[5, 200] = 1e3
    cases["extreme_outliers"] = t
    t = base.clone()
    t[::3, ::5] = fi.smallest_normal / 7  # subnormals
    t[1, :] = -0.0
    t[2, 3], t[2, 4], t[2, 5] = float("inf"), float("-inf"), float("nan")
    t.view(INT_VIEW[dtype])[6, 9] = -1  # a negative NaN with a full payload
    cases["subnormal_zero_inf_nan"] = t
    cases["tiny_scale"] = (torch.randn(5, 33, generator=g) * fi.tiny).to(dtype)
    cases["huge_values"] = (torch.randn(5, 33, generator=g) * fi.max / 4).to(dtype)
    return cases


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "case",
    ["all_zero_groups", "constant_groups", "extreme_outliers", "subnormal_zero_inf_nan", "tiny_scale", "huge_values"],
)
def test_adversarial_tensors_roundtrip(dtype, case):
    roundtrip(_specials(dtype)[case])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 1), (3, 31), (5, 129), (2, 2049), (130, 65)])
def test_odd_shapes_roundtrip(dtype, shape):
    g = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    roundtrip((torch.randn(shape, generator=g)).to(dtype), CodecParams(group_size=32, lane_len=256))


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    dtype=st.sampled_from(DTYPES),
    rows=st.integers(1, 40),
    cols=st.integers(1, 300),
    scale=st.sampled_from([1e-30, 1e-6, 0.02, 1.0, 300.0, 1e30]),
    group_size=st.sampled_from([32, 64, 128]),
    lane_len=st.sampled_from([256, 512, 1024, 2048]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_random_tensors_roundtrip(dtype, rows, cols, scale, group_size, lane_len, seed):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, cols, generator=g, dtype=torch.float64) * scale).to(dtype)
    roundtrip(w, CodecParams(group_size=group_size, lane_len=lane_len))


def test_batched_encode_and_decode_equal_single():
    g = torch.Generator().manual_seed(3)
    ws = {
        f"w{i}": (torch.randn(17 * (i + 1), 100 + 37 * i, generator=g) * 0.05).to(dt) for i, dt in enumerate(DTYPES * 2)
    }
    batched = encode_tensors(ws)
    for name, w in ws.items():
        single = encode_tensor(w, name=name)
        assert torch.equal(single.delta, batched[name].delta)
        assert torch.equal(single.lanes, batched[name].lanes)
    for w, back in zip(ws.values(), decode_tensors(list(batched.values()), verify=True), strict=False):
        assert_bit_exact(back, w)


@pytest.mark.slow
def test_hundred_million_elements_roundtrip():
    g = torch.Generator().manual_seed(4)
    w = (torch.randn(10_000, 10_000, generator=g) * 0.02).to(torch.bfloat16)
    w[0, 0] = float("nan")
    enc = encode_tensor(w, name="big")
    assert_bit_exact(decode_tensor(enc, verify=True), w)


# ---------------------------------------------------------------- the base and inspect
def test_base_prediction_is_the_documented_float32_product():
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(9, 200, generator=g) * 0.1).to(torch.bfloat16)
    base = quantize(w, 64)
    q = torch.stack((base.qweight & 15, base.qweight >> 4), -1).flatten(-2)[:, :200].to(torch.float32)
    z = torch.stack((base.zeros & 15, base.zeros >> 4), -1).flatten(-2)[:, :4].to(torch.float32)
    s = base.scales.float()
    expect = torch.empty(9, 200)
    for col in range(200):
        expect[:, col] = (q[:, col] - z[:, col // 64]) * s[:, col // 64]
    assert_bit_exact(predict(base, (9, 200), 64, torch.bfloat16), expect.to(torch.bfloat16))
    err = (predict(base, (9, 200), 64, torch.float32) - w.float()).abs()
    # RTN error is at most one step (half a step, plus half for the rounded zero point at the edges).
    assert bool((err <= s.repeat_interleave(64, 1)[:, :200] * 1.0 + 1e-6).all())


def test_inspect_reports_consistent_sizes_and_bound():
    g = torch.Generator().manual_seed(6)
    w = (torch.randn(256, 512, generator=g) * 0.02).to(torch.bfloat16)
    enc = encode_tensor(w, name="w")
    info = inspect_tensor(enc)
    bpw = info["bits_per_weight"]
    assert bpw["total"] == pytest.approx(bpw["base"] + bpw["delta"] + bpw["meta"])
    assert 4.0 < bpw["base"] < 4.3  # 4-bit codes + fp16 scale + 4-bit zero per 128
    assert info["bound_bits_per_weight"] < bpw["delta"] < info["bound_bits_per_weight"] * 1.10
    assert info["ratio_to_source"] == pytest.approx(bpw["total"] / 16)


def test_lossy_base_weight_matches_prediction():
    w = (torch.randn(8, 64) * 0.1).to(torch.float16)
    enc = encode_tensor(w)
    assert_bit_exact(enc.base_weight(), predict(enc.base, (8, 64), 128, torch.float16))
    assert enc.base_weight(torch.float32).dtype == torch.float32


def test_numpy_and_torch_window_readers_agree():
    from tpde_hf.codec import bitpack

    g = np.random.default_rng(7)
    widths = g.integers(0, 33, 5000)
    vals = g.integers(0, 1 << 32, 5000) & ((1 << widths) - 1)
    offs = np.cumsum(widths) - widths
    words = bitpack.pack_fields(
        torch.from_numpy(vals), torch.from_numpy(widths), torch.from_numpy(offs), int(widths.sum())
    )
    assert np.array_equal(bitpack.read_fields_np(words.numpy(), widths, offs), vals)
    assert torch.equal(
        bitpack.read_fields(words, torch.from_numpy(widths), torch.from_numpy(offs)), torch.from_numpy(vals)
    )
