"""The ``ckpt-delta`` tensor codec: one tensor of a training checkpoint, exact, against a prediction.

The prediction is ``p = c0 * reference + sum_i c_i * feature_i`` evaluated in the tensor's dtype
(numpy float32 arithmetic, correctly rounded, identical on every machine), where ``reference`` is
the same tensor in the previous checkpoint and the features are tensors both sides can compute
before this one (Adam's moments for a weight, see :mod:`tpde_hf.checkpoints.predict`). The
encoder fits the coefficients by least squares on a sample, estimates the coded size of a few
candidates (``p = reference``, the fitted one, ``p = 0``) in both modes of
:mod:`tpde_hf.checkpoints.kernels`, and keeps the cheapest. Symbols are coded with a context: the
bucket of a small integer per element, by default the exponent of the reference (so a weight's
delta is coded knowing how many ulps one learning-rate step is). For fp32 the encoder makes a scaled
prediction in one compiled pass (:func:`tpde_hf.checkpoints.enc_features.predict_f32`, the same float32
operations in the same order; numpy's where a prediction is NaN); the decoder keeps numpy's, and the
pack-time verify decodes its sampled chunks against numpy's, so the two are checked to agree. The symbols are
never stored (:func:`tpde_hf.checkpoints.enc_stream.encode_fused`: made chunk by chunk in cache where the streams
are written; the tests hold its bytes to the symbol-array oracle, :mod:`tpde_hf.checkpoints.enc_oracle`).

Parts: ``meta`` (int64), ``shape`` (int64), ``coef`` (float32), ``tables`` (zstd of the uint16
frequency tables), ``chunks`` (int64 ``[n, LANES + 2]``: rANS states, words, bit words), ``words`` and
``bits`` (uint8 payloads). ``meta`` holds an xxh3 checksum of the tensor's bytes: a decode that
does not give them back raises :class:`TpdeFormatError` naming the tensor (a corrupt part or the
wrong reference), never a wrong tensor.

Example::

    from tpde_hf.codec.registry import TENSOR_CODECS, CodecContext
    codec = TENSOR_CODECS.get("ckpt-delta")
    parts = codec.encode(new, CodecContext("w", reference=old))
    assert torch.equal(codec.decode(parts, CodecContext("w", reference=old)).view(torch.int32),
                       new.view(torch.int32))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import xxhash
import zstandard

from tpde_hf.checkpoints import dec_kernels as D
from tpde_hf.checkpoints import enc_buffers as EB
from tpde_hf.checkpoints import enc_estimate as EE
from tpde_hf.checkpoints import enc_features as EF
from tpde_hf.checkpoints import enc_stream as ES
from tpde_hf.checkpoints import enc_tables as ET
from tpde_hf.checkpoints import kernels as K
from tpde_hf.checkpoints.predict import _EPS_ARR, Ratio
from tpde_hf.codec.registry import TENSOR_CODECS, CodecContext
from tpde_hf.errors import TpdeFormatError
from tpde_hf.threads import WorkerPool

VERSION = 1
CHUNK = 1 << 15  # small chunks: the pack-time verify decodes a sample of them
VERIFY_EVERY = 64
FORK_RUN = 1 << 20  # elements per run of chunks that another thread may take (option ``fork``)
SAMPLE = 1 << 13  # elements the candidates are estimated on (16384: +0.015% of raw saved, +0.08 CPU-s per save)
#: dtype -> (on-disk code, int view, width, mantissa bits)
DTYPES: dict[torch.dtype, tuple[int, torch.dtype, int, int]] = {
    torch.float32: (1, torch.int32, 32, 23),
    torch.bfloat16: (2, torch.int16, 16, 7),
    torch.float16: (3, torch.int16, 16, 10),
}
CODES = {v[0]: k for k, v in DTYPES.items()}
_META_LEN = 11  # version, mode, dtype, n, chunk, n_ctx, nsym, n_coef, checksum, ctx_lo, n_chunks


def checksum(bits: np.ndarray) -> int:
    """xxh3-64 of the tensor's bytes as a signed int64 (it is stored in an int64 part)."""
    h = xxhash.xxh3_64_intdigest(np.ascontiguousarray(bits).view(np.uint8))
    return h - (1 << 64) if h >= 1 << 63 else h


