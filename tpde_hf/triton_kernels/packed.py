"""``PackedWeight``: one encoded weight in the decode-ready form the kernels read.

:func:`PackedWeight.from_encoded` turns a validated :class:`~tpde_hf.codec.EncodedTensor` into
device tensors in two separable groups:

* **base** (the 4-bit model, needed by every mode): ``qweight`` uint8 ``[out, in_pad/2]``,
  ``scales`` float16 ``[out, n_groups]``, ``zeros`` uint8 ``[out, ceil(n_groups/2)]``, exactly
  as stored in the file (kernels unpack the nibbles on the fly).
* **delta** (only for the lossless modes): the rANS words, the raw-bit words, the per-lane start
  offsets and final states, and the two decode tables. All are built once, on the CPU, here.

============  ======================  =============================================================
delta field   dtype / shape           content
============  ======================  =============================================================
words         int16 [n_words]         the rANS renormalization words (u16 bit patterns), lane-major
raw           int32 [n_raw_words]     raw low bits (u32 bit patterns), LSB first, lanes back to back
lane_state    int32 [n_lanes]         each lane's final encoder state (u32 bit pattern)
word_start    int32|int64 [L+1]       first word of each lane; ``word_start[-1]`` = ``n_words``
raw_start     int32|int64 [L+1]       first raw *bit* of each lane; ``raw_start[-1]`` = total bits
step_lut      int32 [17 << pb]        ``freq | (slot - cum) << 16`` per ``ctx << pb | slot``
sym_lut       int16 [17 << pb]        ``hi | n_raw << 9``: the symbol's value is ``hi << n_raw | raw``
============  ======================  =============================================================

``tables="split"`` adds a second, smaller form of the same tables for the Triton decode (the
GPU sweep compares both; the torch path always reads the first):

============  ======================  =============================================================
slot_sym      int16 [17 << pb]        the symbol of each ``ctx << pb | slot``
sym_step      int32 [17 * n_sym]      ``freq | cum << 16`` per ``ctx * n_sym + symbol``
sym_info      int16 [n_sym]           ``hi | n_raw << 9`` per symbol
============  ======================  =============================================================

A **class-width** delta (``delta_code="class-width"``, see :mod:`tpde_hf.codec.class_width`) is held
as the file stores it instead, after its layout was checked once at construction:

============  ======================  =============================================================
cw_words      int32 [n_words + 1]     the payload, LSB first, one zero word of padding
cw_offsets    int32|int64 [out, S]    bit offset of each span of 1024 columns (S = ceil(in / 1024))
cw_header     int32 [out, ng, H]      per-group widths (and the class-0 minimum); H = 1, or 2 for fp32
============  ======================  =============================================================

A decode step then makes two dependent gathers (``slot_sym`` then ``sym_step``) instead of one, from
tables of 139 + 26 KB (bf16, ``prob_bits = 12``) instead of 278 KB (+ 139 KB off the chain):
they may stay in L1 where the fused form goes to L2.

Context 16 is the identity context of the format (padding positions). Offsets are int32 when the
totals fit, int64 otherwise. The words and raw streams are the file's own payload (no expansion),
so a ``PackedWeight`` on a device takes the size of the file plus the decode tables, 17 x 2**pb x 6
bytes: 418 KB per weight at the default ``prob_bits = 12`` (1.3% of a 4096x4096 bf16 weight, but
most of a 1024x1024 one), 104 KB at ``prob_bits = 10``.

Offload (``lossless-offload`` mode) keeps the base on the GPU and the delta in pinned host memory,
then moves the delta per layer on a side stream::

    pw = PackedWeight.from_encoded(enc).pin_memory()         # everything pinned on the host
    pw = pw.base_to("cuda")                                   # base resident on the GPU
    with torch.cuda.stream(side):                             # a layer ahead:
        ready = pw.delta_to("cuda", non_blocking=True)        # a new PackedWeight, base shared
    torch.cuda.current_stream().wait_stream(side)             # when the layer runs:
    W = reconstruct(ready.record_stream(torch.cuda.current_stream()))
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from tpde_hf.codec import EncodedTensor, rans
from tpde_hf.codec.base_quant import SUPPORTED_GROUP_SIZES, n_groups
from tpde_hf.codec.encoded import N_CONTEXTS
from tpde_hf.codec.ordinal import bit_width, check_dtype
from tpde_hf.codec.symbols import SymbolSpec, symbol_tables
from tpde_hf.errors import TpdeFormatError

#: Index of the identity (padding) context in the decode tables: after the 16 real contexts.
IDENTITY_CONTEXT = N_CONTEXTS
#: ``sym_lut`` packs ``hi`` (< 2**9: at most ``2**(M+1) - 1`` or ``2**K - 1``) below ``n_raw``.
SYM_HI_BITS = 9

_BASE_FIELDS = ("qweight", "scales", "zeros")
_DELTA_FIELDS = ("words", "raw", "lane_state", "word_start", "raw_start", "step_lut", "sym_lut", "slot_sym",
                 "sym_step", "sym_info", "cw_words", "cw_offsets", "cw_header")
#: Decode-table forms ``from_encoded`` builds (see the module docstring).
TABLE_FORMS = ("fused", "split")


@dataclass(frozen=True, eq=False)
class PackedWeight:
    """A weight ``[out, in]`` of ``dtype`` as 4-bit base (+ optional lossless delta) on one device.

    Example::

        enc = encode_tensor(torch.randn(64, 100, dtype=torch.bfloat16))
        pw = PackedWeight.from_encoded(enc)          # "cpu"; or "cuda"
        assert pw.shape == (64, 100) and pw.has_delta
        w = reconstruct(pw)                           # == decode_tensor(enc), bit for bit
    """

    name: str
    shape: tuple[int, int]
    dtype: torch.dtype
    group_size: int
    # ---- base group
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    # ---- codec parameters the delta decode needs (meaningless without a delta)
    prob_bits: int = 12
    n_lanes: int = 0
    steps: int = 0
    # ---- delta group (all None in a base-only weight)
    words: torch.Tensor | None = None
    raw: torch.Tensor | None = None
    lane_state: torch.Tensor | None = None
    word_start: torch.Tensor | None = None
    raw_start: torch.Tensor | None = None
    step_lut: torch.Tensor | None = None
    sym_lut: torch.Tensor | None = None
    # ---- the split form of the tables (tables="split"; None otherwise)
    slot_sym: torch.Tensor | None = None
    sym_step: torch.Tensor | None = None
    sym_info: torch.Tensor | None = None
    # ---- a class-width delta (delta_code="class-width"; None otherwise)
    delta_code: str = "rans"
    cw_words: torch.Tensor | None = None
    cw_offsets: torch.Tensor | None = None
    cw_header: torch.Tensor | None = None
    cw_total_bits: int = 0

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_encoded(cls, enc: EncodedTensor, device: torch.device | str = "cpu", delta: bool = True,
                     tables: str = "fused") -> PackedWeight:
        """Build from a (validated) encoded tensor; ``delta=False`` keeps only the 4-bit base.
        ``tables="split"`` also builds the split decode tables of a rANS delta, which the Triton kernels
        then read (a class-width delta has no tables).

        Raises :class:`TpdeFormatError` on non-finite scales, which no encoder writes and whose
        NaN payloads would differ between CPU and GPU arithmetic, and on a class-width delta whose
        layout is inconsistent (its kernels trust the widths to keep every read inside the payload).
        """
        pw = cls.from_base(enc.qweight, enc.scales, enc.zeros, enc.shape, enc.dtype, enc.params.group_size,
                           name=enc.name)
        if tables not in TABLE_FORMS:
            raise ValueError(f"tables must be one of {TABLE_FORMS}, got {tables!r}")
        if delta and enc.delta_code == "class-width":
            pw = replace(pw, **_class_width_fields(enc))
        elif delta:
            pw = replace(pw, **_delta_fields(enc))
            if tables == "split":
                pw = replace(pw, **split_decode_tables(enc))
        return pw.to(device)

    @classmethod
    def from_base(cls, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, shape: tuple[int, int],
                  dtype: torch.dtype, group_size: int, name: str = "weight") -> PackedWeight:
        """A base-only weight (``base`` mode never reads the delta from disk).

        Example: ``PackedWeight.from_base(sd[p + ".qweight"], sd[p + ".scales"], sd[p + ".zeros"], (o, i),
        torch.bfloat16, 128)``.
        """
        check_dtype(dtype, name)
        if group_size not in SUPPORTED_GROUP_SIZES:
            raise TpdeFormatError(name, f"group size {group_size} not in {SUPPORTED_GROUP_SIZES}")
        out_f, in_f = int(shape[0]), int(shape[1])
        ng = n_groups(in_f, group_size)
        expect = {"qweight": (qweight, torch.uint8, (out_f, ng * group_size // 2)),
                  "scales": (scales, torch.float16, (out_f, ng)),
                  "zeros": (zeros, torch.uint8, (out_f, -(-ng // 2)))}
        for key, (t, dt, shp) in expect.items():
            if t.dtype != dt or tuple(t.shape) != shp:
                raise TpdeFormatError(name, f"{key} is {t.dtype}{list(t.shape)}, expected {dt}{list(shp)}")
        if not bool(torch.isfinite(scales).all()):
            raise TpdeFormatError(name, "scales hold inf or NaN (corrupt base)")
        return cls(name=name, shape=(out_f, in_f), dtype=dtype, group_size=group_size,
                   qweight=_word_aligned(qweight.contiguous()), scales=scales.contiguous(), zeros=zeros.contiguous())

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def has_delta(self) -> bool:
        return self.words is not None or self.cw_words is not None

    def class_width_parts(self):
        """``(ClassWidthDelta, BaseTensors)`` over this weight's tensors (no copy): what the class-width
        kernels and reference decoder read."""
        from tpde_hf.codec.base_quant import BaseTensors
        from tpde_hf.codec.class_width import ClassWidthDelta

        code = ClassWidthDelta(shape=self.shape, dtype=self.dtype, group_size=self.group_size,
                               header=self.cw_header, offsets=self.cw_offsets, words=self.cw_words,
                               total_bits=self.cw_total_bits, checksum=0)
        return code, BaseTensors(self.qweight, self.scales, self.zeros)

    @property
    def split_tables(self) -> bool:
        """Whether the Triton decode reads the split tables (built with ``tables="split"``)."""
        return self.slot_sym is not None

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def width(self) -> int:
        """Bit width of the source dtype (16 or 32)."""
        return bit_width(self.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes held by all tensors (base + delta + tables)."""
        return self.base_nbytes + self.delta_nbytes

    @property
    def base_nbytes(self) -> int:
        return sum(_nbytes(getattr(self, k)) for k in _BASE_FIELDS)

    @property
    def delta_nbytes(self) -> int:
        return sum(_nbytes(getattr(self, k)) for k in _DELTA_FIELDS)

    def base_tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in _BASE_FIELDS}

    def delta_tensors(self) -> dict[str, torch.Tensor]:
        """The delta group (empty for a base-only weight)."""
        return {k: getattr(self, k) for k in _DELTA_FIELDS if getattr(self, k) is not None}

    def require_delta(self) -> None:
        """Raise unless the delta is present and on the base's device (what every decode needs)."""
        if not self.has_delta:
            raise ValueError(f"{self.name}: this PackedWeight holds only the 4-bit base (built with delta=False)")
        delta_device = (self.words if self.words is not None else self.cw_words).device
        if delta_device != self.device:
            raise ValueError(f"{self.name}: the delta is on {delta_device}, the base on {self.device}; "
                             "move one group first (delta_to / base_to)")

    # ------------------------------------------------------------------ moves
    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedWeight:
        """Both groups on ``device`` (a no-op for tensors already there)."""
        return self.base_to(device, non_blocking).delta_to(device, non_blocking)

    def base_to(self, device: torch.device | str, non_blocking: bool = False) -> PackedWeight:
        return self._map(_BASE_FIELDS, lambda t: t.to(device, non_blocking=non_blocking))

    def delta_to(self, device: torch.device | str, non_blocking: bool = False) -> PackedWeight:
        """A new ``PackedWeight`` sharing this one's base, with the delta group on ``device``.

        With a pinned source and ``non_blocking=True`` the copies are asynchronous on the current
        stream: synchronize (or ``wait_stream``) before another stream decodes them.
        """
        return self._map(_DELTA_FIELDS, lambda t: t.to(device, non_blocking=non_blocking))

    def record_stream(self, stream: torch.cuda.Stream) -> PackedWeight:
        """Mark the delta tensors as used on ``stream`` (after a ``delta_to`` on a side stream), so the
        caching allocator does not reuse their memory before ``stream`` is done with them."""
        for t in self.delta_tensors().values():
            t.record_stream(stream)
        return self

    def pin_memory(self, groups: tuple[str, ...] = ("base", "delta")) -> PackedWeight:
        """Page-locked host copies of the named groups (needs a CUDA build; tensors must be on the CPU)."""
        names = (_BASE_FIELDS if "base" in groups else ()) + (_DELTA_FIELDS if "delta" in groups else ())
        return self._map(names, lambda t: t.pin_memory())

    def drop_delta(self) -> PackedWeight:
        """The base-only weight (for ``base`` mode)."""
        return replace(self, **{k: None for k in _DELTA_FIELDS})

    def _map(self, names: tuple[str, ...], fn) -> PackedWeight:
        changes = {k: fn(getattr(self, k)) for k in names if getattr(self, k) is not None}
        return replace(self, **changes)

    def __repr__(self) -> str:
        kind = f"base+{self.delta_code} delta" if self.has_delta else "base only"
        return (f"PackedWeight({self.name!r}, shape={self.shape}, dtype={self.dtype}, G={self.group_size}, "
                f"{kind}, {self.nbytes} bytes on {self.device})")


