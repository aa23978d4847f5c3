"""The class-width delta code (``tpde_hf.codec.class_width``): bit-exact round trips, header and layout.

Every test runs twice: on the torch reference and on the compiled twin (``class_width_compiled``), which
must write the same bytes and reject the same corruptions. Every comparison is on bit patterns (``view``
as int16/int32), never on values. Besides the round trips, a pure-Python reader written from the module
docstring checks the stored layout (header packing, field order, span offsets) that a GPU kernel relies
on, independently of the module's own decoder.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from tpde_hf.codec import CodecParams, base_quant, class_width, class_width_compiled, encode_tensor
from tpde_hf.codec.ordinal import INT_VIEW, bit_width, to_ordinal, wrap
from tpde_hf.errors import TpdeFormatError

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
GROUPS = (32, 64, 128)
# Not multiples of 32/64/128 nor of OFFSET_SPAN (1024); 2x2100 spans three offsets per row.
SHAPES = ((3, 1500), (7, 33), (2, 2100), (5, 128), (1, 1))


IMPLEMENTATIONS = {"reference": class_width, "compiled": class_width_compiled}
_impl = class_width  # the implementation under test, set per test by `implementation`


@pytest.fixture(autouse=True, params=list(IMPLEMENTATIONS))
def implementation(request: pytest.FixtureRequest):
    global _impl
    _impl = IMPLEMENTATIONS[request.param]
    yield request.param
    _impl = class_width


def encode(w: torch.Tensor, base: base_quant.BaseTensors, g: int) -> class_width.ClassWidthDelta:
    """The implementation under test's encode, checked byte for byte against the reference's."""
    code = _impl.encode(w, base, g)
    if _impl is not class_width:
        ref = class_width.encode(w, base, g)
        for part in ("header", "offsets", "words"):
            a, b = getattr(code, part), getattr(ref, part)
            assert torch.equal(a, b) and a.stride() == b.stride(), part  # a view's strides reach the file
        assert (code.total_bits, code.checksum) == (ref.total_bits, ref.checksum)
    return code


def decode(code: class_width.ClassWidthDelta, base: base_quant.BaseTensors, verify: bool = False) -> torch.Tensor:
    return _impl.decode(code, base, verify=verify)


def check_layout(code: class_width.ClassWidthDelta, base: base_quant.BaseTensors) -> None:
    _impl.check_layout(code, base)


def assert_layout_rejected(code: class_width.ClassWidthDelta, base: base_quant.BaseTensors) -> None:
    """Both the layout check (what runs before a GPU kernel reads) and the decoder refuse ``code``."""
    with pytest.raises(TpdeFormatError):
        check_layout(code, base)
    with pytest.raises(TpdeFormatError):
        decode(code, base)


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(INT_VIEW[x.dtype])


def assert_bit_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(bits(a), bits(b))


def round_trip(w: torch.Tensor, g: int) -> class_width.ClassWidthDelta:
    base = base_quant.quantize(w, g)
    code = encode(w, base, g)
    assert_bit_equal(decode(code, base), w)
    return code


def weight(shape: tuple[int, int], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * 0.05).to(dtype)


def random_patterns(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """``n`` uniformly random bit patterns of ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    w = bit_width(dtype)
    raw = torch.randint(-(1 << (w - 1)), 1 << (w - 1), (n,), generator=gen, dtype=torch.int64)
    return raw.to(INT_VIEW[dtype]).view(dtype)


def fp32_specials() -> torch.Tensor:
    """NaN payloads (quiet, signalling, negative), +-inf, +-0, subnormals, the extremes of the finite range."""
    patterns = [0x7FC00000, 0x7FC00001, 0x7F800001, 0x7FBFFFFF, 0x7FFFFFFF, 0xFFC00000, 0xFF800001, 0xFFFFFFFF,
                0x7F800000, 0xFF800000, 0x00000000, 0x80000000, 0x00000001, 0x80000001, 0x007FFFFF, 0x807FFFFF,
                0x00400000, 0x7F7FFFFF, 0xFF7FFFFF, 0x00800000, 0x80800000, 0x3F800000, 0xBF800000]
    return torch.tensor(patterns, dtype=torch.int64).to(torch.int32).view(torch.float32)


