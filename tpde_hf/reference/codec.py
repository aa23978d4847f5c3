"""Tensor codecs that code a fine-tune's tensor against its reference (base) model's tensor of the same name.

Registered in :data:`tpde_hf.codec.registry.TENSOR_CODECS`; ``CodecContext.reference`` is the reference
tensor. Each codec stores one part, ``blob`` (uint8): a 20 x int64 header, the shape, then its payload:

* ``ref-same``: the tensor is the reference, bit for bit (any dtype; cast first if the reference's dtype
  differs): the header only;
* ``ref-ord``: the ordinal delta, magnitude-class symbols rANS-coded with context from the reference value's
  exponent and the previous symbol's class (:mod:`tpde_hf.reference.kernels`);
* ``ref-sparse``: few entries changed: their positions as entropy-coded gaps, their deltas as in ``ref-ord``
  (:mod:`tpde_hf.reference.sparse`).

Header: ``[version, codec id, dtype, reference index, ndim, numel, checksum, reference dtype, ...codec fields]``.
The checksum is the xxh3-64 of the decoded tensor's bytes: every decode is checked, so a damaged blob or a
wrong reference is an error, never a wrong weight. A reference stored in another float dtype is cast to the
tensor's dtype (round to nearest even, deterministic) before the delta is taken.

Example::

    codec = TENSOR_CODECS.get("ref-ord")
    parts = codec.encode(finetuned, CodecContext("w", reference=base))
    assert torch.equal(codec.decode(parts, CodecContext("w", reference=base)).view(torch.int16),
                       finetuned.view(torch.int16))
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import xxhash
import zstandard

from tpde_hf.codec.rans import quantize_frequencies
from tpde_hf.codec.registry import TENSOR_CODECS, CodecContext
from tpde_hf.errors import TpdeFormatError
from tpde_hf.reference import kernels as K
from tpde_hf.reference.fastload import call

VERSION = 1
HEADER = 20
CODEC_IDS = {"ref-same": 1, "ref-ord": 2, "ref-sparse": 3}
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool]
DTYPE_CODE = {d: i + 1 for i, d in enumerate(DTYPES)}
#: bit width, exponent shift and mask of the float dtypes the delta codecs accept
FLOATS = {torch.bfloat16: (16, 7, 0xFF), torch.float16: (16, 10, 0x1F), torch.float32: (32, 23, 0xFF)}
INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
CHUNK = 1 << 16
PROB_BITS = 12
#: (exponent buckets, previous-symbol buckets) tried per tensor; the smallest estimate wins
CONFIGS = ((16, 4), (16, 1), (4, 4), (1, 4), (1, 1))


def checksum(t: torch.Tensor) -> int:
    """Signed xxh3-64 of a tensor's bytes. Example: ``checksum(torch.zeros(2))``."""
    data = t.detach().contiguous().view(-1).view(torch.uint8).numpy()
    return int(np.int64(np.uint64(xxhash.xxh3_64_intdigest(data))))


def dtype_of(code: int, key: str) -> torch.dtype:
    if not 1 <= code <= len(DTYPES):
        raise TpdeFormatError(key, f"reference-coded tensor with unknown dtype code {code}")
    return DTYPES[code - 1]