def exponent(a: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """The biased exponent field of each float (int16); 0 for zeros and subnormals."""
    _, _, width, mb = DTYPES[dtype]
    return K.exponents(a.view(np.int32 if width == 32 else np.int16), width, mb)


def predict(ref: np.ndarray | None, coef: Sequence[float], features: Sequence[np.ndarray], n: int,
            np_dtype: Any) -> np.ndarray:
    """``c0 * ref + sum c_i * f_i`` in ``np_dtype``, one correctly rounded operation at a time (read only: it
    may be ``ref`` itself)."""
    c0 = np_dtype.type(coef[0]) if coef else np_dtype.type(0)
    terms = any(c != 0 for c, _ in zip(coef[1:], features, strict=False))
    if ref is None or c0 == 0:
        p = np.zeros(n, np_dtype)
    elif c0 == 1:
        p = ref.astype(np_dtype, copy=terms)  # no terms to add: the reference itself, no copy
    else:
        p = ref * c0
    for c, f in zip(coef[1:], features, strict=False):
        if c != 0:
            p += np_dtype.type(c) * f
    return p


def _prediction(ref: np.ndarray | None, coef: Sequence[float], features: Sequence[np.ndarray], n: int, np_dtype: Any,
                dtype: torch.dtype) -> tuple[np.ndarray, bool]:
    """The prediction's bit patterns and whether compiled code made them: :func:`predict`'s arithmetic, for
    float32 with a scaled reference and up to 2 features in one pass (:func:`enc_features.predict_f32`), else
    numpy's (the decoder always uses numpy's)."""
    n_feat = min(max(0, len(coef) - 1), len(features))
    if (dtype == torch.float32 and ref is not None and len(coef) <= 3 and n_feat <= 2
            and np.float32(coef[0]) not in (0, 1) and all(f.dtype == np.float32 for f in features[:n_feat])):
        c = np.zeros(3, np.float32)
        c[:len(coef)] = coef
        empty = np.zeros(0, np.float32)
        if n_feat and all(isinstance(f, Ratio) for f in features[:n_feat]):  # the ratios made inline, never stored
            fs = [*((f.m, f.v) for f in features[:n_feat]), (empty, empty), (empty, empty)]
            p, nan = EF.predict_ratio_f32(ref, *fs[0], *fs[1], c, n_feat, _EPS_ARR)
        else:
            fs = [*_arrays(features[:n_feat]), empty, empty]
            p, nan = EF.predict_f32(ref, fs[0], fs[1], c, n_feat)
        if not nan:
            return _as_dtype_bits(p, dtype), True
    return _as_dtype_bits(predict(ref, coef, _arrays(features), n, np_dtype), dtype), False


def _arrays(features: Sequence[Any]) -> list[np.ndarray]:
    """The features as arrays (a lazy :class:`~tpde_hf.checkpoints.predict.Ratio` made whole)."""
    return [f.array() if isinstance(f, Ratio) else f for f in features]


def _np_float(dtype: torch.dtype) -> Any:
    # bf16 has no numpy dtype: its predictions are formed in float32 and rounded to bf16 by torch.
    return np.dtype(np.float16) if dtype == torch.float16 else np.dtype(np.float32)


def _as_dtype_bits(p: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    view = DTYPES[dtype][1]
    if dtype == torch.bfloat16:
        return torch.from_numpy(p).to(torch.bfloat16).view(view).numpy()
    return p.view(np.int32 if view == torch.int32 else np.int16)


def _to_np(t: torch.Tensor | np.ndarray | Ratio, dtype: torch.dtype) -> np.ndarray | Ratio:
    if isinstance(t, Ratio):  # a lazy feature of the pack (float32, flat): indexed, sliced or made whole
        return t if dtype == torch.float32 else t.array()  # (numpy arrays are taken as they are)
    if isinstance(t, np.ndarray):
        return t.reshape(-1)
    t = t.detach().reshape(-1)
    return (t.float() if dtype == torch.bfloat16 else t.to(dtype)).numpy()


def _fit(target: np.ndarray, ref: np.ndarray | None, feats: list[np.ndarray]) -> list[float] | None:
    """Least-squares coefficients ``[c0, c1, ...]`` (float32 values) of ``target`` on ``ref`` and ``feats`` (a
    sample), or None. The normal equations in one compiled pass (:func:`enc_estimate.least_squares`); where their
    system is ill-conditioned or singular, numpy's SVD solver."""
    cols = ([ref] if ref is not None else []) + list(feats)
    if not cols:
        return None
    sol = EE.least_squares(cols, target)
    if sol is None:
        sol = _fit_svd(target, cols)
    if sol is None or not np.isfinite(sol).all():
        return None
    sol = [float(np.float32(s)) for s in sol]
    return sol if ref is not None else [0.0] + sol


def _fit_svd(target: np.ndarray, cols: list[np.ndarray]) -> np.ndarray | None:
    a = np.stack([c.astype(np.float64) for c in cols], 1)
    ok = np.isfinite(a).all(1) & np.isfinite(target)
    if ok.sum() < 16:
        return None
    try:
        return np.linalg.lstsq(a[ok], target[ok].astype(np.float64), rcond=None)[0]
    except np.linalg.LinAlgError:
        return None


_POOL = WorkerPool("tpde-encode")


def _pool_map(fn: Any, items: Sequence[Any]) -> list[Any]:
    """``[fn(x) for x in items]`` on a pool of one thread per core (the encoder's compiled runs release the GIL)."""
    return _POOL.map(fn, items)


def _payload_view(t: torch.Tensor, dt: Any, copy_unaligned: bool = True) -> np.ndarray:
    """A uint8 payload part as ``dt`` words (little-endian, as stored): a view when aligned, else a copy.

    ``copy_unaligned=False``: a view in any case, of a 1-D contiguous uint8 part only. In an entry most ``words``
    and ``bits`` parts are unaligned (about 150 MB of a 190 MB link); the restore's fused decoder
    (:mod:`~tpde_hf.checkpoints.dec_features`) reads them in place, its loads of these words being scalar (or
    gathers), which x86-64 and aarch64 allow at any address."""
    a = t.numpy()
    if not copy_unaligned and (a.dtype != np.uint8 or a.ndim != 1 or not a.flags.c_contiguous):
        raise ValueError("a payload part is not whole words")
    a = np.ascontiguousarray(a).reshape(-1)
    if a.size % np.dtype(dt).itemsize:
        raise ValueError(f"payload of {a.size} bytes is not a whole number of {np.dtype(dt).name} words")
    if copy_unaligned and a.ctypes.data % np.dtype(dt).itemsize:
        a = a.copy()
    return a.view(np.dtype(dt).newbyteorder("<"))


#: A context value at or below this is its own bucket (0): e.g. a parameter no gradient has touched.
SPECIAL = -1000


def _buckets(src: np.ndarray, lo: int, n_ctx: int) -> np.ndarray:
    return EF.buckets(np.ascontiguousarray(src), lo, n_ctx, SPECIAL)  # the same array on both sides


def _low(src: np.ndarray, n_ctx: int) -> int:
    if n_ctx <= 1:
        return 0
    sample = src[:: max(1, src.size // 4096)]
    ordinary = sample[sample > SPECIAL]
    if not ordinary.size:
        return 0
    k = ordinary.size // 100  # about the 1% quantile: the lowest context bucket takes the tail below it
    return int(np.partition(ordinary, k)[k]) - 1


@TENSOR_CODECS.register
class CheckpointDelta:
    """Exact coding of a checkpoint tensor against the previous checkpoint (see the module docstring).

    ``context.options``: ``features`` (list of arrays/tensors, flattened, the tensor's float dtype),
    ``ctx`` (int array: each element's context before bucketing; default: the reference's exponent),
    ``fit`` (default True: try fitted coefficients), ``modes`` (default both), ``fork`` (``fork(fn, items)``,
    a map that idle threads may help with: a large tensor's chunks are then coded in runs). The large temporaries
    come from :func:`tpde_hf.checkpoints.enc_buffers.empty` (reused inside ``enc_buffers.scratch()``).
    """

    name = "ckpt-delta"

    def encode(self, tensor: torch.Tensor, context: CodecContext) -> dict[str, torch.Tensor]:
        dtype = tensor.dtype
        if dtype not in DTYPES:
            raise TpdeFormatError(context.key, f"ckpt-delta codes float32/bfloat16/float16 tensors, not {dtype}")
        code, view, width, mb = DTYPES[dtype]
        n = tensor.numel()
        bits = tensor.detach().contiguous().view(view).reshape(-1).numpy()
        npf = _np_float(dtype)
        ref = self._reference(tensor, context)
        refn = _to_np(ref, dtype) if ref is not None else None
        feats = [_to_np(f, dtype) for f in context.options.get("features", ())]
        src = self._ctx_source(refn, context, dtype, n)
        n_ctx = 1 if n < 4096 else (8 if n < 1 << 16 else 32)
        lo = _low(src, n_ctx)
        ctx = _buckets(src, lo, n_ctx)
        coef, mode = self._choose(bits, tensor, refn, feats, ctx, n_ctx, dtype, npf, context)
        nsym = K.n_symbols(mode, width, mb)
        pbits, compiled = _prediction(refn, coef, feats, n, npf, dtype)
        fork = context.options.get("fork")  # fork(fn, items): idle threads may take runs of chunks
        if fork is None and not K.is_serial():
            fork = _pool_map  # outside kernels.serial (e.g. the CLI's pack): runs of chunks on every core
        pieces = min(16, n // FORK_RUN) if fork is not None and n >= 2 * FORK_RUN else 1
        freq, (states, n_words, n_bitwords, w, b, bad) = self._streams(
            bits, pbits, ctx, n_ctx, nsym, mode, width, mb, bool(context.options.get("verify")), fork, pieces)
        if bad:
            raise TpdeFormatError(context.key, f"ckpt-delta: {bad} elements or rANS steps fail their inverse check "
                                               "(encoder bug); the encoded payload does not decode to the tensor; "
                                               "nothing was stored")
        meta = [VERSION, mode, code, n, CHUNK, n_ctx, nsym, len(coef), checksum(bits), lo, len(states)]
        tables = zstandard.ZstdCompressor(level=9).compress(freq.astype("<u2").tobytes())
        parts = {
            "meta": torch.tensor(meta, dtype=torch.int64),
            "shape": torch.tensor(list(tensor.shape), dtype=torch.int64),
            "coef": torch.tensor(coef, dtype=torch.float32),
            "tables": torch.frombuffer(bytearray(tables), dtype=torch.uint8),
            "chunks": torch.from_numpy(np.concatenate([states, n_words[:, None], n_bitwords[:, None]], 1)),
            # fresh arrays from concatenate: viewed as bytes, no copy (little-endian: as stored)
            "words": torch.from_numpy(w.astype("<u2", copy=False).view(np.uint8)),
            "bits": torch.from_numpy(b.astype("<u4", copy=False).view(np.uint8)),
        }
        if context.options.get("verify"):
            # a compiled prediction is checked against the decoder's (numpy) on the sampled chunks
            self._verify(parts, bits, pbits, ctx, context.key, (refn, coef, feats, npf) if compiled else None)
        return parts

    def _streams(self, bits, pbits, ctx, n_ctx, nsym, mode, width, mb, verify, fork, pieces):
        """The frequency tables and :func:`enc_stream.encode_fused`'s streams: a histogram pass, then each chunk's
        symbols made in cache where the streams are written, with the decoder's inverse of the symbol map on every
        element (``verify``). Returns ``(freq, encode_fused's tuple)``."""
        freq = self._tables(ES.sym_histogram(bits, pbits, ctx, mode, width, mb, n_ctx, nsym))
        cum = (np.cumsum(freq, 1) - freq).astype(np.int64)
        return freq, ES.encode_fused(bits, pbits, ctx, freq, cum, mode, width, mb, CHUNK, verify, fork, pieces)

    def decode(self, parts: Mapping[str, torch.Tensor], context: CodecContext) -> torch.Tensor:
        key = context.key
        pp = self._parse(parts, key)
        dtype, shape, n, coef = pp["dtype"], pp["shape"], pp["n"], pp["coef"]
        npf = _np_float(dtype)
        ref = self._reference_for(shape, n, dtype, context)
        refn = _to_np(ref, dtype) if ref is not None else None
        feats = [_to_np(f, dtype) for f in context.options.get("features", ())]
        if len(coef) > 1 + len(feats):
            raise TpdeFormatError(key, f"ckpt-delta needs {len(coef) - 1} feature tensors, got {len(feats)}")
        src = self._ctx_source(refn, context, dtype, n)
        ctx = _buckets(src, pp["lo"], pp["n_ctx"])
        out = self._fast_payload(pp, refn, coef, feats, ctx)
        if out is None or checksum(out) != pp["digest"]:  # the reference decoder says what is wrong
            pbits = _as_dtype_bits(predict(refn, coef, feats, n, npf), dtype)
            out = self._payload(pp, pbits, ctx, key)
            if checksum(out) != pp["digest"]:
                raise TpdeFormatError(key, "ckpt-delta payload does not decode to the stored checksum (corrupt file, "
                                           "or decoded against the wrong previous checkpoint)")
        return torch.from_numpy(out).view(dtype).reshape(shape)

    @staticmethod
    def _fast_payload(pp: dict[str, Any], refn: np.ndarray | None, coef: list[float], feats: list[np.ndarray],
                      ctx: np.ndarray) -> np.ndarray | None:
        """The tensor's bit patterns by :mod:`~tpde_hf.checkpoints.dec_kernels` (float32: the prediction formed
        chunk by chunk in compiled code), or None where it declines (a NaN prediction, a chunk that does not
        end as encoded): the caller then decodes with the reference decoder, which names the fault."""
        dtype = pp["dtype"]
        _, _, width, mb = DTYPES[dtype]
        _, _, ws, words_s, bs, bits_s, states = CheckpointDelta._decoder_inputs(pp, tables=False)
        tab = D.slot_table(pp["freq"], pp["mode"], mb)
        out = np.empty(pp["n"], np.int32 if width == 32 else np.int16)
        par = not K.is_serial()
        n_feat = len(coef) - 1
        if (dtype == torch.float32 and n_feat <= 2 and (refn is None or refn.dtype == np.float32)
                and all(f.dtype == np.float32 and f.flags.c_contiguous for f in feats[:n_feat])):
            c3 = np.zeros(3, np.float32)
            c3[:len(coef)] = coef
            fs = [*feats[:n_feat], None, None]
            bad, nan = D.decode_f32(None if refn is None else np.ascontiguousarray(refn), fs[0], fs[1], c3, ctx, tab,
                                    states, ws, words_s, bs, bits_s, pp["mode"], pp["chunk"], out, parallel=par)
            if nan:
                return None
        else:
            pbits = _as_dtype_bits(predict(refn, coef, feats, pp["n"], _np_float(dtype)), dtype)
            bad = D.decode_bits(pbits, ctx, tab, states, ws, words_s, bs, bits_s, pp["mode"], width, pp["chunk"], out,
                                parallel=par)
        return None if bad.any() else out

    @staticmethod
    def _parse(parts: Mapping[str, torch.Tensor], key: str, copy_unaligned: bool = True) -> dict[str, Any]:
        """The checked header and payload arrays of a coded tensor (:class:`TpdeFormatError` if malformed);
        ``copy_unaligned``: see :func:`_payload_view`."""
        try:
            meta = [int(v) for v in parts["meta"].tolist()]
            shape = [int(v) for v in parts["shape"].tolist()]
            coef = [float(v) for v in parts["coef"].tolist()]
            tables_b, chunks = parts["tables"].numpy().tobytes(), parts["chunks"].numpy()
            words = _payload_view(parts["words"], np.uint16, copy_unaligned)
            bitw = _payload_view(parts["bits"], np.uint32, copy_unaligned)
        except (KeyError, AttributeError, TypeError, RuntimeError, ValueError) as exc:
            raise TpdeFormatError(key, f"ckpt-delta parts are missing or malformed ({exc})") from None
        if len(meta) != _META_LEN or meta[0] != VERSION:
            raise TpdeFormatError(key, f"ckpt-delta meta of version {meta[:1]} is not understood (expected {VERSION})")
        _, mode, code, n, chunk, n_ctx, nsym, n_coef, digest, lo, nch = meta
        dtype = CODES.get(code)
        if dtype is None or mode not in (K.MODE_ORD, K.MODE_FLD):
            raise TpdeFormatError(key, f"ckpt-delta: unknown dtype code {code} or mode {mode}")
        _, view, width, mb = DTYPES[dtype]
        if (n < 0 or any(s < 0 for s in shape) or int(np.prod(shape, dtype=np.int64)) != n or chunk <= 0
                or not 1 <= n_ctx <= 256 or nsym != K.n_symbols(mode, width, mb) or n_coef != len(coef)
                or nch != (n + chunk - 1) // chunk or chunks.dtype != np.int64 or chunks.shape != (nch, K.LANES + 2)):
            raise TpdeFormatError(key, "ckpt-delta meta is inconsistent (corrupt checkpoint file)")
        try:
            freq = np.frombuffer(zstandard.ZstdDecompressor().decompress(tables_b, max_output_size=n_ctx * nsym * 2),
                                 "<u2").astype(np.int64)
        except zstandard.ZstdError as exc:
            raise TpdeFormatError(key, f"ckpt-delta frequency tables are corrupt ({exc})") from None
        if freq.size != n_ctx * nsym:
            raise TpdeFormatError(key, "ckpt-delta frequency tables have the wrong size")
        freq = freq.reshape(n_ctx, nsym)
        if (freq.sum(1) != 1 << K.PROB_BITS).any():
            raise TpdeFormatError(key, "ckpt-delta frequency tables do not sum to 2**12 (corrupt)")
        n_words, n_bitwords = chunks[:, K.LANES], chunks[:, K.LANES + 1]
        if ((n_words < 0).any() or (n_bitwords < 0).any() or n_words.sum() != words.size
                or n_bitwords.sum() != bitw.size):
            raise TpdeFormatError(key, "ckpt-delta chunk table does not match the payload (truncated or corrupt)")
        return {"dtype": dtype, "shape": shape, "n": n, "coef": coef, "lo": lo, "n_ctx": n_ctx, "nsym": nsym,
                "digest": digest, "mode": mode, "chunk": chunk, "freq": freq, "chunks": chunks,
                "n_words": n_words, "n_bitwords": n_bitwords, "words": words, "bitw": bitw}

    @staticmethod
    def _decoder_inputs(pp: dict[str, Any], tables: bool = True) -> tuple:
        """``(lut, cum, word_start, words, bit_start, bitwords, states)`` of a parsed payload (``tables``
        False: no ``lut`` and ``cum``, None in their places)."""
        freq = pp["freq"]
        cum = (np.cumsum(freq, 1) - freq).astype(np.int64) if tables else None
        lut = ET.slot_symbols(np.ascontiguousarray(freq, np.int64)) if tables else None  # freq: checked by _parse
        ws = np.concatenate([[0], np.cumsum(pp["n_words"])]).astype(np.int64)
        bs = np.concatenate([[0], np.cumsum(pp["n_bitwords"])]).astype(np.int64)
        words_s = pp["words"] if pp["words"].size else np.zeros(1, np.uint16)
        bits_s = pp["bitw"] if pp["bitw"].size else np.zeros(1, np.uint32)
        return lut, cum, ws, words_s, bs, bits_s, np.ascontiguousarray(pp["chunks"][:, :K.LANES])

    @classmethod
    def _payload(cls, pp: dict[str, Any], pbits: np.ndarray, ctx: np.ndarray, key: str) -> np.ndarray:
        """The tensor's bit patterns from a parsed payload, its prediction and its context buckets."""
        _, _, width, mb = DTYPES[pp["dtype"]]
        lut, cum, ws, words_s, bs, bits_s, states = cls._decoder_inputs(pp)
        out = np.empty(pp["n"], np.int32 if width == 32 else np.int16)
        bad = K.decode_chunks(pbits, ctx, lut, pp["freq"], cum, states, ws, words_s, bs, bits_s, pp["mode"], width,
                              mb, pp["chunk"], out)
        if bad.any():
            raise TpdeFormatError(key, "ckpt-delta payload does not decode to the stored checksum (corrupt file, "
                                       "or decoded against the wrong previous checkpoint)")
        return out

    @classmethod
    def _verify(cls, parts: Mapping[str, torch.Tensor], bits: np.ndarray, pbits: np.ndarray, ctx: np.ndarray,
                key: str, numpy_pred: tuple | None = None) -> None:
        """Pack-time check that ``parts`` decode to ``bits`` (:class:`TpdeFormatError` if not; nothing is stored).

        Every element was checked at encode time against the decoder's inverse of the symbol map (and of every
        rANS step). Sampled chunks (the last chunk of every tensor, and the first and every 64th of a tensor
        over :data:`VERIFY_EVERY` chunks) are decoded from the parsed parts as a restore decodes them and
        compared bit for bit; this covers the stream layout, the chunk table, tables and header.
        ``numpy_pred`` (``(ref, coef, features, np dtype)``): ``pbits`` came from compiled code; the sampled
        chunks are decoded against the decoder's own numpy prediction instead, which checks that the two agree.
        """
        pp = cls._parse(parts, key)
        _, _, width, mb = DTYPES[pp["dtype"]]
        nch, ch = len(pp["chunks"]), pp["chunk"]
        if not nch:
            return
        which = np.array(sorted({nch - 1, *(range(0, nch, VERIFY_EVERY) if nch > VERIFY_EVERY else ())}), np.int64)
        if numpy_pred is not None:  # only the sampled chunks' elements are written (and their pages touched)
            ref, coef, feats, npf = numpy_pred
            pbits = EB.empty(pbits.size, pbits.dtype)
            for c in which:
                lo, hi = c * ch, min(bits.size, (c + 1) * ch)
                pbits[lo:hi] = _as_dtype_bits(predict(None if ref is None else ref[lo:hi], coef,
                                                      [f[lo:hi] for f in feats], hi - lo, npf), pp["dtype"])
        lut, cum, ws, words_s, bs, bits_s, states = cls._decoder_inputs(pp)
        out = EB.empty(bits.size, bits.dtype)
        fail = ES.decode_some(which, pbits, ctx, lut, pp["freq"], cum, states, ws, words_s, bs, bits_s,
                             pp["mode"], width, mb, ch, out) != 0
        fail = fail or any(not np.array_equal(out[c * ch:(c + 1) * ch], bits[c * ch:(c + 1) * ch]) for c in which)
        if fail:
            raise TpdeFormatError(key, "ckpt-delta: the encoded payload does not decode to the tensor "
                                       "(encoder bug); nothing was stored")

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _reference(tensor: torch.Tensor, context: CodecContext) -> torch.Tensor | None:
        ref = context.reference
        if ref is None:
            return None
        if ref.shape != tensor.shape or ref.dtype != tensor.dtype:
            return None  # a reshaped or recast tensor is coded alone
        return ref

    @staticmethod
    def _reference_for(shape: list[int], n: int, dtype: torch.dtype, context: CodecContext) -> torch.Tensor | None:
        ref = context.reference
        if ref is None or list(ref.shape) != shape or ref.dtype != dtype:
            return None
        return ref

    @staticmethod
    def _ctx_source(refn: np.ndarray | None, context: CodecContext, dtype: torch.dtype, n: int) -> np.ndarray:
        given = context.options.get("ctx")
        if given is not None:
            src = np.asarray(given).reshape(-1)
            if src.size != n:
                raise TpdeFormatError(context.key, f"ckpt-delta context has {src.size} elements, the tensor {n}")
            return src
        if refn is None:
            return np.zeros(n, np.int16)
        return exponent(refn if dtype != torch.bfloat16 else refn.astype(np.float32), torch.float32
                        if dtype == torch.bfloat16 else dtype)

    def _choose(self, bits, tensor, refn, feats, ctx, n_ctx, dtype, npf, context):
        """The (coefficients, mode) of the candidate with the smallest estimated size on a sample."""
        n = bits.size
        # a strided sample with a fixed odd stride: O(SAMPLE), where a random choice without replacement is O(n)
        idx = (np.arange(SAMPLE, dtype=np.int64) * (n // SAMPLE | 1)) % n if n > SAMPLE else np.arange(n)
        idx.sort(kind="stable")  # wrapped runs of a progression: timsort is ~linear here, same result
        rs = refn[idx] if refn is not None else None
        fs = [f[idx] for f in feats]
        cands: list[list[float]] = [[0.0]]
        if refn is not None:
            cands.append([1.0] + [0.0] * len(feats))
        if context.options.get("fit", True) and (refn is not None or feats):
            target = _to_np(tensor, dtype)[idx].astype(np.float64)
            fitted = _fit(target, rs, fs)
            if fitted is not None:
                cands.append(fitted)
            if rs is not None and feats:
                alone = _fit(target, rs, [])
                if alone is not None:
                    cands.append(alone + [0.0] * len(feats))
        modes = context.options.get("modes", (K.MODE_ORD, K.MODE_FLD))
        _, _, width, mb = DTYPES[dtype]
        best = None
        for coef in cands:
            pb = _as_dtype_bits(predict(rs, coef, fs, idx.size, npf), dtype)
            costs = EE.sample_costs(bits, pb, ctx, idx, width, mb, n_ctx)  # both modes in one call
            for mode in modes:
                if best is None or costs[mode] < best[0]:
                    best = (costs[mode], coef, mode)
        return best[1], best[2]

    @staticmethod
    def _tables(hist: np.ndarray) -> np.ndarray:
        """Frequency tables (``[n_ctx, nsym]``, each row summing to 2**12) from the symbol counts:
        ``rans.quantize_frequencies``' tables, in compiled code (:func:`enc_tables.quantize_tables`)."""
        return ET.quantize_tables(np.ascontiguousarray(hist, np.int64), K.PROB_BITS)


def warm_up() -> None:
    """Load every compiled function a pack of fp32 tensors calls, on serial loops as the packing thread runs
    them (numba's on-disk cache, else a compile), so that the first pack of a run does not pay for it.

    Example::

        warm_up()   # once, before training starts
    """
    rng = np.random.default_rng(0)
    ref = rng.standard_normal(5000).astype(np.float32)
    feat = rng.standard_normal(5000).astype(np.float32)
    new = torch.from_numpy(np.float32(0.9) * ref + np.float32(0.1) * feat)
    src = exponent(ref, torch.float32)
    codec = CheckpointDelta()
    v = np.abs(feat)
    with K.serial(True):
        for opts in ({}, {"features": [feat], "ctx": src // 2},
                     {"features": [feat, feat * np.float32(0.5)], "ctx": src.astype(np.int32)},
                     {"features": [Ratio(feat, v), Ratio(ref, v)], "ctx": src.astype(np.int32)}):
            codec.encode(new, CodecContext("warm-up", torch.from_numpy(ref), {**opts, "verify": True}))
        # the pack's own paths: runs of chunks taken by other threads, the Adam features of predict.options
        x, p = new.numpy().view(np.int32), ref.view(np.int32)
        zero = np.zeros(x.size, np.uint8)
        nsym = K.n_symbols(K.MODE_ORD, 32, 23)
        freq = CheckpointDelta._tables(ES.sym_histogram(x, p, zero, K.MODE_ORD, 32, 23, 1, nsym))
        cum = (np.cumsum(freq, 1) - freq).astype(np.int64)
        ES.encode_fused(x, p, zero, freq, cum, K.MODE_ORD, 32, 23, 1024, True, lambda fn, items: [fn(x) for x in items],
                        2)
        EF.ratio_f32(feat, v, np.ones(1, np.float32))
        EF.half_exponent(v)
        EF.square_ctx(feat, v)
        EF.weight_ctx(ref, v, -1000)
