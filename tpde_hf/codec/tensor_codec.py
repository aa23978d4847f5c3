"""Tensor-level codec: one weight <-> a handful of plain tensors (format version 1).

A weight stored under ``prefix`` (e.g. ``model.layers.0.mlp.up_proj``) becomes:

============  =========================  ==================================================
suffix        dtype / shape              content
============  =========================  ==================================================
qweight       uint8 [out, in_pad/2]      4-bit codes, two per byte (see ``base_quant``)
scales        float16 [out, n_groups]    group scales
zeros         uint8 [out, ceil(ng/2)]    4-bit zero points, two per byte
delta         uint8 [bytes]              rANS words (u16 LE, padded to 4 bytes) + raw bits (u32 LE)
lanes         int32 [n_lanes, 2]         final rANS state; words | raw_bits << 16 per lane
tables        uint8 [bytes]              zstd of uint16 frequencies [16 contexts, n_symbols]
meta          int64 [10]                 version, dtype, out, in, G, lane_len, prob_bits, K, M, checksum
============  =========================  ==================================================

Everything read from a file is validated against everything else before a decode starts, so a
crafted file can neither make the decoder index out of bounds nor return wrong weights silently.

Example::

    enc = encode_tensor(weight, name="layer.weight")
    sd = enc.to_state_dict("layer")
    back = decode_tensor(EncodedTensor.from_state_dict(sd, "layer"))
    assert torch.equal(back.view(torch.int16), weight.view(torch.int16))
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import zstandard

from tpde_hf.codec import base_quant, bitpack, rans
from tpde_hf.codec.ordinal import CODE_DTYPES, DTYPE_CODES, bit_width, check_dtype, from_ordinal, to_ordinal, wrap
from tpde_hf.codec.symbols import SymbolSpec, from_symbols, symbol_tables, to_symbols
from tpde_hf.errors import TpdeFormatError

FORMAT_VERSION = 1
N_CONTEXTS = 16  # |q - zero| in 0..15
SUFFIXES = ("qweight", "scales", "zeros", "delta", "lanes", "tables", "meta")
SUPPORTED_LANE_LENS = (256, 512, 1024, 2048)
META_LEN = 10
_MAX_TABLE_BYTES = N_CONTEXTS * 1024 * 2  # the largest alphabet is 896 symbols


@dataclass(frozen=True)
class CodecParams:
    """Encoder choices; all are recorded in each tensor's ``meta``.

    ``lane_len`` trades parallelism for size: each lane costs 64 bits of header.
    """

    group_size: int = 128
    lane_len: int = 1024
    prob_bits: int = 12
    sym_k: int = 6
    sym_m: int = 5

    def validate(self, name: str | None = None) -> None:
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
    _freq: torch.Tensor | None = field(default=None, repr=False)

    # ---------------------------------------------------------------- derived views
    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

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
        """``(final_states, words_per_lane, raw_bits_per_lane)`` as int64."""
        lanes = self.lanes.to(torch.int64) & 0xFFFFFFFF
        return lanes[:, 0], lanes[:, 1] & 0xFFFF, lanes[:, 1] >> 16

    def frequencies(self) -> torch.Tensor:
        """Per-context symbol frequencies ``[16, n_symbols]`` (int64), decompressed and checked."""
        if self._freq is None:
            self._freq = _read_tables(self.tables, self.spec.n_symbols, self.params.prob_bits, self.name)
        return self._freq

    def split_delta(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rans_words, raw_words)``, both int64 with values in [0, 2**16) and [0, 2**32)."""
        _, n_words, n_raw = self.lane_fields()
        word_bytes = 4 * -(-int(n_words.sum()) // 2)
        data = self.delta.numpy()
        words = np.frombuffer(data[:word_bytes].tobytes(), dtype="<u2")[: int(n_words.sum())]
        raw = np.frombuffer(data[word_bytes:].tobytes(), dtype="<u4")
        return torch.from_numpy(words.astype(np.int64)), torch.from_numpy(raw.astype(np.int64))

    def base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The lossy 4-bit weight (the prediction ``P``), in ``dtype`` or the source dtype."""
        return base_quant.predict(self.base, self.shape, self.params.group_size, dtype or self.dtype)

    # ---------------------------------------------------------------- sizes
    def nbytes(self) -> dict[str, int]:
        base = sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))
        delta = sum(t.numel() * t.element_size() for t in (self.delta, self.lanes, self.tables))
        return {"base": base, "delta": delta, "meta": META_LEN * 8, "total": base + delta + META_LEN * 8}

    # ---------------------------------------------------------------- (de)serialization
    def to_state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        meta = torch.tensor(
            [
                FORMAT_VERSION,
                DTYPE_CODES[self.dtype],
                self.shape[0],
                self.shape[1],
                self.params.group_size,
                self.params.lane_len,
                self.params.prob_bits,
                self.params.sym_k,
                self.params.sym_m,
                self.checksum,
            ],
            dtype=torch.int64,
        )
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
        meta_v = _check_meta(meta, name)
        version, dcode, out_f, in_f, g, lane_len, pb, k, m, checksum = meta_v
        params = CodecParams(group_size=g, lane_len=lane_len, prob_bits=pb, sym_k=k, sym_m=m)
        params.validate(name)
        enc = cls(
            name=name, dtype=CODE_DTYPES[dcode], shape=(out_f, in_f), params=params, checksum=checksum,
            qweight=qweight, scales=scales, zeros=zeros, delta=delta, lanes=lanes, tables=tables,
        )
        enc.validate()
        return enc

    def validate(self) -> None:
        """Check every shape, dtype, length and table against the others, before any decode."""
        name, (out_f, in_f), g = self.name, self.shape, self.params.group_size
        ng = base_quant.n_groups(in_f, g)
        expect = {
            "qweight": (torch.uint8, (out_f, ng * g // 2)),
            "scales": (torch.float16, (out_f, ng)),
            "zeros": (torch.uint8, (out_f, -(-ng // 2))),
            "lanes": (torch.int32, (self.layout.n_lanes, 2)),
        }
        for key, (dtype, shape) in expect.items():
            t = getattr(self, key)
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise TpdeFormatError(name, f"{key} is {t.dtype}{list(t.shape)}, expected {dtype}{list(shape)}")
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


def _check_meta(meta: torch.Tensor, name: str) -> list[int]:
    if meta.dtype != torch.int64 or meta.dim() != 1 or meta.numel() < 1:
        raise TpdeFormatError(name, f"meta must be a 1-D int64 tensor, got {meta.dtype}{list(meta.shape)}")
    version = int(meta[0])
    if version > FORMAT_VERSION:
        raise TpdeFormatError(
            name, f"format version {version} is newer than this tpde-hf supports ({FORMAT_VERSION}); upgrade tpde-hf"
        )
    if version != FORMAT_VERSION or meta.numel() != META_LEN:
        raise TpdeFormatError(name, f"unknown format version {version} or malformed meta")
    values = [int(v) for v in meta]
    if values[1] not in CODE_DTYPES:
        raise TpdeFormatError(name, f"unknown source dtype code {values[1]}")
    if values[2] <= 0 or values[3] <= 0 or values[2] * values[3] >= 1 << 40:
        raise TpdeFormatError(name, f"invalid shape {values[2:4]}")
    return values


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


def tensor_checksum(weight: torch.Tensor) -> int:
    """Signed 64-bit BLAKE2b of the weight's bytes (little-endian, row-major)."""
    data = weight.contiguous().view(torch.uint8).numpy()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


# ==================================================================== encode
def encode_tensor(weight: torch.Tensor, params: CodecParams | None = None, name: str = "tensor") -> EncodedTensor:
    """Encode a 2-D bf16/fp16/fp32 weight into 4-bit base + lossless delta."""
    params = params or CodecParams()
    params.validate(name)
    check_dtype(weight.dtype, name)
    if weight.dim() != 2 or weight.numel() == 0:
        raise TpdeFormatError(name, f"expected a non-empty 2-D weight, got shape {list(weight.shape)}")
    weight = weight.detach().to("cpu").contiguous()
    shape = (weight.shape[0], weight.shape[1])
    width = bit_width(weight.dtype)
    spec = SymbolSpec(params.sym_k, params.sym_m, width)
    g = params.group_size

    base = base_quant.quantize(weight, g)
    lv = base_quant.levels(base, shape, g)
    pred = base_quant.predict_from_levels(lv, base.scales, g, weight.dtype)
    r = wrap(to_ordinal(weight) - to_ordinal(pred), width).flatten()
    sym, raw, nraw = to_symbols(r, spec)
    ctx = lv.abs().flatten().to(torch.int64)
    del r, pred

    counts = torch.bincount(ctx * spec.n_symbols + sym, minlength=N_CONTEXTS * spec.n_symbols)
    freq = rans.quantize_frequencies(counts.view(N_CONTEXTS, spec.n_symbols), params.prob_bits)
    layout = LaneLayout.for_numel(weight.numel(), params.lane_len)
    states, n_words, words = rans.encode_lanes(
        layout.to_matrix(sym, 0),
        layout.to_matrix(ctx, N_CONTEXTS),
        rans.with_identity_context(freq, params.prob_bits),
        params.prob_bits,
    )
    nraw_m = layout.to_matrix(nraw, 0)
    offsets, n_raw = _raw_offsets(nraw_m)
    raw_words = bitpack.pack_fields(layout.to_matrix(raw, 0).flatten(), nraw_m.flatten(), offsets.flatten(), int(n_raw.sum()))

    word_bytes = np.zeros(2 * -(-words.numel() // 2), dtype="<u2")
    word_bytes[: words.numel()] = words.numpy()
    payload = word_bytes.tobytes() + raw_words.numpy().astype("<u4").tobytes()
    lanes = torch.stack((states, n_words | (n_raw << 16)), dim=1)
    lanes = torch.where(lanes >= 1 << 31, lanes - (1 << 32), lanes).to(torch.int32)
    table_bytes = zstandard.ZstdCompressor(level=19).compress(freq.numpy().astype("<u2").tobytes())
    return EncodedTensor(
        name=name, dtype=weight.dtype, shape=shape, params=params, checksum=tensor_checksum(weight),
        qweight=base.qweight, scales=base.scales, zeros=base.zeros,
        delta=torch.frombuffer(bytearray(payload), dtype=torch.uint8),
        lanes=lanes, tables=torch.frombuffer(bytearray(table_bytes), dtype=torch.uint8), _freq=freq,
    )


def _raw_offsets(nraw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bit offset of every element's raw field: lanes back to back, each in step order."""
    per_lane = nraw.sum(dim=0)
    lane_start = torch.cumsum(per_lane, 0) - per_lane
    return lane_start[None, :] + torch.cumsum(nraw, 0) - nraw, per_lane


# ==================================================================== decode
def decode_tensor(enc: EncodedTensor, verify: bool = False) -> torch.Tensor:
    """Rebuild the original weight exactly (CPU reference). ``verify`` also checks the checksum."""
    return decode_tensors([enc], verify=verify)[0]


def decode_tensors(encs: list[EncodedTensor], verify: bool = False) -> list[torch.Tensor]:
    """Decode several weights in one vectorized pass over all their lanes (faster on small tensors)."""
    if not encs:
        return []
    preds, deltas = [], []
    for enc, sym, raw_words, offs in _decode_symbols(encs):
        nraw_tab = symbol_tables(enc.spec)[1]
        nraw = nraw_tab[sym]
        _, _, n_raw = enc.lane_fields()
        if not torch.equal(nraw.sum(dim=0), n_raw):
            raise TpdeFormatError(enc.name, "raw-bit stream does not match the decoded symbols (corrupt delta)")
        raw = bitpack.read_fields(raw_words, nraw.flatten(), (offs + torch.cumsum(nraw, 0) - nraw).flatten())
        deltas.append(from_symbols(sym.flatten()[: enc.numel], raw[: enc.numel], enc.spec))
        preds.append(enc)
    out = []
    for enc, r in zip(preds, deltas):
        lv = base_quant.levels(enc.base, enc.shape, enc.params.group_size)
        pred = base_quant.predict_from_levels(lv, enc.scales, enc.params.group_size, enc.dtype)
        width = bit_width(enc.dtype)
        w = from_ordinal(wrap(to_ordinal(pred).flatten() + r, width), enc.dtype).view(enc.shape)
        if verify and tensor_checksum(w) != enc.checksum:
            raise TpdeFormatError(enc.name, "checksum mismatch: the decoded weight differs from the original")
        out.append(w)
    return out


def _decode_symbols(encs: list[EncodedTensor]):
    """Run the rANS lanes of all ``encs`` together; yields ``(enc, symbols[steps, lanes], raw_words, lane_raw_start)``."""
    max_steps = max(e.layout.steps for e in encs)
    ctx_cols, step_luts, sym_luts, states, word_streams, starts, lane_counts = [], [], [], [], [], [], []
    word_base, ctx_base = 0, 0
    for enc in encs:
        lay = enc.layout
        pb = enc.params.prob_bits
        lv = base_quant.levels(enc.base, enc.shape, enc.params.group_size)
        ctx = lay.to_matrix(lv.abs().flatten().to(torch.int64), N_CONTEXTS)
        ctx = torch.nn.functional.pad(ctx, (0, 0, 0, max_steps - lay.steps), value=N_CONTEXTS)
        ctx_cols.append(ctx + ctx_base)
        freq = rans.with_identity_context(enc.frequencies(), pb)
        step_lut, sym_lut = rans.decode_luts(freq, pb)
        step_luts.append(step_lut)
        sym_luts.append(sym_lut)
        ctx_base += N_CONTEXTS + 1
        st, n_words, _ = enc.lane_fields()
        words, _ = enc.split_delta()
        states.append(st)
        starts.append(word_base + torch.cumsum(n_words, 0) - n_words)
        word_streams.append(words)
        word_base += words.numel()
        lane_counts.append(lay.n_lanes)
    pbs = {e.params.prob_bits for e in encs}
    if len(pbs) != 1:  # the shared LUT indexing assumes one probability scale
        return [item for e in encs for item in _decode_symbols([e])]
    pb = pbs.pop()
    words = torch.cat(word_streams + [torch.zeros(1, dtype=torch.int64)])
    start = torch.cat(starts)
    lut_index, final_x, final_ptr = rans.decode_lanes(
        torch.cat(ctx_cols, dim=1), torch.cat(states), start, words, torch.cat(step_luts), pb
    )
    sym = torch.cat(sym_luts)[lut_index]
    results = []
    col = 0
    for enc, n, st in zip(encs, lane_counts, starts):
        sl = slice(col, col + n)
        col += n
        _, n_words, n_raw = enc.lane_fields()
        if not bool((final_x[sl] == rans.STATE_LOW).all()) or not torch.equal(final_ptr[sl], st + n_words):
            raise TpdeFormatError(enc.name, "delta stream failed its lane check (corrupt or truncated delta)")
        _, raw_words = enc.split_delta()
        results.append((enc, sym[: enc.layout.steps, sl], raw_words, (torch.cumsum(n_raw, 0) - n_raw)[None, :]))
    return results


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
        "lanes": enc.layout.n_lanes,
        "steps": enc.layout.steps,
        "table_bits": math.ceil(enc.tables.numel() * 8),
    }
