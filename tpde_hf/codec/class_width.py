"""The class-width delta code: a fixed bit width per (group, context class), decoded without a chain.

The delta code of ``CodecParams(delta_code="class-width")`` (format version 2), chosen at conversion
with ``tpde convert --delta-code class-width``. ``benchmarks/bench_delta_codes.py`` measures its size
against the rANS delta; its kernels are ``triton_kernels/class_width_kernels.py``. In a file, ``delta``
holds ``words``, ``lanes`` holds ``offsets`` and ``tables`` holds ``header`` (``encoded``).

Why: an rANS lane is a chain of dependent steps (about 110 SASS instructions per weight), so the
fused lossless GEMV cannot approach bf16 speed. Here every element's bit position is a prefix sum
of widths that the base alone determines, so a GPU decodes all elements of a tile at once.

The code, for a weight ``[out, in]`` with its base (group size ``G``) and ``r = ord(W) - ord(P)``:

* Each element's class comes from its level ``a = |q - zero|``: ``{0}, {1}, {2, 3}, {4..15}``
  (:data:`CLASS_EDGES`).
* Class 0 (``P = 0``, so ``r`` is the ordinal of ``W`` itself, often 15 bits) is coded against a
  frame of reference: ``mag = r if r >= 0 else -1 - r``; field ``((mag - min0) << 1) | (r < 0)``,
  where ``min0`` is the smallest ``mag`` of class 0 in the group.
* The other classes store ``zigzag(r)``.
* Every field of a class in a group has the width of that class's largest field there.
* Fields follow the elements in row-major order (real columns only, no padding), LSB first, in one
  stream of 32-bit words (:mod:`tpde_hf.codec.bitpack`).

Stored parts:

* ``header``: int32 ``[out, n_groups, H]``.
  * 16-bit sources (H = 1): bits 0-15 hold the four width codes, four bits each; code 15 means
    16 bits, so width 15 is stored as 16. Bits 16-31 hold ``min0``.
  * fp32 (H = 2): word 0 holds the four widths as bytes, word 1 holds ``min0``.
* ``offsets``: ``[out, ceil(in / OFFSET_SPAN)]``, the bit position of each span of
  :data:`OFFSET_SPAN` columns. A GPU program starts there and sums widths from that point. int32
  while the payload is under ``2**31`` bits (256 MB), else int64 (:func:`offset_dtype`): on MiniLM,
  whose rows are one span, int64 offsets cost 0.14 bits per weight.
* ``words``: int32 payload, with one zero word of padding for the 64-bit read window.
* ``total_bits`` and ``checksum`` (the BLAKE2b of the original weight, as in the rANS format's meta):
  decode checks that the widths account for exactly ``total_bits``, and ``verify=True`` checks the
  rebuilt weight against ``checksum``. Only the checksum catches a corrupt ``min0`` or payload bit.

Example::

    from tpde_hf.codec import base_quant, class_width
    w = torch.randn(64, 300, dtype=torch.bfloat16)
    base = base_quant.quantize(w, 128)
    code = class_width.encode(w, base, 128)
    assert torch.equal(class_width.decode(code, base).view(torch.int16), w.view(torch.int16))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tpde_hf.codec import base_quant, bitpack
from tpde_hf.codec.checksum import tensor_checksum
from tpde_hf.codec.ordinal import bit_width, check_dtype, from_ordinal, to_ordinal, wrap
from tpde_hf.codec.symbols import unzigzag, zigzag
from tpde_hf.errors import TpdeFormatError

#: Lower edges of the context classes over ``|q - zero|``.
CLASS_EDGES = (0, 1, 2, 4)
N_CLASSES = len(CLASS_EDGES)
#: Columns per stored bit offset: a multiple of every group size, and of every kernel's step.
OFFSET_SPAN = 1024
#: ``class_of_level[a]`` for ``a = |q - zero|`` in [0, 15].
CLASS_OF_LEVEL = torch.bucketize(torch.arange(16), torch.tensor(CLASS_EDGES), right=True) - 1


@dataclass(frozen=True)
class ClassWidthDelta:
    """One weight's delta in the class-width code (see the module docstring for the layout)."""

    shape: tuple[int, int]
    dtype: torch.dtype
    group_size: int
    header: torch.Tensor
    offsets: torch.Tensor
    words: torch.Tensor
    total_bits: int
    checksum: int

    @property
    def stored_bytes(self) -> int:
        """Bytes of every stored part: what the delta would add to a file (``total_bits`` and ``checksum``
        as two int64, like the rANS format's meta)."""
        return 16 + sum(t.numel() * t.element_size() for t in (self.header, self.offsets, self.words))

    def widths(self) -> torch.Tensor:
        """Field widths in bits, int64 ``[out, n_groups, N_CLASSES]``, unpacked from the header."""
        h = self.header.to(torch.int64) & 0xFFFFFFFF
        if bit_width(self.dtype) == 32:
            return (h[..., :1] >> (8 * torch.arange(N_CLASSES))) & 0xFF
        codes = (h >> (4 * torch.arange(N_CLASSES))) & 0xF
        return codes + (codes == 15).to(torch.int64)

    def min0(self) -> torch.Tensor:
        """The class-0 frame of reference, int64 ``[out, n_groups]``."""
        h = self.header.to(torch.int64) & 0xFFFFFFFF
        return h[..., 1] if bit_width(self.dtype) == 32 else h[..., 0] >> 16


