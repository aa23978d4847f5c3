"""The stored form of one converted weight: seven plain tensors (format versions 1 and 2).

A weight stored under ``prefix`` (e.g. ``model.layers.0.mlp.up_proj``) becomes seven tensors. The
base is the same for every delta code; the delta has one of the codes registered in
:data:`tpde_hf.codec.registry.DELTA_CODES` (``CodecParams.delta_code``):

* ``"rans"`` (the default, format version 1): context-coded rANS lanes, the smaller file
  (:mod:`.delta_rans`);
* ``"class-width"`` (format version 2): one field width per (group, class), decoded without a
  dependent chain, so a GPU decodes a whole tile at once (:mod:`.delta_class_width`); about
  0.4-0.6 bits per weight larger on bf16.

============  =========================  ==================================================
suffix        dtype / shape              content
============  =========================  ==================================================
qweight       uint8 [out, in_pad/2]      4-bit codes, two per byte (see ``base_quant``)
scales        float16 [out, n_groups]    group scales
zeros         uint8 [out, ceil(ng/2)]    4-bit zero points, two per byte
meta          int64 [10] (v1), [12] (v2) version, dtype, out, in, G, lane_len, prob_bits, K, M, checksum;
                                         v2 adds the delta code's index (its ``index``) and the
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
The checks that depend on the delta code are the code's ``validate`` hook (:class:`DeltaCode`).

This module holds the types and the meta; it imports no codec implementation, so the codecs
(:mod:`.delta_rans`, :mod:`.delta_class_width`, :mod:`.compiled`) import it, never the reverse.

Example::

    enc = encode_tensor(weight, name="layer.weight")
    sd = enc.to_state_dict("layer")
    back = decode_tensor(EncodedTensor.from_state_dict(sd, "layer"))
    assert torch.equal(back.view(torch.int16), weight.view(torch.int16))
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import zstandard

from tpde_hf.codec import base_quant, class_width, registry
from tpde_hf.codec.ordinal import CODE_DTYPES, DTYPE_CODES, bit_width, check_dtype
from tpde_hf.codec.symbols import SymbolSpec
from tpde_hf.errors import TpdeFormatError

#: The newest tensor format this package reads (see the module docstring).
FORMAT_VERSION = 2
N_CONTEXTS = 16  # |q - zero| in 0..15
SUFFIXES = ("qweight", "scales", "zeros", "delta", "lanes", "tables", "meta")
SUPPORTED_LANE_LENS = (256, 512, 1024, 2048)
META_LENS = {1: 10, 2: 12}
_MAX_TABLE_BYTES = N_CONTEXTS * 1024 * 2  # the largest alphabet is 896 symbols


class DeltaCode(Protocol):
    """A delta code of the base + delta format, registered in :data:`registry.DELTA_CODES`.

    ``index`` is its number in a version-2 meta (a format fact: never reuse one);
    ``format_version`` the oldest tensor format that can hold it. The meta hooks write and read
    ``meta[5:9]``; ``validate`` checks the code's three parts (after the base was checked);
    ``encode_batch`` / ``decode_batch`` run the active backend over several tensors;
    ``inspect`` adds the code's own entries to :func:`tensor_codec.inspect_tensor`.

    Example: ``registry.DELTA_CODES.get("rans").decode_batch([enc], verify=True)``.
    """

    name: str
    index: int
    format_version: int

    def meta_fields(self, params: CodecParams) -> list[int]: ...

    def params_from_meta(self, group_size: int, fields: list[int], total_bits: int,
                         name: str | None) -> CodecParams: ...

    def validate(self, enc: EncodedTensor) -> None: ...

    def encode_batch(self, weights: dict[str, torch.Tensor], params: CodecParams) -> dict[str, EncodedTensor]: ...

    def decode_batch(self, encs: list[EncodedTensor], verify: bool) -> list[torch.Tensor]: ...

    def inspect(self, enc: EncodedTensor) -> dict[str, Any]: ...


def delta_code(name: str, tensor: str | None = None) -> DeltaCode:
    """The registered delta code called ``name`` (a :class:`TpdeFormatError` naming ``tensor`` if unknown)."""
    return registry.DELTA_CODES.get(name, tensor)


def delta_code_names() -> tuple[str, ...]:
    """The registered delta codes' names in meta-index order, e.g. ``('rans', 'class-width')``."""
    return tuple(sorted(registry.DELTA_CODES.names(), key=lambda n: delta_code(n).index))


def delta_code_at(index: int, tensor: str | None = None) -> DeltaCode:
    """The delta code stored as ``index`` in a version-2 meta."""
    for name in registry.DELTA_CODES.names():
        code = delta_code(name)
        if code.index == index:
            return code
    raise TpdeFormatError(tensor, f"unknown delta code {index} (this tpde-hf knows {delta_code_names()})")


