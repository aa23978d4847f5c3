"""The compiled CPU codec: numba loops over the same format, byte- and bit-identical to the numpy reference.

The numpy reference (:mod:`tpde_hf.codec.rans` and friends) is vectorized over lanes and makes one
pass over memory per operation; these loops make one pass per element and use both cores for the
decode. :mod:`tpde_hf.codec.backend` picks one; the tests run both and compare their bytes.

Work is cut into chunks of steps (a contiguous run of rows), so the prediction table, which
holds the ordinal of ``dtype(c * scale)`` for every group and level ``c`` in ``-15..15``, never
exists for the whole weight at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import torch

from tpde_hf.codec import base_quant, rans
from tpde_hf.codec import compiled_kernels as kernels
from tpde_hf.codec.backend import thread_limit
from tpde_hf.codec.ordinal import INT_VIEW, bit_width
from tpde_hf.codec.symbols import SymbolSpec, symbol_tables
from tpde_hf.errors import TpdeFormatError
from tpde_hf.threads import WorkerPool

if TYPE_CHECKING:
    from tpde_hf.codec.encoded import EncodedTensor, LaneLayout

#: About this many elements per chunk: bounds the prediction table (4 * 32 / G bytes per element).
CHUNK_ELEMENTS = 1 << 22
_BIT_LENGTH_16 = np.array([int(v).bit_length() for v in range(1 << 16)], dtype=np.uint8)


def prediction_ordinals(scales: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """int32 ``[rows, n_groups, 32]``: ``ord(dtype(float32(c) * float32(scale)))`` at index ``c + 15``.

    The same value as :func:`base_quant.predict_from_levels`: the float32 product is exact (an fp16
    scale times ``|c| <= 15``), so only the cast rounds, to nearest even (a test checks every fp16
    scale against torch). One compiled pass over row blocks on the codec's threads: the table is
    rebuilt at every decode, and numpy's ten passes over it cost a fifth of a layer's decode.
    Index 31 is unused (0).
    """
    s32 = scales.numpy().astype(np.float32)
    rows = s32.shape[0]
    out = np.empty((rows, s32.shape[1], 32), dtype=np.int32)
    width = bit_width(dtype)
    _run_all(kernels.prediction_rows, [(s32, r0, r1, width, dtype == torch.float16, out)
                                       for r0, r1 in _blocks(rows, out.size)])
    return out


@dataclass(frozen=True)
class _Chunk:
    e0: int  # steps [e0, e1)
    e1: int
    r0: int  # rows [r0, r1) hold those steps' elements
    r1: int


def _chunks(layout: LaneLayout, in_f: int) -> list[_Chunk]:
    per = max(1, CHUNK_ELEMENTS // layout.n_lanes)
    chunks = []
    for e0 in range(0, layout.steps, per):
        e1 = min(layout.steps, e0 + per)
        i0, i1 = e0 * layout.n_lanes, min(e1 * layout.n_lanes, layout.numel)
        chunks.append(_Chunk(e0, e1, i0 // in_f, (i1 - 1) // in_f + 1))
    return chunks


def _row_chunks(out_f: int, in_f: int) -> Iterator[tuple[int, int]]:
    rows = max(1, CHUNK_ELEMENTS // in_f)
    for r0 in range(0, out_f, rows):
        yield r0, min(out_f, r0 + rows)


def _weight_bits(weight: torch.Tensor) -> np.ndarray:
    return weight.contiguous().view(INT_VIEW[weight.dtype]).numpy().ravel()


def _group_shift(group_size: int) -> int:
    return group_size.bit_length() - 1  # group sizes are powers of two


#: Tensors under this many elements run on the calling thread: a thread hand-off costs more.
MIN_PARALLEL_ELEMENTS = 1 << 16
_POOL = WorkerPool("tpde-codec")


def codec_threads() -> int:
    """Threads the compiled codec uses: the calling thread's :func:`backend.limit_codec_threads`, else
    ``TPDE_CODEC_THREADS``, else every core this process may run on.

    Conversion worker processes set ``TPDE_CODEC_THREADS`` to their share of the cores.
    """
    limit = thread_limit()
    if limit is not None:
        return limit
    env = os.environ.get("TPDE_CODEC_THREADS", "").strip()
    if env:
        return max(1, int(env))
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _run_all(fn: Callable, jobs: list[tuple]) -> list:
    """``fn(*job)`` for every job; on the thread pool when there is more than one (the loops drop the GIL)."""
    return _POOL.run(fn, jobs)


#: Lanes a rANS kernel call walks through all its steps together. Each lane reads (decode) or writes (encode)
#: its own stream, so one step of n lanes touches n cache lines: a real-size weight (5120 x 13824: 69,120
#: lanes) swept whole fell out of L2 at every step and cost 3 to 5 times the CPU per byte of a small one.
LANE_BLOCK = 1024


def _lane_blocked(kernel: Callable, l0_at: int) -> Callable:
    """``kernel`` run over its lanes ``[l0, l1)`` (arguments ``l0_at`` and ``l0_at + 1``) in runs of
    :data:`LANE_BLOCK` lanes, each through all the call's steps.

    Lanes are independent and each still sees its steps in order, so the bytes are the same.

    Example::

        _lane_blocked(kernels.decode_steps, -3)(*args)   # same result as kernels.decode_steps(*args)
    """
    def run(*args: object) -> None:
        args_ = list(args)
        l0, l1 = int(args_[l0_at]), int(args_[l0_at + 1])
        for s in range(l0, l1, LANE_BLOCK):
            args_[l0_at], args_[l0_at + 1] = s, min(l1, s + LANE_BLOCK)
            kernel(*args_)

    return run


def _blocks(count: int, numel: int) -> list[tuple[int, int]]:
    """``count`` lanes or rows cut into one contiguous block per thread (one block for a small weight)."""
    n = 1 if numel < MIN_PARALLEL_ELEMENTS else max(1, min(codec_threads(), count))
    per = -(-count // n)
    return [(b0, min(count, b0 + per)) for b0 in range(0, count, per)]


def _as_float32(weight: torch.Tensor) -> np.ndarray:
    """The weight as a float32 array (exact for every source dtype), without a torch op."""
    if weight.dtype == torch.float32:
        return weight.numpy()
    if weight.dtype == torch.float16:
        return weight.view(torch.int16).numpy().view(np.float16).astype(np.float32)
    return (weight.view(torch.int16).numpy().astype(np.int32) << 16).view(np.float32)  # bfloat16


def quantize(weight: torch.Tensor, group_size: int) -> base_quant.BaseTensors:
    """:func:`base_quant.quantize` in compiled loops, bit for bit (a test compares them).

    Rows go in chunks, so the float32 copy never holds the whole weight.
    """
    parts = [_quantize_rows(weight[r0:r1], group_size) for r0, r1 in _row_chunks(*weight.shape)]
    if len(parts) == 1:
        return parts[0]
    # numpy, not torch.cat: a torch op here leaves OpenMP threads spinning against the codec's threads.
    return base_quant.BaseTensors(*(torch.from_numpy(np.concatenate([getattr(b, f).numpy() for b in parts]))
                                    for f in ("qweight", "scales", "zeros")))


def _quantize_rows(weight: torch.Tensor, group_size: int) -> base_quant.BaseTensors:
    out_f, in_f = weight.shape
    ng = base_quant.n_groups(in_f, group_size)
    gshift = _group_shift(group_size)
    w = _as_float32(weight)
    lo = np.zeros((out_f, ng), dtype=np.float32)
    hi = np.zeros((out_f, ng), dtype=np.float32)
    row_blocks = _blocks(out_f, weight.numel())
    _run_all(kernels.group_ranges, [(w, r0, r1, gshift, lo, hi) for r0, r1 in row_blocks])
    with np.errstate(over="ignore"):  # a range past the float32 maximum becomes inf, then 65504
        scale32 = (hi - lo) / np.float32(15.0)
    scale = np.minimum(scale32, np.float32(base_quant.FP16_MAX)).astype(np.float16)
    fallback = np.where(scale32 > 0, np.float16(base_quant.FP16_MIN_SUBNORMAL), np.float16(1.0))
    scale = np.where(scale == 0, fallback, scale)
    s32 = scale.astype(np.float32)
    zero = np.clip(np.rint(-lo / s32), np.float32(0), np.float32(15)).astype(np.float32)
    qweight = np.empty((out_f, ng * group_size // 2), dtype=np.uint8)
    _run_all(kernels.quantize_codes, [(w, r0, r1, gshift, s32, zero, qweight) for r0, r1 in row_blocks])
    return base_quant.BaseTensors(
        qweight=torch.from_numpy(qweight),
        scales=torch.from_numpy(scale),
        zeros=base_quant.pack_nibbles(torch.from_numpy(zero.astype(np.uint8))),
    )


@dataclass
class EncodedLanes:
    """What the encoder's loops produce for one weight, before it is packed into tensors."""

    freq: torch.Tensor  # [16, n_symbols] int64
    states: np.ndarray  # final rANS state per lane
    n_words: np.ndarray  # rANS words per lane
    words: np.ndarray  # uint16, lane after lane in decoder order
    n_raw: np.ndarray  # raw bits per lane
    raw_words: np.ndarray  # uint32, the raw-bit stream


