"""The Triton kernels and their torch fallbacks against the codec's CPU reference decoder.

Weights are compared bit for bit (integer views); matmul outputs within a bound that ``F.linear``
itself is checked to meet against a float64 reference. Without CUDA the Triton kernels run under
``TRITON_INTERPRET=1`` (set here when absent) on small tensors; the ``cuda`` variants (marked
``gpu``) run the same checks on a GPU when one is present. To test the *compiled* kernels there,
leave the interpreter off: ``TRITON_INTERPRET=0 python -m pytest -m gpu tests/test_triton_kernels.py``.
"""

from __future__ import annotations

import dataclasses
import os

import torch

if not torch.cuda.is_available():  # before anything imports triton's JIT: the kernels run interpreted
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tpde_hf.codec import CodecParams, decode_tensor, encode_tensor  # noqa: E402
from tpde_hf.errors import TpdeFormatError  # noqa: E402
from tpde_hf.triton_kernels import (  # noqa: E402
    PackedWeight,
    base_linear,
    base_weight,
    lossless_linear,
    reconstruct,
    torch_ref,
    triton_available,
)

INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
DTYPES = list(INT_VIEW)
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# numpy's overflow/invalid warnings from the interpreter's float math (inf * 0 and the like).
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not triton_available("cpu"), reason="needs TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                    reason="needs a CUDA GPU")]),
]


@pytest.fixture(scope="module", autouse=True)
def _fast_interpreter():
    """Turn off the interpreter's signed-overflow sanitizer: about a third of its time, and the
    asserts it builds cannot fire there (the kernels' uint32 arithmetic wraps on purpose)."""
    if not INTERPRETED:
        yield
        return
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    saved = builder.options
    if hasattr(saved, "sanitize_overflow"):
        builder.options = dataclasses.replace(saved, sanitize_overflow=False)
    yield
    builder.options = saved


# ---------------------------------------------------------------------------- helpers
def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT_VIEW[t.dtype])