def offset_dtype(total_bits: int) -> torch.dtype:
    """The dtype of the span offsets of a payload of ``total_bits``: int32 where every offset fits."""
    return torch.int32 if total_bits < 2**31 else torch.int64


def _element_classes(base: base_quant.BaseTensors, shape: tuple[int, int],
                     group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    levels = base_quant.levels(base, shape, group_size)
    return levels, CLASS_OF_LEVEL[levels.abs()]


def _grouped(x: torch.Tensor, group_size: int, fill: int) -> torch.Tensor:
    """``[out, in]`` -> ``[out, n_groups, G]``, padding the last group with ``fill``."""
    out_f, in_f = x.shape
    ng = base_quant.n_groups(in_f, group_size)
    return torch.nn.functional.pad(x, (0, ng * group_size - in_f), value=fill).view(out_f, ng, group_size)


def _per_column(x: torch.Tensor, group_size: int, in_f: int) -> torch.Tensor:
    """Per-group values ``[out, n_groups, ...]`` repeated over each group's columns: ``[out, in, ...]``."""
    return x.repeat_interleave(group_size, 1)[:, :in_f]


def _field_positions(widths: torch.Tensor, cls: torch.Tensor, group_size: int):
    """``(width, start bit)`` of every element's field (flat, int64) and the payload's total bits."""
    elem_w = _per_column(widths, group_size, cls.shape[1]).gather(2, cls[..., None]).squeeze(-1).flatten()
    ends = torch.cumsum(elem_w, 0)
    return elem_w, ends - elem_w, int(ends[-1])


def _bit_length(x: torch.Tensor) -> torch.Tensor:
    """Bits needed for non-negative int64 ``x`` (0 for 0); exact since ``x < 2**32``."""
    _, e = torch.frexp(x.to(torch.float64))
    return torch.where(x > 0, e.to(torch.int64), 0)


def _pack_header(widths: torch.Tensor, min0: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    shifts = torch.arange(N_CLASSES)
    if bit_width(dtype) == 32:
        word0 = (widths << (8 * shifts)).sum(-1)
        return torch.stack((wrap(word0, 32), wrap(min0, 32)), -1).to(torch.int32)
    codes = torch.where(widths >= 15, 15, widths)
    return wrap((codes << (4 * shifts)).sum(-1) | (min0 << 16), 32).to(torch.int32)[..., None]


def _fields_and_widths(r: torch.Tensor, cls: torch.Tensor, group_size: int, dtype: torch.dtype):
    """Per-element fields and the per-(group, class) widths and class-0 minimum."""
    neg = r < 0
    mag = torch.where(neg, -1 - r, r)
    g_cls = _grouped(cls, group_size, -1)
    g_mag = _grouped(mag, group_size, 0)
    in_c0 = g_cls == 0
    big = 1 << 40
    min0 = torch.where(in_c0, g_mag, big).amin(-1)
    min0 = torch.where(min0 == big, 0, min0)
    fields = torch.where(cls == 0, ((mag - _per_column(min0, group_size, r.shape[1])) << 1) | neg, zigzag(r))
    g_fields = _grouped(fields, group_size, 0)
    widths = torch.stack([_bit_length(torch.where(g_cls == k, g_fields, 0).amax(-1)) for k in range(N_CLASSES)], -1)
    present = torch.stack([(g_cls == k).any(-1) for k in range(N_CLASSES)], -1)
    widths[..., 0] = torch.where(present[..., 0], widths[..., 0].clamp(min=1), 0)  # the sign bit is always there
    if bit_width(dtype) == 16:
        widths = torch.where(widths == 15, 16, widths)  # width code 15 means 16 bits
    return fields, widths, min0


#: Rows are coded in chunks of about this many elements, so that the int64 temporaries of a large
#: weight (about 80 bytes per element) never exist all at once.
CHUNK_ELEMENTS = 1 << 22


def _row_chunks(shape: tuple[int, int]) -> list[slice]:
    rows = max(1, CHUNK_ELEMENTS // shape[1])
    return [slice(r0, min(r0 + rows, shape[0])) for r0 in range(0, shape[0], rows)]


def _base_rows(base: base_quant.BaseTensors, rows: slice) -> base_quant.BaseTensors:
    return base_quant.BaseTensors(base.qweight[rows], base.scales[rows], base.zeros[rows])


def encode(weight: torch.Tensor, base: base_quant.BaseTensors, group_size: int) -> ClassWidthDelta:
    """The class-width delta of ``weight`` against ``base`` (bf16, fp16 or fp32, any bit pattern)."""
    check_dtype(weight.dtype)
    shape = tuple(weight.shape)
    width = bit_width(weight.dtype)
    headers, offsets, pieces = [], [], []
    total = 0
    for rows in _row_chunks(shape):
        w = weight[rows]
        chunk_shape = tuple(w.shape)
        levels, cls = _element_classes(_base_rows(base, rows), chunk_shape, group_size)
        pred = base_quant.predict_from_levels(levels, base.scales[rows], group_size, weight.dtype)
        r = wrap(to_ordinal(w) - to_ordinal(pred), width)
        del pred, levels
        fields, widths, min0 = _fields_and_widths(r, cls, group_size, weight.dtype)
        elem_w, starts, chunk_bits = _field_positions(widths, cls, group_size)
        # The chunk's fields land at bit ``total`` of the stream: pack them from word ``total // 32``.
        shift = total & 31
        pieces.append((total >> 5, bitpack.pack_fields(fields.flatten(), elem_w, starts + shift, chunk_bits + shift)))
        headers.append(_pack_header(widths, min0, weight.dtype))
        offsets.append(starts.view(chunk_shape)[:, ::OFFSET_SPAN] + total)
        total += chunk_bits
    words = torch.zeros(bitpack.n_words(total) + 1, dtype=torch.int64)  # + the zero word of padding
    for first, piece in pieces:
        words[first : first + piece.numel()] |= piece  # chunks share at most their boundary word's bits
    return ClassWidthDelta(
        shape=shape, dtype=weight.dtype, group_size=group_size,
        header=torch.cat(headers),
        offsets=torch.cat(offsets).to(offset_dtype(total)).contiguous(),
        words=wrap(words, 32).to(torch.int32),
        total_bits=total,
        checksum=tensor_checksum(weight),
    )


def _expect(part: torch.Tensor, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if part.dtype != dtype or tuple(part.shape) != shape:
        raise TpdeFormatError(None, f"class-width delta: {name} is {part.dtype} {list(part.shape)}, "
                                    f"expected {dtype} {list(shape)}")


def validate(code: ClassWidthDelta, base: base_quant.BaseTensors) -> None:
    """Raise :class:`TpdeFormatError` unless every part has the layout that ``code.shape`` implies."""
    check_dtype(code.dtype)
    if code.group_size not in base_quant.SUPPORTED_GROUP_SIZES:
        raise TpdeFormatError(None, f"class-width delta: group size {code.group_size} unsupported")
    if len(code.shape) != 2 or min(code.shape) < 1:
        raise TpdeFormatError(None, f"class-width delta: shape {list(code.shape)} is not a 2-D weight")
    out_f, in_f = code.shape
    ng = base_quant.n_groups(in_f, code.group_size)
    _expect(base.qweight, "qweight", torch.uint8, (out_f, ng * code.group_size // 2))
    _expect(base.scales, "scales", torch.float16, (out_f, ng))
    _expect(base.zeros, "zeros", torch.uint8, (out_f, -(-ng // 2)))
    _expect(code.header, "header", torch.int32, (out_f, ng, 1 if bit_width(code.dtype) == 16 else 2))
    _expect(code.offsets, "offsets", offset_dtype(code.total_bits), (out_f, -(-in_f // OFFSET_SPAN)))
    _expect(code.words, "words", torch.int32, (bitpack.n_words(code.total_bits) + 1,))
    # A 16-bit header's 4-bit width codes cannot exceed 16; an fp32 header's bytes can exceed 32.
    if bit_width(code.dtype) == 32 and int(code.widths().max()) > 32:
        raise TpdeFormatError(None, f"class-width delta: a width exceeds the {bit_width(code.dtype)}-bit source")


def _checked_chunks(code: ClassWidthDelta, base: base_quant.BaseTensors):
    """Per row chunk: ``(rows, levels, classes, element widths, element bit offsets)``, checking that
    the header's widths give exactly the stored span offsets and, after the last chunk, the payload's
    length (so no read can leave the payload)."""
    validate(code, base)
    widths = code.widths()
    offsets = code.offsets.to(torch.int64)
    total = 0
    for rows in _row_chunks(code.shape):
        chunk_shape = (rows.stop - rows.start, code.shape[1])
        levels, cls = _element_classes(_base_rows(base, rows), chunk_shape, code.group_size)
        elem_w, starts, chunk_bits = _field_positions(widths[rows], cls, code.group_size)
        starts += total
        if not torch.equal(starts.view(chunk_shape)[:, ::OFFSET_SPAN], offsets[rows]):
            raise TpdeFormatError(None, "class-width delta: stored span offsets disagree with the header's widths")
        total += chunk_bits
        yield rows, levels, cls, elem_w, starts
    if total != code.total_bits:
        raise TpdeFormatError(None, f"class-width delta: the header's widths add up to {total} bits, "
                                    f"the payload holds {code.total_bits}")


def check_layout(code: ClassWidthDelta, base: base_quant.BaseTensors) -> None:
    """Raise :class:`TpdeFormatError` unless the delta is consistent with itself and its base (no decode)."""
    for _ in _checked_chunks(code, base):
        pass


def decode(code: ClassWidthDelta, base: base_quant.BaseTensors, verify: bool = False) -> torch.Tensor:
    """The exact weight from ``base`` and its class-width delta; raises on an inconsistent delta.

    ``verify`` also checks the rebuilt weight against the stored checksum.
    """
    width = bit_width(code.dtype)
    words = code.words.to(torch.int64) & 0xFFFFFFFF
    min0 = code.min0()
    weight = torch.empty(code.shape, dtype=code.dtype)
    for rows, levels, cls, elem_w, starts in _checked_chunks(code, base):
        in_f = code.shape[1]
        fields = bitpack.read_fields(words, elem_w, starts).view(cls.shape)
        mag = (fields >> 1) + _per_column(min0[rows], code.group_size, in_f)
        r = torch.where(cls == 0, torch.where((fields & 1) == 1, -1 - mag, mag), unzigzag(fields))
        pred = base_quant.predict_from_levels(levels, base.scales[rows], code.group_size, code.dtype)
        weight[rows] = from_ordinal(wrap(to_ordinal(pred) + r, width), code.dtype)
    if verify and tensor_checksum(weight) != code.checksum:
        raise TpdeFormatError(None, "class-width delta: checksum mismatch, the delta or its base is corrupt")
    return weight


__all__ = ["CLASS_EDGES", "OFFSET_SPAN", "ClassWidthDelta", "check_layout", "decode", "encode", "offset_dtype",
           "validate"]
