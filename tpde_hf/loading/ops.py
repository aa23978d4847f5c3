"""Load-time conversion ops between a tpde repo on disk and a transformers model skeleton.

* :class:`TpdeDequantize` is the conversion op of ``mode="dequantize"``: it decodes each weight
  (or each group of per-expert weights) as it is read, so the dense model is never held twice;
  :class:`StackExperts` rebuilds a 3-D expert tensor from its decoded slices (in every mode);
* :func:`write_manifest` writes ``tpde_manifest.json`` for a saved repo.

Which weight goes where (the headers, the key mapping, expert stacks) is :mod:`tpde_hf.loading.plan`; its names
are re-exported here. :mod:`tpde_hf.loading.storage_ops` holds the ops for weights laid out by a base storage.

Example::

    index = read_checkpoint_index(["/repo/model.safetensors"])
    plan = build_load_plan(model, index)  # model: a skeleton on the meta device
    op = TpdeDequantize(...)              # what the quantizer hands transformers for dequantize mode
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from typing import Any

import torch
from transformers.core_model_loading import ConversionOps, WeightConverter

from tpde_hf.codec import SUFFIXES, EncodedTensor, decode_tensors, tensor_checksum
from tpde_hf.codec.registry import STORAGE_TOKEN
from tpde_hf.errors import TpdeFormatError
from tpde_hf.format import (
    MANIFEST_NAME,
    decode_expert_tensor,
    encoded_prefixes,
    expert_slice_prefix,
    make_manifest,
    manifest_entry,
    parse_expert_slice,
)
from tpde_hf.loading.plan import (  # noqa: F401  (re-exported: the public names of the load path)
    BASE_SUFFIXES,
    DELTA_SUFFIXES,
    DirectTarget,
    EncodedWeight,
    ExpertStack,
    FusedTarget,
    KeyMap,
    KeyTarget,
    LoadPlan,
    StackExperts,
    TensorInfo,
    _model_transforms,
    build_load_plan,
    read_checkpoint_index,
    read_safetensors_header,
)
from tpde_hf.storage_format import (
    META_PART,
    decode_weight,
    storage_weights,
)


# ==================================================================== dequantize-mode op
def _stem(pattern: str, suffix: str) -> str | None:
    return pattern[: -len(suffix)] if pattern.endswith(suffix) else None


class TpdeDequantize(ConversionOps):
    """Decode tpde weights while transformers reads them (``mode="dequantize"``).

    Input: ``{stem + suffix: [tensor, ...]}`` for the seven tpde suffixes (one tensor per matched
    key, e.g. one per expert), optionally with dense ``{stem + 'weight': [...]}`` entries, which pass
    through. Output: ``{stem + 'weight': [decoded, ...]}``, cast to the target parameter's dtype.
    A corrupt tensor is recorded on the quantizer and raised, naming the tensor, after loading.
    ``labels``: the names of the weights it reads, in order, for error messages (the slices of an
    :class:`ExpertStack`); by default they are derived from the parameter's name.
    """

    def __init__(self, hf_quantizer: Any, labels: list[str] | None = None,
                 storage: dict[str, list[str]] | None = None):
        self.hf_quantizer = hf_quantizer
        self.labels = labels
        self.storage = storage or {}  # base storage -> the key suffixes of its parts (``tpde_storage.S.meta`` ...)
        # storage suffixes first: ``tpde_storage.S.meta`` also ends with the resident ``meta``
        self._suffixes = [s for sfx in self.storage.values() for s in sfx] + list(SUFFIXES)

    def __deepcopy__(self, memo: dict) -> TpdeDequantize:
        # transformers deep-copies a converter for every weight: keep one shared quantizer (errors go to it)
        return TpdeDequantize(self.hf_quantizer, self.labels, self.storage)

    @torch.no_grad()
    def convert(self, input_dict: dict[str, Any], source_patterns: list[str] | None = None,
                target_patterns: list[str] | None = None, full_layer_name: str | None = None,
                model: torch.nn.Module | None = None, **kwargs: Any) -> dict[str, Any]:
        groups: dict[str, dict[str, list[torch.Tensor]]] = defaultdict(dict)
        passthrough: dict[str, Any] = {}
        for key, value in input_dict.items():
            values = value if isinstance(value, list) else [value]
            for suffix in self._suffixes:
                stem = _stem(key, suffix)
                if stem is not None and (stem == "" or stem.endswith(".")):
                    groups[stem][suffix] = values
                    break
            else:
                passthrough[key] = value
        out_dtype = _target_dtype(model, full_layer_name)
        result = dict(passthrough)
        for stem, parts in groups.items():
            label = full_layer_name or f"{stem}weight"
            storage = {s.split(".")[1] for s in parts if s.startswith(STORAGE_TOKEN + ".")}
            if storage:
                dense = self._decode_storage(stem, parts, storage, label, full_layer_name)
                if dense is None:
                    return {}
                result[f"{stem}weight"] = [d.to(out_dtype) for d in dense] if out_dtype is not None else dense
                continue
            missing = [s for s in SUFFIXES if s not in parts]
            if missing:
                raise TpdeFormatError(label, f"tpde tensors {missing} are missing from the checkpoint")
            counts = {len(v) for v in parts.values()}
            if len(counts) != 1:
                raise TpdeFormatError(label, "tpde tensors of this weight come in mismatched numbers (bad shard?)")
            n = counts.pop()
            names = self.labels if self.labels is not None and len(self.labels) == n else \
                _source_names(full_layer_name, stem, n)
            try:
                encs = [
                    EncodedTensor.from_parts(name, **{s: parts[s][i].detach().to("cpu") for s in SUFFIXES})
                    for i, name in enumerate(names)
                ]
                verify = bool(getattr(self.hf_quantizer.quantization_config, "verify", False))
                dense = decode_tensors(encs, verify=verify)
            except TpdeFormatError as exc:
                # transformers would turn an exception here into a generic "conversion issues" error:
                # record ours, load nothing (or zeros, so that a merge op can run), raise it after loading
                self.hf_quantizer.record_error(exc)
                if stem == "":
                    return {}
                dense = [_zeros_like_stored(parts["meta"][i], exc) for i in range(len(names))]
            if out_dtype is not None:
                dense = [d.to(out_dtype) for d in dense]
            result[f"{stem}weight"] = dense
        return result

    def _decode_storage(self, stem: str, parts: dict[str, list[torch.Tensor]], storage: set[str], label: str,
                        full_layer_name: str | None) -> list[torch.Tensor] | None:
        """Decode the storage-laid weights of one stem (one per matched key); None after recording an error."""
        try:
            if len(storage) != 1:
                raise TpdeFormatError(label, f"stored by several base storages at once ({sorted(storage)})")
            (name,) = storage
            token = f"{STORAGE_TOKEN}.{name}."
            by_part = {s[len(token):]: v for s, v in parts.items()}
            if META_PART not in by_part:
                raise TpdeFormatError(label, f"its {token}{META_PART} tensor is missing from the checkpoint")
            counts = {len(v) for v in by_part.values()}
            if len(counts) != 1:
                raise TpdeFormatError(label, "tpde tensors of this weight come in mismatched numbers (bad shard?)")
            n = counts.pop()
            names = self.labels if self.labels is not None and len(self.labels) == n else \
                _source_names(full_layer_name, stem, n)
            verify = bool(getattr(self.hf_quantizer.quantization_config, "verify", False))
            return [decode_weight(nm, name, {p: v[i] for p, v in by_part.items()}, verify=verify)
                    for i, nm in enumerate(names)]
        except TpdeFormatError as exc:
            self.hf_quantizer.record_error(exc)  # raised after loading, as for the resident layout
            return None

    @property
    def reverse_op(self) -> ConversionOps:
        from transformers.core_model_loading import _IdentityOp

        return _IdentityOp()


def expert_stack_dequantize_converter(st: ExpertStack, hf_quantizer: Any) -> WeightConverter:
    """``mode="dequantize"``: decode the slices of ``st`` as transformers reads them, then stack them into its
    target (one converter per 3-D expert tensor, handed to transformers by the quantizer)."""
    token = expert_slice_prefix(st.renamed, 0, st.transposed)[: -len("0")]
    suffixes = sorted({s for w in st.weights for s in w.storage_suffixes()})
    # exactly this tensor's slices (a suffix is left unescaped: TpdeDequantize matches the pattern's tail)
    sources = [re.escape(token) + r"\d+\." + s for s in suffixes]
    labels = [w.name for w in st.weights]
    storage = {w.storage: [s for s in suffixes if s.startswith(f"{STORAGE_TOKEN}.{w.storage}.")]
               for w in st.weights if w.storage is not None}
    return WeightConverter(sources, st.target,
                           [TpdeDequantize(hf_quantizer, labels, storage or None), st.stack_op()],
                           force_cpu=True)


def _zeros_like_stored(meta: torch.Tensor, exc: Exception) -> torch.Tensor:
    from tpde_hf.codec.ordinal import CODE_DTYPES

    vals = [int(v) for v in meta.flatten().tolist()]
    if len(vals) < 4 or vals[1] not in CODE_DTYPES or vals[2] <= 0 or vals[3] <= 0 or vals[2] * vals[3] > 1 << 34:
        raise exc
    return torch.zeros((vals[2], vals[3]), dtype=CODE_DTYPES[vals[1]])


def _source_names(full_layer_name: str | None, stem: str, n: int) -> list[str]:
    base = full_layer_name or "weight"
    if stem == "":
        return [base] * n
    return [f"{base} <- {stem.strip('.')}.weight [{i}]" for i in range(n)]


def _target_dtype(model: torch.nn.Module | None, full_layer_name: str | None) -> torch.dtype | None:
    if model is None or full_layer_name is None:
        return None
    try:
        param = model.get_parameter(full_layer_name)
    except AttributeError:
        return None
    return param.dtype if param.is_floating_point() else None


# ==================================================================== manifest of a saved repo
def write_manifest(folder: str) -> dict:
    """Write ``tpde_manifest.json`` for the safetensors shards in ``folder`` and return it.

    Encoded weights take dtype, shape and checksum from their ``meta``; a 3-D expert tensor stored one
    weight per expert is decoded and hashed whole (its entry describes the original 3-D tensor); every
    other tensor is hashed as stored. Example::

        model.save_pretrained(out)   # a tpde model saves its parts; the manifest is added
        write_manifest(out)
    """
    from contextlib import ExitStack

    from safetensors import safe_open

    from tpde_hf.codec.ordinal import CODE_DTYPES
    from tpde_hf.format import dtype_name

    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    entries: dict[str, dict] = {}
    with ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(os.path.join(folder, f), framework="pt")) for f in files}
        where = {k: fh for fh in handles.values() for k in fh.keys()}
        prefixes = encoded_prefixes(where)
        part_keys = {f"{p}.{s}" for p in prefixes for s in SUFFIXES}
        stored = storage_weights(where)  # weights laid out by a base storage: their meta is a storage part
        part_keys.update(k for w in stored.values() for k in w.parts.values())
        meta_keys = {**{p: f"{p}.meta" for p in prefixes}, **{p: w.parts[META_PART] for p, w in stored.items()}}
        n_experts: dict[str, int] = {}  # 3-D expert tensor -> 1 + its highest expert index stored
        for p in meta_keys:
            if (parsed := parse_expert_slice(p)) is not None:
                n_experts[parsed[0]] = max(n_experts.get(parsed[0], 0), parsed[1] + 1)
                continue
            meta = where[meta_keys[p]].get_tensor(meta_keys[p])
            if meta.numel() < 10:
                raise TpdeFormatError(f"{p}.weight", "malformed meta tensor")
            _, dcode, out_f, in_f = (int(v) for v in meta[:4])
            dtype = dtype_name(CODE_DTYPES[dcode])
            entries[f"{p}.weight"] = manifest_entry(dtype, (out_f, in_f), int(meta[9]), True)
        for key, n in n_experts.items():
            tensor = decode_expert_tensor(key, n, lambda k: where[k].get_tensor(k), where.keys())
            entries[key] = manifest_entry(dtype_name(tensor.dtype), tensor.shape, tensor_checksum(tensor), True)
        for k, fh in where.items():
            if k not in part_keys:
                t = fh.get_tensor(k)
                entries[k] = manifest_entry(dtype_name(t.dtype), t.shape, tensor_checksum(t), False)
    manifest = make_manifest(entries)
    with open(os.path.join(folder, MANIFEST_NAME), "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1)
        fh.write("\n")
    return manifest