@dataclass(frozen=True)
class CodecParams:
    """Encoder choices; all are recorded in each tensor's ``meta``.

    ``lane_len`` trades parallelism for size: each lane costs 64 bits of header. ``delta_code``
    picks the delta's code (see the module docstring); the class-width code ignores ``lane_len``,
    ``prob_bits``, ``sym_k`` and ``sym_m``.

    ``base_quantizer`` picks how the encoder chooses the base (:mod:`.base_quantizers`: ``minmax`` or
    ``search``); it is not in the meta either, because the decoder reads q, scale and zero as stored.

    ``storage`` is the one choice not in the meta: the registered base storage
    (:data:`registry.BASE_STORAGE`) a repo writer lays each weight out with on disk, or None for the
    seven tensors above. Its name is in the stored keys (:func:`registry.storage_key`); the tensor
    codec itself ignores it.

    Example: ``encode_tensor(w, CodecParams(group_size=64, delta_code="class-width"))``.
    """

    group_size: int = 128
    lane_len: int = 1024
    prob_bits: int = 12
    sym_k: int = 6
    sym_m: int = 5
    delta_code: str = "rans"
    storage: str | None = None
    base_quantizer: str = "minmax"

    @property
    def format_version(self) -> int:
        """The tensor format version these parameters write: 1 for rANS, 2 for class-width."""
        return delta_code(self.delta_code).format_version

    def validate(self, name: str | None = None) -> None:
        if self.delta_code not in registry.DELTA_CODES:
            raise TpdeFormatError(name, f"delta code {self.delta_code!r} not in {delta_code_names()}")
        if self.group_size not in base_quant.SUPPORTED_GROUP_SIZES:
            raise TpdeFormatError(name, f"group size {self.group_size} not in {base_quant.SUPPORTED_GROUP_SIZES}")
        if self.lane_len not in SUPPORTED_LANE_LENS:
            raise TpdeFormatError(name, f"lane length {self.lane_len} not in {SUPPORTED_LANE_LENS}")
        if not 10 <= self.prob_bits <= 15:
            raise TpdeFormatError(name, f"prob_bits {self.prob_bits} outside [10, 15]")
        if not (1 <= self.sym_m <= self.sym_k <= 8):
            raise TpdeFormatError(name, f"symbol parameters K={self.sym_k}, M={self.sym_m} unsupported")
        if self.base_quantizer not in registry.BASE_QUANTIZERS:
            raise TpdeFormatError(name, f"base quantizer {self.base_quantizer!r} not in "
                                        f"{registry.BASE_QUANTIZERS.names()}")
        if self.storage is not None and not known_storage(self.storage):
            raise TpdeFormatError(name, f"base storage {self.storage!r} not in {registry.BASE_STORAGE.names()}")


def known_storage(name: str) -> bool:
    """Whether base storage ``name`` is registered, after importing the built-in storages
    (:mod:`tpde_hf.codec.storage`, where present) on first need."""
    if name not in registry.BASE_STORAGE:
        importlib.import_module("tpde_hf.codec.storage_resident")  # the built-in "resident"
    if name not in registry.BASE_STORAGE:
        try:
            importlib.import_module("tpde_hf.codec.storage")
        except ModuleNotFoundError as exc:
            if exc.name != "tpde_hf.codec.storage":
                raise
    return name in registry.BASE_STORAGE


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
            self._freq = read_tables(self.tables, self.spec.n_symbols, self.params.prob_bits, self.name)
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
        code = delta_code(p.delta_code, self.name)
        version = code.format_version
        values = [version, DTYPE_CODES[self.dtype], self.shape[0], self.shape[1], p.group_size,
                  *code.meta_fields(p), self.checksum]
        if version >= 2:
            values += [code.index, self.total_bits]
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

        The base is checked here; the delta by its code's ``validate`` hook (for class-width the
        cheap check of every part's dtype and shape; its full layout check runs before any decode
        reads the payload).
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
        delta_code(self.delta_code, name).validate(self)


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
    v = meta.tolist()  # one call: indexing element by element is a torch call (and a GIL round trip) each
    version = v[0]
    if version > FORMAT_VERSION:
        raise TpdeFormatError(
            name, f"format version {version} is newer than this tpde-hf supports ({FORMAT_VERSION}); upgrade tpde-hf"
        )
    if version not in META_LENS or meta.numel() != META_LENS[version]:
        raise TpdeFormatError(name, f"unknown format version {version} or malformed meta")
    if v[1] not in CODE_DTYPES:
        raise TpdeFormatError(name, f"unknown source dtype code {v[1]}")
    if v[2] <= 0 or v[3] <= 0 or v[2] * v[3] >= 1 << 40:
        raise TpdeFormatError(name, f"invalid shape {v[2:4]}")
    code_index, total_bits = (v[10], v[11]) if version >= 2 else (0, 0)
    code = delta_code_at(code_index, name)
    if code.format_version > version:
        raise TpdeFormatError(name, f"delta code {code.name!r} needs format version {code.format_version}, "
                                    f"the meta says {version}")
    params = code.params_from_meta(v[4], v[5:9], total_bits, name)
    params.validate(name)
    return StoredMeta(version, CODE_DTYPES[v[1]], (v[2], v[3]), params, v[9], total_bits)


@contextmanager
def named_errors(name: str) -> Iterator[None]:
    """Re-raise a :class:`TpdeFormatError` that names no tensor (the class-width module's) with ``name``."""
    try:
        yield
    except TpdeFormatError as exc:
        if exc.tensor_name is not None:
            raise
        raise TpdeFormatError(name, str(exc)) from None


def read_tables(blob: torch.Tensor, n_sym: int, prob_bits: int, name: str) -> torch.Tensor:
    """The rANS frequency tables ``[16, n_sym]`` (int64) from their stored zstd blob, checked."""
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


# ==================================================================== shared by the encoders
def checked_weight(weight: torch.Tensor, params: CodecParams, name: str) -> torch.Tensor:
    """``weight`` on the CPU, contiguous, after checking ``params``, its dtype and its shape."""
    params.validate(name)
    check_dtype(weight.dtype, name)
    if weight.dim() != 2 or weight.numel() == 0:
        raise TpdeFormatError(name, f"expected a non-empty 2-D weight, got shape {list(weight.shape)}")
    return weight.detach().to("cpu").contiguous()


def concat_bases(bases: list[base_quant.BaseTensors]) -> base_quant.BaseTensors:
    """Row chunks' bases as one."""
    return base_quant.BaseTensors(*(torch.cat([getattr(b, f) for b in bases]) for f in ("qweight", "scales", "zeros")))
