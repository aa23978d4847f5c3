"""Load-time plumbing between a tpde repo on disk and a transformers model skeleton.

* :func:`read_checkpoint_index` reads the safetensors headers (a few KB per shard, no tensor
  data) and checks every shard is complete, naming the file that is not;
* :func:`build_load_plan` maps every weight stored in tpde form to its place in the model, through
  the model's own key renamings and weight converters (e.g. per-expert MoE weights that
  transformers 5.x fuses into 3-D parameters);
* :class:`TpdeDequantize` is the conversion op of ``mode="dequantize"``: it decodes each weight
  (or each group of per-expert weights) as it is read, so the dense model is never held twice;
* :func:`write_manifest` writes ``tpde_manifest.json`` for a saved repo.

Example::

    index = read_checkpoint_index(["/repo/model.safetensors"])
    plan = build_load_plan(model, index)  # model: a skeleton on the meta device
"""

from __future__ import annotations

import json
import os
import struct
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.core_model_loading import (
    ConversionOps,
    WeightConverter,
    WeightRenaming,
    dot_natural_key,
    rename_source_key,
)

from tpde_hf.codec import SUFFIXES, EncodedTensor, decode_tensors, tensor_checksum
from tpde_hf.errors import TpdeFormatError
from tpde_hf.format import MANIFEST_NAME, SAFETENSORS_DTYPES, encoded_prefixes, make_manifest, manifest_entry

DELTA_SUFFIXES = ("delta", "lanes", "tables")
BASE_SUFFIXES = tuple(s for s in SUFFIXES if s not in DELTA_SUFFIXES)
_MAX_HEADER = 512 * 1024 * 1024


# ==================================================================== checkpoint headers
@dataclass(frozen=True)
class TensorInfo:
    """Where one stored tensor lives and what it is (from the safetensors header only)."""

    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]


def read_safetensors_header(path: str) -> dict[str, TensorInfo]:
    """Parse one shard's header and check that the file holds every byte it announces.

    Raises :class:`TpdeFormatError` naming ``path`` for a truncated or corrupt shard.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise TpdeFormatError(path, "corrupt safetensors shard: file too short for a header")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER):
                raise TpdeFormatError(path, f"corrupt safetensors shard: header length {n} exceeds file size {size}")
            header = json.loads(fh.read(n).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TpdeFormatError(path, f"corrupt safetensors shard: unreadable header ({exc})") from None
    if not isinstance(header, dict):
        raise TpdeFormatError(path, "corrupt safetensors shard: header is not a JSON object")
    data_len = size - 8 - n
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = getattr(torch, SAFETENSORS_DTYPES[entry["dtype"]])
            shape = tuple(int(s) for s in entry["shape"])
            start, end = (int(v) for v in entry["data_offsets"])
        except (KeyError, TypeError, ValueError, AttributeError):
            raise TpdeFormatError(path, f"corrupt safetensors shard: bad header entry for {name!r}") from None
        numel = 1
        for s in shape:
            numel *= s
        if end - start != numel * torch.empty((), dtype=dtype).element_size() or start < 0:
            raise TpdeFormatError(path, f"corrupt safetensors shard: {name} has inconsistent data offsets")
        if end > data_len:
            raise TpdeFormatError(
                path, f"truncated safetensors shard: {name} ends at byte {end} but the file holds {data_len} data bytes"
            )
        out[name] = TensorInfo(path, dtype, shape)
    return out


def read_checkpoint_index(files: Iterable[str]) -> dict[str, TensorInfo]:
    """Merge the headers of all shards: ``{tensor name: TensorInfo}``."""
    index: dict[str, TensorInfo] = {}
    for path in files:
        if not str(path).endswith(".safetensors"):
            raise TpdeFormatError(str(path), "tpde repos are stored as safetensors; this checkpoint file is not one")
        index.update(read_safetensors_header(str(path)))
    return index


# ==================================================================== the load plan
@dataclass
class EncodedWeight:
    """One weight stored in tpde form: its checkpoint prefix and the header entry of each part."""

    prefix: str
    parts: dict[str, TensorInfo]

    @property
    def name(self) -> str:
        """The original tensor name, used in every error message (``'...up_proj.weight'``)."""
        return f"{self.prefix}.weight"

    @property
    def file(self) -> str:
        return self.parts["meta"].file

    def specs(self, suffixes: Iterable[str]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {s: (self.parts[s].dtype, self.parts[s].shape) for s in suffixes}


@dataclass
class DirectTarget:
    """A stored weight that is exactly one module's ``weight`` (``nn.Linear``, ``Conv1D`` or other)."""

    module_path: str
    weight: EncodedWeight


