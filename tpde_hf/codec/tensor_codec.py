"""Tensor-level codec: one weight <-> seven plain tensors (format versions 1 and 2).

A weight stored under ``prefix`` (e.g. ``model.layers.0.mlp.up_proj``) becomes seven tensors. The
base is the same for every delta code; the delta has one of two codes (``CodecParams.delta_code``):

* ``"rans"`` (the default, format version 1): context-coded rANS lanes, the smaller file;
* ``"class-width"`` (format version 2): one field width per (group, class), decoded without a
  dependent chain, so a GPU decodes a whole tile at once (:mod:`tpde_hf.codec.class_width`); about
  0.4-0.6 bits per weight larger on bf16.

============  =========================  ==================================================
suffix        dtype / shape              content
============  =========================  ==================================================
qweight       uint8 [out, in_pad/2]      4-bit codes, two per byte (see ``base_quant``)
scales        float16 [out, n_groups]    group scales
zeros         uint8 [out, ceil(ng/2)]    4-bit zero points, two per byte
meta          int64 [10] (v1), [12] (v2) version, dtype, out, in, G, lane_len, prob_bits, K, M, checksum;
                                         v2 adds the delta code's index in ``DELTA_CODES`` and the
                                         payload's bit count (class-width; 0 for rANS)
============  =========================  ==================================================

The other three are the delta; what they hold depends on the code:

======  ==========================================================  =====================================
suffix  rans                                                        class-width
======  ==========================================================  =====================================
delta   uint8 [bytes]: rANS words (u16 LE, padded to 4 bytes) then  int32 [n_words + 1]: the fields, LSB
        raw bits (u32 LE)                                           first, and one zero word of padding
lanes   int32 [n_lanes, 2]: final rANS state; words | raw_bits      int32 or int64 [out, ceil(in / 1024)]:
        << 16 per lane (where each lane's decode starts)            bit offset of each span of 1024 columns
tables  uint8 [bytes]: zstd of uint16 frequencies [16, n_symbols]   int32 [out, n_groups, 1 or 2]: the
                                                                    per-group width headers
======  ==========================================================  =====================================

In a class-width meta, ``lane_len`` holds the span (1024) and ``prob_bits, K, M`` are 0. A tensor is
written in the oldest version that can hold it, so a rANS repo stays readable by tpde-hf releases
that predate version 2; those refuse a class-width tensor with an "upgrade tpde-hf" error.

Everything read from a file is validated against everything else before a decode starts, so a
crafted file can neither make the decoder index out of bounds nor return wrong weights silently.

Two CPU implementations sit behind :func:`encode_tensors` / :func:`decode_tensors`: the numpy
reference in this module (vectorized over lanes) and the compiled one in :mod:`.compiled` (the
default); for a class-width delta, the torch reference :mod:`.class_width` and the compiled
:mod:`.class_width_compiled`. :mod:`.backend` chooses, and the tests hold each pair to identical
bytes and bits.

Example::

    enc = encode_tensor(weight, name="layer.weight")
    sd = enc.to_state_dict("layer")
    back = decode_tensor(EncodedTensor.from_state_dict(sd, "layer"))
    assert torch.equal(back.view(torch.int16), weight.view(torch.int16))
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import zstandard

from tpde_hf.codec import base_quant, bitpack, class_width, rans
from tpde_hf.codec.backend import active_backend
from tpde_hf.codec.checksum import tensor_checksum
from tpde_hf.codec.ordinal import CODE_DTYPES, DTYPE_CODES, bit_width, check_dtype, from_ordinal, to_ordinal, wrap
from tpde_hf.codec.symbols import SymbolSpec, symbol_tables, to_symbols
from tpde_hf.errors import TpdeFormatError

#: The newest tensor format this package reads (see the module docstring).
FORMAT_VERSION = 2
#: The delta codes, by their index in a version-2 meta.
DELTA_CODES = ("rans", "class-width")
N_CONTEXTS = 16  # |q - zero| in 0..15
SUFFIXES = ("qweight", "scales", "zeros", "delta", "lanes", "tables", "meta")
SUPPORTED_LANE_LENS = (256, 512, 1024, 2048)
META_LENS = {1: 10, 2: 12}
_MAX_TABLE_BYTES = N_CONTEXTS * 1024 * 2  # the largest alphabet is 896 symbols


@dataclass(frozen=True)
class CodecParams:
    """Encoder choices; all are recorded in each tensor's ``meta``.

    ``lane_len`` trades parallelism for size: each lane costs 64 bits of header. ``delta_code``
    picks the delta's code (see the module docstring); the class-width code ignores ``lane_len``,
    ``prob_bits``, ``sym_k`` and ``sym_m``.

    Example: ``encode_tensor(w, CodecParams(group_size=64, delta_code="class-width"))``.
    """

    group_size: int = 128
    lane_len: int = 1024
    prob_bits: int = 12
    sym_k: int = 6
    sym_m: int = 5
    delta_code: str = "rans"

    @property
    def format_version(self) -> int:
        """The tensor format version these parameters write: 1 for rANS, 2 for class-width."""
        return 1 if self.delta_code == "rans" else 2

    def validate(self, name: str | None = None) -> None:
        if self.delta_code not in DELTA_CODES:
            raise TpdeFormatError(name, f"delta code {self.delta_code!r} not in {DELTA_CODES}")
        if self.group_size not in base_quant.SUPPORTED_GROUP_SIZES:
            raise TpdeFormatError(name, f"group size {self.group_size} not in {base_quant.SUPPORTED_GROUP_SIZES}")
        if self.lane_len not in SUPPORTED_LANE_LENS:
            raise TpdeFormatError(name, f"lane length {self.lane_len} not in {SUPPORTED_LANE_LENS}")
        if not 10 <= self.prob_bits <= 15:
            raise TpdeFormatError(name, f"prob_bits {self.prob_bits} outside [10, 15]")
        if not (1 <= self.sym_m <= self.sym_k <= 8):
            raise TpdeFormatError(name, f"symbol parameters K={self.sym_k}, M={self.sym_m} unsupported")


@dataclass
class LaneLayout:
    """How ``numel`` elements are spread over interleaved lanes: element ``i`` -> lane ``i % n_lanes``."""

    numel: int
    n_lanes: int
    steps: int

    @classmethod
    def for_numel(cls, numel: int, lane_len: int) -> LaneLayout:
        n_lanes = -(-numel // lane_len)
        return cls(numel, n_lanes, -(-numel // n_lanes))

    def to_matrix(self, flat: torch.Tensor, pad_value: int) -> torch.Tensor:
        """``[numel]`` -> ``[steps, n_lanes]``, padding the tail of the last step."""
        padded = torch.full((self.steps * self.n_lanes,), pad_value, dtype=flat.dtype)
        padded[: self.numel] = flat
        return padded.view(self.steps, self.n_lanes)


@dataclass
class EncodedTensor:
    """One weight in tpde form. Build with :func:`encode_tensor` or :meth:`from_state_dict`."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, int]
    params: CodecParams
    checksum: int
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    delta: torch.Tensor
    lanes: torch.Tensor
    tables: torch.Tensor
    total_bits: int = 0  # the class-width payload's bit count (0 for rANS)
    _freq: torch.Tensor | None = field(default=None, repr=False)
    _luts: tuple | None = field(default=None, repr=False)
    _compiled_lut: np.ndarray | None = field(default=None, repr=False)

    # ---------------------------------------------------------------- derived views
    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def delta_code(self) -> str:
        """``"rans"`` or ``"class-width"`` (see the module docstring)."""
        return self.params.delta_code

    def class_width_code(self) -> class_width.ClassWidthDelta:
        """The delta as a :class:`~tpde_hf.codec.class_width.ClassWidthDelta` (views, no copy)."""
        if self.delta_code != "class-width":
            raise ValueError(f"{self.name}: its delta is {self.delta_code}, not class-width")
        return class_width.ClassWidthDelta(shape=self.shape, dtype=self.dtype, group_size=self.params.group_size,
                               header=self.tables, offsets=self.lanes, words=self.delta,
                               total_bits=self.total_bits, checksum=self.checksum)

    @property
    def layout(self) -> LaneLayout:
        return LaneLayout.for_numel(self.numel, self.params.lane_len)

    @property
    def spec(self) -> SymbolSpec:
        return SymbolSpec(self.params.sym_k, self.params.sym_m, bit_width(self.dtype))

    @property
    def base(self) -> base_quant.BaseTensors:
        return base_quant.BaseTensors(self.qweight, self.scales, self.zeros)

    def lane_fields(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(final_states, words_per_lane, raw_bits_per_lane)`` as int64 (rANS only)."""
        if self.delta_code != "rans":
            raise ValueError(f"{self.name}: a {self.delta_code} delta has no rANS lanes")
        lanes = self.lanes.to(torch.int64) & 0xFFFFFFFF
        return lanes[:, 0], lanes[:, 1] & 0xFFFF, lanes[:, 1] >> 16

    def frequencies(self) -> torch.Tensor:
        """Per-context symbol frequencies ``[16, n_symbols]`` (int64), decompressed and checked."""
        if self._freq is None:
            self._freq = _read_tables(self.tables, self.spec.n_symbols, self.params.prob_bits, self.name)
        return self._freq

    def split_delta(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rans_words, raw_words)``, both int64 with values in [0, 2**16) and [0, 2**32)."""
        words, raw = self.delta_streams()
        return torch.from_numpy(words.astype(np.int64)), torch.from_numpy(raw[:-1].astype(np.int64))

    def delta_streams(self) -> tuple[np.ndarray, np.ndarray]:
        """``(rans_words uint16, raw_words uint32)`` as stored; ``raw_words`` gets one extra zero word
        so that a reader's 64-bit window never runs off the end."""
        _, n_words, _ = self.lane_fields()
        total = int(n_words.sum())
        word_bytes = 4 * -(-total // 2)
        data = self.delta.numpy()
        words = data[:word_bytes].view("<u2")[:total]
        raw = np.zeros((data.size - word_bytes) // 4 + 1, dtype=np.uint32)
        raw[:-1] = data[word_bytes:].view("<u4")
        return words, raw

    def base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The lossy 4-bit weight (the prediction ``P``), in ``dtype`` or the source dtype."""
        return base_quant.predict(self.base, self.shape, self.params.group_size, dtype or self.dtype)

    # ---------------------------------------------------------------- sizes
    def nbytes(self) -> dict[str, int]:
        base = sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))
        delta = sum(t.numel() * t.element_size() for t in (self.delta, self.lanes, self.tables))
        meta = META_LENS[self.params.format_version] * 8
        return {"base": base, "delta": delta, "meta": meta, "total": base + delta + meta}

    # ---------------------------------------------------------------- (de)serialization
    def meta_tensor(self) -> torch.Tensor:
        """The stored ``meta`` (int64), in the oldest format version that holds this tensor."""
        p = self.params
        version = p.format_version
        code_fields = ([p.lane_len, p.prob_bits, p.sym_k, p.sym_m] if p.delta_code == "rans"
                       else [class_width.OFFSET_SPAN, 0, 0, 0])
        values = [version, DTYPE_CODES[self.dtype], self.shape[0], self.shape[1], p.group_size, *code_fields,
                  self.checksum]
        if version >= 2:
            values += [DELTA_CODES.index(p.delta_code), self.total_bits]
        return torch.tensor(values, dtype=torch.int64)

    def to_state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        meta = self.meta_tensor()
        parts = dict(
            qweight=self.qweight, scales=self.scales, zeros=self.zeros, delta=self.delta,
            lanes=self.lanes, tables=self.tables, meta=meta,
        )
        return {f"{prefix}.{k}": v.contiguous() for k, v in parts.items()}

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], prefix: str, name: str | None = None) -> EncodedTensor:
        """Rebuild from stored tensors, validating every field. Raises :class:`TpdeFormatError`."""
        name = name or prefix
        missing = [s for s in SUFFIXES if f"{prefix}.{s}" not in sd]
        if missing:
            raise TpdeFormatError(name, f"missing tensors {missing}")
        t = {s: sd[f"{prefix}.{s}"].detach().to("cpu") for s in SUFFIXES}
        return cls.from_parts(name=name, **t)

    @classmethod
    def from_parts(cls, name: str, *, qweight, scales, zeros, delta, lanes, tables, meta) -> EncodedTensor:
        stored = parse_meta(meta, name)
        enc = cls(
            name=name, dtype=stored.dtype, shape=stored.shape, params=stored.params, checksum=stored.checksum,
            qweight=qweight, scales=scales, zeros=zeros, delta=delta, lanes=lanes, tables=tables,
            total_bits=stored.total_bits,
        )
        enc.validate()
        return enc

    def validate(self) -> None:
        """Check every shape, dtype, length and table against the others, before any decode.

        For a class-width delta this is the cheap check (every part's dtype and shape); the full
        layout check (``class_width.check_layout``) runs before any decode reads the payload.
        """
        name, (out_f, in_f), g = self.name, self.shape, self.params.group_size
        ng = base_quant.n_groups(in_f, g)
        expect = {
            "qweight": (torch.uint8, (out_f, ng * g // 2)),
            "scales": (torch.float16, (out_f, ng)),
            "zeros": (torch.uint8, (out_f, -(-ng // 2))),
        }
        for key, (dtype, shape) in expect.items():
            t = getattr(self, key)
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise TpdeFormatError(name, f"{key} is {t.dtype}{list(t.shape)}, expected {dtype}{list(shape)}")
        if not bool(torch.isfinite(self.scales).all()):
            # The encoder never writes one; a crafted inf/NaN scale would decode to device-dependent NaN bits.
            raise TpdeFormatError(name, "scales contain inf or NaN")
        if self.delta_code == "class-width":
            with named_errors(name):
                class_width.validate(self.class_width_code(), self.base)
            return
        if self.lanes.dtype != torch.int32 or tuple(self.lanes.shape) != (self.layout.n_lanes, 2):
            raise TpdeFormatError(name, f"lanes is {self.lanes.dtype}{list(self.lanes.shape)}, "
                                        f"expected torch.int32{[self.layout.n_lanes, 2]}")
        for key in ("delta", "tables"):
            t = getattr(self, key)
            if t.dtype != torch.uint8 or t.dim() != 1:
                raise TpdeFormatError(name, f"{key} must be a 1-D uint8 tensor, got {t.dtype}{list(t.shape)}")
        states, n_words, n_raw = self.lane_fields()
        steps = self.layout.steps
        if bool(((states < rans.STATE_LOW) | (states >= 1 << 32)).any()):
            raise TpdeFormatError(name, "a lane's rANS state is out of range")
        if bool((n_words > steps).any()) or bool((n_raw > steps * self.spec.max_raw_bits).any()):
            raise TpdeFormatError(name, "a lane's length does not fit its element count")
        want = 4 * -(-int(n_words.sum()) // 2) + 4 * bitpack.n_words(int(n_raw.sum()))
        if self.delta.numel() != want:
            raise TpdeFormatError(
                name, f"delta payload has {self.delta.numel()} bytes, the lane table says {want} (truncated or corrupt)"
            )
        self.frequencies()


@dataclass(frozen=True)
class StoredMeta:
    """What a ``meta`` tensor says, checked (see :func:`parse_meta`)."""

    version: int
    dtype: torch.dtype
    shape: tuple[int, int]
    params: CodecParams
    checksum: int
    total_bits: int


def parse_meta(meta: torch.Tensor, name: str | None) -> StoredMeta:
    """Read and check a stored ``meta`` (either version). Raises :class:`TpdeFormatError`.

    Example: ``parse_meta(sd["layer.meta"], "layer.weight").params.delta_code``.
    """
    if meta.dtype != torch.int64 or meta.dim() != 1 or meta.numel() < 1:
        raise TpdeFormatError(name, f"meta must be a 1-D int64 tensor, got {meta.dtype}{list(meta.shape)}")
    version = int(meta[0])
    if version > FORMAT_VERSION:
        raise TpdeFormatError(
            name, f"format version {version} is newer than this tpde-hf supports ({FORMAT_VERSION}); upgrade tpde-hf"
        )
    if version not in META_LENS or meta.numel() != META_LENS[version]:
        raise TpdeFormatError(name, f"unknown format version {version} or malformed meta")
    v = [int(x) for x in meta]
    if v[1] not in CODE_DTYPES:
        raise TpdeFormatError(name, f"unknown source dtype code {v[1]}")
    if v[2] <= 0 or v[3] <= 0 or v[2] * v[3] >= 1 << 40:
        raise TpdeFormatError(name, f"invalid shape {v[2:4]}")
    code_index, total_bits = (v[10], v[11]) if version >= 2 else (0, 0)
    if not 0 <= code_index < len(DELTA_CODES):
        raise TpdeFormatError(name, f"unknown delta code {code_index} (this tpde-hf knows {DELTA_CODES})")
    code = DELTA_CODES[code_index]
    if code == "rans":
        params = CodecParams(group_size=v[4], lane_len=v[5], prob_bits=v[6], sym_k=v[7], sym_m=v[8])
        if total_bits != 0:
            raise TpdeFormatError(name, f"a rANS meta holds a payload bit count ({total_bits})")
    else:
        params = CodecParams(group_size=v[4], delta_code=code)
        if v[5:9] != [class_width.OFFSET_SPAN, 0, 0, 0]:
            raise TpdeFormatError(name, f"class-width meta fields {v[5:9]} unsupported "
                                        f"(expected [{class_width.OFFSET_SPAN}, 0, 0, 0])")
        if not 0 <= total_bits < 1 << 48:
            raise TpdeFormatError(name, f"invalid payload bit count {total_bits}")
    params.validate(name)
    return StoredMeta(version, CODE_DTYPES[v[1]], (v[2], v[3]), params, v[9], total_bits)


@contextmanager
def named_errors(name: str):
    """Re-raise a :class:`TpdeFormatError` that names no tensor (the class-width module's) with ``name``."""
    try:
        yield
    except TpdeFormatError as exc:
        if exc.tensor_name is not None:
            raise
        raise TpdeFormatError(name, str(exc)) from None


def _read_tables(blob: torch.Tensor, n_sym: int, prob_bits: int, name: str) -> torch.Tensor:
    size = N_CONTEXTS * n_sym * 2
    try:
        raw = zstandard.ZstdDecompressor().decompress(blob.numpy().tobytes(), max_output_size=_MAX_TABLE_BYTES)
    except zstandard.ZstdError as exc:
        raise TpdeFormatError(name, f"code tables are corrupt ({exc})") from None
    if len(raw) != size:
        raise TpdeFormatError(name, f"code tables hold {len(raw)} bytes, expected {size}")
    freq = torch.from_numpy(np.frombuffer(raw, dtype="<u2").astype(np.int64)).view(N_CONTEXTS, n_sym)
    if not bool((freq.sum(dim=1) == 1 << prob_bits).all()):
        raise TpdeFormatError(name, "code tables do not sum to the probability scale")
    return freq


# ==================================================================== encode
#: Lanes of several tensors run through one rANS loop while their elements stay under this bound:
#: a few thousand lanes per numpy call amortize its overhead; more only costs memory.
BATCH_ELEMENTS = 1 << 24


@dataclass
class _Prepared:
    """Everything an encode needs before the rANS loop, for one tensor."""

    name: str
    weight: torch.Tensor
    params: CodecParams
    base: base_quant.BaseTensors
    freq: torch.Tensor
    layout: LaneLayout
    f_all: np.ndarray
    c_all: np.ndarray
    raw: torch.Tensor
    nraw: torch.Tensor


#: Rows are quantized and symbolized in chunks of about this many elements, so the int64
#: temporaries of a 10**8-element weight never exist all at once.
PREPARE_CHUNK_ELEMENTS = 1 << 22


def _checked_weight(weight: torch.Tensor, params: CodecParams, name: str) -> torch.Tensor:
    params.validate(name)
    check_dtype(weight.dtype, name)
    if weight.dim() != 2 or weight.numel() == 0:
        raise TpdeFormatError(name, f"expected a non-empty 2-D weight, got shape {list(weight.shape)}")
    return weight.detach().to("cpu").contiguous()


def _concat_bases(bases: list[base_quant.BaseTensors]) -> base_quant.BaseTensors:
    return base_quant.BaseTensors(*(torch.cat([getattr(b, f) for b in bases]) for f in ("qweight", "scales", "zeros")))


def _encode_compiled(weight: torch.Tensor, params: CodecParams, name: str) -> EncodedTensor:
    from tpde_hf.codec import compiled

    weight = _checked_weight(weight, params, name)
    base = compiled.quantize(weight, params.group_size)
    spec = SymbolSpec(params.sym_k, params.sym_m, bit_width(weight.dtype))
    layout = LaneLayout.for_numel(weight.numel(), params.lane_len)
    lanes = compiled.encode_lanes(weight, base, spec, layout, params.group_size, params.prob_bits, N_CONTEXTS)
    return _assemble(name, weight, params, base, lanes.freq, lanes.states, lanes.n_words, lanes.words,
                     lanes.n_raw, lanes.raw_words)


def _quantize(weight: torch.Tensor, group_size: int) -> base_quant.BaseTensors:
    """The 4-bit base of a checked weight: the same bits on both backends (the tests hold them to it)."""
    if active_backend() == "compiled":
        from tpde_hf.codec import compiled

        return compiled.quantize(weight, group_size)
    rows = max(1, PREPARE_CHUNK_ELEMENTS // weight.shape[1])
    return _concat_bases([base_quant.quantize(weight[r0 : r0 + rows], group_size)
                          for r0 in range(0, weight.shape[0], rows)])


def class_width_impl():
    """The class-width codec of the active backend: :mod:`.class_width_compiled` or the torch reference
    :mod:`.class_width` (both have ``encode``, ``decode`` and ``check_layout``, with identical results)."""
    if active_backend() == "compiled":
        from tpde_hf.codec import class_width_compiled  # numba: only when the compiled codec runs

        return class_width_compiled
    return class_width


def _encode_class_width(weight: torch.Tensor, params: CodecParams, name: str) -> EncodedTensor:
    weight = _checked_weight(weight, params, name)
    base = _quantize(weight, params.group_size)
    code = class_width_impl().encode(weight, base, params.group_size)
    return EncodedTensor(
        name=name, dtype=weight.dtype, shape=tuple(weight.shape), params=params, checksum=code.checksum,
        qweight=base.qweight, scales=base.scales, zeros=base.zeros,
        delta=code.words, lanes=code.offsets, tables=code.header, total_bits=code.total_bits,
    )


def _prepare(weight: torch.Tensor, params: CodecParams, name: str) -> _Prepared:
    weight = _checked_weight(weight, params, name)
    out_f, in_f = weight.shape
    width = bit_width(weight.dtype)
    spec = SymbolSpec(params.sym_k, params.sym_m, width)
    g = params.group_size

    # Everything up to the symbols is row-local: do it chunk by chunk into compact arrays.
    rows = max(1, PREPARE_CHUNK_ELEMENTS // in_f)
    bases, joint, raws, nraws = [], [], [], []
    counts = torch.zeros(N_CONTEXTS * spec.n_symbols, dtype=torch.int64)
    for r0 in range(0, out_f, rows):
        w = weight[r0 : r0 + rows]
        base = base_quant.quantize(w, g)
        lv = base_quant.levels(base, (w.shape[0], in_f), g)
        pred = base_quant.predict_from_levels(lv, base.scales, g, weight.dtype)
        r = wrap(to_ordinal(w) - to_ordinal(pred), width).flatten()
        del pred
        sym, raw, nraw = to_symbols(r, spec)
        del r
        ctx_sym = lv.abs().flatten().to(torch.int64) * spec.n_symbols + sym
        counts += torch.bincount(ctx_sym, minlength=counts.numel())
        bases.append(base)
        joint.append(ctx_sym.to(torch.int32))
        raws.append(raw.to(torch.int32 if width == 16 else torch.int64))
        nraws.append(nraw.to(torch.uint8))
    base = _concat_bases(bases)
    freq = rans.quantize_frequencies(counts.view(N_CONTEXTS, spec.n_symbols), params.prob_bits)
    layout = LaneLayout.for_numel(weight.numel(), params.lane_len)
    f_all, c_all = rans.element_tables(
        rans.with_identity_context(freq, params.prob_bits),
        layout.to_matrix(torch.cat(joint), N_CONTEXTS * spec.n_symbols),  # pad: identity context, symbol 0
    )
    return _Prepared(name, weight, params, base, freq, layout, f_all, c_all,
                     layout.to_matrix(torch.cat(raws), 0), layout.to_matrix(torch.cat(nraws), 0))


def _finish(prep: _Prepared, states: torch.Tensor, n_words: torch.Tensor, words: torch.Tensor) -> EncodedTensor:
    offsets, n_raw = _raw_offsets(prep.nraw)
    raw_words = bitpack.pack_fields(prep.raw.flatten(), prep.nraw.flatten(), offsets.flatten(), int(n_raw.sum()))
    return _assemble(prep.name, prep.weight, prep.params, prep.base, prep.freq, states.numpy(), n_words.numpy(),
                     words.numpy(), n_raw.numpy(), raw_words.numpy())


def _assemble(name: str, weight: torch.Tensor, params: CodecParams, base: base_quant.BaseTensors,
              freq: torch.Tensor, states: np.ndarray, n_words: np.ndarray, words: np.ndarray, n_raw: np.ndarray,
              raw_words: np.ndarray) -> EncodedTensor:
    """Pack an encoder's output (per-lane arrays and the two streams) into the stored tensors."""
    word_bytes = np.zeros(2 * -(-words.size // 2), dtype="<u2")
    word_bytes[: words.size] = words
    payload = np.concatenate((word_bytes.view(np.uint8), raw_words.astype("<u4").view(np.uint8)))
    lanes = np.stack((states.astype(np.int64), n_words.astype(np.int64) | (n_raw.astype(np.int64) << 16)), axis=1)
    # Level 12: within 2% of level 19 on these small tables (about 16 bytes a tensor), at a tenth of the time.
    table_bytes = zstandard.ZstdCompressor(level=12).compress(freq.numpy().astype("<u2").tobytes())
    return EncodedTensor(
        name=name, dtype=weight.dtype, shape=tuple(weight.shape), params=params,
        checksum=tensor_checksum(weight),
        qweight=base.qweight, scales=base.scales, zeros=base.zeros,
        delta=torch.from_numpy(payload),
        lanes=torch.from_numpy(lanes.astype(np.uint32).view(np.int32)), tables=_bytes_tensor(table_bytes),
        _freq=freq,
    )


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())


def _raw_offsets(nraw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bit offset of every element's raw field: lanes back to back, each in step order."""
    per_lane = nraw.sum(dim=0)
    lane_start = torch.cumsum(per_lane, 0) - per_lane
    return lane_start[None, :] + torch.cumsum(nraw, 0) - nraw, per_lane


def _pad_steps(a: np.ndarray, steps: int, value: int) -> np.ndarray:
    if a.shape[0] == steps:
        return a
    pad = np.full((steps - a.shape[0], a.shape[1]), value, dtype=a.dtype)
    return np.concatenate((a, pad))


def _batches(items: list, numel, key) -> list[list]:
    """Group consecutive items with equal ``key`` into batches of at most ``BATCH_ELEMENTS``."""
    batches: list[list] = []
    size = 0
    for item in items:
        if batches and key(batches[-1][0]) == key(item) and size + numel(item) <= BATCH_ELEMENTS:
            batches[-1].append(item)
            size += numel(item)
        else:
            batches.append([item])
            size = numel(item)
    return batches


def encode_tensors(weights: dict[str, torch.Tensor], params: CodecParams | None = None) -> dict[str, EncodedTensor]:
    """Encode several 2-D weights, running their rANS lanes together (much faster on small tensors).

    Example: ``encode_tensors({"q.weight": wq, "k.weight": wk})["q.weight"].nbytes()``.
    """
    params = params or CodecParams()
    if params.delta_code == "class-width":
        return {n: _encode_class_width(w, params, n) for n, w in weights.items()}
    if active_backend() == "compiled":
        return {n: _encode_compiled(w, params, n) for n, w in weights.items()}
    out: dict[str, EncodedTensor] = {}
    names = list(weights)
    for batch in _batches(names, lambda n: weights[n].numel(), lambda n: 0):
        preps = [_prepare(weights[n], params, n) for n in batch]
        steps = max(p.layout.steps for p in preps)
        ident = 1 << params.prob_bits
        f_all = np.concatenate([_pad_steps(p.f_all, steps, ident) for p in preps], axis=1)
        c_all = np.concatenate([_pad_steps(p.c_all, steps, 0) for p in preps], axis=1)
        states, n_words, words = rans.encode_lanes(f_all, c_all, params.prob_bits)
        del f_all, c_all
        lane0, word0 = 0, 0
        for p in preps:
            lanes = slice(lane0, lane0 + p.layout.n_lanes)
            nw = n_words[lanes]
            total = int(nw.sum())
            out[p.name] = _finish(p, states[lanes], nw, words[word0 : word0 + total])
            lane0 += p.layout.n_lanes
            word0 += total
    return out


def encode_tensor(weight: torch.Tensor, params: CodecParams | None = None, name: str = "tensor") -> EncodedTensor:
    """Encode a 2-D bf16/fp16/fp32 weight into 4-bit base + lossless delta."""
    return encode_tensors({name: weight}, params)[name]


# ==================================================================== decode
def decode_tensor(enc: EncodedTensor, verify: bool = False) -> torch.Tensor:
    """Rebuild the original weight exactly on the CPU. ``verify`` also checks the checksum.

    Runs the compiled codec, or the numpy reference (see :mod:`tpde_hf.codec.backend`): same bits.
    """
    return decode_tensors([enc], verify=verify)[0]


def decode_tensors(encs: list[EncodedTensor], verify: bool = False) -> list[torch.Tensor]:
    """Decode several weights in one vectorized pass over all their lanes (faster on small tensors)."""
    rans_encs = [e for e in encs if e.delta_code == "rans"]
    if active_backend() == "compiled":
        decoded = [_decode_compiled(enc, verify) for enc in rans_encs]
    else:
        decoded = []
        for batch in _batches(rans_encs, lambda e: e.numel, lambda e: e.params.prob_bits):
            decoded.extend(_decode_batch(batch, verify))
    from_rans = iter(decoded)
    return [next(from_rans) if e.delta_code == "rans" else _decode_class_width(e, verify) for e in encs]


def _decode_class_width(enc: EncodedTensor, verify: bool) -> torch.Tensor:
    with named_errors(enc.name):
        return class_width_impl().decode(enc.class_width_code(), enc.base, verify=verify)


def _decode_compiled(enc: EncodedTensor, verify: bool) -> torch.Tensor:
    from tpde_hf.codec import compiled

    if enc._compiled_lut is None:  # cached: a layer decoded at every forward builds it once
        enc._compiled_lut = compiled.decode_table(enc.frequencies(), enc.params.prob_bits, enc.spec)
    w = compiled.decode(enc, enc._compiled_lut)
    _check_checksum(enc, w, verify)
    return w


def _check_checksum(enc: EncodedTensor, w: torch.Tensor, verify: bool) -> None:
    if verify and tensor_checksum(w) != enc.checksum:
        raise TpdeFormatError(enc.name, "checksum mismatch: the decoded weight differs from the original")


def _lane_luts(enc: EncodedTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per ``(ctx, slot)``: the rANS step entry, the symbol's value bits and its raw bit count.

    Cached on the tensor: a layer decoded at every forward builds its tables once.
    """
    if enc._luts is None:
        pb = enc.params.prob_bits
        step_lut, sym_lut = rans.decode_luts(rans.with_identity_context(enc.frequencies(), pb), pb)
        base_u, nraw = symbol_tables(enc.spec)
        enc._luts = (step_lut.numpy(), base_u[sym_lut].numpy(), nraw[sym_lut].numpy().astype(np.uint8))
    return enc._luts


def _decode_batch(encs: list[EncodedTensor], verify: bool) -> list[torch.Tensor]:
    """Decode tensors with equal ``prob_bits``: one rANS loop over all lanes, then per-tensor rebuild."""
    pb = encs[0].params.prob_bits
    steps = max(e.layout.steps for e in encs)
    ctx_rows, step_luts, states, starts, word_streams, levels = [], [], [], [], [], []
    ctx_offset, word_base = 0, 0
    for enc in encs:
        lv = base_quant.levels(enc.base, enc.shape, enc.params.group_size)
        levels.append(lv)
        ctx = enc.layout.to_matrix(lv.abs().flatten(), N_CONTEXTS).numpy().astype(np.uint32)
        ctx += np.uint32(ctx_offset)
        ctx <<= np.uint32(pb)
        ctx_rows.append(_pad_steps(ctx, steps, (ctx_offset + N_CONTEXTS) << pb))
        ctx_offset += N_CONTEXTS + 1
        step_luts.append(_lane_luts(enc)[0])
        st, n_words, _ = enc.lane_fields()
        words, _ = enc.split_delta()
        states.append(st)
        starts.append(word_base + torch.cumsum(n_words, 0) - n_words)
        word_streams.append(words)
        word_base += words.numel()
    lut_index, final_x, final_ptr = rans.decode_lanes(
        np.concatenate(ctx_rows, axis=1), torch.cat(states), torch.cat(starts),
        torch.cat(word_streams + [torch.zeros(1, dtype=torch.int64)]), np.concatenate(step_luts), pb,
    )
    del ctx_rows
    out = []
    col, lut_base = 0, 0
    for enc, lv, start in zip(encs, levels, starts, strict=True):
        lanes = slice(col, col + enc.layout.n_lanes)
        col = lanes.stop
        _, n_words, n_raw = enc.lane_fields()
        if not bool((final_x[lanes] == rans.STATE_LOW).all()) or not torch.equal(final_ptr[lanes], start + n_words):
            raise TpdeFormatError(enc.name, "delta stream failed its lane check (corrupt or truncated delta)")
        _, ubase_lut, nraw_lut = _lane_luts(enc)
        idx = lut_index[: enc.layout.steps, lanes] - np.uint32(lut_base)
        lut_base += (N_CONTEXTS + 1) << pb
        r = _deltas(enc, idx, ubase_lut, nraw_lut, n_raw.numpy())
        pred = base_quant.predict_from_levels(lv, enc.scales, enc.params.group_size, enc.dtype)
        w = from_ordinal(wrap(to_ordinal(pred).flatten() + r, bit_width(enc.dtype)), enc.dtype).view(enc.shape)
        _check_checksum(enc, w, verify)
        out.append(w)
    return out


def _deltas(enc: EncodedTensor, idx: np.ndarray, ubase_lut: np.ndarray, nraw_lut: np.ndarray,
            n_raw: np.ndarray) -> torch.Tensor:
    """Deltas ``r`` in flat element order from the decoded LUT indices ``idx[steps, lanes]``."""
    nraw = nraw_lut.take(idx)
    # Offsets fit int32 unless a tensor carries over 2**31 raw bits (about 2*10**8 elements).
    off_t = np.int32 if idx.size * enc.spec.max_raw_bits < 1 << 31 else np.int64
    offsets = np.cumsum(nraw, axis=0, dtype=off_t)
    if not np.array_equal(offsets[-1], n_raw):
        raise TpdeFormatError(enc.name, "raw-bit stream does not match the decoded symbols (corrupt delta)")
    offsets += (np.cumsum(n_raw) - n_raw).astype(off_t)[None, :]
    offsets -= nraw
    n = enc.numel
    _, raw_words = enc.split_delta()
    u = ubase_lut.take(idx.ravel()[:n])
    u |= bitpack.read_fields_np(raw_words.numpy(), nraw.ravel()[:n], offsets.ravel()[:n])
    r = torch.from_numpy(u)
    return (r >> 1) ^ -(r & 1)


# ==================================================================== inspect
def conditional_entropy_bits(values: torch.Tensor, context: torch.Tensor) -> float:
    """Empirical ``H(values | context)`` in bits per element (the bound for a context-coded delta)."""
    total = 0.0
    n = values.numel()
    for c in torch.unique(context):
        _, counts = torch.unique(values[context == c], return_counts=True)
        p = counts.to(torch.float64)
        total += float(-(p * torch.log2(p / p.sum())).sum())
    return total / n


def inspect_tensor(enc: EncodedTensor, weight: torch.Tensor | None = None) -> dict:
    """Sizes and bits per weight (base, delta, total) and the ``H(r | |c|)`` bound for this tensor.

    ``weight`` (the decoded original) is computed when not given.
    """
    weight = decode_tensor(enc) if weight is None else weight
    lv = base_quant.levels(enc.base, enc.shape, enc.params.group_size)
    pred = base_quant.predict_from_levels(lv, enc.scales, enc.params.group_size, enc.dtype)
    r = wrap(to_ordinal(weight) - to_ordinal(pred), bit_width(enc.dtype)).flatten()
    sizes = enc.nbytes()
    n = enc.numel
    src_bits = 8 * weight.element_size()
    return {
        "name": enc.name,
        "shape": list(enc.shape),
        "dtype": str(enc.dtype).replace("torch.", ""),
        "numel": n,
        "bytes": sizes,
        "bits_per_weight": {k: 8 * v / n for k, v in sizes.items()},
        "bound_bits_per_weight": conditional_entropy_bits(r, lv.abs().flatten()),
        "ratio_to_source": sizes["total"] * 8 / (n * src_bits),
        "delta_code": enc.delta_code,
        **({"lanes": enc.layout.n_lanes, "steps": enc.layout.steps} if enc.delta_code == "rans"
           else {"spans": int(enc.lanes.shape[1])}),
        "table_bits": math.ceil(enc.tables.numel() * enc.tables.element_size() * 8),
    }
