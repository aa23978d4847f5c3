"""The repository-level format shared by conversion, loading and verification.

A tpde repo is an ordinary Hugging Face model folder:

* ``config.json`` carries ``quantization_config`` (see :func:`quantization_config_dict`);
* safetensors shards hold, for every converted linear ``X`` (weight ``X.weight``), the tensors
  ``X.qweight, X.scales, X.zeros, X.delta, X.lanes, X.tables, X.meta`` (see ``codec.encoded``;
  what ``delta, lanes, tables`` hold depends on the delta code, ``rans`` or ``class-width``),
  and every other tensor unchanged (biases, norms, embeddings, a dense lm_head); an MoE expert
  tensor stored as one 3-D tensor ``K`` holds one such set per expert, ``K.tpde_expert.<e>.qweight``
  ... (see :func:`expert_slice_prefix`);
* a repo converted with a base storage (``tpde convert --storage S``, ``quantization_config.storage``) stores
  each converted weight's parts as ``X.tpde_storage.S.<part>`` instead of the seven tensors
  (:mod:`tpde_hf.storage_format`); the loader rebuilds the resident tensors in every mode;
* ``tpde_manifest.json`` records, for every *original* tensor, its dtype, shape and checksum,
  so a load or ``tpde verify`` can prove bit-exactness (a 3-D expert tensor: one entry, its 3-D shape
  and the checksum of the whole tensor).

Example::

    sd = encode_state_dict(model.state_dict(), convertible_weights(model))
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable

import torch

from tpde_hf.codec import SUFFIXES, CodecParams, EncodedTensor, decode_tensors, encode_tensor, tensor_checksum
from tpde_hf.integrity import ALGO as INTEGRITY_ALGO

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


# ==================================================================== MoE experts stored as one 3-D tensor
#: A 3-D expert tensor ``K`` (``[E, A, B]``: GPT-OSS ``experts.gate_up_proj``, GraniteMoE ``input_linear.weight``)
#: is stored as one 2-D tpde weight per expert, with the prefix ``K.<token>.<e>``. The token says how expert ``e``
#: is held: ``tpde_expert`` as stored (``K[e]``, ``[A, B]``), ``tpde_expert_t`` transposed (``K[e].T``, ``[B, A]``,
#: for models that compute ``x @ K[e]``: the 4-bit groups then run along ``A``, the input dimension). The prefix
#: starts with ``K.``, so the model's own renamings of ``K`` carry over to the parts, which land under the 3-D
#: parameter's name; ``K`` is a tensor, so no real tensor of the checkpoint is named ``K.<anything>``.
EXPERT_TOKENS = {"tpde_expert": False, "tpde_expert_t": True}
_EXPERT_SLICE = re.compile(r"^(?P<key>.+)\.(?P<token>tpde_expert|tpde_expert_t)\.(?P<index>0|[1-9][0-9]*)$")


def expert_slice_prefix(key: str, index: int, transposed: bool) -> str:
    """The prefix of expert ``index`` of the 3-D tensor ``key``.

    Example: ``expert_slice_prefix("mlp.experts.down_proj", 3, True)`` -> ``'mlp.experts.down_proj.tpde_expert_t.3'``.
    """
    return f"{key}.{'tpde_expert_t' if transposed else 'tpde_expert'}.{index}"


def parse_expert_slice(prefix: str) -> tuple[str, int, bool] | None:
    """``(key, expert index, transposed)`` of an expert-slice prefix, or None for any other prefix.

    Example: ``parse_expert_slice("m.experts.down_proj.tpde_expert.3")`` -> ``('m.experts.down_proj', 3, False)``.
    """
    m = _EXPERT_SLICE.match(prefix)
    return (m["key"], int(m["index"]), EXPERT_TOKENS[m["token"]]) if m else None


def expert_slice(tensor: torch.Tensor, index: int, transposed: bool) -> torch.Tensor:
    """Expert ``index`` of a 3-D tensor as it is encoded (2-D, contiguous). Example: ``expert_slice(w, 0, True)``."""
    part = tensor[index]
    return part.mT.contiguous() if transposed else part.contiguous()


def as_encoded(weight_name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The 2-D matrix the codec encodes for the stored slice ``weight_name`` (``prefix.weight``): a transposed
    expert slice, read from the source as ``K[e]``, is encoded as ``K[e].T``; anything else as it is."""
    parsed = parse_expert_slice(weight_name[: -len(".weight")]) if weight_name.endswith(".weight") else None
    return tensor.mT.contiguous() if parsed is not None and parsed[2] else tensor


def stack_expert_slices(slices: list[torch.Tensor], transposed: bool) -> torch.Tensor:
    """The 3-D tensor ``[E, A, B]`` from its decoded expert slices (each ``[A, B]``, or ``[B, A]`` when transposed):
    a new contiguous tensor, bit for bit the original. Example: ``stack_expert_slices([w0, w1], False)``."""
    return torch.stack([s.mT if transposed else s for s in slices], dim=0)