@dataclass
class FusedTarget:
    """A model parameter built from several stored weights by one of the model's converters.

    ``sources`` maps each of the converter's source patterns to the stored weights it collects,
    in checkpoint order (e.g. one per expert); ``storage_paths`` gives, for each stored weight,
    the module path (relative to the host module) where its parts are loaded.
    """

    host_path: str
    param_name: str
    converter: WeightConverter
    sources: dict[str, list[EncodedWeight]] = field(default_factory=dict)
    storage_paths: dict[str, str] = field(default_factory=dict)


@dataclass
class LoadPlan:
    direct: list[DirectTarget]
    fused: list[FusedTarget]
    weights: dict[str, EncodedWeight]
    dense_fused_targets: set[str]

    @property
    def empty(self) -> bool:
        return not self.weights


def _model_transforms(model) -> tuple[list[WeightRenaming], list[WeightConverter]]:
    from transformers.conversion_mapping import get_model_conversion_mapping

    mapping = get_model_conversion_mapping(model)
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    return renamings, converters


def build_load_plan(model: torch.nn.Module, index: dict[str, TensorInfo]) -> LoadPlan:
    """Map every tpde-stored weight of ``index`` to the module or fused parameter it loads into.

    ``model`` is the freshly built skeleton (before any module replacement).
    """
    keys = sorted(index, key=dot_natural_key)
    prefixes = encoded_prefixes(keys)
    weights = {p: EncodedWeight(p, {s: index[f"{p}.{s}"] for s in SUFFIXES}) for p in prefixes}
    renamings, converters = _model_transforms(model)
    meta_sd = model.state_dict()
    bmp = model.base_model_prefix
    pattern_to_converter = {pat: c for c in converters for pat in c.source_patterns}

    direct: list[DirectTarget] = []
    fused: dict[str, FusedTarget] = {}
    for prefix in sorted(prefixes, key=dot_natural_key):
        w = weights[prefix]
        target, pattern = rename_source_key(w.name, renamings, converters, bmp, meta_sd)
        if pattern is None:
            if target not in meta_sd or not target.endswith(".weight"):
                continue  # the model has no such weight: transformers reports the keys as unexpected
            direct.append(DirectTarget(target[: -len(".weight")], w))
            continue
        if target not in meta_sd:
            continue
        converter = pattern_to_converter[pattern]
        host_path, _, param_name = target.rpartition(".")
        ft = fused.setdefault(target, FusedTarget(host_path, param_name, converter))
        ft.sources.setdefault(pattern, []).append(w)
        storage = _renamed_prefix(prefix, renamings, bmp, target)
        if not storage.startswith(host_path + "."):
            raise TpdeFormatError(
                w.name,
                f"cannot place this tpde weight under {host_path} (it renames to {storage}); use mode='dequantize'",
            )
        ft.storage_paths[prefix] = storage[len(host_path) + 1 :]

    # Fused parameters that also collect dense (non-tpde) tensors cannot be held in tpde form.
    dense_fused: set[str] = set()
    encoded_keys = {f"{p}.{s}" for p in prefixes for s in SUFFIXES}
    for key in keys:
        if key in encoded_keys or not key.endswith(".weight"):
            continue
        target, pattern = rename_source_key(key, renamings, converters, bmp, meta_sd)
        if pattern is not None and target in fused:
            dense_fused.add(target)
    return LoadPlan(direct, list(fused.values()), weights, dense_fused)


def _renamed_prefix(prefix: str, renamings: list[WeightRenaming], bmp: str, target: str) -> str:
    """Where ``prefix.qweight`` lands after the model's renamings, with the base-model prefix fixed like ``target``."""
    renamed, _ = rename_source_key(f"{prefix}.qweight", renamings, [])
    renamed = renamed[: -len(".qweight")]
    if bmp:
        if target.startswith(bmp + ".") and not renamed.startswith(bmp + "."):
            renamed = f"{bmp}.{renamed}"
        elif not target.startswith(bmp + ".") and renamed.startswith(bmp + "."):
            renamed = renamed[len(bmp) + 1 :]
    return renamed


