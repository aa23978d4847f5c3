"""Loading the weights a base storage laid out (:mod:`tpde_hf.storage_format`) through transformers' own hooks.

:func:`storage_converters` gives the quantizer one ``WeightConverter`` per storage in the repo (its
``update_weight_conversions``): in ``base`` and ``lossless-offload`` mode :class:`StorageToResident` reads only
the ``meta`` and ``base_*`` parts and loads the resident base; in ``lossless`` mode it loads all seven resident
parts (the delta re-encoded from the exact weight); in ``dequantize`` mode
:class:`~tpde_hf.loading.TpdeDequantize` decodes the exact weight. ``lossless-offload`` builds the host delta
in :func:`tpde_hf.nn.offload.setup_offload` (:func:`tpde_hf.nn.holder.stored_delta`). In ``dequantize`` and
``lossless`` mode, :func:`storage_converters` also starts the load's decode workers
(:mod:`tpde_hf.loading.storage_prefetch`), which decode whole weights ahead of the converters; the converters take
their results, and :func:`strip_storage_converters` stops them.

Example::

    conversions = storage_converters(quantizer, plan, "base") + conversions
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.core_model_loading import ConversionOps, WeightConverter

from tpde_hf.codec.registry import STORAGE_TOKEN
from tpde_hf.errors import TpdeFormatError
from tpde_hf.loading.ops import DELTA_SUFFIXES, LoadPlan, TpdeDequantize
from tpde_hf.storage_format import META_PART, StoredWeight, decode_base, is_base_part, resident_parts, storage_suffixes


class StorageToResident(ConversionOps):
    """Rebuild the resident parts of one storage-laid weight as transformers reads its stored parts
    (modes ``base``, ``lossless-offload``: ``meta, qweight, scales, zeros`` from the ``meta`` and ``base_*`` parts;
    ``lossless``: all seven, the delta re-encoded from the exact weight).

    Input: ``{"tpde_storage.S.<part>": [tensor]}``; output: the resident parts under their full names
    (``<stem>meta`` first, ``full_layer_name`` being ``<stem>meta``). A corrupt weight is recorded on the
    quantizer and raised, naming it, after loading.

    Example::

        StorageToResident(quantizer, "coded", full=False).convert(parts, full_layer_name="m.up.meta")
    """

    supports_many_to_many = True

    def __init__(self, hf_quantizer: Any, storage: str, full: bool):
        self.hf_quantizer, self.storage, self.full = hf_quantizer, storage, full

    def __deepcopy__(self, memo: dict) -> StorageToResident:
        return StorageToResident(self.hf_quantizer, self.storage, self.full)

    @torch.no_grad()
    def convert(self, input_dict: dict[str, Any], source_patterns: list[str] | None = None,
                target_patterns: list[str] | None = None, full_layer_name: str | None = None,
                model: torch.nn.Module | None = None, **kwargs: Any) -> dict[str, torch.Tensor]:
        layer = full_layer_name or META_PART
        stem = layer[: -len(META_PART)] if layer.endswith(META_PART) else layer + "."
        label = _holder_name(model, stem) or f"{stem}weight"
        token = f"{STORAGE_TOKEN}.{self.storage}."
        try:
            parts = {}
            for key, value in input_dict.items():
                values = value if isinstance(value, list) else [value]
                if not key.startswith(token) or len(values) != 1:
                    raise TpdeFormatError(label, f"unexpected stored parts {key!r} ({len(values)} tensors)")
                parts[key[len(token):]] = values[0]
            if self.full:
                out = resident_parts(label, self.storage, parts)
            else:
                out = decode_base(label, self.storage, {p: t for p, t in parts.items() if is_base_part(p)})
        except TpdeFormatError as exc:
            self.hf_quantizer.record_error(exc)
            return {}
        return {f"{stem}{s}": out[s] for s in (META_PART, *(s for s in out if s != META_PART))}

    @property
    def reverse_op(self) -> ConversionOps:
        from transformers.core_model_loading import _IdentityOp

        return _IdentityOp()


def _holder_name(model: torch.nn.Module | None, stem: str) -> str | None:
    if model is None or not stem:
        return None
    try:
        return model.get_submodule(stem[:-1]).__dict__.get("_tpde_name")
    except AttributeError:
        return None


def storage_converters(hf_quantizer: Any, plan: LoadPlan | None, mode: str) -> list[WeightConverter]:
    """The converters that read storage-laid weights (one per storage in the repo; none for the resident layout).

    ``dequantize``: each weight decoded straight to ``weight``; ``base`` / ``lossless-offload``: the resident
    base from the ``meta`` and ``base_*`` parts (the others are never read); ``lossless``: all resident parts.
    """
    if plan is None:
        return []
    stored = [StoredWeight(w.prefix, w.storage, {p: "" for p in w.parts})
              for w in plan.weights.values() if w.storage is not None]
    if stored:  # from here on the cores decode whole weights, beside transformers' own work on its thread
        from tpde_hf.loading.storage_prefetch import start

        start(hf_quantizer, mode)
    out = []
    for storage, suffixes in storage_suffixes(stored).items():
        if mode == "dequantize":
            out.append(WeightConverter(suffixes, "weight", [TpdeDequantize(hf_quantizer, None, {storage: suffixes})],
                                       force_cpu=True))
            continue
        full = mode == "lossless"
        sources = suffixes if full else [s for s in suffixes if is_base_part(s.rsplit(".", 1)[1])]
        targets = [META_PART, "qweight", "scales", "zeros", *(DELTA_SUFFIXES if full else ())]
        out.append(WeightConverter(sources, targets, [StorageToResident(hf_quantizer, storage, full)], force_cpu=True))
    return out


def strip_storage_converters(model: torch.nn.Module) -> None:
    """A loaded model holds, and saves, the resident layout: forget the converters that read a storage's parts
    (transformers would reverse them on ``save_pretrained``); the load's decode workers stop."""
    from tpde_hf.loading.storage_prefetch import close

    close(getattr(model, "hf_quantizer", None))
    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        model._weight_conversions = [c for c in conversions if not any(
            isinstance(op, StorageToResident) for op in getattr(c, "operations", ()))]


def storage_dequantize_suffixes(plan: LoadPlan | None) -> dict[str, list[str]]:
    """``{storage: part key suffixes}`` of the storage-laid weights of ``plan`` (for :class:`TpdeDequantize`)."""
    if plan is None:
        return {}
    return storage_suffixes([StoredWeight(w.prefix, w.storage, {p: "" for p in w.parts})
                             for w in plan.weights.values() if w.storage is not None])
