"""Restore a checkpoint tensor with its Adam features formed inside the decoder: no feature arrays.

:func:`tpde_hf.checkpoints.predict.options` gives the codec tensor-sized feature and context arrays (for a
weight: two ratios ``m / (sqrt(v) + eps)`` and an int32 context; for ``exp_avg_sq``: ``m * m`` and a context),
which the decoder then reads back: about 60 bytes of memory traffic per weight where the decode needs 27, and
memory, not arithmetic, bounds a restore on this kind of machine. :func:`decode` picks the same inputs
``options`` would (the same keys, dtypes and size checks, in the same order), and the decoder
(:func:`~tpde_hf.checkpoints.dec_kernels.decode_adam`) computes features and contexts block by block in cache,
with the same float32 operations, so the prediction is bit for bit the one the encoder used.

The payload's ``words`` and ``bits`` parts are read where they lie in the entry's memory map, aligned or not
(:func:`_parse`: the codec's own decode copies an unaligned part, and most are: about 150 MB of a 190 MB link).

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
from tpde_hf.checkpoints.codec import CODES, CheckpointDelta, checksum
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
    pp = _parse(parts, key)
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



def _parse(parts: Mapping[str, torch.Tensor], key: str = "") -> dict | None:
    """:meth:`CheckpointDelta._parse` of a float32 tensor, its payload parts as views where they lie in the entry's
    map, aligned or not; None where it does not parse (the caller's ordinary decode then names the fault)."""
    try:
        pp = CheckpointDelta._parse(parts, key, copy_unaligned=False)
    except TpdeFormatError:
        return None
    return pp if pp["dtype"] == torch.float32 else None


def stored_sizes(meta: Mapping[str, np.ndarray]) -> dict[str, tuple[torch.dtype | None, int]]:
    """``{key: (dtype, n)}`` from each coded tensor's ``meta`` part (``ckpt-delta``: version, mode, dtype code,
    n, ...), what its decode gives when it succeeds; ``(None, -1)`` for a meta that does not say."""
    out: dict[str, tuple[torch.dtype | None, int]] = {}
    for key, m in meta.items():
        ok = m.dtype == np.int64 and m.size > 3
        out[key] = (CODES.get(int(m[2])), int(m[3])) if ok else (None, -1)
    return out