def encode_lanes(weight: torch.Tensor, base: base_quant.BaseTensors, spec: SymbolSpec, layout: LaneLayout,
                 group_size: int, prob_bits: int, n_contexts: int) -> EncodedLanes:
    """Count symbols, build the tables and rANS-encode every lane of one (already quantized) weight.

    Pass 2 reads the coding fields pass 1 kept (weights up to ``PACKED_MAX_ELEMENTS``), or recomputes
    them from the base; both write the same bytes (a test compares them).
    """
    out_f, in_f = weight.shape
    bits = _weight_bits(weight)
    qweight, zeros = base.qweight.numpy(), base.zeros.numpy()
    width, gshift = bit_width(weight.dtype), _group_shift(group_size)
    n_lanes = layout.n_lanes
    blocks = _blocks(n_lanes, layout.numel)
    common = (in_f, gshift, n_lanes, width, spec.k, spec.m, spec.n_symbols, _BIT_LENGTH_16)

    # Pass 1: symbol counts per context and raw bits per lane, each thread over its own elements;
    # it keeps every element's coding fields for pass 2 where they fit in a small multiple of the weight.
    fields = _packed_fields(spec, n_contexts, layout.numel)
    packed = np.empty(layout.numel if fields else 0, dtype=fields[2] if fields else np.uint32)
    j_bits, nr_bits = fields[:2] if fields else (0, 0)
    counts = np.zeros((len(blocks), n_contexts * spec.n_symbols), dtype=np.int64)
    lane_raws = np.zeros((len(blocks), n_lanes), dtype=np.int64)
    tables: dict[tuple[int, int], np.ndarray] = {}

    def pred_rows(r0: int, r1: int) -> np.ndarray:  # a one-chunk weight builds its table once for both passes
        if (r0, r1) not in tables:
            tables.clear()
            tables[(r0, r1)] = prediction_ordinals(base.scales[r0:r1], weight.dtype)
        return tables[(r0, r1)]

    for r0, r1 in _row_chunks(out_f, in_f):
        pred = pred_rows(r0, r1)
        i0, i1 = r0 * in_f, r1 * in_f
        cuts = np.linspace(i0, i1, len(blocks) + 1).astype(np.int64)
        _run_all(kernels.symbol_statistics, [
            (bits, qweight, zeros, pred, r0, int(cuts[t]), int(cuts[t + 1]), *common, counts[t], lane_raws[t],
             packed, j_bits, nr_bits)
            for t in range(len(blocks))
        ])
    lane_raw = lane_raws.sum(axis=0)
    freq = rans.quantize_frequencies(torch.from_numpy(counts.sum(axis=0)).view(n_contexts, spec.n_symbols), prob_bits)
    cum = (torch.cumsum(freq, dim=1) - freq).numpy().astype(np.uint32).ravel()

    # Pass 2: rANS, backwards, each thread over its own lanes and its own slice of the raw stream.
    state = np.full(n_lanes, rans.STATE_LOW, dtype=np.uint64)
    word_buf = np.empty((n_lanes, layout.steps), dtype=np.uint16)
    word_pos = np.full(n_lanes, layout.steps - 1, dtype=np.int64)
    lane_start = np.cumsum(lane_raw) - lane_raw
    raw_pos = lane_start + lane_raw  # each lane's raw fields are written back to front
    raw_bases = [int(lane_start[l0]) >> 5 for l0, _ in blocks]
    raw_parts = [np.zeros((int(lane_start[l1 - 1] + lane_raw[l1 - 1]) >> 5) - rb + 2, dtype=np.uint64)
                 for (_, l1), rb in zip(blocks, raw_bases, strict=True)]
    freq_u32 = freq.numpy().astype(np.uint32).ravel()
    lane_jobs = list(zip(blocks, raw_bases, raw_parts, strict=True))
    if fields:
        tables.clear()  # pass 2 needs no prediction table
        _run_all(_lane_blocked(kernels.encode_packed, -4), [
            (packed, j_bits, nr_bits, 0, layout.steps, layout.numel, n_lanes, freq_u32, cum, prob_bits, state,
             word_pos, word_buf, raw_pos, l0, l1, rb, part)
            for (l0, l1), rb, part in lane_jobs
        ])
    else:
        for ch in reversed(_chunks(layout, in_f)):
            pred = pred_rows(ch.r0, ch.r1)
            _run_all(_lane_blocked(kernels.encode_steps, -4), [
                (bits, qweight, zeros, pred, ch.r0, ch.e0, ch.e1, layout.numel, *common, freq_u32, cum,
                 prob_bits, state, word_pos, word_buf, raw_pos, l0, l1, rb, part)
                for (l0, l1), rb, part in lane_jobs
            ])
    del packed
    if not np.array_equal(raw_pos, lane_start):  # the two passes must agree on every raw field
        raise AssertionError("compiled encoder: raw-bit pass out of step with the statistics pass")
    n_raw_words = -(-int(lane_raw.sum()) // 32)
    raw_words = np.zeros(n_raw_words, dtype=np.uint64)
    for rb, part in zip(raw_bases, raw_parts, strict=True):  # blocks share at most their edge words
        kernels.or_into(raw_words, rb, part)
    n_words = layout.steps - 1 - word_pos
    words = np.empty(int(n_words.sum()), dtype=np.uint16)
    kernels.gather_lane_words(word_buf, word_pos, words)
    return EncodedLanes(freq, state.astype(np.int64), n_words, words, lane_raw, raw_words.astype(np.uint32))


#: Pass 1 keeps every element's coding fields for pass 2 in weights up to this many elements (4 bytes
#: each for 16-bit sources with the default symbols, 8 for fp32); larger weights recompute them.
PACKED_MAX_ELEMENTS = 1 << 24


def _packed_fields(spec: SymbolSpec, n_contexts: int, numel: int) -> tuple[int, int, type] | None:
    """``(j_bits, nr_bits, dtype)`` of the packed coding fields of a weight, or None to recompute them."""
    if numel > PACKED_MAX_ELEMENTS:
        return None
    j_bits = (n_contexts * spec.n_symbols - 1).bit_length()
    nr_bits = spec.max_raw_bits.bit_length()
    total = j_bits + nr_bits + spec.max_raw_bits
    return (j_bits, nr_bits, np.uint32) if total <= 32 else (j_bits, nr_bits, np.uint64) if total <= 64 else None


def decode_table(freq: torch.Tensor, prob_bits: int, spec: SymbolSpec) -> np.ndarray:
    """uint64 over ``ctx << prob_bits | slot``: the rANS step entry ``freq | (slot - cum) << 16`` (as in
    :func:`rans.decode_luts`), the symbol's leading value bits ``u >> n_raw`` (bits 32..40) and its
    raw-bit count ``n_raw`` (bits 48..53). The last context is the identity (padding) context."""
    rows = rans.with_identity_context(freq, prob_bits).numpy()
    lead, n_raw = _symbol_fields(spec)
    out = np.zeros(rows.shape[0] << prob_bits, dtype=np.uint64)
    kernels.fill_decode_table(rows, prob_bits, lead, n_raw, out)
    return out


@lru_cache(maxsize=16)
def _symbol_fields(spec: SymbolSpec) -> tuple[np.ndarray, np.ndarray]:
    """Per symbol: leading value bits ``base_u >> n_raw`` (< 2**9: K, M <= 8) and the raw-bit count."""
    base_u, n_raw = symbol_tables(spec)
    return (base_u >> n_raw).numpy().astype(np.uint64), n_raw.numpy().astype(np.uint64)


def decode(enc: EncodedTensor, lut: np.ndarray) -> torch.Tensor:
    """Rebuild one weight; ``lut`` is the tensor's :func:`decode_table`."""
    out_f, in_f = enc.shape
    layout = enc.layout
    states, n_words, n_raw = (t.numpy() for t in enc.lane_fields())
    words, raw_words = enc.delta_streams()
    # The loop clamps its reads into these arrays, so each must hold at least its padding.
    words = words if words.size else np.zeros(1, dtype=np.uint16)
    raw_words = raw_words if raw_words.size >= 2 else np.zeros(2, dtype=np.uint32)
    word_end = np.cumsum(n_words)
    raw_end = np.cumsum(n_raw)
    state = states.astype(np.uint64)
    word_ptr = word_end - n_words
    raw_ptr = raw_end - n_raw
    out = np.empty(layout.numel, dtype=_np_int(enc.dtype))
    width, gshift = bit_width(enc.dtype), _group_shift(enc.params.group_size)
    qweight, zeros = enc.qweight.numpy(), enc.zeros.numpy()
    blocks = _blocks(layout.n_lanes, layout.numel)
    for ch in _chunks(layout, in_f):
        pred = prediction_ordinals(enc.scales[ch.r0 : ch.r1], enc.dtype)
        _run_all(_lane_blocked(kernels.decode_steps, -3), [
            (qweight, zeros, pred, ch.r0, ch.e0, ch.e1, layout.numel, in_f, gshift, layout.n_lanes, width,
             enc.params.prob_bits, lut, words, raw_words, state, word_ptr, raw_ptr, l0, l1, out)
            for l0, l1 in blocks
        ])
    # Pointers only grow: equal to the lane ends means no lane read past its own data.
    if not (state == rans.STATE_LOW).all() or not np.array_equal(word_ptr, word_end):
        raise TpdeFormatError(enc.name, "delta stream failed its lane check (corrupt or truncated delta)")
    if not np.array_equal(raw_ptr, raw_end):
        raise TpdeFormatError(enc.name, "raw-bit stream does not match the decoded symbols (corrupt delta)")
    return torch.from_numpy(out).view(enc.dtype).view(out_f, in_f)


def _np_int(dtype: torch.dtype) -> type:
    return np.int16 if bit_width(dtype) == 16 else np.int32