def _word_aligned(qweight: torch.Tensor) -> torch.Tensor:
    """``qweight`` starting on a 4-byte boundary, copied once if it does not (a view into a file): the
    base matmul reads the codes as int32 words (rows are whole groups, a multiple of 16 bytes)."""
    return qweight.clone() if qweight.data_ptr() % 4 else qweight


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _offset_dtype(total: int) -> torch.dtype:
    return torch.int32 if total < 2**31 else torch.int64


def _starts(counts: torch.Tensor) -> torch.Tensor:
    """``[0, c0, c0 + c1, ..., sum]`` in the narrowest offset dtype that holds the sum."""
    out = torch.zeros(counts.numel() + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=out[1:])
    return out.to(_offset_dtype(int(out[-1])))


def decode_tables(enc: EncodedTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(step_lut int32, sym_lut int16)`` over ``ctx << prob_bits | slot`` for the 17 contexts.

    ``step_lut`` is the codec's own table (``rans.decode_luts``); ``sym_lut`` folds the symbol
    tables in so that one gather gives both the value bits and the raw-bit count:
    ``u = hi << n_raw | raw`` (``hi`` is the small value itself, or ``1 << M | mantissa``).
    """
    pb = enc.params.prob_bits
    step, sym = rans.decode_luts(rans.with_identity_context(enc.frequencies(), pb), pb)
    step = torch.from_numpy(np.ascontiguousarray(step.numpy()).view(np.int32))  # < 2**31: freq <= 2**15
    return step.clone(), _symbol_info(enc)[sym]


def _symbol_info(enc: EncodedTensor) -> torch.Tensor:
    """``hi | n_raw << SYM_HI_BITS`` per symbol of ``enc``'s alphabet, int16."""
    base_u, nraw = symbol_tables(SymbolSpec(enc.params.sym_k, enc.params.sym_m, bit_width(enc.dtype)))
    hi = base_u >> nraw
    assert int(hi.max()) < 1 << SYM_HI_BITS and int(nraw.max()) < 32
    return (hi | (nraw << SYM_HI_BITS)).to(torch.int16)


def split_decode_tables(enc: EncodedTensor) -> dict[str, torch.Tensor]:
    """``slot_sym``, ``sym_step`` and ``sym_info`` (see the module docstring): the same decode as
    :func:`decode_tables`, indexed by symbol where the fused form is indexed by slot."""
    pb = enc.params.prob_bits
    freq = rans.with_identity_context(enc.frequencies(), pb)
    cum = torch.where(freq > 0, torch.cumsum(freq, dim=1) - freq, 0)  # no slot reaches a zero-frequency symbol
    _, sym = rans.decode_luts(freq, pb)
    assert freq.shape[1] < 1 << 15 and int(cum.max()) < 1 << 15 and int(freq.max()) <= 1 << 15
    return dict(slot_sym=sym.to(torch.int16), sym_step=(freq | (cum << 16)).flatten().to(torch.int32),
                sym_info=_symbol_info(enc))


def _class_width_fields(enc: EncodedTensor) -> dict:
    """The class-width delta group of ``enc`` on the CPU, after the full layout check."""
    from tpde_hf.codec.delta_class_width import class_width_impl
    from tpde_hf.codec.encoded import named_errors

    code = enc.class_width_code()
    with named_errors(enc.name):
        class_width_impl().check_layout(code, enc.base)
    return dict(delta_code="class-width", cw_words=code.words.contiguous(), cw_offsets=code.offsets.contiguous(),
                cw_header=code.header.contiguous(), cw_total_bits=code.total_bits)


def _delta_fields(enc: EncodedTensor) -> dict:
    """The delta group of ``enc`` on the CPU (see the module docstring)."""
    states, n_words, n_raw = enc.lane_fields()
    total_words = int(n_words.sum())
    word_bytes = 4 * -(-total_words // 2)  # words are u16 LE, padded to a 4-byte boundary
    payload = enc.delta.numpy()
    words = np.frombuffer(payload[: 2 * total_words].tobytes(), dtype="<i2").astype(np.int16)
    raw = np.frombuffer(payload[word_bytes:].tobytes(), dtype="<i4").astype(np.int32)
    step_lut, sym_lut = decode_tables(enc)
    layout = enc.layout
    return dict(
        prob_bits=enc.params.prob_bits,
        n_lanes=layout.n_lanes,
        steps=layout.steps,
        words=torch.from_numpy(words),
        raw=torch.from_numpy(raw),
        lane_state=enc.lanes[:, 0].clone(),
        word_start=_starts(n_words),
        raw_start=_starts(n_raw),
        step_lut=step_lut,
        sym_lut=sym_lut,
    )

