"""Tensor-level codec: one weight <-> seven plain tensors (format versions 1 and 2).

The stored form and its checks live in :mod:`.encoded`; each delta code is a plug-in registered in
:data:`tpde_hf.codec.registry.DELTA_CODES` (``rans``: :mod:`.delta_rans`, ``class-width``:
:mod:`.delta_class_width`). This module is the front door: it looks the code up by name and hands
it the whole batch, so a new delta code arrives as a new module, never as a branch here.

Two CPU implementations sit behind each code: for rANS the numpy reference
(:mod:`.rans_reference`, vectorized over lanes) and the compiled one in :mod:`.compiled` (the
default); for a class-width delta, the torch reference :mod:`.class_width` and the compiled
:mod:`.class_width_compiled`. :mod:`.backend` chooses, and the tests hold each pair to identical
bytes and bits.

Example::

    enc = encode_tensor(weight, name="layer.weight")
    sd = enc.to_state_dict("layer")
    back = decode_tensor(EncodedTensor.from_state_dict(sd, "layer"))
    assert torch.equal(back.view(torch.int16), weight.view(torch.int16))
"""

from __future__ import annotations

import math

import torch

from tpde_hf.codec import base_quant, registry

# The built-in delta codes register themselves on import.
from tpde_hf.codec import delta_class_width as _delta_class_width  # noqa: F401
from tpde_hf.codec import delta_rans as _delta_rans  # noqa: F401
from tpde_hf.codec.base_quantizers import quantize_base
from tpde_hf.codec.checksum import tensor_checksum
from tpde_hf.codec.delta_class_width import class_width_impl
from tpde_hf.codec.encoded import (
    FORMAT_VERSION,
    META_LENS,
    N_CONTEXTS,
    SUFFIXES,
    SUPPORTED_LANE_LENS,
    CodecParams,
    EncodedTensor,
    LaneLayout,
    StoredMeta,
    checked_weight,
    delta_code,
    delta_code_names,
    named_errors,
    parse_meta,
)
from tpde_hf.codec.ordinal import bit_width, to_ordinal, wrap

#: The delta codes, by their index in a version-2 meta (the registered names in index order).
DELTA_CODES = delta_code_names()

__all__ = [
    "DELTA_CODES", "FORMAT_VERSION", "META_LENS", "N_CONTEXTS", "SUFFIXES", "SUPPORTED_LANE_LENS",
    "CodecParams", "EncodedTensor", "LaneLayout", "StoredMeta", "class_width_impl", "conditional_entropy_bits",
    "decode_tensor", "decode_tensors", "encode_base_and_meta", "encode_tensor", "encode_tensors",
    "inspect_tensor", "meta_needs_delta", "named_errors", "parse_meta", "tensor_checksum",
]


# ==================================================================== encode
def encode_tensors(weights: dict[str, torch.Tensor], params: CodecParams | None = None) -> dict[str, EncodedTensor]:
    """Encode several 2-D weights; the delta code batches them as it likes (rANS runs their lanes together).

    Example: ``encode_tensors({"q.weight": wq, "k.weight": wk})["q.weight"].nbytes()``.
    """
    params = params or CodecParams()
    if params.delta_code not in registry.DELTA_CODES:
        params.validate(next(iter(weights), None))  # names the code and the tensor
    return delta_code(params.delta_code).encode_batch(weights, params)


def encode_tensor(weight: torch.Tensor, params: CodecParams | None = None, name: str = "tensor") -> EncodedTensor:
    """Encode a 2-D bf16/fp16/fp32 weight into 4-bit base + lossless delta."""
    return encode_tensors({name: weight}, params)[name]


def meta_needs_delta(params: CodecParams) -> bool:
    """Whether the ``meta`` that ``params`` write records anything of the encoded delta.

    A version-1 meta (rANS) holds version, dtype, shape, the codec parameters and the checksum: all known
    before the delta is coded. A version-2 meta also holds the payload's bit count (``total_bits``).

    Example: ``meta_needs_delta(CodecParams())`` -> False; ``delta_code="class-width"`` -> True.
    """
    return params.format_version >= 2


