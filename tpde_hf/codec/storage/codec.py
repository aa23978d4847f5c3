"""The ``narrow-rans`` storage codec: a converted linear weight on disk in two uint8 parts.

* ``base_blob`` (what ``base`` mode reads): the 4-bit codes ``q`` rANS-coded with the group's zero point
  as context (one 16 x 16 frequency table per tensor, zstd), the fp16 scales as two zstd byte planes, the
  zero points zstd-coded, and an xxh3-64 checksum of the resident base;
* ``delta_blob``: each weight coded *inside its quantization bin* (range narrowing, :mod:`.kernels`),
  with frequencies derived from the bin's geometry (no tables), the weights that fall outside their bin
  (non-finite values, clamped codes) as a list of exceptions, and an xxh3-64 checksum of the weight.

``version`` is the layout: 2 (written) codes alternate elements of a block with two interleaved rANS
states (lanes), so their chains overlap on one core; 1 (still read) has one state per block (its block
index holds one state, not two). Both decode to exactly the resident layout (``qweight, scales, zeros``
of :mod:`tpde_hf.codec.base_quant`) and to the exact weight. Elements are coded in blocks of ``BLOCK``
consecutive elements (row-major), each its own rANS stream, so blocks decode on several threads. Before
any block, the bins that the tensor's codes use are built once, into one table shared by the threads
(:func:`_bins`); the per-element loops then only read tables. Inside :func:`.table.shared_bins` (a load's
decode workers, :mod:`tpde_hf.loading.storage_prefetch`) the bins are kept across tensors instead, so a scale
that many tensors share is built once, and the weight is decoded by one compiled call (:mod:`.fused`).
Decoding the weight alone (:func:`decode_weight`) skips
building the resident base: the weight's checksum covers the codes it was decoded with.

Layouts (all little-endian; ``u32 lengths`` of the sections follow each header):

=========  ========================================================  ====================================
blob       header                                                    sections
=========  ========================================================  ====================================
base       version u8, dtype code u8, group size u16, out u32,       block index (u32 states, u32 words),
           in u32, checksum of the base (and of dtype, group size,   q words, q table, scales hi, scales
           shape) u64                                                lo, zeros
delta      version u8, grid shift u8 (low mantissa bits that are 0   block index, words, exceptions (zstd
           in every weight), 2 pad bytes, exceptions u32, checksum   of u64 position gaps then u32 bit
           of the weight u64                                         patterns; empty without exceptions)
=========  ========================================================  ====================================

Example::

    codec = BASE_STORAGE.get("narrow-rans")
    parts = codec.encode(w, base_quant.quantize(w).__dict__, CodecContext("layer.weight"))
    assert torch.equal(codec.decode(parts, CodecContext("layer.weight")).view(torch.int16), w.view(torch.int16))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import lru_cache

import numpy as np
import torch

from tpde_hf.codec import base_quant, rans
from tpde_hf.codec.ordinal import CODE_DTYPES, DTYPE_CODES, INT_VIEW, bit_width, check_dtype
from tpde_hf.codec.registry import CodecContext
from tpde_hf.codec.storage import bins as K
from tpde_hf.codec.storage import delta as D
from tpde_hf.codec.storage import streams as S
from tpde_hf.codec.storage.blob import pack_blob, zstd_pack
from tpde_hf.codec.storage.reader import (  # noqa: F401  (re-exported: the layout's constants and parsers)
    _BASE,
    _DELTA,
    _LANES,
    _MANTISSA,
    BLOCK,
    VERSIONS,
    _base_sections,
    _block_index,
    _blocks,
    _checksum,
    _delta_sections,
    _finish_weight,
    _parse_base,
    _scales,
)
from tpde_hf.errors import TpdeFormatError
from tpde_hf.threads import WorkerPool

VERSION = 2  # the layout this writer writes (both blobs' version byte)
ZSTD_LEVEL = 12


def _threads() -> int:
    try:
        from tpde_hf.codec.compiled import codec_threads

        return codec_threads()
    except Exception:  # noqa: BLE001 - the compiled codec's thread setting is optional here
        return 1


_POOL = WorkerPool("tpde-storage")


def _run(fn: Callable, jobs: list[tuple], make_cache: Callable[[], object] | None = None) -> list:
    """``fn(*job, cache)`` for every job, on the codec's threads (the kernels release the GIL); each thread
    takes a contiguous share of the jobs and one ``make_cache()`` of its own. The calling thread takes the
    first share; the others run on one pool kept for the process (no thread start per call)."""
    n = max(1, min(_threads(), len(jobs)))
    shares = [jobs[len(jobs) * t // n: len(jobs) * (t + 1) // n] for t in range(n)]

    def share(part: list[tuple]) -> list:
        cache = make_cache() if make_cache else None
        return [fn(*j, cache) for j in part]

    return [r for part in _POOL.run(share, [(part,) for part in shares]) for r in part]


def _scale_ids(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(distinct scales as float32, index of each group's scale)``: bins are built once per scale."""
    uniq, ids = S.scale_ids(np.ascontiguousarray(scales).view(np.uint16))
    return uniq.view(np.float16).astype(np.float32), ids.reshape(scales.shape)


