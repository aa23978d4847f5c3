"""The parts of one tpde weight held on a module, and how to rebuild the weight from them.

A *holder* is any module whose ``_parameters`` hold the stored parts of one weight (``qweight,
scales, zeros, meta`` and, when the delta is resident, ``delta, lanes, tables``), with its name,
mode and compute dtype in ``__dict__`` (:func:`set_tpde_attrs`): a :class:`~tpde_hf.nn.TpdeLinear`,
a :class:`~tpde_hf.nn.TpdeWeightStore`, or any module whose weight a forward hook rebuilds.

This module is the bottom of :mod:`tpde_hf.nn`: it imports only the codec (and, lazily, the Triton
kernels), so :mod:`~tpde_hf.nn.offload` and :mod:`~tpde_hf.nn.linear` both build on it and the
dependency runs one way (``linear -> offload -> holder``).

All device-specific choices go through :func:`reconstruct_exact` / :func:`reconstruct_base`, so
switching backends is one line.

Example::

    register_parts(module, specs, device="cpu")     # empty parameters named like the stored tensors
    set_tpde_attrs(module, "x.weight", "lossless", torch.bfloat16)
    ...                                              # fill them (transformers' loader does)
    w = reconstruct_exact(module, torch.device("cpu"))
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from tpde_hf.codec import SUFFIXES, EncodedTensor, decode_tensor
from tpde_hf.codec.encoded import parse_meta
from tpde_hf.codec.ordinal import CODE_DTYPES
from tpde_hf.errors import TpdeFormatError

DELTA_SUFFIXES = ("delta", "lanes", "tables")
BASE_SUFFIXES = ("qweight", "scales", "zeros", "meta")
PartSpecs = dict[str, tuple[torch.dtype, tuple[int, ...]]]


# ==================================================================== backend selection (one place)
def _kernels(device: torch.device) -> Any | None:
    """The Triton kernel module when it exists and can run on ``device``, else ``None``."""
    if device.type != "cuda":
        return None
    try:
        from tpde_hf import triton_kernels as tk
    except ImportError:
        return None
    needed = ("PackedWeight", "lossless_linear", "base_linear", "reconstruct", "triton_available")
    if not all(hasattr(tk, n) for n in needed):
        return None
    try:
        return tk if tk.triton_available(device) else None
    except Exception:  # a broken Triton install must not break the torch path
        return None


def reconstruct_exact(holder: nn.Module, device: torch.device) -> torch.Tensor:
    """The exact original weight of ``holder`` (source dtype) on ``device``."""
    tk = _kernels(device)
    if tk is not None:
        return tk.reconstruct(_packed(holder, tk, device))
    return decode_tensor(encoded_of(holder)).to(device)


def reconstruct_base(holder: nn.Module, device: torch.device) -> torch.Tensor:
    """The lossy 4-bit prediction ``P`` of ``holder`` (source dtype) on ``device``."""
    parts = {s: getattr(holder, s) for s in ("qweight", "scales", "zeros")}
    vals = meta_values(holder)
    shape, group, dtype = (vals[2], vals[3]), vals[4], CODE_DTYPES[vals[1]]
    if parts["qweight"].device != device:
        parts = {k: v.to(device) for k, v in parts.items()}
    return base_weight_torch(parts["qweight"], parts["scales"], parts["zeros"], shape, group, dtype)


def base_weight_torch(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      shape: tuple[int, int], group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """``P = dtype(float32(q - zero) * float32(scale))`` with broadcasting instead of repeats.

    Bit-identical to :meth:`EncodedTensor.base_weight` (the same exact fp32 product, one cast).
    """
    out_f, in_f = shape
    ng = scales.shape[1]
    q = torch.stack((qweight & 0x0F, qweight >> 4), dim=-1).view(out_f, ng, group_size)
    z = torch.stack((zeros & 0x0F, zeros >> 4), dim=-1).view(out_f, -1)[:, :ng]
    c = q.to(torch.float32) - z.to(torch.float32).unsqueeze(-1)
    w = (c * scales.to(torch.float32).unsqueeze(-1)).to(dtype).view(out_f, ng * group_size)
    return w if ng * group_size == in_f else w[:, :in_f].contiguous()


def _packed(holder: nn.Module, tk: Any, device: torch.device) -> Any:
    """The kernels' ``PackedWeight`` of ``holder`` on ``device`` (built once; base shares our tensors)."""
    qweight = holder._parameters["qweight"]
    key = (qweight.device.type, qweight.data_ptr(), str(device))
    cached = holder.__dict__.get("_tpde_packed")
    if cached is not None and cached[0] == key:
        return cached[1]
    vals = meta_values(holder)
    if holder.__dict__.get("_tpde_mode") == "base":
        base = {s: holder._parameters[s].to(device) for s in ("qweight", "scales", "zeros")}
        pw = tk.PackedWeight.from_base(base["qweight"], base["scales"], base["zeros"], (vals[2], vals[3]),
                                       CODE_DTYPES[vals[1]], vals[4], name=holder.__dict__.get("_tpde_name", "weight"))
    else:
        pw = tk.PackedWeight.from_encoded(encoded_of(holder), device)
        if qweight.device == device:  # share the resident base instead of a second copy
            pw = dataclasses.replace(pw, qweight=qweight, scales=holder._parameters["scales"],
                                     zeros=holder._parameters["zeros"])
    holder.__dict__["_tpde_packed"] = (key, pw)
    return pw


# ==================================================================== parts held as parameters
def register_parts(module: nn.Module, specs: PartSpecs, device: torch.device | str = "meta") -> None:
    """Register one empty, frozen parameter per stored part (shapes and dtypes from the repo)."""
    for suffix, (dtype, shape) in specs.items():
        param = nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)
        module.register_parameter(suffix, param)


