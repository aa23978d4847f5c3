"""The compiled CPU codec against the numpy/torch reference: same bytes, same weights, same base."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tpde_hf.codec import CodecParams, decode_tensor, encode_tensor
from tpde_hf.codec import compiled as compiled_codec
from tpde_hf.codec.backend import active_backend, use_backend
from tpde_hf.codec.base_quant import predict_from_levels, quantize
from tpde_hf.codec.ordinal import to_ordinal

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def encode_with(backend: str, w: torch.Tensor, params: CodecParams | None = None) -> dict[str, torch.Tensor]:
    with use_backend(backend):
        return encode_tensor(w, params, name="w").to_state_dict("p")


def assert_same_bytes(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        assert x.dtype == y.dtype and x.shape == y.shape, key
        assert torch.equal(x.view(torch.uint8) if x.dtype != torch.uint8 else x,
                           y.view(torch.uint8) if y.dtype != torch.uint8 else y), key


@pytest.mark.parametrize("dtype", DTYPES)
def test_prediction_table_matches_torch_for_every_fp16_scale(dtype):
    """Every finite fp16 scale (±, subnormal) times every level: numpy's casts round as torch's do."""
    patterns = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    scales = patterns[torch.isfinite(patterns)].view(-1, 1)
    table = compiled_codec.prediction_ordinals(scales, dtype)
    for c in range(-15, 16):
        levels = torch.full(scales.shape, c, dtype=torch.int32)
        expect = to_ordinal(predict_from_levels(levels, scales, 32, dtype)).view(-1).numpy()
        assert np.array_equal(table[:, 0, c + 15], expect), c


def _quantize_cases(dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    fi = torch.finfo(dtype)
    cases = []
    for shape in [(1, 1), (3, 31), (130, 65), (257, 1000)]:
        for scale in (1e-30, 1e-6, 0.02, 300.0, 1e30):
            w = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
            flat = w.view(-1)
            flat[0] = float("nan")
            if flat.numel() > 3:
                flat[1], flat[2], flat[3] = float("-inf"), -0.0, fi.smallest_normal / 4
            cases.append(w)
    cases.append(torch.full((4, 200), fi.max, dtype=dtype))
    alternating = torch.full((4, 200), fi.max, dtype=dtype)
    alternating[:, ::2] *= -1  # a range that overflows float32 for fp32 sources
    cases.append(alternating)
    cases.append(torch.zeros(3, 70, dtype=dtype))
    return cases


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_compiled_quantize_is_the_torch_quantize(dtype, group_size):
    for w in _quantize_cases(dtype):
        a, b = quantize(w, group_size), compiled_codec.quantize(w, group_size)
        assert torch.equal(a.qweight, b.qweight)
        assert torch.equal(a.zeros, b.zeros)
        assert torch.equal(a.scales.view(torch.int16), b.scales.view(torch.int16))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dtype=st.sampled_from(DTYPES),
    rows=st.integers(1, 300),
    cols=st.integers(1, 700),
    scale=st.sampled_from([1e-30, 1e-6, 0.02, 1.0, 1e30]),
    group_size=st.sampled_from([32, 64, 128]),
    lane_len=st.sampled_from([256, 512, 1024, 2048]),
    prob_bits=st.sampled_from([10, 12, 15]),
    seed=st.integers(0, 2**31 - 1),
)
def test_both_encoders_write_identical_bytes(dtype, rows, cols, scale, group_size, lane_len, prob_bits, seed):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, cols, generator=g, dtype=torch.float64) * scale).to(dtype)
    w.view(-1)[seed % w.numel()] = float("nan")
    params = CodecParams(group_size=group_size, lane_len=lane_len, prob_bits=prob_bits)
    assert_same_bytes(encode_with("compiled", w, params), encode_with("numpy", w, params))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("k, m", [(6, 5), (8, 1), (1, 1), (8, 8)])
def test_kept_coding_fields_and_recomputed_ones_write_the_same_bytes(monkeypatch, dtype, k, m):
    """Pass 2 reads the fields pass 1 kept (small weights) or recomputes them (large ones): same bytes,
    in every packing (32-bit fields for 16-bit sources by default, 64-bit for fp32 and wide symbols)."""
    gen = torch.Generator().manual_seed(k * 10 + m)
    w = (torch.randn(37, 301, generator=gen) * 0.03).to(dtype)
    special = torch.tensor([0.0, -0.0, float("inf"), float("nan"), 1e30, 3e-39], dtype=torch.float32)
    n = w.view(-1)[::97].numel()
    w.view(-1)[::97] = special.repeat(-(-n // special.numel()))[:n].to(dtype)
    params = CodecParams(lane_len=256, sym_k=k, sym_m=m)
    spec_fields = compiled_codec._packed_fields(encode_tensor(w, params).spec, 16, w.numel())
    assert spec_fields is not None  # this weight is small enough to keep its fields
    kept = encode_with("compiled", w, params)
    monkeypatch.setattr(compiled_codec, "PACKED_MAX_ELEMENTS", 0)
    assert compiled_codec._packed_fields(encode_tensor(w, params).spec, 16, w.numel()) is None
    assert_same_bytes(kept, encode_with("compiled", w, params))
    assert_same_bytes(kept, encode_with("numpy", w, params))


@pytest.mark.parametrize("width", [16, 32])
@pytest.mark.parametrize("prob_bits", [10, 12, 15])
def test_decode_table_is_the_reference_lookup_table(width, prob_bits):
    """The compiled table builder against the torch construction of :func:`rans.decode_luts`."""
    from tpde_hf.codec import rans
    from tpde_hf.codec.symbols import SymbolSpec, symbol_tables

    spec = SymbolSpec(6, 5, width)
    gen = torch.Generator().manual_seed(width + prob_bits)
    rows = []
    for ctx in range(16):  # skewed, flat, one-symbol and sparse rows: every slot layout
        counts = torch.zeros(spec.n_symbols, dtype=torch.int64)
        if ctx == 0:
            counts[3] = 1
        elif ctx % 3 == 0:
            counts[torch.randint(0, spec.n_symbols, (5,), generator=gen)] = 7
        else:
            counts = torch.randint(0, 50, (spec.n_symbols,), generator=gen) ** (ctx % 4)
        rows.append(counts)
    freq = rans.quantize_frequencies(torch.stack(rows), prob_bits)
    step, sym = rans.decode_luts(rans.with_identity_context(freq, prob_bits), prob_bits)
    base_u, n_raw = symbol_tables(spec)
    expected = (step.numpy().astype(np.uint64) | ((base_u >> n_raw)[sym].numpy().astype(np.uint64) << np.uint64(32))
                | (n_raw[sym].numpy().astype(np.uint64) << np.uint64(48)))
    assert np.array_equal(compiled_codec.decode_table(freq, prob_bits, spec), expected)


@pytest.mark.parametrize("threads", ["1", "3"])
def test_thread_count_changes_nothing(monkeypatch, threads):
    """Lane blocks split over threads (and their shared raw-stream edge words) give the same bytes."""
    monkeypatch.setenv("TPDE_CODEC_THREADS", threads)
    g = torch.Generator().manual_seed(12)
    w = (torch.randn(700, 333, generator=g) * 0.02).to(torch.bfloat16)  # above the threading threshold
    assert w.numel() >= compiled_codec.MIN_PARALLEL_ELEMENTS
    stored = encode_with("compiled", w, CodecParams(lane_len=256))
    assert_same_bytes(stored, encode_with("numpy", w, CodecParams(lane_len=256)))
    with use_backend("compiled"):
        from tpde_hf.codec import EncodedTensor

        back = decode_tensor(EncodedTensor.from_state_dict(stored, "p"), verify=True)
    assert torch.equal(back.view(torch.int16), w.view(torch.int16))


def test_backend_choice(monkeypatch):
    monkeypatch.delenv("TPDE_CODEC_BACKEND", raising=False)
    assert active_backend() == "compiled"  # numba is a dependency
    with use_backend("numpy"):
        assert active_backend() == "numpy"
    monkeypatch.setenv("TPDE_CODEC_BACKEND", "numpy")
    assert active_backend() == "numpy"
    monkeypatch.setenv("TPDE_CODEC_BACKEND", "fast")
    with pytest.raises(ValueError, match="TPDE_CODEC_BACKEND"):
        active_backend()
    with pytest.raises(ValueError, match="unknown codec backend"):
        with use_backend("gpu"):
            pass


FORK_SCRIPT = """
import os, sys, torch, numpy as np
torch.set_num_threads(1)  # torch's own OpenMP pool cannot survive a fork; keep it out of this test
from tpde_hf.codec import decode_tensor, encode_tensor, use_backend
w = (torch.randn(400, 300) * 0.02).to(torch.bfloat16)
with use_backend("compiled"):
    enc = encode_tensor(w, name="w")
    decode_tensor(enc)  # above the threading threshold: the codec's thread pool exists now
pid = os.fork()
if pid == 0:
    with use_backend("compiled"):
        back = decode_tensor(enc)
    os._exit(0 if np.array_equal(back.view(torch.int16).numpy(), w.view(torch.int16).numpy()) else 3)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_decode_works_in_a_forked_child():
    """A child forked after the codec's thread pool exists gets a fresh pool instead of hanging on a dead one."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", FORK_SCRIPT], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "TPDE_CODEC_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-2000:]