@lru_cache(maxsize=4)
def value_lut(dtype: torch.dtype) -> np.ndarray:
    """float32 value of every 16-bit pattern of ``dtype`` (empty for fp32, which the kernels bit-cast)."""
    if dtype == torch.float32:
        return np.zeros(1, dtype=np.float32)
    pats = np.arange(1 << 16, dtype=np.uint32)
    if dtype == torch.bfloat16:
        return (pats << 16).view(np.float32)
    return pats.astype(np.uint16).view(np.float16).astype(np.float32)


def pack4(codes: np.ndarray) -> np.ndarray:
    """numpy :func:`base_quant.pack_nibbles` (uint8 codes in [0, 15], padded to an even length with 0)."""
    if codes.shape[-1] % 2:
        codes = np.concatenate((codes, np.zeros(codes.shape[:-1] + (1,), dtype=np.uint8)), axis=-1)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack4(packed: np.ndarray, length: int) -> np.ndarray:
    """numpy :func:`base_quant.unpack_nibbles`."""
    out = np.empty(packed.shape[:-1] + (2 * packed.shape[-1],), dtype=np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out[..., :length]


def grid_bits(bits: np.ndarray, width: int, mb: int) -> int:
    """Low mantissa bits that are 0 in every finite weight (at most ``mb``): a tensor that came from a narrower
    format (fp16 values stored as fp32: 13) is coded on that coarser grid. Example: fp32 ``[0.5, 0.25]`` -> 23."""
    ored = int(S.or_finite_magnitudes(bits, width, mb))
    return mb if ored == 0 else min(mb, (ored & -ored).bit_length() - 1)


def _geometry(dtype: torch.dtype) -> tuple[int, int, np.ndarray]:
    return bit_width(dtype), _MANTISSA[dtype], value_lut(dtype)


def _bins(q: np.ndarray, z: np.ndarray, sids: np.ndarray, uscales: np.ndarray, gshift: int, width: int,
          mb: int, tz: int, lut: np.ndarray) -> tuple:
    """The tensor's bin tables (:func:`kernels.new_cache`), every (scale, level) that ``q`` uses built once,
    on the codec's threads (disjoint scale ranges), before any block is coded."""
    out_f, in_f = q.shape
    need = np.zeros((uscales.size, K.NLEV), dtype=np.bool_)
    step = max(1, -(-out_f // 8))
    # Concurrent stores of True into ``need`` are benign: every writer stores the same byte value.
    _run(lambda r0, r1, _: K.mark_bins(q, z, sids, r0, r1, in_f, gshift, need),
         [(r, min(r + step, out_f)) for r in range(0, out_f, step)])
    return _build_bins(need, uscales, width, mb, tz, lut)


def _build_bins(need: np.ndarray, uscales: np.ndarray, width: int, mb: int, tz: int, lut: np.ndarray) -> tuple:
    """The bin tables with every (scale id, level) set in ``need`` built, on the codec's threads."""
    cache = K.new_cache(uscales.size)
    ustep = max(1, -(-uscales.size // 16))
    _run(lambda u0, u1, _: K.build_bins(need, uscales, u0, u1, width, mb, tz, lut, cache),
         [(u, min(u + ustep, uscales.size)) for u in range(0, uscales.size, ustep)])
    return cache


# ==================================================================== encode
def _lmask(version: int) -> int:
    """Lane mask of a layout: element ``i`` of a block starting at ``i0`` goes to lane ``(i - i0) & mask``."""
    return _LANES[version] - 1


def _encode_streams(symbols: Callable, numel: int, pb: int, max_syms: int, version: int,
                    make_cache: Callable[[], object] | None = None) -> tuple[bytes, bytes]:
    """Run ``symbols(i0, i1, st, fr, cache)`` per block and rANS-code each: ``(block index, words)`` bytes;
    the index holds per block its final state(s) (one in layout 1, two in layout 2) and its word count."""
    nl = _LANES[version]

    def one(i0: int, i1: int, cache: object) -> tuple[tuple[int, ...], np.ndarray]:
        st = np.empty(max_syms * (i1 - i0), dtype=np.int32)  # starts (with the lane), freqs: int32 is enough
        fr = np.empty_like(st)
        ns = symbols(i0, i1, st, fr, cache)
        words = np.empty(ns + 2, dtype=np.uint16)
        xs, first = S.rans_encode(st, fr, ns, pb, words)
        return (*(int(x) for x in xs[:nl]), words.size - first), words[first:]

    res = _run(one, _blocks(numel), make_cache)
    index = np.array([row for row, _ in res], dtype="<u4").reshape(len(res), -1)
    return index.tobytes(), b"".join(w.astype("<u2").tobytes() for _, w in res)


def _q_table(q: np.ndarray, z: np.ndarray, gshift: int) -> np.ndarray:
    counts = S.q_counts(q, z, gshift)
    return rans.quantize_frequencies(torch.from_numpy(counts), S.QPB).numpy().astype(np.int64)


def encode_base(q: np.ndarray, z: np.ndarray, scales: torch.Tensor, dtype: torch.dtype, group_size: int,
                checksum: int, version: int = VERSION) -> torch.Tensor:
    """The ``base_blob`` of codes ``q`` ([out, in] uint8), zero points ``z`` ([out, ng] uint8) and scales
    (``version``: the layout, for tests of earlier layouts)."""
    out_f, in_f = q.shape
    gshift = group_size.bit_length() - 1
    freq = _q_table(q, z, gshift)
    cum = np.cumsum(freq, axis=1) - freq
    lm = _lmask(version)
    index, words = _encode_streams(
        lambda i0, i1, st, fr, _: S.q_symbols(q, z, i0, i1, in_f, gshift, cum, freq, st, fr, lm), q.size, S.QPB, 1,
        version)
    s16 = scales.contiguous().view(torch.int16).numpy().view(np.uint16)
    sections = [index, words, zstd_pack(freq.astype("<u2"), 19), zstd_pack((s16 >> 8).astype(np.uint8), ZSTD_LEVEL),
                zstd_pack((s16 & 0xFF).astype(np.uint8), ZSTD_LEVEL), zstd_pack(z, ZSTD_LEVEL)]
    fields = (version, DTYPE_CODES[dtype], group_size, out_f, in_f, checksum)
    return pack_blob(_BASE, fields, sections)


def encode_delta(bits: np.ndarray, q: np.ndarray, z: np.ndarray, s16: np.ndarray, dtype: torch.dtype,
                 group_size: int, checksum: int, coarse_grid: bool = True, version: int = VERSION) -> torch.Tensor:
    """The ``delta_blob`` of the weight's bit patterns ``bits`` (flat) against its base; ``coarse_grid=False``
    codes every tensor on its dtype's own grid (for ablations); ``version``: the layout."""
    out_f, in_f = q.shape
    width, mb, lut = _geometry(dtype)
    gshift = group_size.bit_length() - 1
    exc = np.zeros(bits.size, dtype=np.uint8)
    uscales, sids = _scale_ids(s16)
    tz = grid_bits(bits, width, mb) if coarse_grid else 0

    cache = _bins(q, z, sids, uscales, gshift, width, mb, tz, lut)

    lm = _lmask(version)

    def symbols(i0: int, i1: int, st: np.ndarray, fr: np.ndarray, _: object) -> int:
        return D.delta_symbols(bits, q, z, sids, uscales, i0, i1, in_f, gshift, width, mb, tz, lut, cache, st,
                               fr, exc[i0:i1], lm)

    index, words = _encode_streams(symbols, bits.size, K.PB, K.MAX_SYMBOLS, version)
    pos = np.flatnonzero(exc)
    # Exceptions: position gaps (u64) then bit patterns (u32), zstd (clamped codes cluster in a few groups).
    exc_data = b""
    if pos.size:
        gaps = np.diff(pos, prepend=0).astype("<u8")
        patt = (bits[pos].astype(np.int64) & ((1 << width) - 1)).astype("<u4")
        exc_data = zstd_pack(np.concatenate((gaps.view(np.uint8), patt.view(np.uint8))), 19)
    return pack_blob(_DELTA, (version, tz, pos.size, checksum), [index, words, exc_data])


# ==================================================================== decode (the blobs are parsed by .reader)
def _decode_streams(decode: Callable, index: tuple[np.ndarray, np.ndarray], words: np.ndarray, numel: int,
                    name: str, what: str, make_cache: Callable[[], object] | None = None) -> None:
    """``decode(block words, states, read position, i0, i1, cache)`` per block (states and position updated in
    place), then the check that every block ended on its initial states with every word read."""
    states, counts = index
    starts = np.concatenate(([0], np.cumsum(counts)))
    pad = np.zeros(1, dtype=np.uint16)  # the kernels read one word ahead (branch-free): never an empty array
    jobs = [(words[starts[b]:starts[b + 1]] if starts[b + 1] > starts[b] else pad, states[b].copy(),
             np.zeros(1, dtype=np.int64), i0, i1) for b, (i0, i1) in enumerate(_blocks(numel))]
    _run(decode, jobs, make_cache)
    for b, (_, xs, ps, _, _) in enumerate(jobs):
        if bool((xs != S.STATE_LOW).any()) or int(ps[0]) != counts[b]:
            raise TpdeFormatError(name, f"{what} stream does not decode to its end state (corrupt)")


def decode_base_arrays(parts: Mapping[str, torch.Tensor], name: str, resident: bool = True) -> dict:
    """The resident base plus what the delta decode needs (``q``, ``z``, ``dtype``, ``shape``, ``group_size``);
    ``resident=False`` skips packing (and checksumming) the resident base: ``base`` holds the scales only (the
    weight's own checksum then covers the codes: a wrong code decodes a wrong weight)."""
    b = _base_sections(parts, name)
    version, dcode, g, out_f, in_f, checksum = b["fields"]
    ng = base_quant.n_groups(in_f, g)
    scales, z, lutq, fcq = _scales(b["s16"]), b["z"], b["lutq"], b["fcq"]
    q = np.empty((out_f, in_f), dtype=np.uint8)
    gshift = g.bit_length() - 1
    lm = _lmask(version)
    qflat = q.reshape(-1)
    _decode_streams(lambda w, xs, ps, i0, i1, _: S.q_decode(w, xs, ps, z, i0, i1, in_f, gshift, lutq, fcq, qflat,
                                                             lm),
                    b["index"], b["words"], out_f * in_f, name, "q")
    if not resident:
        return {"base": {"scales": scales}, "q": q, "z": z, "dtype": CODE_DTYPES[dcode], "shape": (out_f, in_f),
                "group_size": g}
    qweight = np.empty((out_f, ng * g // 2), dtype=np.uint8)
    S.pack_codes(q, z, g, qweight)  # the padding past in_f: each group's zero point
    base = {"qweight": torch.from_numpy(qweight), "scales": scales, "zeros": torch.from_numpy(pack4(z))}
    arrays = (base[k].numpy() for k in ("qweight", "scales", "zeros"))
    if _checksum(*arrays, header=(dcode, g, out_f, in_f)) != checksum:
        raise TpdeFormatError(name, "the base does not match its checksum (corrupt)")
    return {"base": base, "q": q, "z": z, "dtype": CODE_DTYPES[dcode],
            "shape": (out_f, in_f), "group_size": g}


def decode_weight(parts: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    """The exact weight from both blobs (the resident base is not built)."""
    return decode_weight_and_base(parts, name, resident=False)[0]


def decode_weight_and_base(parts: Mapping[str, torch.Tensor], name: str,
                           resident: bool = True) -> tuple[torch.Tensor, dict]:
    """``(exact weight, resident base)`` from both blobs, the base decoded once (``resident=False``: the base
    holds the scales only, see :func:`decode_base_arrays`). Inside :func:`.table.shared_bins` (a load's decode
    workers) the weight alone is decoded by one compiled call (:mod:`.fused`)."""
    if not resident:
        fast = decode_weight_fused(parts, name)
        if fast is not None:
            return fast
    b = decode_base_arrays(parts, name, resident)
    dtype, (out_f, in_f), g = b["dtype"], b["shape"], b["group_size"]
    numel = out_f * in_f
    d = _delta_sections(parts, name, numel, dtype)
    width, mb, lut = _geometry(dtype)
    tz = d["tz"]
    out = np.empty(numel, dtype=np.int16 if width == 16 else np.int32)
    gshift = g.bit_length() - 1
    q, z = b["q"], b["z"]
    uscales, sids = _scale_ids(b["base"]["scales"].numpy())
    cache = _bins(q, z, sids, uscales, gshift, width, mb, tz, lut)
    lm = _lmask(d["version"])
    qflat = q.reshape(-1)
    _decode_streams(lambda w, xs, ps, i0, i1, _: D.delta_decode(w, xs, ps, qflat, z, sids, uscales, i0, i1, in_f,
                                                                gshift, width, mb, tz, lut, cache, out[i0:i1], lm),
                    d["index"], d["words"], numel, name, "delta")
    return _finish_weight(out, d, dtype, (out_f, in_f), name), b["base"]


def decode_weight_fused(parts: Mapping[str, torch.Tensor], name: str) -> tuple[torch.Tensor, dict] | None:
    """:func:`decode_weight_and_base` (``resident=False``: the base holds the scales only) by one call of
    :func:`.fused.decode_blocks`, with the shared bins of :func:`.table.shared_bins`; None outside such a block (the
    caller then decodes block by block, on the codec's threads). The same checks as the block drivers: a corrupt
    part raises :class:`TpdeFormatError` naming ``name``, and the weight must match its checksum."""
    from tpde_hf.codec.storage import table as T
    from tpde_hf.codec.storage.fused import Q_BAD, decode_blocks

    if not T.active():  # before any parsing: the caller parses again
        return None
    b = _base_sections(parts, name)
    version, dcode, g, out_f, in_f, _ = b["fields"]
    dtype = CODE_DTYPES[dcode]
    width, mb, lut = _geometry(dtype)
    numel = out_f * in_f
    d = _delta_sections(parts, name, numel, dtype)
    table = T.table_for(width, mb, d["tz"], lut)
    if table is None:
        return None
    sids, cache, _ = table.prepare(b["s16"], b["z"])
    out = np.empty(numel, dtype=np.int16 if width == 16 else np.int32)
    (qs, qc), (ds, dc) = b["index"], d["index"]
    bad, block = decode_blocks(b["words"], qs, qc, d["words"], ds, dc, b["z"], sids, numel, in_f, g.bit_length() - 1,
                               width, d["tz"], cache, b["lutq"], b["fcq"], out, _lmask(version),
                               _lmask(d["version"]), BLOCK)
    if bad:
        what = "q" if bad == Q_BAD else "delta"
        raise TpdeFormatError(name, f"{what} stream does not decode to its end state (corrupt, block {block})")
    return _finish_weight(out, d, dtype, (out_f, in_f), name), {"scales": _scales(b["s16"])}


class NarrowRans:
    """Storage codec ``narrow-rans`` (see the module docstring); registered in ``BASE_STORAGE``.

    ``context.options["coarse_grid"] = False`` turns off the per-tensor coarse grid (ablations only);
    ``context.options["layout"] = 1`` writes the earlier layout (tests only; the reader decodes both).

    Example: ``NarrowRans().decode_base(parts, CodecContext("layer.weight"))["qweight"]``.
    """

    name = "narrow-rans"
    reads_resident_delta = False  # it codes its own delta from the weight and the base
    # its blobs hold shape, dtype and checksums: a load's decode worker skips the meta (storage_format.
    # decode_weight_ahead); the loading thread checks the result against it
    decodes_without_meta = True

    def encode(self, weight: torch.Tensor, base: Mapping[str, torch.Tensor],
               context: CodecContext) -> dict[str, torch.Tensor]:
        name = context.key
        check_dtype(weight.dtype, name)
        if weight.dim() != 2 or weight.numel() == 0:
            raise ValueError(f"{name}: narrow-rans stores non-empty 2-D weights, got shape {list(weight.shape)}")
        out_f, in_f = weight.shape
        if weight.numel() >= 1 << 40:
            raise ValueError(f"{name}: narrow-rans stores fewer than 2**40 weights, got {weight.numel()}")
        qweight, scales, zeros = (base[k].detach().cpu().contiguous() for k in ("qweight", "scales", "zeros"))
        ng = scales.shape[1] if scales.dim() == 2 else 0
        g = qweight.shape[1] * 2 // ng if ng else 0
        if (g not in base_quant.SUPPORTED_GROUP_SIZES or base_quant.n_groups(in_f, g) != ng
                or tuple(qweight.shape) != (out_f, ng * g // 2) or tuple(scales.shape) != (out_f, ng)
                or tuple(zeros.shape) != (out_f, -(-ng // 2)) or scales.dtype != torch.float16):
            raise ValueError(f"{name}: the base does not have the resident layout of a {list(weight.shape)} weight")
        qfull = unpack4(qweight.numpy(), ng * g)
        z = np.ascontiguousarray(unpack4(zeros.numpy(), ng))
        if not bool(torch.isfinite(scales).all()):
            raise ValueError(f"{name}: the base has non-finite scales")
        # The decoder rebuilds padding from the zero points: refuse a base it could not reproduce.
        if not np.array_equal(np.repeat(z, g, axis=1)[:, in_f:], qfull[:, in_f:]) or \
                not np.array_equal(pack4(z), zeros.numpy()):
            raise ValueError(f"{name}: the base's padding is not the zero point (not a base_quant base)")
        q = np.ascontiguousarray(qfull[:, :in_f])
        w = weight.detach().cpu().contiguous()
        bits = w.view(INT_VIEW[w.dtype]).numpy().ravel()
        base_sum = _checksum(qweight.numpy(), scales.numpy(), zeros.numpy(),
                             header=(DTYPE_CODES[w.dtype], g, out_f, in_f))
        version = int(context.options.get("layout", VERSION))
        if version not in VERSIONS:
            raise ValueError(f"{name}: narrow-rans writes layouts {VERSIONS}, not {version}")
        return {"base_blob": encode_base(q, z, scales, w.dtype, g, base_sum, version),
                "delta_blob": encode_delta(bits, q, z, scales.numpy(), w.dtype, g, _checksum(bits),
                                           bool(context.options.get("coarse_grid", True)), version)}

    def decode_base(self, parts: Mapping[str, torch.Tensor], context: CodecContext) -> dict[str, torch.Tensor]:
        return decode_base_arrays(parts, context.key)["base"]

    def decode(self, parts: Mapping[str, torch.Tensor], context: CodecContext) -> torch.Tensor:
        return decode_weight(parts, context.key)

    def decode_with_base(self, parts: Mapping[str, torch.Tensor],
                         context: CodecContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(decode(...), decode_base(...))`` from one decode of the base (a writer's check reads both)."""
        return decode_weight_and_base(parts, context.key)