def has_delta(holder: nn.Module) -> bool:
    return "delta" in holder._parameters or holder.__dict__.get("_tpde_host_delta") is not None


def parts_of(holder: nn.Module) -> dict[str, torch.Tensor]:
    """All seven parts (the delta from host memory in offload mode)."""
    host = holder.__dict__.get("_tpde_host_delta")
    parts = {}
    for s in SUFFIXES:
        if s in holder._parameters:
            parts[s] = holder._parameters[s]
        elif host is not None and s in host:
            parts[s] = host[s]
    return parts


def parts_key(holder: nn.Module) -> tuple:
    """Identifies the parts' current storage: changes when any part is replaced or moved."""
    return tuple((s, t.device.type, t.data_ptr()) for s, t in parts_of(holder).items())


def encoded_of(holder: nn.Module) -> EncodedTensor:
    """The validated :class:`EncodedTensor` of ``holder`` (CPU), cached while its parts are unchanged."""
    name = holder.__dict__.get("_tpde_name", "tpde weight")
    parts = parts_of(holder)
    missing = [s for s in SUFFIXES if s not in parts]
    if missing:
        raise TpdeFormatError(
            name,
            f"parts {missing} are not loaded (mode={holder.__dict__.get('_tpde_mode')!r}); "
            "the delta is only available in modes 'lossless' and 'lossless-offload'",
        )
    if any(t.device.type == "meta" for t in parts.values()):
        raise TpdeFormatError(name, "its tensors are still on the meta device (not loaded)")
    key = parts_key(holder)
    cached = holder.__dict__.get("_tpde_enc")
    if cached is None or cached[0] != key:
        enc = EncodedTensor.from_parts(name, **{s: t.detach().to("cpu") for s, t in parts.items()})
        cached = (key, enc)
        holder.__dict__["_tpde_enc"] = cached
    return cached[1]


def meta_values(holder: nn.Module) -> list[int]:
    """The ten ``meta`` integers, cached (reading a GPU tensor synchronizes)."""
    meta = holder._parameters["meta"]
    key = (meta.device.type, meta.data_ptr())
    cached = holder.__dict__.get("_tpde_meta")
    if cached is None or cached[0] != key:
        if meta.device.type == "meta":
            raise TpdeFormatError(holder.__dict__.get("_tpde_name"), "meta is not loaded")
        vals = [int(v) for v in meta.detach().to("cpu").tolist()]
        if len(vals) < 10 or vals[1] not in CODE_DTYPES:
            raise TpdeFormatError(holder.__dict__.get("_tpde_name"), f"malformed meta tensor {vals}")
        cached = (key, vals)
        holder.__dict__["_tpde_meta"] = cached
    return cached[1]


def validate_holder(holder: nn.Module) -> None:
    """Check the loaded parts (everything the format allows to check without decoding)."""
    name = holder.__dict__.get("_tpde_name", "tpde weight")
    meta = holder._parameters["meta"]
    if meta.device.type == "meta":
        return  # offloaded to disk by accelerate: checked when it is loaded for a forward
    stored = parse_meta(meta.detach().to("cpu"), name)
    if has_delta(holder):
        encoded_of(holder)  # validates every part against every other
        return
    (out_f, in_f), g = stored.shape, stored.params.group_size
    ng = -(-in_f // g)
    expect = {"qweight": (torch.uint8, (out_f, ng * g // 2)), "scales": (torch.float16, (out_f, ng)),
              "zeros": (torch.uint8, (out_f, -(-ng // 2)))}
    for key, (dtype, shape) in expect.items():
        t = holder._parameters[key]
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise TpdeFormatError(name, f"{key} is {t.dtype}{list(t.shape)}, expected {dtype}{list(shape)}")


def stored_delta(fh: Any, prefix: str, storage: str | None = None, parts: Any = ()) -> dict[str, torch.Tensor]:
    """The resident delta parts (``delta, lanes, tables``) of the weight stored under ``prefix`` in an open
    safetensors shard ``fh``; for a weight laid out by base storage ``storage`` (its stored ``parts``), rebuilt
    from them (:func:`tpde_hf.storage_format.resident_parts`, checked against the meta's checksum).

    Example: ``with safe_open(path, framework="pt") as fh: stored_delta(fh, "model.layers.0.mlp.up_proj")``.
    """
    if storage is None:
        return {s: fh.get_tensor(f"{prefix}.{s}") for s in DELTA_SUFFIXES}
    from tpde_hf.codec.registry import storage_key
    from tpde_hf.storage_format import resident_parts

    stored = {p: fh.get_tensor(storage_key(prefix, storage, p)) for p in parts}
    got = resident_parts(f"{prefix}.weight", storage, stored)
    return {s: got[s] for s in DELTA_SUFFIXES}


def set_tpde_attrs(holder: nn.Module, name: str, mode: str, compute_dtype: torch.dtype | None) -> None:
    """Record what ``holder`` holds: the original tensor's name (for errors), the runtime mode, the compute dtype."""
    holder.__dict__["_tpde_name"] = name
    holder.__dict__["_tpde_mode"] = mode
    holder.__dict__["_tpde_compute_dtype"] = compute_dtype


__all__ = [
    "BASE_SUFFIXES", "DELTA_SUFFIXES", "PartSpecs", "base_weight_torch", "encoded_of", "has_delta", "meta_values",
    "parts_key", "parts_of", "reconstruct_base", "reconstruct_exact", "register_parts", "set_tpde_attrs",
    "stored_delta", "validate_holder",
]