def expert_slice_keys(key: str, n_experts: int, keys: Iterable[str]) -> tuple[bool, list[str]] | None:
    """``(transposed, slice prefixes in expert order)`` of the 3-D tensor ``key`` among stored ``keys``, when all
    ``n_experts`` slices are stored in one orientation (every part present); else None."""
    from tpde_hf.storage_format import expected_part_keys

    keys = set(keys)
    for transposed in (False, True):
        prefixes = [expert_slice_prefix(key, e, transposed) for e in range(n_experts)]
        if prefixes and all(all(k in keys for k in expected_part_keys(keys, p).values()) for p in prefixes):
            return transposed, prefixes
    return None


def expert_part_keys(key: str, n_experts: int, stored: Collection[str]) -> list[str]:
    """Every stored key the 3-D tensor ``key`` needs (its slices' parts, in the orientation stored; when slices
    are missing, in the orientation of most of the parts present, so that a caller can list the missing ones)."""
    from tpde_hf.storage_format import expected_part_keys

    def keys(transposed: bool) -> list[str]:  # each slice: its resident tensors, or its base storage's parts
        return [k for e in range(n_experts) for k in expected_part_keys(stored, expert_slice_prefix(key, e, transposed))
                .values()]

    plain, transposed = keys(False), keys(True)
    return transposed if sum(k in stored for k in transposed) > sum(k in stored for k in plain) else plain


def decode_expert_tensor(key: str, n_experts: int, read: Callable[[str], torch.Tensor], stored: Collection[str],
                         verify: bool = True) -> torch.Tensor:
    """The 3-D expert tensor ``key`` rebuilt from its ``n_experts`` stored slices (``read(stored_key)`` gives a
    stored tensor; ``stored``: every stored key). ``verify``: check each slice against its own checksum.

    Raises :class:`~tpde_hf.errors.TpdeFormatError` naming the tensor, and the expert where one is at fault.
    Example::

        w = decode_expert_tensor("m.experts.down_proj", 4, sd.__getitem__, sd.keys())
    """
    from tpde_hf.errors import TpdeFormatError

    found = expert_slice_keys(key, n_experts, stored)
    if found is None:
        present = sorted({p[1] for k in stored if (p := parse_expert_slice(k.rpartition(".")[0])) and p[0] == key})
        raise TpdeFormatError(key, f"its {n_experts} expert slices are not all stored in one orientation "
                                   f"(experts found: {present})")
    from tpde_hf.storage_format import decode_weight, expected_part_keys, split_suffixes

    transposed, prefixes = found
    slices: list[torch.Tensor | None] = [None] * len(prefixes)
    encs, at = [], []
    for e, p in enumerate(prefixes):
        storage, parts = split_suffixes(expected_part_keys(stored, p))
        if storage is not None:  # laid out by a base storage: its own decode
            slices[e] = decode_weight(f"{key} [expert {e}]", storage, {q: read(k) for q, k in parts.items()}, verify)
            continue
        encs.append(EncodedTensor.from_parts(f"{key} [expert {e}]", **{s: read(f"{p}.{s}") for s in SUFFIXES}))
        at.append(e)
    for e, w in zip(at, decode_tensors(encs, verify=verify), strict=True):
        slices[e] = w
    return stack_expert_slices(slices, transposed)


def expert_entry_failures(name: str, entry: dict, read: Callable[[str], torch.Tensor],
                          stored: Collection[str]) -> list[str]:
    """What ``tpde verify`` finds wrong with the 3-D expert tensor of manifest ``entry`` (empty: bit-exact).

    Each slice is decoded and checked against its own checksum (a damaged slice is named, expert included),
    then the rebuilt 3-D tensor against the manifest's dtype, shape and checksum of the original.
    """
    from tpde_hf.errors import TpdeFormatError

    try:
        w = decode_expert_tensor(name, entry["shape"][0], read, stored)
    except TpdeFormatError as exc:
        return [str(exc) if str(exc).startswith(name) else f"{name}: {exc}"]
    if dtype_name(w.dtype) != entry["dtype"] or list(w.shape) != entry["shape"]:
        got = f"{dtype_name(w.dtype)}{list(w.shape)}"
        return [f"{name}: stored as {got}, manifest says {entry['dtype']}{entry['shape']}"]
    if tensor_checksum(w) != entry["checksum"]:
        return [f"{name}: decoded tensor differs from the original (checksum mismatch)"]
    return []


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
                             modules_to_not_convert: list[str], cast_from: str | None = None) -> dict:
    """The ``quantization_config`` entry written to ``config.json``: ``format_version`` is the oldest
    version that holds ``params`` (1 for a rANS delta, 2 for class-width), as for each tensor's meta.

    ``cast_from``: the source's floating dtypes (comma-separated) when the conversion cast them to
    ``source_dtype`` (``tpde convert --dtype``): the repo is exact with respect to the cast model, not the
    original. Absent otherwise. A reader that does not know the field keeps it (:class:`~tpde_hf.TpdeConfig`).

    Example::

        quantization_config_dict(CodecParams(), torch.bfloat16, ["lm_head"], cast_from="float32")["cast_from"]
    """
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
        "integrity": INTEGRITY_ALGO,  # every shard carries per-tensor checksums (tpde_hf.integrity)
        **({"cast_from": cast_from} if cast_from else {}),
        **({"storage": params.storage} if params.storage else {}),  # laid out by a base storage (storage_format)
        # informational: the decoder reads q, scale and zero as stored, whichever quantizer chose them
        **({"base_quantizer": params.base_quantizer} if params.base_quantizer != "minmax" else {}),
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