# ==================================================================== an independent reader of the layout
def reference_decode(code: class_width.ClassWidthDelta, base: base_quant.BaseTensors) -> tuple[list, list]:
    """Widths and deltas ``r`` read with Python ints from the layout the module docstring describes.

    Returns ``(widths[row][group][class], r[row][col])``; also checks the span offsets against the
    running bit position.
    """
    out_f, in_f = code.shape
    g = code.group_size
    ng = base_quant.n_groups(in_f, g)
    w16 = bit_width(code.dtype) == 16
    assert code.header.dtype == torch.int32 and tuple(code.header.shape) == (out_f, ng, 1 if w16 else 2)
    assert code.offsets.dtype == torch.int32  # the payload is far under 2**31 bits
    assert tuple(code.offsets.shape) == (out_f, -(-in_f // class_width.OFFSET_SPAN))
    assert code.words.dtype == torch.int32
    header = [[[v & 0xFFFFFFFF for v in grp] for grp in row] for row in code.header.tolist()]
    stream = 0
    for i, v in enumerate(code.words.tolist()):
        stream |= (v & 0xFFFFFFFF) << (32 * i)
    levels = base_quant.levels(base, code.shape, g).abs().tolist()
    offsets = code.offsets.tolist()
    widths, rs = [], []
    pos = 0
    for row in range(out_f):
        row_w, min0 = [], []
        for grp in range(ng):
            h = header[row][grp]
            if w16:  # bits 0-15: four 4-bit width codes (15 means 16 bits); bits 16-31: min0
                nibbles = [(h[0] >> (4 * k)) & 0xF for k in range(4)]
                row_w.append([16 if c == 15 else c for c in nibbles])
                min0.append(h[0] >> 16)
            else:  # word 0: four widths as bytes; word 1: min0
                row_w.append([(h[0] >> (8 * k)) & 0xFF for k in range(4)])
                min0.append(h[1])
        r_row = []
        for col in range(in_f):
            if col % class_width.OFFSET_SPAN == 0:
                assert offsets[row][col // class_width.OFFSET_SPAN] == pos, (row, col)
            a = levels[row][col]
            cls = 0 if a == 0 else 1 if a == 1 else 2 if a < 4 else 3
            n = row_w[col // g][cls]
            field = (stream >> pos) & ((1 << n) - 1)
            pos += n
            if cls == 0:
                mag = (field >> 1) + min0[col // g]
                r_row.append(-1 - mag if field & 1 else mag)
            else:
                r_row.append((field >> 1) ^ -(field & 1))
        widths.append(row_w)
        rs.append(r_row)
    assert code.words.numel() == -(-pos // 32) + 1  # the payload, then one zero word for the 64-bit window
    assert code.words[-1].item() == 0
    return widths, rs


def true_deltas(w: torch.Tensor, base: base_quant.BaseTensors, g: int) -> torch.Tensor:
    pred = base_quant.predict(base, tuple(w.shape), g, w.dtype)
    return wrap(to_ordinal(w) - to_ordinal(pred), bit_width(w.dtype))


def natural_widths(w: torch.Tensor, base: base_quant.BaseTensors, g: int) -> list:
    """The smallest width per (row, group, class), from the definition, before the 15 -> 16 rule."""
    r = true_deltas(w, base, g).tolist()
    lv = base_quant.levels(base, tuple(w.shape), g).abs().tolist()
    out_f, in_f = w.shape
    result = []
    for row in range(out_f):
        row_w = []
        for g0 in range(0, in_f, g):
            cols = range(g0, min(g0 + g, in_f))
            cls = {c: (0 if lv[row][c] == 0 else 1 if lv[row][c] == 1 else 2 if lv[row][c] < 4 else 3) for c in cols}
            mags = {c: (r[row][c] if r[row][c] >= 0 else -1 - r[row][c]) for c in cols}
            c0 = [mags[c] for c in cols if cls[c] == 0]
            min0 = min(c0) if c0 else 0
            widths = []
            for k in range(4):
                members = [c for c in cols if cls[c] == k]
                if k == 0:
                    fields = [((mags[c] - min0) << 1) | (r[row][c] < 0) for c in members]
                    widths.append(max(1, max(fields).bit_length()) if members else 0)
                else:
                    fields = [(r[row][c] << 1) ^ (r[row][c] >> 63) for c in members]
                    widths.append(max(fields, default=0).bit_length())
            row_w.append(widths)
        result.append(row_w)
    return result


def expected_header_widths(natural: list, dtype: torch.dtype) -> list:
    if bit_width(dtype) == 32:
        return natural
    return [[[16 if n == 15 else n for n in grp] for grp in row] for row in natural]


# ==================================================================== round trips
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("g", GROUPS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_round_trip_shapes(dtype: torch.dtype, g: int, shape: tuple[int, int]) -> None:
    w = weight(shape, dtype, seed=shape[0] * 7 + shape[1])
    code = round_trip(w, g)
    assert code.shape == shape and code.dtype == dtype and code.group_size == g


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("g", GROUPS)
def test_every_16_bit_pattern(dtype: torch.dtype, g: int) -> None:
    """All 65,536 bit patterns (NaNs, infs, subnormals, -0.0 included) as one 256x256 weight."""
    w = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype).view(256, 256)
    code = round_trip(w, g)
    widths = code.widths()
    assert int(widths.max()) <= 16 and not bool((widths == 15).any())
    # Shuffled, so that groups mix specials with ordinary values.
    perm = torch.randperm(w.numel(), generator=torch.Generator().manual_seed(g))
    round_trip(w.flatten()[perm].view(256, 256), g)


@pytest.mark.parametrize("g", GROUPS)
def test_fp32_random_bit_patterns(g: int) -> None:
    """Uniformly random fp32 bit patterns (about 1 in 256 a NaN or inf), with the special values mixed in."""
    w = random_patterns(1024 * 2000, torch.float32, seed=g)
    specials = fp32_specials()
    w[torch.randperm(w.numel(), generator=torch.Generator().manual_seed(1))[: 40 * specials.numel()]] = \
        specials.repeat(40)
    code = round_trip(w.view(1024, 2000), g)
    assert int(code.widths().max()) <= 32


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_special_values_in_real_looking_groups(dtype: torch.dtype) -> None:
    """NaN, +-inf, +-0 and subnormals scattered through small weights: each in its own group's context."""
    w = weight((16, 700), dtype, seed=3)
    width = bit_width(dtype)
    if width == 32:
        specials = fp32_specials()
    else:  # NaN payloads (quiet, signalling, negative), both infinities, +-0 and subnormals
        mant = 7 if dtype == torch.bfloat16 else 10
        exp_all = ((1 << (15 - mant)) - 1) << mant
        pats = [exp_all | m for m in (0, 1, 2, (1 << mant) - 1, 1 << (mant - 1))] + [0, 1, 2, (1 << mant) - 1]
        pats += [p | 0x8000 for p in pats]
        specials = torch.tensor(pats, dtype=torch.int64).to(torch.int16).view(dtype)
    idx = torch.randperm(w.numel(), generator=torch.Generator().manual_seed(4))[: 3 * specials.numel()]
    w.view(-1)[idx] = specials.repeat(3)
    for g in GROUPS:
        round_trip(w, g)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_constant_groups_and_all_zero_weight(dtype: torch.dtype) -> None:
    for value in (0.0, -0.0, 0.5, -3.25, 1e-3):
        w = torch.full((4, 300), value, dtype=dtype)
        for g in GROUPS:
            code = round_trip(w, g)
            if value == 0.0 and math.copysign(1.0, value) > 0:  # +0.0: every delta is 0
                # All elements are class 0 with r = 0: one (sign) bit each, nothing else.
                assert code.widths()[..., 0].eq(1).all() and code.widths()[..., 1:].eq(0).all()
                assert bool((code.min0() == 0).all())
                assert code.words.numel() == -(-w.numel() // 32) + 1
    # Constant rows side by side with ordinary ones.
    w = weight((6, 260), dtype, seed=5)
    w[1] = 0.0
    w[3] = -7.5
    w[4, :128] = 0.125
    for g in GROUPS:
        round_trip(w, g)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extreme_outliers(dtype: torch.dtype) -> None:
    """One huge value per group among small ones: the scale saturates, the small values fall in class 0."""
    big = 60000.0 if dtype == torch.float16 else 1e30
    w = weight((8, 512), dtype, seed=6) * 0.01
    w[:, ::128] = big
    w[::2, 5::128] = -big
    w[3, 7] = 1e-30 if dtype != torch.float16 else 6e-8
    for g in GROUPS:
        code = round_trip(w, g)
        assert int(code.widths().max()) <= bit_width(dtype)


# ==================================================================== header, layout, sizes
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "g"), (((7, 33), 32), ((3, 1500), 128), ((2, 2100), 64)),
                         ids=("7x33-G32", "3x1500-G128", "2x2100-G64"))
def test_layout_matches_the_documented_format(dtype: torch.dtype, shape: tuple[int, int], g: int) -> None:
    """A reader written from the docstring (Python ints) finds the same deltas, widths and offsets."""
    w = weight(shape, dtype, seed=11)
    w.view(-1)[::97] = float("nan")
    w.view(-1)[5::131] = -0.0
    base = base_quant.quantize(w, g)
    code = encode(w, base, g)
    widths, rs = reference_decode(code, base)
    assert torch.equal(torch.tensor(rs, dtype=torch.int64), true_deltas(w, base, g))
    assert widths == code.widths().tolist()
    # The widths are the smallest that hold every field (15 stored as 16 for 16-bit sources).
    assert widths == expected_header_widths(natural_widths(w, base, g), dtype)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_width_15_is_stored_as_16(dtype: torch.dtype) -> None:
    """A class-0 field of 15 bits (+0.0 and 0.01 below half a step of 10/15) is stored with width 16."""
    w = torch.zeros(4, 64, dtype=dtype)
    w[:, 1] = 0.01  # ord(0.01) in [2**13, 2**14): field (mag - min0) << 1 has 15 bits
    w[:, 2] = 10.0
    w[1, 40:] = weight((1, 24), dtype, seed=2)  # a second group of ordinary values
    base = base_quant.quantize(w, 32)
    code = encode(w, base, 32)
    natural = torch.tensor(natural_widths(w, base, 32))
    stored = code.widths()
    assert bool((natural[:, 0, 0] == 15).all())
    assert torch.equal(stored, torch.where(natural == 15, 16, natural))
    nibbles = (code.header[..., 0].to(torch.int64)[..., None] >> (4 * torch.arange(4))) & 0xF
    assert torch.equal(nibbles, torch.where(natural >= 15, 15, natural))
    assert_bit_equal(decode(code, base), w)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("g", GROUPS)
def test_stored_bytes_and_widths_bound(dtype: torch.dtype, g: int) -> None:
    w = weight((9, 2100), dtype, seed=g)
    w.view(-1)[::301] = float("inf")
    base = base_quant.quantize(w, g)
    code = encode(w, base, g)
    widths = code.widths()
    src = bit_width(dtype)
    assert int(widths.min()) >= 0 and int(widths.max()) <= src
    if src == 16:
        assert not bool((widths == 15).any())
    ng = base_quant.n_groups(w.shape[1], g)
    assert tuple(widths.shape) == (w.shape[0], ng, class_width.N_CLASSES)
    # Payload bits = sum over (group, class) of members x width, computed from the base alone.
    lv = base_quant.levels(base, tuple(w.shape), g).abs()
    cls = torch.bucketize(lv, torch.tensor(class_width.CLASS_EDGES, dtype=lv.dtype), right=True) - 1
    counts = torch.nn.functional.one_hot(
        torch.nn.functional.pad(cls.to(torch.int64), (0, ng * g - w.shape[1]), value=class_width.N_CLASSES),
        class_width.N_CLASSES + 1)[..., : class_width.N_CLASSES].view(w.shape[0], ng, g, -1).sum(2)
    total_bits = int((counts * widths).sum())
    assert code.words.numel() == -(-total_bits // 32) + 1
    assert code.total_bits == total_bits
    assert code.stored_bytes == 16 + (code.header.numel() * code.header.element_size()
                                 + code.offsets.numel() * code.offsets.element_size()
                                 + code.words.numel() * code.words.element_size())
    h = 1 if src == 16 else 2
    # int32 offsets: three spans per row
    assert code.stored_bytes == 16 + 4 * w.shape[0] * ng * h + 4 * w.shape[0] * 3 + 4 * code.words.numel()


# ==================================================================== one base for both delta codes
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("g", GROUPS)
def test_shares_its_base_with_the_rans_codec(dtype: torch.dtype, g: int) -> None:
    w = weight((24, 1100), dtype, seed=21)
    w[0, :40] = 0.0
    w[2, 3] = float("nan")
    w[5, 9] = float("-inf")
    enc = encode_tensor(w, CodecParams(group_size=g))
    base = base_quant.quantize(w, g)
    assert torch.equal(enc.qweight, base.qweight) and enc.qweight.dtype == torch.uint8
    assert torch.equal(enc.zeros, base.zeros) and enc.zeros.dtype == torch.uint8
    assert enc.scales.dtype == base.scales.dtype == torch.float16
    assert torch.equal(enc.scales.view(torch.int16), base.scales.view(torch.int16))
    code = encode(w, enc.base, g)  # the rANS file's own base
    assert_bit_equal(decode(code, enc.base), w)


# ==================================================================== corrupt input
def _set_width(code: class_width.ClassWidthDelta, row: int, grp: int, cls: int, new: int) -> torch.Tensor:
    """The header with one width code replaced (16-bit: a nibble, code 15 = 16 bits; fp32: a byte)."""
    h = code.header.clone()
    v = int(h[row, grp, 0]) & 0xFFFFFFFF
    if bit_width(code.dtype) == 16:
        new = 15 if new == 16 else new
        v = (v & ~(0xF << (4 * cls))) | (new << (4 * cls))
    else:
        v = (v & ~(0xFF << (8 * cls))) | (new << (8 * cls))
    h[row, grp, 0] = v - (1 << 32) if v >= 1 << 31 else v
    return h


def _present_class(base: base_quant.BaseTensors, shape: tuple[int, int], g: int, row: int, grp: int) -> int:
    lv = base_quant.levels(base, shape, g).abs()[row, grp * g : (grp + 1) * g]
    cls = torch.bucketize(lv, torch.tensor(class_width.CLASS_EDGES, dtype=lv.dtype), right=True) - 1
    return int(torch.bincount(cls.to(torch.int64), minlength=4).argmax())


@pytest.fixture(params=DTYPES, ids=str)
def coded(request: pytest.FixtureRequest) -> tuple[torch.Tensor, base_quant.BaseTensors, class_width.ClassWidthDelta]:
    w = weight((6, 1300), request.param, seed=31)
    base = base_quant.quantize(w, 128)
    return w, base, encode(w, base, 128)


@pytest.mark.parametrize("delta", (-1, 1, 3))
def test_corrupt_width_code_is_detected(coded, delta: int) -> None:
    """A changed width of a class present in a group moves every later bit offset: the span offsets disagree."""
    w, base, code = coded
    for row, grp in ((0, 0), (2, 5), (4, 10)):  # spans that a stored offset follows (the last one: below)
        k = _present_class(base, code.shape, 128, row, grp)
        old = int(code.widths()[row, grp, k])
        src = bit_width(code.dtype)
        storable = [v for v in range(src + 1) if v != old and not (src == 16 and v == 15)]
        new = min(storable, key=lambda v: abs(v - (old + delta)))
        assert_layout_rejected(dataclasses.replace(code, header=_set_width(code, row, grp, k, new)), base)


def test_fp32_width_past_32_bits_is_refused() -> None:
    """An fp32 header stores widths as bytes: one past 32 bits is refused before any field is read
    (the decoders' masks and shifts assume at most 32). A 16-bit header's codes cannot exceed 16."""
    w = weight((3, 300), torch.float32, seed=5)
    base = base_quant.quantize(w, 128)
    code = encode(w, base, 128)
    for new in (33, 64, 255):
        bad = dataclasses.replace(code, header=_set_width(code, 1, 1, 0, new))
        with pytest.raises(TpdeFormatError, match="exceeds"):
            check_layout(bad, base)
        with pytest.raises(TpdeFormatError, match="exceeds"):
            decode(bad, base)


def test_truncated_or_missing_payload_is_detected(coded) -> None:
    w, base, code = coded
    for keep in (code.words.numel() - 1, code.words.numel() // 2, 1, 0):
        assert_layout_rejected(dataclasses.replace(code, words=code.words[:keep]), base)


def test_corrupt_offsets_are_detected(coded) -> None:
    w, base, code = coded
    for row, span in ((0, 1), (3, 0), (5, 1)):
        off = code.offsets.clone()
        off[row, span] += 1
        assert_layout_rejected(dataclasses.replace(code, offsets=off), base)
    assert_layout_rejected(dataclasses.replace(code, offsets=code.offsets[:, :1]), base)


def test_corrupt_width_in_the_last_span_is_detected(coded) -> None:
    w, base, code = coded
    row, grp = code.shape[0] - 1, base_quant.n_groups(code.shape[1], 128) - 1
    k = _present_class(base, code.shape, 128, row, grp)
    old = int(code.widths()[row, grp, k])
    assert_layout_rejected(dataclasses.replace(code, header=_set_width(code, row, grp, k, old - 1)), base)


def test_corrupt_min0_is_detected(coded) -> None:
    w, base, code = coded
    h = code.header.clone()
    grp = int(torch.nonzero(base_quant.levels(base, code.shape, 128)[0] == 0)[0]) // 128  # a group with class 0
    if bit_width(code.dtype) == 16:
        h[0, grp, 0] += 1 << 16
    else:
        h[0, grp, 1] += 1
    with pytest.raises(TpdeFormatError):
        decode(dataclasses.replace(code, header=h), base, verify=True)  # only the checksum sees it


def test_corrupt_payload_is_detected(coded) -> None:
    w, base, code = coded
    words = code.words.clone()
    words[words.numel() // 2] ^= 1 << 7
    with pytest.raises(TpdeFormatError):
        decode(dataclasses.replace(code, words=words), base, verify=True)  # only the checksum


def test_malformed_header_shape_raises_format_error(coded) -> None:
    w, base, code = coded
    for header in (code.header[:, :-1], code.header[:-1], code.header.to(torch.int64)):
        with pytest.raises(TpdeFormatError):
            decode(dataclasses.replace(code, header=header), base)


def test_offsets_widen_to_int64_only_past_2_31_bits() -> None:
    assert class_width.offset_dtype(2**31 - 1) == torch.int32
    assert class_width.offset_dtype(2**31) == torch.int64
    w = weight((4, 300), torch.bfloat16, seed=5)
    base = base_quant.quantize(w, 128)
    code = encode(w, base, 128)
    with pytest.raises(TpdeFormatError, match="offsets"):  # an int64 copy of small offsets is malformed
        decode(dataclasses.replace(code, offsets=code.offsets.to(torch.int64)), base)
