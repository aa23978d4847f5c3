"""Restore a checkpoint tensor with its Adam features formed inside the decoder: no feature arrays.

:func:`tpde_hf.checkpoints.predict.options` gives the codec tensor-sized feature and context arrays (for a
weight: two ratios ``m / (sqrt(v) + eps)`` and an int32 context; for ``exp_avg_sq``: ``m * m`` and a context),
which the decoder then reads back: about 60 bytes of memory traffic per weight where the decode needs 27, and
memory, not arithmetic, bounds a restore on this kind of machine. :func:`decode` picks the same inputs
``options`` would (the same keys, dtypes and size checks, in the same order), and the decoder
(:func:`~tpde_hf.checkpoints.dec_kernels.decode_adam`) computes features and contexts block by block in cache,
with the same float32 operations, so the prediction is bit for bit the one the encoder used.

The payload's ``words`` and ``bits`` parts are read where they lie in the entry's memory map, aligned or not
(:func:`_parse`: the codec's parser copies an unaligned part, and most are: about 150 MB of a 190 MB link).

It only ever takes a shortcut to the same bytes: where a tensor does not fit a recipe, where the payload does not
parse, where a prediction is NaN, where a chunk does not end as encoded, or where the result does not match the
stored xxh3 checksum, it returns None and the caller decodes the ordinary way (``options`` + the codec), which
names the fault exactly as before. Nothing here raises for corrupt input.

Example::

    t = decode(key, parts, current, previous, param_names, backward=True)
    if t is None:
        t = codec.decode(parts, CodecContext(key, previous[key], predict.options(key, current, previous, ...)))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
import zstandard

from tpde_hf.checkpoints import dec_kernels as D
from tpde_hf.checkpoints import kernels as K
from tpde_hf.checkpoints import predict
from tpde_hf.checkpoints.codec import _META_LEN, CODES, DTYPES, VERSION, CheckpointDelta, checksum
from tpde_hf.errors import TpdeFormatError

#: how many feature coefficients each recipe may carry (the codec refuses more than its features)
_N_FEAT = {D.RECIPE_M: 0, D.RECIPE_V: 1, D.RECIPE_W: 2}


#: the fused decoder's recipe for each kind of :func:`predict.sources`
_RECIPE = {predict.FROM_V: D.RECIPE_M, predict.FROM_M: D.RECIPE_V, predict.FROM_ADAM: D.RECIPE_W}


def plan(key: str, cur: Mapping[str, torch.Tensor], prev: Mapping[str, torch.Tensor] | None,
         param_names: Sequence[str] | None, backward: bool = False,
         stored: Mapping[str, tuple[torch.dtype | None, int]] | None = None) -> tuple | None:
    """``(recipe, a, b, c, d)``: the tensors :func:`predict.options` builds ``key``'s features and context from
    (:func:`predict.sources`, the one place that picks them), or None where ``options`` gives no recipe.

    ``stored``: the stored dtype and element count of each tensor of ``cur``'s checkpoint. A backward
    ``exp_avg_sq`` reads its own checkpoint's ``exp_avg`` only for its size, so with ``stored`` it does not
    wait for that tensor's decode: the two decode at once (if that decode fails, the restore fails with its
    error anyway)."""
    sizes = None if stored is None else {k: (n if dt == torch.float32 else None) for k, (dt, n) in stored.items()}
    src = predict.sources(key, cur, prev, param_names, backward, sizes)
    if src is None:
        return None
    kind, arrays = src
    full = tuple(np.ascontiguousarray(a) for a in arrays) + (None,) * (4 - len(arrays))
    return (_RECIPE[kind], *full)


def decode(key: str, parts: Mapping[str, torch.Tensor], cur: Mapping[str, torch.Tensor],
           prev: Mapping[str, torch.Tensor] | None, param_names: Sequence[str] | None, backward: bool = False,
           parallel: bool | None = None,
           stored: Mapping[str, tuple[torch.dtype | None, int]] | None = None,
           spare: Callable[[int], np.ndarray | None] | None = None) -> torch.Tensor | None:
    """``key`` decoded from its coded ``parts`` with the features computed in the decoder, or None where this
    path does not apply or declines (see the module docstring). ``cur``/``prev``: as for
    :func:`predict.options`; ``parallel``: chunks on numba's threads (default: unless :func:`kernels.serial`);
    ``stored``: see :func:`plan`; ``spare(n)``: an int32 array of ``n`` elements to decode into (every element
    is written), or None: a new one. The result views the array it was decoded into."""
    p = plan(key, cur, prev, param_names, backward, stored)
    if p is None:
        return None
    try:
        return _decode_planned(key, parts, prev.get(key), p, not K.is_serial() if parallel is None else parallel,
                               spare)
    except (TpdeFormatError, zstandard.ZstdError, KeyError, TypeError, ValueError, RuntimeError, IndexError):
        return None  # the ordinary decode names the fault


def _output(n: int, spare: Callable[[int], np.ndarray | None] | None) -> np.ndarray:
    """An int32 array of ``n`` elements: a spare one (checked) or a new one."""
    out = spare(n) if spare is not None else None
    if out is None or out.dtype != np.int32 or out.shape != (n,) or not out.flags.c_contiguous:
        out = np.empty(n, np.int32)
    return out


def _decode_planned(key: str, parts: Mapping[str, torch.Tensor], ref_t: torch.Tensor, p: tuple,
                    parallel: bool, spare: Callable[[int], np.ndarray | None] | None = None) -> torch.Tensor | None:
    recipe, a, b, c, d = p
    pp = _parse(parts)
    if pp is None:
        return None
    n, coef = pp["n"], pp["coef"]
    ref = predict._np(ref_t)
    ref = None if ref is None else np.ascontiguousarray(ref)  # the compiled loops want it contiguous
    # the codec's conditions: a float32 tensor, the reference used as is (same shape), no more coefficients
    # than features; anything else goes the ordinary way
    if (pp["dtype"] != torch.float32 or ref is None or list(ref_t.shape) != pp["shape"] or ref.size != n
            or a.size != n or len(coef) > 1 + _N_FEAT[recipe]):
        return None
    _, _, ws, words, bs, bitwords, states = CheckpointDelta._decoder_inputs(pp, tables=False)
    tab, sym = D.table(pp["freq"], pp["mode"], 23)
    out = _output(n, spare)
    bad, nan = D.decode_adam(recipe, ref, a, b, c, d, coef, pp["lo"], pp["n_ctx"], tab, states, ws, words, bs,
                             bitwords, pp["mode"], pp["chunk"], out, parallel=parallel, sym=sym)
    if nan or bad.any() or checksum(out) != pp["digest"]:
        return None
    return torch.from_numpy(out).view(torch.float32).reshape(pp["shape"])



def _words(t: torch.Tensor, dt: np.dtype) -> np.ndarray:
    """A uint8 payload part as little-endian ``dt`` words: always a view, also where the part is not aligned to
    ``dt``. The codec's parser copies such a part (in an entry most ``words`` and ``bits`` parts are unaligned:
    about 150 MB of a 190 MB link, and the copy's fresh pages are faulted in each time); the decoder's loads of
    these words are scalar (or gathers), which x86-64 and aarch64 allow at any address."""
    a = t.numpy()
    if a.dtype != np.uint8 or a.ndim != 1 or not a.flags.c_contiguous or a.size % dt.itemsize:
        raise ValueError("a payload part is not whole words")
    return a.view(dt)


def _parse(parts: Mapping[str, torch.Tensor]) -> dict | None:
    """:meth:`CheckpointDelta._parse` of a float32 tensor with its payload parts as views (:func:`_words`), the
    same checks; None where it does not parse (the caller's ordinary decode then names the fault)."""
    try:
        meta = [int(v) for v in parts["meta"].tolist()]
        shape = [int(v) for v in parts["shape"].tolist()]
        coef = [float(v) for v in parts["coef"].tolist()]
        tables_b, chunks = parts["tables"].numpy().tobytes(), parts["chunks"].numpy()
        words, bitw = _words(parts["words"], np.dtype("<u2")), _words(parts["bits"], np.dtype("<u4"))
        if len(meta) != _META_LEN or meta[0] != VERSION:
            return None
        _, mode, code, n, chunk, n_ctx, nsym, n_coef, digest, lo, nch = meta
        if CODES.get(code) != torch.float32 or mode not in (K.MODE_ORD, K.MODE_FLD):
            return None
        _, _, width, mb = DTYPES[torch.float32]
        if (n < 0 or any(s < 0 for s in shape) or int(np.prod(shape, dtype=np.int64)) != n or chunk <= 0
                or not 1 <= n_ctx <= 256 or nsym != K.n_symbols(mode, width, mb) or n_coef != len(coef)
                or nch != (n + chunk - 1) // chunk or chunks.dtype != np.int64 or chunks.shape != (nch, K.LANES + 2)):
            return None
        raw = zstandard.ZstdDecompressor().decompress(tables_b, max_output_size=n_ctx * nsym * 2)
        freq = np.frombuffer(raw, "<u2").astype(np.int64)
        if freq.size != n_ctx * nsym:
            return None
        freq = freq.reshape(n_ctx, nsym)
        n_words, n_bitwords = chunks[:, K.LANES], chunks[:, K.LANES + 1]
        if ((freq.sum(1) != 1 << K.PROB_BITS).any() or (n_words < 0).any() or (n_bitwords < 0).any()
                or n_words.sum() != words.size or n_bitwords.sum() != bitw.size):
            return None
    except (KeyError, AttributeError, TypeError, RuntimeError, ValueError, zstandard.ZstdError):
        return None
    return {"dtype": torch.float32, "shape": shape, "n": n, "coef": coef, "lo": lo, "n_ctx": n_ctx, "nsym": nsym,
            "digest": digest, "mode": mode, "chunk": chunk, "freq": freq, "chunks": chunks, "n_words": n_words,
            "n_bitwords": n_bitwords, "words": words, "bitw": bitw}


def stored_sizes(meta: Mapping[str, np.ndarray]) -> dict[str, tuple[torch.dtype | None, int]]:
    """``{key: (dtype, n)}`` from each coded tensor's ``meta`` part (``ckpt-delta``: version, mode, dtype code,
    n, ...), what its decode gives when it succeeds; ``(None, -1)`` for a meta that does not say."""
    out: dict[str, tuple[torch.dtype | None, int]] = {}
    for key, m in meta.items():
        ok = m.dtype == np.int64 and m.size > 3
        out[key] = (CODES.get(int(m[2])), int(m[3])) if ok else (None, -1)
    return out