def ref_as(reference: torch.Tensor | None, like: torch.Tensor | None, key: str, dtype: torch.dtype | None = None,
           shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """The reference tensor as the coded tensor's dtype and shape; a clear error if there is none or it differs."""
    dtype = dtype if dtype is not None else like.dtype
    shape = shape if shape is not None else tuple(like.shape)
    if reference is None:
        raise TpdeFormatError(key, "is coded against the reference model, but no reference tensor was given")
    if tuple(reference.shape) != shape:
        raise TpdeFormatError(key, f"the reference tensor has shape {tuple(reference.shape)}, the coded one {shape}: "
                                   "wrong reference model")
    ref = reference.detach().to("cpu")
    if ref.dtype != dtype:
        if not (ref.is_floating_point() and dtype.is_floating_point):
            raise TpdeFormatError(key, f"the reference tensor is {ref.dtype}, the coded one {dtype}")
        ref = ref.to(dtype)
    return ref.contiguous()


def make_header(codec: str, t: torch.Tensor, ref_index: int, ref_dtype: torch.dtype, fields: list[int]) -> np.ndarray:
    h = np.zeros(HEADER + t.dim(), dtype=np.int64)
    h[:8] = [VERSION, CODEC_IDS[codec], DTYPE_CODE[t.dtype], ref_index, t.dim(), t.numel(), checksum(t),
             DTYPE_CODE.get(ref_dtype, 0)]
    h[8 : 8 + len(fields)] = fields
    h[HEADER:] = list(t.shape)
    return h


def read_header(blob: torch.Tensor, codec: str, key: str) -> tuple[np.ndarray, tuple[int, ...], np.ndarray]:
    """``(header, shape, payload bytes)`` of a blob; :class:`TpdeFormatError` naming ``key`` if malformed."""
    raw = blob.detach().to("cpu").contiguous().view(torch.uint8).numpy() if isinstance(blob, torch.Tensor) else blob
    if raw.ndim != 1 or raw.size < HEADER * 8:
        raise TpdeFormatError(key, f"{codec} blob is truncated ({raw.size} bytes)")
    h = np.frombuffer(raw[: HEADER * 8].tobytes(), dtype="<i8").copy()
    if h[0] != VERSION or h[1] != CODEC_IDS[codec]:
        raise TpdeFormatError(key, f"{codec} blob has version/codec {h[0]}/{h[1]}: damaged, or written by a newer "
                                   "tpde-hf")
    ndim = int(h[4])
    if not 0 <= ndim <= 8 or raw.size < (HEADER + ndim) * 8:
        raise TpdeFormatError(key, f"{codec} blob header is damaged (ndim {ndim})")
    shape = tuple(int(s) for s in np.frombuffer(raw[HEADER * 8 : (HEADER + ndim) * 8].tobytes(), dtype="<i8"))
    if any(s < 0 for s in shape) or int(np.prod(shape, dtype=np.int64)) != int(h[5]):
        raise TpdeFormatError(key, f"{codec} blob header is damaged (shape {shape}, numel {int(h[5])})")
    return h, shape, raw[(HEADER + ndim) * 8 :]


def finish(out: torch.Tensor, h: np.ndarray, key: str, codec: str) -> torch.Tensor:
    if checksum(out) != int(h[6]):
        raise TpdeFormatError(key, f"decoded {codec} tensor does not match its checksum: the stored delta is damaged "
                                   "or the reference model is not the one it was coded against")
    return out


def pack(header: np.ndarray, *sections: np.ndarray) -> torch.Tensor:
    """Header and sections as one uint8 tensor, each section padded to 8 bytes."""
    chunks = [header.astype("<i8").tobytes()]
    for s in sections:
        b = np.ascontiguousarray(s).tobytes()
        chunks.append(b + b"\0" * (-len(b) % 8))
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)


def take(payload: np.ndarray, pos: int, nbytes: int, dtype: str, key: str) -> tuple[np.ndarray, int]:
    """A copied (so aligned) section of ``nbytes`` at ``pos``; the next position (8-byte padded)."""
    if nbytes < 0 or pos + nbytes > payload.size:
        raise TpdeFormatError(key, "reference-coded blob is truncated")
    arr = np.frombuffer(payload[pos : pos + nbytes].tobytes(), dtype=dtype).copy()
    return arr, pos + nbytes + (-nbytes % 8)