def assert_bit_exact(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(bits(a.cpu()), bits(b.cpu()))


def weight(shape: tuple[int, int], dtype: torch.dtype, seed: int, adversarial: bool = True) -> torch.Tensor:
    """Gaussian weights (std 0.02, like an LLM's) plus, when ``adversarial``: NaNs with odd payloads,
    ±inf, ±0, subnormals, outliers and the largest finite values, all in the first three rows
    (matmul tests compare the other rows' finite outputs) and subnormals/outliers everywhere."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    if not adversarial:
        return w
    fi = torch.finfo(dtype)
    rows, cols = shape
    flat = w.view(-1)
    n = flat.numel()
    sub = torch.randperm(n, generator=g)[: max(1, n // 50)]
    flat[sub] = fi.smallest_normal / 3  # subnormals
    big = torch.randperm(n, generator=g)[: max(1, n // 100)]
    flat[big] = torch.where(torch.rand(big.numel(), generator=g) < 0.5, -1.0, 1.0).to(dtype) * (
        8.0 if dtype == torch.float16 else 1e4)
    specials = [float("nan"), float("inf"), float("-inf"), -0.0, fi.max, -fi.max, fi.tiny]
    for k, v in enumerate(specials):
        r, c = (k % min(rows, 3)), (k * 7) % cols
        w[r, c] = v
    iv = w.view(INT_VIEW[dtype])
    iv[0, (3 * cols) // 4] = -1  # a negative NaN with a full payload
    iv[min(1, rows - 1), cols // 2] = 0x7F81 if dtype == torch.bfloat16 else (0x7C01 if dtype == torch.float16
                                                                              else 0x7F800001)  # signaling NaN
    return w


def encoded(shape, dtype, group_size, seed=0, lane_len=256, adversarial=True):
    w = weight(shape, dtype, seed, adversarial)
    return w, encode_tensor(w, CodecParams(group_size=group_size, lane_len=lane_len), name="w")


_UNIT = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}


def matmul_bound(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(float64 reference, error bound)``: one rounding of the output dtype plus float32
    accumulation over ``K`` terms (``K * 2**-24 * sum |x||w|``), plus the output's subnormal step."""
    x64, w64 = x.double(), w.double()
    b64 = None if bias is None else bias.double()
    ref = F.linear(x64, w64, b64)
    mag = F.linear(x64.abs(), w64.abs(), None if b64 is None else b64.abs())
    k = x.shape[-1] + 1
    bound = _UNIT[x.dtype] * ref.abs() + k * 2.0**-24 * mag + torch.finfo(x.dtype).smallest_normal * 2.0**-10
    return ref, bound


def assert_matmul_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """``y`` (any kernel) is within the bound that ``F.linear`` itself meets, with the same NaN/inf."""
    y, x, w = y.cpu(), x.cpu(), w.cpu()
    bias = None if bias is None else bias.cpu()
    dense = F.linear(x, w.to(x.dtype), bias)
    assert y.shape == dense.shape and y.dtype == dense.dtype
    assert torch.equal(torch.isnan(y), torch.isnan(dense))
    assert torch.equal(torch.isposinf(y), torch.isposinf(dense)) and torch.equal(torch.isneginf(y),
                                                                                 torch.isneginf(dense))
    ref, bound = matmul_bound(x, w.to(x.dtype), bias)
    fin = torch.isfinite(dense)
    assert int(fin.sum()) > 0
    for out in (dense, y):  # the bound must hold for F.linear too, or it is not a fair tolerance
        err = (out.double() - ref).abs()
        assert bool((err[fin] <= bound[fin]).all()), float((err - bound)[fin].max())


# ---------------------------------------------------------------------------- PackedWeight
def test_packed_weight_groups_moves_and_sizes():
    w, enc = encoded((37, 101), torch.bfloat16, 32)
    pw = PackedWeight.from_encoded(enc)
    assert pw.shape == (37, 101) and pw.dtype == torch.bfloat16 and pw.has_delta
    assert (pw.n_lanes, pw.steps) == (enc.layout.n_lanes, enc.layout.steps)
    assert pw.nbytes == pw.base_nbytes + pw.delta_nbytes
    assert pw.base_nbytes == enc.nbytes()["base"]
    # The streams are the file's payload, not expanded: only the tables and lane offsets are added.
    stream = pw.words.numel() * 2 + pw.raw.numel() * 4
    assert enc.delta.numel() - 2 <= stream <= enc.delta.numel()
    assert set(pw.delta_tensors()) == {"words", "raw", "lane_state", "word_start", "raw_start", "step_lut",
                                       "sym_lut"}
    moved = pw.delta_to("cpu")
    assert moved.qweight is pw.qweight  # the base is shared, not copied
    assert_bit_exact(reconstruct(moved), w)
    base_only = pw.drop_delta()
    assert not base_only.has_delta and base_only.delta_nbytes == 0
    with pytest.raises(ValueError, match="only the 4-bit base"):
        reconstruct(base_only)
    assert_bit_exact(base_weight(base_only), enc.base_weight())
    assert "base+rans delta" in repr(pw)


def test_packed_weight_rejects_bad_base():
    _, enc = encoded((8, 40), torch.float16, 32, adversarial=False)
    scales = enc.scales.clone()
    scales[1, 0] = float("inf")
    with pytest.raises(TpdeFormatError, match="inf or NaN"):
        PackedWeight.from_base(enc.qweight, scales, enc.zeros, enc.shape, enc.dtype, 32)
    with pytest.raises(TpdeFormatError, match="qweight"):
        PackedWeight.from_base(enc.qweight[:, :-1], enc.scales, enc.zeros, enc.shape, enc.dtype, 32)
    with pytest.raises(TpdeFormatError, match="group size"):
        PackedWeight.from_base(enc.qweight, enc.scales, enc.zeros, enc.shape, enc.dtype, 16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("delta_code", ["rans", "class-width"])
def test_offload_pinned_delta_moves_per_layer(delta_code):
    w = weight((64, 1100), torch.bfloat16, seed=0)
    enc = encode_tensor(w, CodecParams(group_size=64, lane_len=256, delta_code=delta_code), name="w")
    host = PackedWeight.from_encoded(enc).pin_memory()
    assert all(t.is_pinned() for t in host.delta_tensors().values())
    resident = host.base_to("cuda")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        ready = resident.delta_to("cuda", non_blocking=True)
    torch.cuda.current_stream().wait_stream(side)
    ready.record_stream(torch.cuda.current_stream())
    assert ready.device.type == "cuda" and all(t.device.type == "cuda" for t in ready.delta_tensors().values())
    assert_bit_exact(reconstruct(ready, check=True), w)
    with pytest.raises(ValueError, match="move one group first"):
        reconstruct(host.base_to("cuda"))  # delta still on the host


# ---------------------------------------------------------------------------- torch fallback
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("shape,lane_len", [((37, 101), 256), ((1, 1), 256), ((7, 1), 512), ((130, 65), 1024),
                                            ((300, 7), 256), ((64, 520), 2048)])
def test_torch_reconstruct_is_bit_exact(dtype, group_size, shape, lane_len):
    w, enc = encoded(shape, dtype, group_size, seed=shape[0] + shape[1], lane_len=lane_len)
    pw = PackedWeight.from_encoded(enc)
    out = reconstruct(pw, backend="torch")
    assert_bit_exact(out, w)
    assert_bit_exact(out, decode_tensor(enc))
    assert_bit_exact(base_weight(pw, backend="torch"), enc.base_weight())


def test_torch_loop_matches_numpy_loop():
    """The torch step loop (GPUs without Triton) and the numpy one (CPU) give the same symbols."""
    _, enc = encoded((130, 65), torch.float32, 64)
    pw = PackedWeight.from_encoded(enc)
    ctx = torch_ref.levels(pw).abs().flatten().to(torch.int64)
    assert torch.equal(torch_ref._rans_lut_index(pw, ctx, loop="torch"), torch_ref._rans_lut_index(pw, ctx))


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_linears_are_the_dense_matmul(dtype):
    w, enc = encoded((37, 101), dtype, 32)
    pw = PackedWeight.from_encoded(enc)
    x = torch.randn(2, 3, 101, generator=torch.Generator().manual_seed(1)).to(dtype)
    bias = torch.randn(37).to(dtype)
    assert_bit_exact(lossless_linear(x, pw, bias, backend="torch"), F.linear(x, w, bias))
    assert_bit_exact(base_linear(x, pw, bias, backend="torch"), F.linear(x, enc.base_weight(), bias))


def test_torch_reconstruct_detects_a_corrupt_stream():
    _, enc = encoded((37, 101), torch.bfloat16, 32)
    pw = PackedWeight.from_encoded(enc)
    pw.words[5] ^= 0x1234
    with pytest.raises(TpdeFormatError, match="lane check"):
        reconstruct(pw, backend="torch")


def test_input_checks():
    _, enc = encoded((8, 40), torch.bfloat16, 32, adversarial=False)
    pw = PackedWeight.from_encoded(enc)
    with pytest.raises(ValueError, match="expects"):
        lossless_linear(torch.zeros(2, 41, dtype=torch.bfloat16), pw)
    with pytest.raises(TypeError, match="bfloat16"):
        base_linear(torch.zeros(2, 40, dtype=torch.float64), pw)
    with pytest.raises(ValueError, match="backend"):
        reconstruct(pw, backend="cuda")
    with pytest.raises(ValueError, match="out must be"):
        reconstruct(pw, torch.empty(8, 41, dtype=torch.bfloat16))


def test_triton_available_follows_the_interpreter_flag(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_available("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not triton_available("cpu")
    assert triton_available("cuda") == torch.cuda.is_available()


# ---------------------------------------------------------------------------- Triton: reconstruct
# One odd shape per group size: (37, 101) several groups and a padded one; (300, 7) a block of
# lanes spanning several rows per step; (5, 700) long rows.
_SHAPES = {32: (37, 101), 64: (300, 7), 128: (5, 700)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prob_bits", [10, 12, 15])
def test_split_tables_are_the_fused_tables_indexed_by_symbol(dtype, prob_bits):
    """For every context and slot, the split tables give the fused tables' step and symbol info."""
    w = weight((40, 96), dtype, seed=prob_bits)
    enc = encode_tensor(w, CodecParams(group_size=32, lane_len=256, prob_bits=prob_bits), name="w")
    pw = PackedWeight.from_encoded(enc, tables="split")
    assert pw.split_tables and not PackedWeight.from_encoded(enc).split_tables
    n_sym = pw.sym_info.numel()
    idx = torch.arange(pw.step_lut.numel())
    ctx, slot = idx >> prob_bits, idx & ((1 << prob_bits) - 1)
    sym = pw.slot_sym.to(torch.int64)
    p = pw.sym_step.to(torch.int64)[ctx * n_sym + sym]
    fused = pw.step_lut.to(torch.int64) & 0xFFFFFFFF
    assert torch.equal(p & 0xFFFF, fused & 0xFFFF)
    assert torch.equal(slot - (p >> 16), fused >> 16)
    assert torch.equal(pw.sym_info[sym], pw.sym_lut)
    with pytest.raises(ValueError, match="tables must be one of"):
        PackedWeight.from_encoded(enc, tables="other")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("tables", ["fused", "split"])
def test_triton_reconstruct_is_bit_exact(device, dtype, group_size, tables):
    w, enc = encoded(_SHAPES[group_size], dtype, group_size, seed=group_size)
    pw = PackedWeight.from_encoded(enc, device, tables=tables)
    out = reconstruct(pw, backend="triton", check=True)
    assert out.device.type == device
    assert_bit_exact(out, w)
    assert_bit_exact(out, decode_tensor(enc))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,lane_len,dtype", [((129, 130), 256, torch.float16),  # 66 lanes: two programs
                                                  ((2, 600), 1024, torch.bfloat16),
                                                  ((1, 1), 256, torch.float32)])
def test_triton_reconstruct_lane_layouts(device, shape, lane_len, dtype):
    w, enc = encoded(shape, dtype, 64, seed=3, lane_len=lane_len, adversarial=shape != (1, 1))
    out = torch.full(shape, float("nan"), dtype=dtype, device=device)
    got = reconstruct(PackedWeight.from_encoded(enc, device), out, backend="triton", check=True)
    assert got.data_ptr() == out.data_ptr()
    assert_bit_exact(out, w)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_decode_with_64_bit_offsets(device, monkeypatch):
    """The int64-offset variant (weights past 2**31 elements, too big to test) decodes the same bits."""
    from tpde_hf.triton_kernels import triton_impl

    w, enc = encoded((37, 101), torch.float16, 32, seed=21)
    pw = PackedWeight.from_encoded(enc, device)
    monkeypatch.setattr(triton_impl, "_needs_off64", lambda *tensors: True)
    assert_bit_exact(reconstruct(pw, backend="triton", check=True), w)
    x = torch.randn(3, 101, generator=torch.Generator().manual_seed(21)).to(torch.float16)
    assert_matmul_close(lossless_linear(x.to(device), pw, backend="triton", fused=True), x, w)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tables", ["fused", "split"])
def test_triton_reconstruct_detects_a_corrupt_stream(device, tables):
    _, enc = encoded((37, 101), torch.bfloat16, 32)
    pw = PackedWeight.from_encoded(enc, device, tables=tables)
    pw.words[5] ^= 0x1234
    with pytest.raises(TpdeFormatError, match="lane check"):
        reconstruct(pw, backend="triton", check=True)


# ---------------------------------------------------------------------------- Triton: base weight
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_triton_base_weight_is_bit_exact(device, dtype, group_size):
    _, enc = encoded(_SHAPES[group_size], dtype, group_size, seed=group_size)
    assert_bit_exact(base_weight(PackedWeight.from_encoded(enc, device, delta=False), backend="triton"),
                     enc.base_weight())


@pytest.mark.parametrize("device", DEVICES)
def test_triton_prediction_rounding_on_every_fp16_scale(device):
    """Every finite fp16 scale times every level -15..15, rounded to each source dtype, matches torch
    (bf16 rounding is written out in the kernel; the interpreter's own cast truncates)."""
    scales = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    scales = scales[torch.isfinite(scales)]
    rows = scales.numel() // 64
    scales = scales[: rows * 64].view(rows, 64).repeat_interleave(2, dim=1)  # 2 groups per scale
    ng = scales.shape[1]
    q = (torch.arange(32) % 16).repeat(rows, ng).to(torch.uint8)  # G = 32: q = 0..15, twice
    zeros = torch.tensor([15, 0], dtype=torch.uint8).repeat(rows, ng // 2)  # c = -15..0, then 0..15
    qweight = q[:, 0::2] | (q[:, 1::2] << 4)
    zeros = zeros[:, 0::2] | (zeros[:, 1::2] << 4)
    for dtype in DTYPES:
        pw = PackedWeight.from_base(qweight, scales, zeros, (rows, ng * 32), dtype, 32).to(device)
        assert_bit_exact(base_weight(pw, backend="triton"), torch_ref.base_weight(pw.to("cpu")))


# ---------------------------------------------------------------------------- Triton: fused lossless
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["gemv", "batched_bias", "multi_row_blocks"])
@pytest.mark.parametrize("tables", ["fused", "split"])
def test_triton_fused_lossless_linear(device, dtype, case, tables):
    shape, lead, use_bias = {"gemv": ((37, 101), (1,), False), "batched_bias": ((5, 700), (2, 3), True),
                             "multi_row_blocks": ((300, 7), (16,), True)}[case]
    w, enc = encoded(shape, dtype, {"gemv": 32, "batched_bias": 128, "multi_row_blocks": 64}[case], seed=7)
    pw = PackedWeight.from_encoded(enc, device, tables=tables)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(*lead, shape[1], generator=g).to(dtype)
    bias = (torch.randn(shape[0], generator=g) * 0.1).to(dtype) if use_bias else None
    y = lossless_linear(x.to(device), pw, None if bias is None else bias.to(device), backend="triton", fused=True)
    assert y.shape == (*lead, shape[0]) and y.device.type == device
    assert_matmul_close(y, x, w, bias)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_lanes", [64, 128])
def test_triton_fused_lossless_linear_wider_programs(device, block_lanes):
    """The benchmark's other program widths (2 and 4 warps, reduced through shared memory)."""
    from tpde_hf.triton_kernels import triton_impl

    w, enc = encoded((70, 101), torch.bfloat16, 32, seed=8)
    x = torch.randn(2, 101, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    y = triton_impl.fused_linear(x.to(device), PackedWeight.from_encoded(enc, device), block_lanes=block_lanes)
    assert_matmul_close(y.to(torch.bfloat16), x, w)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_fused_lossless_linear_row_chunks_and_mixed_dtype(device):
    """17 rows: two programs over the batch; a float32 weight used by bfloat16 activations."""
    w, enc = encoded((37, 101), torch.float32, 32, seed=5)
    x = torch.randn(17, 101, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    y = lossless_linear(x.to(device), PackedWeight.from_encoded(enc, device), backend="triton", fused=True)
    assert_matmul_close(y, x, w)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_prefill_path_is_bit_identical_to_dense(device):
    """Above FUSED_MAX_ROWS the weight is reconstructed and the matmul is F.linear's own."""
    w, enc = encoded((37, 101), torch.bfloat16, 32, seed=9)
    x = torch.randn(40, 101, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).to(device)
    bias = torch.randn(37).to(torch.bfloat16).to(device)
    y = lossless_linear(x, PackedWeight.from_encoded(enc, device), bias, backend="triton")
    assert_bit_exact(y, F.linear(x, w.to(device), bias))


# ---------------------------------------------------------------------------- Triton: base matmul
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_triton_base_linear(device, dtype, group_size):
    shape = _SHAPES[group_size]
    _, enc = encoded(shape, dtype, group_size, seed=group_size + 1)
    pw = PackedWeight.from_encoded(enc, device, delta=False)
    g = torch.Generator().manual_seed(group_size)
    x = torch.randn(3, shape[1], generator=g).to(dtype)
    bias = torch.randn(shape[0], generator=g).to(dtype)
    y = base_linear(x.to(device), pw, bias.to(device), backend="triton", fused=True)
    assert_matmul_close(y, x, enc.base_weight(), bias)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_triton_base_linear_split_k_is_deterministic(device, rows):
    """Split-K (several programs per output tile, the last one adds the partials in order): within
    the matmul bound for every split, including splits that do not divide the 10 groups and more
    splits than groups; the same bits on every run; the tile tickets end reset for the next launch."""
    from tpde_hf.triton_kernels import triton_impl

    _, enc = encoded((37, 300), torch.bfloat16, 32, seed=12)  # 10 groups per row, the last one partial
    pw = PackedWeight.from_encoded(enc, device, delta=False)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 300, generator=g).to(torch.bfloat16)
    bias = torch.randn(37, generator=g).to(torch.bfloat16)
    xd, bd = x.to(device), bias.to(device)
    for split in (1, 2, 3, 7, 64):
        y = triton_impl.base_linear(xd, pw, bd, split=split)
        assert_matmul_close(y, x, enc.base_weight(), bias)
        assert_bit_exact(triton_impl.base_linear(xd, pw, bd, split=split), y)
    assert all(not bool(t.any()) for t in triton_impl._TICKETS.values())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_base_linear_dequantizes_bit_exactly(device, dtype):
    """With x = I (one-hot rows) every output is one weight times 1, so ``y.T`` is the kernel's own
    dequantized weight in x's dtype: bit for bit ``base_weight``'s, through the word unpacking and the
    fused ``q * s - zero * s``. 45 columns: a partial last group (masked padding)."""
    _, enc = encoded((37, 45), dtype, 32, seed=24, adversarial=False)
    pw = PackedWeight.from_encoded(enc, device, delta=False)
    eye = torch.eye(45, dtype=dtype, device=pw.device)
    y = base_linear(eye, pw, backend="triton", fused=True)
    assert_bit_exact(y.T.contiguous(), enc.base_weight().to(pw.device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("block_n", "block_k_bytes"), [(32, 16), (64, 4), (128, 32), (128, 64)])
def test_triton_base_linear_launch_configs(device, block_n, block_k_bytes):
    """Every tile the benchmark sweeps (64 bytes = a whole 128-group per K step; 4 = one word), on
    rows and columns that fill no tile and a last group that is partial."""
    from tpde_hf.triton_kernels import triton_impl

    _, enc = encoded((150, 333), torch.bfloat16, 128, seed=21)
    pw = PackedWeight.from_encoded(enc, device, delta=False)
    x = torch.randn(2, 333, generator=torch.Generator().manual_seed(21)).to(torch.bfloat16)
    y = triton_impl.base_linear(x.to(device), pw, None, block_n=block_n, block_k_bytes=block_k_bytes)
    assert_matmul_close(y, x, enc.base_weight())


@pytest.mark.parametrize("device", DEVICES)
def test_triton_base_linear_reads_words_of_any_alignment(device):
    """The codes are read as int32 words: a qweight that starts off a 4-byte boundary (a view into a
    larger buffer, as from a file) is aligned once by ``PackedWeight`` and gives the same result; a K
    step of part of a word is refused."""
    from tpde_hf.triton_kernels import triton_impl

    _, enc = encoded((20, 64), torch.float16, 32, seed=22)
    pw = PackedWeight.from_encoded(enc, device, delta=False)
    buf = torch.zeros(pw.qweight.numel() + 1, dtype=torch.uint8, device=pw.device)
    buf[1:].copy_(pw.qweight.flatten())
    view = buf[1:].view(pw.qweight.shape)
    assert view.data_ptr() % 4 == 1
    shifted = PackedWeight.from_base(view, pw.scales, pw.zeros, pw.shape, pw.dtype, pw.group_size)
    assert shifted.qweight.data_ptr() % 4 == 0 and torch.equal(shifted.qweight, view)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(22)).to(torch.float16).to(device)
    assert_bit_exact(triton_impl.base_linear(x, shifted, None), triton_impl.base_linear(x, pw, None))
    with pytest.raises(ValueError, match="multiple of 4"):
        triton_impl.base_linear(x, pw, None, block_k_bytes=6)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_base_linear_ignores_crafted_padding_codes(device):
    """Columns past ``in_features`` hold the zero point in every file this package writes (P = 0).
    Other codes there, with an fp16 scale large enough to overflow, must not turn the output into
    NaN (inf * 0): the kernel masks the padding of a partial last group."""
    _, enc = encoded((9, 40), torch.float16, 32, seed=23)  # the second group has 8 real columns
    pw = PackedWeight.from_encoded(enc, device, delta=False)
    q = pw.qweight.clone()
    q[:, 16:20] = 0x11  # columns 32..39, the real part of group 1: code 1, P = 60000
    q[:, 20:] = 0xFF  # columns 40..63, its padding: code 15, P = 15 * 60000 = inf in fp16
    scales = pw.scales.clone()
    scales[:, 1] = 60000.0
    zeros = torch.zeros_like(pw.zeros)
    crafted = dataclasses.replace(pw, qweight=q, scales=scales, zeros=zeros)
    x = torch.randn(2, 40, generator=torch.Generator().manual_seed(23)).to(torch.float16)
    y = base_linear(x.to(device), crafted, backend="triton", fused=True)
    ref = torch_ref.base_weight(crafted.to("cpu"))  # sliced to the 40 real columns
    assert_matmul_close(y, x, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_base_linear_batches_and_mixed_dtype(device):
    _, enc = encoded((70, 101), torch.float32, 32, seed=4)
    pw = PackedWeight.from_encoded(enc, device, delta=False)
    x = torch.randn(2, 20, 101, generator=torch.Generator().manual_seed(4)).to(torch.float16)
    y = base_linear(x.to(device), pw, backend="triton", fused=True)  # 40 rows: BLOCK_M = 64
    assert_matmul_close(y, x, enc.base_weight())
    x = x.reshape(40, 101).repeat(2, 1).to(torch.bfloat16)  # 80 rows: dequantize + F.linear
    y = base_linear(x.to(device), pw, backend="triton")
    assert_bit_exact(y, F.linear(x.to(device), enc.base_weight().to(device).to(torch.bfloat16)))