def encode_base_and_meta(weight: torch.Tensor, params: CodecParams | None = None,
                         name: str = "tensor") -> tuple[base_quant.BaseTensors, torch.Tensor, int]:
    """``(base, meta, checksum)`` byte for byte as :func:`encode_tensor` writes them, without coding the delta.

    For a writer that stores the base and the meta but not the resident delta (a base storage): the base
    is the same for every delta code (:mod:`.encoded`), so it comes from the same quantizer call the delta
    codes make. Raises ``ValueError`` where the meta records the delta (:func:`meta_needs_delta`).

    Example: ``base, meta, checksum = encode_base_and_meta(w, CodecParams(), "up.weight")``.
    """
    params = params or CodecParams()
    weight = checked_weight(weight, params, name)
    if meta_needs_delta(params):
        raise ValueError(f"{name}: a {params.delta_code} meta records the coded delta; encode it with encode_tensor")
    base = quantize_base(weight, params)
    checksum = tensor_checksum(weight)
    empty = torch.empty(0, dtype=torch.uint8)  # the meta reads no delta part (see meta_needs_delta)
    meta = EncodedTensor(name=name, dtype=weight.dtype, shape=tuple(weight.shape), params=params, checksum=checksum,
                         qweight=base.qweight, scales=base.scales, zeros=base.zeros,
                         delta=empty, lanes=empty, tables=empty).meta_tensor()
    return base, meta, checksum


# ==================================================================== decode
def decode_tensor(enc: EncodedTensor, verify: bool = False) -> torch.Tensor:
    """Rebuild the original weight exactly on the CPU. ``verify`` also checks the checksum.

    Runs the compiled codec, or the numpy reference (see :mod:`tpde_hf.codec.backend`): same bits.
    """
    return decode_tensors([enc], verify=verify)[0]


def decode_tensors(encs: list[EncodedTensor], verify: bool = False) -> list[torch.Tensor]:
    """Decode several weights, each delta code's tensors in one batch (rANS: one pass over all lanes)."""
    by_code: dict[str, list[int]] = {}
    for i, e in enumerate(encs):
        by_code.setdefault(e.delta_code, []).append(i)
    out: list[torch.Tensor | None] = [None] * len(encs)
    for code, idx in by_code.items():
        decoded = delta_code(code, encs[idx[0]].name).decode_batch([encs[i] for i in idx], verify)
        for i, w in zip(idx, decoded, strict=True):
            out[i] = w
    return out  # type: ignore[return-value]


# ==================================================================== inspect
def conditional_entropy_bits(values: torch.Tensor, context: torch.Tensor) -> float:
    """Empirical ``H(values | context)`` in bits per element (the bound for a context-coded delta)."""
    total = 0.0
    n = values.numel()
    for c in torch.unique(context):
        _, counts = torch.unique(values[context == c], return_counts=True)
        p = counts.to(torch.float64)
        total += float(-(p * torch.log2(p / p.sum())).sum())
    return total / n


def inspect_tensor(enc: EncodedTensor, weight: torch.Tensor | None = None) -> dict:
    """Sizes and bits per weight (base, delta, total) and the ``H(r | |c|)`` bound for this tensor.

    ``weight`` (the decoded original) is computed when not given.
    """
    weight = decode_tensor(enc) if weight is None else weight
    lv = base_quant.levels(enc.base, enc.shape, enc.params.group_size)
    pred = base_quant.predict_from_levels(lv, enc.scales, enc.params.group_size, enc.dtype)
    r = wrap(to_ordinal(weight) - to_ordinal(pred), bit_width(enc.dtype)).flatten()
    sizes = enc.nbytes()
    n = enc.numel
    src_bits = 8 * weight.element_size()
    return {
        "name": enc.name,
        "shape": list(enc.shape),
        "dtype": str(enc.dtype).replace("torch.", ""),
        "numel": n,
        "bytes": sizes,
        "bits_per_weight": {k: 8 * v / n for k, v in sizes.items()},
        "bound_bits_per_weight": conditional_entropy_bits(r, lv.abs().flatten()),
        "ratio_to_source": sizes["total"] * 8 / (n * src_bits),
        "delta_code": enc.delta_code,
        **delta_code(enc.delta_code, enc.name).inspect(enc),
        "table_bits": math.ceil(enc.tables.numel() * enc.tables.element_size() * 8),
    }
