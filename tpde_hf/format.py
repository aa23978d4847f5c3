"""The repository-level format shared by conversion, loading and verification.

A tpde repo is an ordinary Hugging Face model folder:

* ``config.json`` carries ``quantization_config`` (see :func:`quantization_config_dict`);
* safetensors shards hold, for every converted linear ``X`` (weight ``X.weight``), the tensors
  ``X.qweight, X.scales, X.zeros, X.delta, X.lanes, X.tables, X.meta`` (see ``codec.tensor_codec``;
  what ``delta, lanes, tables`` hold depends on the delta code, ``rans`` or ``class-width``),
  and every other tensor unchanged (biases, norms, embeddings, a dense lm_head);
* ``tpde_manifest.json`` records, for every *original* tensor, its dtype, shape and checksum,
  so a load or ``tpde verify`` can prove bit-exactness.

Example::

    sd = encode_state_dict(model.state_dict(), convertible_weights(model))
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

from tpde_hf.codec import SUFFIXES, CodecParams, EncodedTensor, encode_tensor

QUANT_METHOD = "tpde"
MANIFEST_NAME = "tpde_manifest.json"
RUNTIME_MODES = ("lossless", "lossless-offload", "base", "dequantize")
DEFAULT_KEEP_DENSE = ("lm_head",)


def module_prefix(weight_name: str) -> str:
    """``'model.layers.0.mlp.up_proj.weight'`` -> ``'model.layers.0.mlp.up_proj'``."""
    if not weight_name.endswith(".weight"):
        raise ValueError(f"{weight_name} is not a weight name")
    return weight_name[: -len(".weight")]


def encoded_keys(prefix: str) -> list[str]:
    return [f"{prefix}.{s}" for s in SUFFIXES]


def is_encoded_prefix(keys: Iterable[str], prefix: str) -> bool:
    keys = set(keys)
    return all(k in keys for k in encoded_keys(prefix))


def encoded_prefixes(keys: Iterable[str]) -> list[str]:
    """Module prefixes that are stored in tpde form among ``keys``."""
    keys = list(keys)
    metas = [k[: -len(".meta")] for k in keys if k.endswith(".meta")]
    return [p for p in metas if is_encoded_prefix(keys, p)]


def convertible_weights(model: torch.nn.Module, keep_dense: Iterable[str] = DEFAULT_KEEP_DENSE,
                        include: str | None = None, exclude: str | None = None) -> list[str]:
    """Names of ``nn.Linear`` weights to convert (``*.weight``), skipping modules kept dense.

    ``keep_dense`` entries match a module name or any of its dotted suffixes (``lm_head``);
    ``include``/``exclude`` are regular expressions on the module name.
    """
    keep = tuple(keep_dense)
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if any(name == k or name.endswith("." + k) for k in keep):
            continue
        if include and not re.search(include, name):
            continue
        if exclude and re.search(exclude, name):
            continue
        names.append(f"{name}.weight")
    return names


def quantization_config_dict(params: CodecParams, source_dtype: torch.dtype,
                             modules_to_not_convert: list[str]) -> dict:
    """The ``quantization_config`` entry written to ``config.json``: ``format_version`` is the oldest
    version that holds ``params`` (1 for a rANS delta, 2 for class-width), as for each tensor's meta."""
    rans_fields = ({"lane_len": params.lane_len, "prob_bits": params.prob_bits, "sym_k": params.sym_k,
                    "sym_m": params.sym_m} if params.delta_code == "rans" else {})  # class-width has none
    return {
        "quant_method": QUANT_METHOD,
        "format_version": params.format_version,
        "bits": 4,
        "group_size": params.group_size,
        "delta_code": params.delta_code,
        **rans_fields,
        "source_dtype": str(source_dtype).replace("torch.", ""),
        "modules_to_not_convert": list(modules_to_not_convert),
    }


def encode_state_dict(state_dict: dict[str, torch.Tensor], weights: Iterable[str],
                      params: CodecParams | None = None) -> dict[str, torch.Tensor]:
    """Return a new state dict where each name in ``weights`` is replaced by its tpde tensors."""
    weights = set(weights)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if name in weights:
            prefix = module_prefix(name)
            out.update(encode_tensor(tensor, params, name).to_state_dict(prefix))
        else:
            out[name] = tensor
    return out


def read_encoded(state_dict: dict[str, torch.Tensor], prefix: str) -> EncodedTensor:
    """Validated :class:`EncodedTensor` for ``prefix``, named after its original weight."""
    return EncodedTensor.from_state_dict(state_dict, prefix, name=f"{prefix}.weight")


# ==================================================================== manifest and repo files
MANIFEST_FORMAT_VERSION = 1
CONVERSION_REPORT_NAME = "tpde_conversion.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"

# safetensors header dtype strings <-> torch dtype names (as written in the manifest).
SAFETENSORS_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16", "U32": "uint32",
    "I32": "int32", "U64": "uint64", "I64": "int64", "F16": "float16", "BF16": "bfloat16", "F32": "float32",
    "F64": "float64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
CODEC_DTYPES = ("bfloat16", "float16", "float32")  # the source dtypes the codec accepts


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``'bfloat16'`` (the spelling used in the manifest and configs)."""
    return str(dtype).replace("torch.", "")


def manifest_entry(dtype: str, shape: Iterable[int], checksum: int, encoded: bool) -> dict:
    """One ``tensors`` entry of ``tpde_manifest.json`` (``checksum`` is :func:`tensor_checksum`)."""
    return {"dtype": dtype, "shape": [int(s) for s in shape], "checksum": int(checksum), "encoded": bool(encoded)}


def make_manifest(entries: dict[str, dict]) -> dict:
    """The whole manifest: ``{"format_version": 1, "tensors": {original_name: entry}}``, names sorted."""
    return {"format_version": MANIFEST_FORMAT_VERSION, "tensors": {k: entries[k] for k in sorted(entries)}}


def validate_manifest(manifest: object, source: str = MANIFEST_NAME) -> dict[str, dict]:
    """Check a parsed manifest's structure; return its ``tensors`` mapping.

    Raises :class:`~tpde_hf.errors.TpdeFormatError` naming ``source`` and the faulty entry.

    Example::

        tensors = validate_manifest(json.loads(Path(repo, MANIFEST_NAME).read_text()))
    """
    from tpde_hf.errors import TpdeFormatError

    if not isinstance(manifest, dict) or not isinstance(manifest.get("tensors"), dict):
        raise TpdeFormatError(source, "not a tpde manifest (expected an object with a 'tensors' mapping)")
    version = manifest.get("format_version")
    if version != MANIFEST_FORMAT_VERSION:
        raise TpdeFormatError(
            source, f"manifest format_version {version!r} unsupported (expected {MANIFEST_FORMAT_VERSION})"
        )
    for name, e in manifest["tensors"].items():
        ok = (
            isinstance(e, dict)
            and isinstance(e.get("dtype"), str)
            and isinstance(e.get("shape"), list)
            and all(isinstance(s, int) and s >= 0 for s in e["shape"])
            and isinstance(e.get("checksum"), int)
            and isinstance(e.get("encoded"), bool)
        )
        if not ok:
            raise TpdeFormatError(source, f"malformed manifest entry for {name!r}: {e!r}")
    return manifest["tensors"]