# ==================================================================== dequantize-mode op
def _stem(pattern: str, suffix: str) -> str | None:
    return pattern[: -len(suffix)] if pattern.endswith(suffix) else None


class TpdeDequantize(ConversionOps):
    """Decode tpde weights while transformers reads them (``mode="dequantize"``).

    Input: ``{stem + suffix: [tensor, ...]}`` for the seven tpde suffixes (one tensor per matched
    key, e.g. one per expert), optionally with dense ``{stem + 'weight': [...]}`` entries, which pass
    through. Output: ``{stem + 'weight': [decoded, ...]}``, cast to the target parameter's dtype.
    A corrupt tensor is recorded on the quantizer and raised, naming the tensor, after loading.
    """

    def __init__(self, hf_quantizer: Any):
        self.hf_quantizer = hf_quantizer

    def __deepcopy__(self, memo: dict) -> TpdeDequantize:
        # transformers deep-copies a converter for every weight: keep one shared quantizer (errors go to it)
        return TpdeDequantize(self.hf_quantizer)

    @torch.no_grad()
    def convert(self, input_dict: dict[str, Any], source_patterns: list[str] | None = None,
                target_patterns: list[str] | None = None, full_layer_name: str | None = None,
                model: torch.nn.Module | None = None, **kwargs: Any) -> dict[str, Any]:
        groups: dict[str, dict[str, list[torch.Tensor]]] = defaultdict(dict)
        passthrough: dict[str, Any] = {}
        for key, value in input_dict.items():
            values = value if isinstance(value, list) else [value]
            for suffix in SUFFIXES:
                stem = _stem(key, suffix)
                if stem is not None and (stem == "" or stem.endswith(".")):
                    groups[stem][suffix] = values
                    break
            else:
                passthrough[key] = value
        out_dtype = _target_dtype(model, full_layer_name)
        result = dict(passthrough)
        for stem, parts in groups.items():
            missing = [s for s in SUFFIXES if s not in parts]
            label = full_layer_name or f"{stem}weight"
            if missing:
                raise TpdeFormatError(label, f"tpde tensors {missing} are missing from the checkpoint")
            counts = {len(v) for v in parts.values()}
            if len(counts) != 1:
                raise TpdeFormatError(label, "tpde tensors of this weight come in mismatched numbers (bad shard?)")
            names = _source_names(full_layer_name, stem, counts.pop())
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

    @property
    def reverse_op(self) -> ConversionOps:
        from transformers.core_model_loading import _IdentityOp

        return _IdentityOp()


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

    Encoded weights take dtype, shape and checksum from their ``meta``; every other tensor is
    hashed as stored. Example::

        model.save_pretrained(out)   # a tpde model saves its parts; the manifest is added
        write_manifest(out)
    """
    from safetensors import safe_open

    from tpde_hf.codec.ordinal import CODE_DTYPES
    from tpde_hf.format import dtype_name

    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    entries: dict[str, dict] = {}
    for fname in files:
        path = os.path.join(folder, fname)
        with safe_open(path, framework="pt") as fh:
            keys = list(fh.keys())
            prefixes = set(encoded_prefixes(keys))
            part_keys = {f"{p}.{s}" for p in prefixes for s in SUFFIXES}
            for p in prefixes:
                meta = fh.get_tensor(f"{p}.meta")
                if meta.numel() < 10:
                    raise TpdeFormatError(f"{p}.weight", "malformed meta tensor")
                _, dcode, out_f, in_f = (int(v) for v in meta[:4])
                dtype = dtype_name(CODE_DTYPES[dcode])
                entries[f"{p}.weight"] = manifest_entry(dtype, (out_f, in_f), int(meta[9]), True)
            for k in keys:
                if k in part_keys:
                    continue
                t = fh.get_tensor(k)
                entries[k] = manifest_entry(dtype_name(t.dtype), t.shape, tensor_checksum(t), False)
    manifest = make_manifest(entries)
    with open(os.path.join(folder, MANIFEST_NAME), "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1)
        fh.write("\n")
    return manifest
