"""Load-time decode of reference-coded tensors, as transformers weight conversions (every mode).

A tensor ``K`` stored as ``K.tpde_codec.<codec>.blob`` is matched by one :class:`WeightConverter` per reference
codec, whose source pattern is the stored suffix and whose target is ``K`` itself (the model's own key renamings
of ``K`` carry over: they run first). Its op, :class:`ReferenceDecode`, resolves the reference once per load
(:class:`LoadReference`: the recorded commit, through the Hugging Face cache; offline mode honoured), checks each
reference tensor it uses against the recorded xxh3, and decodes ``K`` bit for bit. A failure is recorded on the
quantizer and raised after loading with its own message (transformers would otherwise report a generic
conversion issue), naming the reference.

Example::

    convs = reference_converters(hf_quantizer)   # prepended by TpdeHfQuantizer.update_weight_conversions
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from transformers.core_model_loading import ConversionOps, WeightConverter

from tpde_hf.codec.registry import CODEC_TOKEN, TENSOR_CODECS, CodecContext
from tpde_hf.errors import TpdeFormatError
from tpde_hf.reference.resolve import ReferenceError, ResolvedReference, check_reference_tensor, resolve_reference

PART = "blob"


def reference_info(hf_quantizer: Any) -> dict | None:
    """``quantization_config.reference`` of the repo being loaded, or None."""
    info = getattr(hf_quantizer.quantization_config, "reference", None)
    return info if isinstance(info, dict) else None


def has_reference_parts(keys: Any) -> bool:
    """Whether any stored key is a reference-coded part (a repo may hold no standalone tpde weight at all)."""
    from tpde_hf.reference import CODEC_NAMES

    marks = tuple(f".{CODEC_TOKEN}.{c}.{PART}" for c in CODEC_NAMES)
    return any(k.endswith(marks) for k in keys)


class LoadReference:
    """The reference of one load: resolved on first use, each tensor checked once against its checksum."""

    def __init__(self, info: dict, token: Any = None):
        if not isinstance(info.get("model"), str) or not isinstance(info.get("tensors"), list):
            raise TpdeFormatError("config.json", "quantization_config.reference is malformed (needs 'model' and "
                                                 "'tensors')")
        self.info = info
        self.token = token
        self._ref: ResolvedReference | None = None
        self._lock = threading.Lock()

    @property
    def label(self) -> str:
        i = self.info
        return f"{i['model']}@{i['commit']}" if i.get("commit") else i["model"]

    def resolved(self) -> ResolvedReference:
        with self._lock:
            if self._ref is None:
                i = self.info
                # a Hub reference is fetched at the recorded commit: the bytes it was coded against
                self._ref = resolve_reference(i["model"], revision=i.get("commit") or i.get("revision"),
                                              token=self.token)
            return self._ref

    def tensor(self, index: int, key: str) -> torch.Tensor:
        tensors = self.info["tensors"]
        if not 0 <= index < len(tensors) or not isinstance(tensors[index], list) or len(tensors[index]) != 2:
            raise TpdeFormatError(key, f"names reference tensor #{index}, which config.json does not list")
        name, digest = tensors[index]
        return check_reference_tensor(self.resolved(), name, digest)


def load_reference(hf_quantizer: Any) -> LoadReference:
    ref = getattr(hf_quantizer, "_tpde_reference", None)
    if ref is None:
        ref = LoadReference(reference_info(hf_quantizer) or {}, getattr(hf_quantizer, "_tpde_token", None))
        hf_quantizer._tpde_reference = ref
    return ref


class ReferenceDecode(ConversionOps):
    """Decode one reference-coded tensor: input ``{pattern: [blob]}``, output ``{full_layer_name: tensor}``."""

    def __init__(self, hf_quantizer: Any, codec: str):
        self.hf_quantizer = hf_quantizer
        self.codec = codec

    def __deepcopy__(self, memo: dict) -> ReferenceDecode:
        return ReferenceDecode(self.hf_quantizer, self.codec)  # one shared quantizer: errors go to it

    @torch.no_grad()
    def convert(self, input_dict: dict[str, Any], source_patterns: list[str] | None = None,
                target_patterns: list[str] | None = None, full_layer_name: str | None = None,
                model: torch.nn.Module | None = None, **kwargs: Any) -> dict[str, Any]:
        import numpy as np

        from tpde_hf.loading import _target_dtype
        from tpde_hf.reference import codec as C

        key = full_layer_name or "?"
        try:
            values = [v for vs in input_dict.values() for v in (vs if isinstance(vs, list) else [vs])]
            if len(values) != 1:
                raise TpdeFormatError(key, f"{len(values)} {self.codec} blobs load into this parameter, expected 1")
            blob = values[0].detach().to("cpu")
            h, _, _ = C.read_header(blob, self.codec, key)
            ref = load_reference(self.hf_quantizer)
            reference = ref.tensor(int(np.int64(h[3])), key)
            out = TENSOR_CODECS.get(self.codec, key).decode({PART: blob}, CodecContext(key, reference))
        except TpdeFormatError as exc:
            self.hf_quantizer.record_error(exc)
            return {}
        dtype = _target_dtype(model, full_layer_name)
        if dtype is not None and out.is_floating_point() and out.dtype != dtype:
            out = out.to(dtype)
        return {key: out}

    @property
    def reverse_op(self) -> ConversionOps:
        from transformers.core_model_loading import _IdentityOp

        return _IdentityOp()


def reference_converters(hf_quantizer: Any) -> list[WeightConverter]:
    """One converter per reference codec: ``K.tpde_codec.<codec>.blob`` -> ``K`` (decoded)."""
    from tpde_hf.reference import CODEC_NAMES

    return [WeightConverter([rf"\.{CODEC_TOKEN}\.{c}\.{PART}"], "", [ReferenceDecode(hf_quantizer, c)],
                            force_cpu=True) for c in CODEC_NAMES]


def strip_converters(model: torch.nn.Module) -> None:
    """Drop the reference converters from the model's saved conversions: a loaded model saves dense tensors."""
    convs = getattr(model, "_weight_conversions", None)
    if convs:
        model._weight_conversions = [c for c in convs if not any(isinstance(op, ReferenceDecode)
                                                                 for op in getattr(c, "operations", []))]


__all__ = ["ReferenceDecode", "ReferenceError", "has_reference_parts", "reference_converters", "strip_converters"]