# ==================================================================== ref-same
class RefSame:
    """A tensor equal to the reference (after a cast to its dtype): stored as a header only."""

    name = "ref-same"

    def encode(self, tensor: torch.Tensor, context: CodecContext) -> dict[str, torch.Tensor] | None:
        if context.reference is None or tuple(context.reference.shape) != tuple(tensor.shape):
            return None
        t = tensor.detach().to("cpu").contiguous()
        if t.dtype not in DTYPE_CODE:
            return None
        try:
            ref = ref_as(context.reference, t, context.key)
        except TpdeFormatError:
            return None
        if checksum(ref) != checksum(t) or not torch.equal(ref.view(torch.uint8), t.view(torch.uint8)):
            return None
        return {"blob": pack(make_header(self.name, t, int(context.options.get("ref_index", -1)),
                                         context.reference.dtype, []))}

    def decode(self, parts: Mapping[str, torch.Tensor], context: CodecContext) -> torch.Tensor:
        h, shape, _ = read_header(_blob(parts, context.key), self.name, context.key)
        ref = ref_as(context.reference, None, context.key, dtype_of(int(h[2]), context.key), shape)
        return finish(ref.clone(), h, context.key, self.name)


def _blob(parts: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if set(parts) != {"blob"}:
        raise TpdeFormatError(key, f"reference-coded tensor needs exactly the part 'blob', got {sorted(parts)}")
    return parts["blob"]


# ==================================================================== ref-ord
def _bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(-1).view(INT_VIEW[t.dtype]).numpy()


def _estimate(counts: np.ndarray, raw_bits: int) -> float:
    """Bytes of an rANS stream with static per-context tables (entropy + a rough table cost)."""
    total = 0.0
    for row in counts:
        s = row.sum()
        if s:
            nz = row[row > 0]
            total += float(-(nz * np.log2(nz / s)).sum()) / 8 + 3 * len(nz)
    return total + raw_bits / 8


def _ctx_map(n_eb: int, n_prev: int) -> np.ndarray:
    """Map the finest context (16 exponent x 4 previous buckets) to the context of ``(n_eb, n_prev)``."""
    m = np.empty(64, dtype=np.int64)
    for c in range(64):
        eb, pb = divmod(c, 4)
        m[c] = max(eb - (16 - n_eb), 0) * n_prev + (pb if n_prev == 4 else 0)
    return m


def prev_bucket_map(n_prev: int) -> np.ndarray:
    """The previous-symbol bucket of every symbol (what :func:`kernels._prev_bucket` computes)."""
    s = np.arange(K.N_SYM)
    if n_prev == 1:
        return np.zeros(K.N_SYM, np.int64)
    return np.select([s == 0, s <= 2, s < K.DIRECT], [0, 1, 2], 3).astype(np.int64)


def decode_tables(freq: np.ndarray, prob_bits: int, n_eb: int, n_prev: int, e_low: int,
                  exp_mask: int) -> tuple[np.ndarray, ...]:
    """``(ctxtab, symlut, fctab, symtab)``: the decode kernel's tables (:func:`kernels._decode_chunk`).

    ``freq`` must be validated first (each context sums to ``2**prob_bits``, which must be 12). ``ctxtab``: reference
    exponent -> its context row << 12, then ``e_low, n_eb, n_prev`` (the kernel computes the rows from them, which
    vectorizes); ``symlut``: per context and slot, the symbol (one byte); ``fctab``: per
    context (rows of 128) and symbol, ``freq | cum << 13``; ``symtab``: per symbol, the previous-symbol row it
    selects (<< 12), its raw bit count << 16 and the value bits it stands for << 22.

    Example::

        ctxtab, symlut, fctab, symtab = decode_tables(freq, 12, 16, 1, 110, 0xFF)
    """
    n_ctx = freq.shape[0]
    e = np.arange(exp_mask + 1)
    ctxtab = ((np.clip(e - e_low, 0, n_eb - 1) * n_prev) << prob_bits).astype(np.int64)
    # the kernel computes the rows from these; e_low (read from the blob) clamped to where it gives the same rows
    ctxtab = np.append(ctxtab, np.array([min(max(e_low, -n_eb), exp_mask + 1), n_eb, n_prev], np.int64))
    symlut = np.repeat(np.tile(np.arange(K.N_SYM, dtype=np.uint8), n_ctx), freq.reshape(-1))
    fctab = np.zeros((n_ctx, 128), np.int32)
    fctab[:, : K.N_SYM] = freq | ((np.cumsum(freq, axis=1) - freq) << 13)
    s = np.arange(K.N_SYM)
    ex = 4 + ((s - K.DIRECT) >> 1)
    big = s >= K.DIRECT
    value = np.where(big, (1 << np.where(big, ex, 0)) | (((s - K.DIRECT) & 1) << np.where(big, ex - 1, 0)), s)
    symtab = np.zeros(128, np.int64)  # symbols >= N_SYM have no slot: never read
    symtab[: K.N_SYM] = (prev_bucket_map(n_prev) << prob_bits) | (np.where(big, ex - 1, 0) << 16) | (value << 22)
    return ctxtab, symlut, fctab.reshape(-1), symtab


class RefOrd:
    """Ordinal delta against the reference, rANS-coded with context (see the module docstring)."""

    name = "ref-ord"

    def encode(self, tensor: torch.Tensor, context: CodecContext) -> dict[str, torch.Tensor] | None:
        t = tensor.detach().to("cpu").contiguous()
        if t.dtype not in FLOATS or t.numel() == 0 or context.reference is None:
            return None
        try:
            ref = ref_as(context.reference, t, context.key)
        except TpdeFormatError:
            return None
        width, shift, emask = FLOATS[t.dtype]
        tb, rb = _bits(t), _bits(ref)
        n = tb.size
        n_chunks = (n + CHUNK - 1) // CHUNK
        exps = (rb.astype(np.int64) & ((1 << width) - 1)) >> shift & emask
        hist = np.cumsum(np.bincount(exps, minlength=emask + 1))
        e_top = int(np.searchsorted(hist, 0.999 * n))  # the top 0.1% share the highest bucket
        sym = np.empty(n, np.uint8)
        ctx = np.empty(n, np.uint8)
        nraw = np.empty(n, np.uint8)
        raw = np.empty(n, np.uint32)
        chunk_bits = np.empty(n_chunks, np.int64)
        K.symbols(tb, rb, width, shift, emask, e_top - 15, 16, 4, CHUNK, sym, ctx, nraw, raw, chunk_bits)
        fine = np.bincount(ctx.astype(np.int64) * K.N_SYM + sym, minlength=64 * K.N_SYM).reshape(64, K.N_SYM)
        raw_bits = int(chunk_bits.sum())
        best = None
        for n_eb, n_prev in context.options.get("configs", CONFIGS):  # a benchmark may pin one
            m = _ctx_map(n_eb, n_prev)
            counts = np.zeros((n_eb * n_prev, K.N_SYM), np.int64)
            np.add.at(counts, m, fine)
            est = _estimate(counts, raw_bits)
            if best is None or est < best[0]:
                best = (est, n_eb, n_prev, m, counts)
        _, n_eb, n_prev, m, counts = best
        force = bool(context.options.get("force"))  # tests: code even what does not pay
        if best[0] >= t.numel() * t.element_size() and not force:
            return None  # cannot pay: keep the cheaper options
        ctx = m[ctx].astype(np.uint8)
        freq = quantize_frequencies(counts, PROB_BITS).numpy().astype(np.int64)
        cum = np.cumsum(freq, axis=1) - freq
        raw_words_per = (chunk_bits + 31) // 32
        raw_start = np.zeros(n_chunks + 1, np.int64)
        np.cumsum(raw_words_per, out=raw_start[1:])
        raw_words = np.zeros(int(raw_start[-1]), np.uint32)
        word_buf = np.empty((n_chunks, min(n, CHUNK) + 2), np.uint16)
        word_count = np.empty(n_chunks, np.int64)
        states = np.empty((n_chunks, K.LANES), np.uint64)
        K.rans_encode(sym, ctx, nraw, raw, freq, cum, PROB_BITS, CHUNK, word_buf, word_count, states, raw_words,
                      raw_start)
        cap = word_buf.shape[1]
        words = np.concatenate([word_buf[c, cap - word_count[c] :] for c in range(n_chunks)])
        word_start = np.zeros(n_chunks + 1, np.int64)
        np.cumsum(word_count, out=word_start[1:])
        table = zstandard.ZstdCompressor(level=19).compress(freq.astype("<u2").tobytes())
        chunks = np.stack([word_start, raw_start, *(np.append(states[:, j].astype(np.int64), 0)
                                                    for j in range(K.LANES))])
        fields = [CHUNK, n_eb, n_prev, e_top - (n_eb - 1), PROB_BITS, n_chunks, len(table), words.size, raw_words.size]
        header = make_header(self.name, t, int(context.options.get("ref_index", -1)), context.reference.dtype, fields)
        blob = pack(header, np.frombuffer(table, np.uint8), chunks.astype("<i8"), words.astype("<u2"),
                    raw_words.astype("<u4"))
        if blob.numel() >= t.numel() * t.element_size() and not force:
            return None
        return {"blob": blob}

    def decode(self, parts: Mapping[str, torch.Tensor], context: CodecContext) -> torch.Tensor:
        job = prepare_ord(_blob(parts, context.key), context.reference, context.key)
        # one thread when asked (a pool decodes whole tensors in parallel at load) or when the tensor is small
        run = K.rans_decode if job.n_chunks > 2 and not context.options.get("serial") else K.rans_decode_serial
        status = np.zeros(job.n_chunks, np.int64)
        call(run, *job.kernel_args(), status)  # through fastload: no numba typing set-up in a fresh process
        return job.finish(status)


class OrdJob:
    """One ``ref-ord`` tensor, checked and ready for the kernel (:func:`prepare_ord`): its reference, its (empty)
    output, the decode tables and chunk table, and where its two streams lie in the blob. :meth:`finish` checks the
    kernel's status and the xxh3."""

    __slots__ = ("key", "header", "ref", "out", "width", "shift", "emask", "chunk", "n_chunks", "tables", "blob",
                 "words_at", "raw_at", "word_start", "states", "raw_start")

    def stream(self, which: str, spare_in_blob: bool = False) -> np.ndarray:
        """``words`` (uint16) or ``raw`` (uint32) with one spare word after it (see the kernel): a view of the blob
        when ``spare_in_blob`` and the blob holds that word and the section is aligned, else a copy."""
        start, n = self.words_at if which == "words" else self.raw_at
        dtype, size = (np.uint16, 2) if which == "words" else (np.uint32, 4)
        raw = self.blob  # uint8 numpy (prepare_ord)
        if spare_in_blob and start + (n + 1) * size <= raw.size and (raw.ctypes.data + start) % size == 0:
            return raw[start : start + (n + 1) * size].view(dtype)
        out = np.zeros(n + 1, dtype)
        out[:n] = raw[start : start + n * size].view(f"<u{size}")
        return out

    def kernel_args(self) -> tuple:
        """The arguments of :func:`kernels.rans_decode_serial` up to ``status``."""
        return (_bits(self.ref), _bits(self.out), self.width, self.shift, self.emask, self.chunk, *self.tables,
                self.stream("words"), self.word_start, self.states, self.stream("raw"), self.raw_start)

    def finish(self, status: np.ndarray) -> torch.Tensor:
        """The decoded tensor; :class:`TpdeFormatError` naming the tensor if a chunk or the checksum failed."""
        if status.any():
            bad = int(np.flatnonzero(status)[0])
            raise TpdeFormatError(self.key, f"ref-ord stream of chunk {bad} is damaged (code {int(status[bad])})")
        return finish(self.out, self.header, self.key, "ref-ord")


def _section(payload: np.ndarray, pos: int, nbytes: int, key: str) -> int:
    """Check that ``nbytes`` at ``pos`` lie in the payload; the next section's position (8-byte padded)."""
    if nbytes < 0 or pos + nbytes > payload.size:
        raise TpdeFormatError(key, "reference-coded blob is truncated")
    return pos + nbytes + (-nbytes % 8)


def prepare_ord(blob: torch.Tensor | np.ndarray, reference: torch.Tensor | None, key: str) -> OrdJob:
    """Parse and check a ``ref-ord`` blob against its reference tensor; :class:`TpdeFormatError` naming ``key``
    on any damage. The streams stay in the blob until :meth:`OrdJob.stream` reads them.

    Example::

        job = prepare_ord(blob, reference, "model.layers.0.mlp.up_proj.weight")
    """
    name = RefOrd.name
    if isinstance(blob, torch.Tensor):  # a numpy blob (the load's prefetch) costs no torch call: no GIL release
        blob = blob.detach().to("cpu").contiguous().view(torch.uint8).numpy()
    h, shape, payload = read_header(blob, name, key)
    dtype = dtype_of(int(h[2]), key)
    if dtype not in FLOATS:
        raise TpdeFormatError(key, f"ref-ord blob names dtype {dtype}, which it cannot code")
    chunk, n_eb, n_prev, e_low, prob_bits, n_chunks, n_table, n_words, n_raw = (int(v) for v in h[8:17])
    n = int(h[5])
    if (chunk <= 0 or n_eb not in (1, 4, 16) or n_prev not in (1, 4) or prob_bits != PROB_BITS
            or n_chunks != (n + chunk - 1) // max(chunk, 1) or min(n_table, n_words, n_raw) < 0):
        raise TpdeFormatError(key, "ref-ord blob header is damaged")
    ref = ref_as(reference, None, key, dtype, shape)
    pos = 0
    table, pos = take(payload, pos, n_table, "u1", key)
    rows = 2 + K.LANES  # word starts, raw starts, one final state per lane
    chunks, pos = take(payload, pos, rows * (n_chunks + 1) * 8, "<i8", key)
    base = blob.size - payload.size  # the payload's offset in the blob
    words_at, pos = (base + pos, n_words), _section(payload, pos, 2 * n_words, key)
    raw_at, pos = (base + pos, n_raw), _section(payload, pos, 4 * n_raw, key)
    n_ctx = n_eb * n_prev
    try:
        freq = np.frombuffer(zstandard.ZstdDecompressor().decompress(table.tobytes(),
                                                                     max_output_size=2 * n_ctx * K.N_SYM),
                             dtype="<u2").astype(np.int64)
    except zstandard.ZstdError as exc:
        raise TpdeFormatError(key, f"ref-ord frequency table is damaged ({exc})") from None
    if freq.size != n_ctx * K.N_SYM:
        raise TpdeFormatError(key, "ref-ord frequency table is damaged (wrong size)")
    freq = freq.reshape(n_ctx, K.N_SYM)
    if not (freq.sum(axis=1) == 1 << prob_bits).all():
        raise TpdeFormatError(key, "ref-ord frequency table is damaged (a context does not sum to 2**prob_bits)")
    chunks = chunks.reshape(rows, n_chunks + 1)
    states = np.ascontiguousarray(chunks[2:, :-1].T)
    if chunks[0, -1] != n_words or chunks[1, -1] != n_raw or (states < 0).any() or (states >= 1 << 32).any():
        raise TpdeFormatError(key, "ref-ord chunk table is damaged")
    job = OrdJob()
    job.key, job.header, job.ref, job.out = key, h, ref, torch.empty(shape, dtype=dtype)
    job.width, job.shift, job.emask = FLOATS[dtype]
    job.chunk, job.n_chunks = chunk, n_chunks
    job.tables = decode_tables(freq, prob_bits, n_eb, n_prev, e_low, job.emask)
    job.blob, job.words_at, job.raw_at = blob, words_at, raw_at
    job.word_start, job.raw_start, job.states = np.ascontiguousarray(chunks[0]), np.ascontiguousarray(chunks[1]), states
    return job


TENSOR_CODECS.register(RefSame)
TENSOR_CODECS.register(RefOrd)
