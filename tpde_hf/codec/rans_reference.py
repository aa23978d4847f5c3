"""The numpy reference of the rANS delta code: encode and decode vectorized over lanes.

One pass over memory per operation, lanes of several tensors in one loop (much faster on small
tensors than one tensor at a time). The compiled codec (:mod:`.compiled`) is the default; the tests
hold the two to identical bytes and bits. :mod:`.delta_rans` picks one through
:mod:`.backend`.

Example::

    enc = encode_batch({"w": weight}, CodecParams())["w"]
    assert torch.equal(decode_batch([enc], verify=True)[0].view(torch.int16), weight.view(torch.int16))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import zstandard

from tpde_hf.codec import base_quant, bitpack, rans
from tpde_hf.codec.base_quantizers import quantize_base
from tpde_hf.codec.checksum import tensor_checksum
from tpde_hf.codec.encoded import N_CONTEXTS, CodecParams, EncodedTensor, LaneLayout, checked_weight, concat_bases
from tpde_hf.codec.ordinal import bit_width, from_ordinal, to_ordinal, wrap
from tpde_hf.codec.symbols import SymbolSpec, symbol_tables, to_symbols
from tpde_hf.errors import TpdeFormatError

#: Lanes of several tensors run through one rANS loop while their elements stay under this bound:
#: a few thousand lanes per numpy call amortize its overhead; more only costs memory.
BATCH_ELEMENTS = 1 << 24
#: Rows are quantized and symbolized in chunks of about this many elements, so the int64
#: temporaries of a 10**8-element weight never exist all at once.
PREPARE_CHUNK_ELEMENTS = 1 << 22


# ==================================================================== encode
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


def _prepare(weight: torch.Tensor, params: CodecParams, name: str) -> _Prepared:
    weight = checked_weight(weight, params, name)
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
        base = quantize_base(w, params)
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
    base = concat_bases(bases)
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
    return assemble(prep.name, prep.weight, prep.params, prep.base, prep.freq, states.numpy(), n_words.numpy(),
                    words.numpy(), n_raw.numpy(), raw_words.numpy())


def assemble(name: str, weight: torch.Tensor, params: CodecParams, base: base_quant.BaseTensors,
             freq: torch.Tensor, states: np.ndarray, n_words: np.ndarray, words: np.ndarray, n_raw: np.ndarray,
             raw_words: np.ndarray) -> EncodedTensor:
    """Pack an encoder's output (per-lane arrays and the two streams) into the stored tensors.

    Both backends end here, so their bytes are laid out by one function.
    """
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


def batches(items: list, numel: Callable, key: Callable) -> list[list]:
    """Group consecutive items with equal ``key`` into batches of at most ``BATCH_ELEMENTS``."""
    out: list[list] = []
    size = 0
    for item in items:
        if out and key(out[-1][0]) == key(item) and size + numel(item) <= BATCH_ELEMENTS:
            out[-1].append(item)
            size += numel(item)
        else:
            out.append([item])
            size = numel(item)
    return out


def encode_batch(weights: dict[str, torch.Tensor], params: CodecParams) -> dict[str, EncodedTensor]:
    """Encode several 2-D weights, running their rANS lanes together."""
    out: dict[str, EncodedTensor] = {}
    names = list(weights)
    for batch in batches(names, lambda n: weights[n].numel(), lambda n: 0):
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


# ==================================================================== decode
def check_checksum(enc: EncodedTensor, w: torch.Tensor, verify: bool) -> None:
    """With ``verify``, a :class:`TpdeFormatError` unless ``w`` has the stored checksum."""
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


def decode_batch(encs: list[EncodedTensor], verify: bool) -> list[torch.Tensor]:
    """Decode rANS tensors, batching those with equal ``prob_bits`` into one loop over all their lanes."""
    out: list[torch.Tensor] = []
    for batch in batches(encs, lambda e: e.numel, lambda e: e.params.prob_bits):
        out.extend(_decode_batch(batch, verify))
    return out


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
        check_checksum(enc, w, verify)
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
