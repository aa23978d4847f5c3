"""``TpdeLinear``: the module that replaces a converted ``nn.Linear`` (or GPT-2 ``Conv1D``).

It holds one weight in tpde form as parameters named like the stored tensors
(``qweight, scales, zeros, meta`` and, when the delta is resident, ``delta, lanes, tables``), so
transformers loads them straight from the repo and ``save_pretrained`` writes them back unchanged.

Each forward rebuilds the weight it needs and applies it exactly as the replaced layer did:

* ``lossless``: the exact original weight (bit for bit), then ``F.linear`` (``torch.addmm`` for
  ``Conv1D``) -- so the outputs are bit-identical to the original model's on the same device;
* ``base``: the 4-bit prediction ``P`` only (the delta was never read);
* ``lossless-offload``: like ``lossless``, the delta coming from pinned host memory (see
  :mod:`tpde_hf.nn.offload`).

On CUDA the Triton kernels of :mod:`tpde_hf.triton_kernels` are used when they are available;
everywhere else the torch path (the codec's reference decoder) runs; the choice is made in
:mod:`tpde_hf.nn.holder` (the stored parts and their decoding, the bottom of this package).

Model code that reads ``layer.weight`` (T5, ``nn.MultiheadAttention``) gets the weight the layer
computes with, rebuilt on demand and never kept (read-only, not a parameter; see
:mod:`tpde_hf.nn.weight_access` for what a read costs).

``Conv1D`` weights are stored as in the checkpoint (``[in, out]``, i.e. transposed with respect to
``nn.Linear``), so the 4-bit groups of a GPT-2 layer run along its output features.

Example::

    layer = TpdeLinear.from_dense(torch.nn.Linear(256, 64, dtype=torch.bfloat16))
    y = layer(torch.randn(2, 256, dtype=torch.bfloat16))   # == the nn.Linear's output, bit for bit
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tpde_hf.codec import SUFFIXES, CodecParams, encode_tensor
from tpde_hf.codec.ordinal import CODE_DTYPES
from tpde_hf.nn.holder import (
    BASE_SUFFIXES,
    DELTA_SUFFIXES,
    PartSpecs,
    _kernels,
    _packed,
    base_weight_torch,
    encoded_of,
    has_delta,
    meta_values,
    parts_of,
    reconstruct_base,
    reconstruct_exact,
    register_parts,
    set_tpde_attrs,
    validate_holder,
)
from tpde_hf.nn.offload import fetch_packed, host_delta
from tpde_hf.nn.weight_access import exposed_weight, holder_weight, take_cached_weight, weight_for_forward


def _save_host_delta(holder: nn.Module, destination: dict, prefix: str) -> None:
    """In offload mode the delta is not a parameter; a state dict (e.g. ``save_pretrained``) still has it."""
    if holder.__dict__.get("_tpde_mode") != "lossless-offload":
        return
    host = host_delta(holder)
    if host:
        for s in DELTA_SUFFIXES:
            destination[prefix + s] = host[s]


def _keep_part_dtypes(module: nn.Module, fn):
    """Wrap an ``_apply`` function so that parts move between devices but are never cast."""
    parts = {id(p) for s, p in module._parameters.items() if s in SUFFIXES and p is not None}

    def apply(t: torch.Tensor) -> torch.Tensor:
        out = fn(t)
        if id(t) in parts and out.dtype != t.dtype:
            out = t.to(device=out.device)
        return out

    return apply


def _follow_dtype_cast(holder: nn.Module, fn) -> None:
    """After ``module.to(dtype)`` / ``.half()``: compute in the new dtype (the stored parts stay as they are)."""
    dtype = holder.__dict__.get("_tpde_compute_dtype")
    if dtype is None:
        return
    probe = torch.empty(0, dtype=dtype)
    try:
        cast = fn(probe)
    except Exception:  # e.g. a move to a device that is not there: nothing to follow
        return
    if isinstance(cast, torch.Tensor) and cast.is_floating_point():
        holder.__dict__["_tpde_compute_dtype"] = cast.dtype


# ==================================================================== the modules
class _StoredPartsModule(nn.Module):
    """Module holding tpde parts: dtype casts never touch the stored bytes, and a host-held delta is saved too.

    ``weight`` is a read-only attribute, not a parameter: model code that reads it gets the weight
    (see :attr:`weight`); ``state_dict()`` and ``named_parameters()`` hold only the stored parts.
    """

    @property
    def weight(self) -> torch.Tensor:
        """The weight as the replaced module held it, rebuilt on each read: bit for bit the original in
        ``lossless`` / ``lossless-offload``, the 4-bit prediction in ``base``; a plain tensor in the compute
        dtype on the parts' device, which nothing keeps once the reader drops it.

        For model code that reads ``layer.weight`` instead of calling ``layer`` (T5, ``nn.MultiheadAttention``).
        Inside the forward of the module that holds this layer, repeated reads (and this layer's own
        forward right after) share one rebuild (:mod:`tpde_hf.nn.weight_access`). Example::

            torch.equal(layer.weight.view(torch.int16), original.view(torch.int16))   # lossless: True
        """
        try:
            return exposed_weight(self)
        except AttributeError as exc:  # else Python would report "no attribute 'weight'" and hide the cause
            raise RuntimeError(f"tpde: rebuilding {self.__dict__.get('_tpde_name')} failed: {exc}") from exc

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "weight":
            raise AttributeError(_read_only_message(self))
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        if name == "weight":
            raise AttributeError(_read_only_message(self))
        super().__delattr__(name)

    def _apply(self, fn, recurse: bool = True):
        out = super()._apply(_keep_part_dtypes(self, fn), recurse)
        _follow_dtype_cast(self, fn)
        return out

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        _save_host_delta(self, destination, prefix)


class TpdeWeightStore(_StoredPartsModule):
    """Holds one tpde weight (no forward): per-expert storage under a fused-expert module, or a parameter
    of another module (e.g. ``nn.MultiheadAttention.in_proj_weight``) that the host's forward hook rebuilds.
    ``store.weight`` gives the weight (exact, or 4-bit in ``base`` mode), like :attr:`TpdeLinear.weight`."""

    def __init__(self, name: str, specs: PartSpecs, mode: str, compute_dtype: torch.dtype | None = None,
                 device: torch.device | str = "meta"):
        super().__init__()
        register_parts(self, specs, device)
        set_tpde_attrs(self, name, mode, compute_dtype)

    def weight_tensor(self, device: torch.device | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight (exact or base, per mode) on ``device``."""
        device = device or self._parameters["qweight"].device
        return holder_weight(self, device, dtype)

    def extra_repr(self) -> str:
        vals = self._parameters["meta"]
        return f"name={self._tpde_name}, mode={self._tpde_mode}, meta_device={vals.device.type}"


class TpdeLinear(_StoredPartsModule):
    """A linear layer whose weight is stored as a 4-bit base plus a lossless delta.

    Args:
        in_features, out_features: as ``nn.Linear``.
        bias: whether the layer has a bias (loaded as ``bias``, like ``nn.Linear``).
        specs: dtype and shape of each stored part (``suffix -> (dtype, shape)``).
        mode: ``"lossless"``, ``"lossless-offload"`` or ``"base"``.
        name: the original weight's name, used in error messages.
        compute_dtype: dtype of the weight fed to the matmul (the model's load dtype).
        transposed: ``True`` for a GPT-2 ``Conv1D`` (weight stored ``[in, out]``, forward via addmm).

    Example::

        lin = torch.nn.Linear(256, 64, dtype=torch.bfloat16)
        t = TpdeLinear.from_dense(lin, mode="base")
        err = (t(x) - lin(x)).abs().max()   # small: the 4-bit error
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, specs: PartSpecs, mode: str = "lossless",
                 name: str = "weight", compute_dtype: torch.dtype | None = None, transposed: bool = False,
                 device: torch.device | str = "meta", bias_dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.transposed = transposed
        register_parts(self, specs, device)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype or compute_dtype, device=device))
        else:
            self.register_parameter("bias", None)
        set_tpde_attrs(self, name, mode, compute_dtype)
        # the shape ``.weight`` has while the parts are not loaded yet
        self.__dict__["_tpde_shape"] = (in_features, out_features) if transposed else (out_features, in_features)

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_dense(cls, layer: nn.Module, mode: str = "lossless", params: CodecParams | None = None,
                   name: str = "weight") -> TpdeLinear:
        """Encode an ``nn.Linear`` or ``Conv1D`` into a ``TpdeLinear`` (on the layer's device)."""
        transposed = type(layer).__name__ == "Conv1D"
        weight = layer.weight.detach()
        enc = encode_tensor(weight.cpu(), params, name)
        sd = enc.to_state_dict("x")
        specs = {s: (t.dtype, tuple(t.shape)) for s, t in ((k[2:], v) for k, v in sd.items())}
        if mode == "base":
            specs = {s: v for s, v in specs.items() if s not in DELTA_SUFFIXES}
        in_f, out_f = (weight.shape[0], weight.shape[1]) if transposed else (weight.shape[1], weight.shape[0])
        device = weight.device
        mod = cls(in_f, out_f, layer.bias is not None, specs, mode, name, weight.dtype, transposed, device="cpu")
        with torch.no_grad():
            for s in specs:
                mod._parameters[s].copy_(sd[f"x.{s}"])
            if layer.bias is not None:
                mod.bias.copy_(layer.bias.detach())
        return mod.to(device)

    @property
    def mode(self) -> str:
        return self._tpde_mode

    @property
    def compute_dtype(self) -> torch.dtype | None:
        return self._tpde_compute_dtype

    def weight_tensor(self, device: torch.device | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as the replaced layer held it (``[out, in]``, or ``[in, out]`` for ``Conv1D``)."""
        return weight_for_forward(self, device or self._parameters["qweight"].device, dtype)

    def dense_module(self) -> nn.Module:
        """An ``nn.Linear`` (or ``Conv1D``) with the exact weight: what this layer replaced."""
        from transformers.pytorch_utils import Conv1D

        w = self.weight_tensor()
        with torch.device("meta"):
            if self.transposed:
                layer = Conv1D(self.out_features, self.in_features)
            else:
                layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        layer.weight = nn.Parameter(w)
        if self.bias is not None:
            layer.bias = nn.Parameter(self.bias.detach().clone())
        return layer

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cuda" and not self.transposed:
            tk = _kernels(x.device)
            if tk is not None:
                return _kernel_linear(self, tk, x)
        w = weight_for_forward(self, x.device, None)
        if self.transposed:  # exactly Conv1D.forward
            size_out = x.size()[:-1] + (self.out_features,)
            return torch.addmm(self.bias, x.view(-1, x.size(-1)), w).view(size_out)
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        kind = ", conv1d" if self.transposed else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"mode={self._tpde_mode}{kind}")


@torch.compiler.disable
def _kernel_linear(layer: TpdeLinear, tk: Any, x: torch.Tensor) -> torch.Tensor:
    """GPU path: the Triton kernels (``fused_gemv`` allows the fused decode+GEMV, not bit-exact)."""
    mode = layer._tpde_mode
    cached = take_cached_weight(layer, x.device)  # taken in any case: it must not outlive this forward
    if mode == "base":
        return tk.base_linear(x, _packed(layer, tk, x.device), layer.bias)
    fused = True if layer.__dict__.get("_tpde_fused_gemv") else False
    if cached is not None and not fused and cached.dtype == CODE_DTYPES[meta_values(layer)[1]]:
        # a `.weight` read just rebuilt W: what lossless_linear(fused=False) computes, without a second decode
        return F.linear(x, cached.to(x.dtype), layer.bias)
    if mode == "lossless-offload":
        pw = fetch_packed(layer, tk, x.device)
    else:
        pw = _packed(layer, tk, x.device)
    return tk.lossless_linear(x, pw, layer.bias, fused=None if fused else False)


def _read_only_message(module: nn.Module) -> str:
    return (f"{type(module).__name__}.weight is read-only: the weight ({module.__dict__.get('_tpde_name')}) is "
            "stored in tpde form (4-bit base + lossless delta) and rebuilt on each read. For a dense, writable "
            "weight use layer.dense_module() or model.dequantize(), or load with TpdeConfig(mode='dequantize').")


__all__ = [
    "BASE_SUFFIXES", "DELTA_SUFFIXES", "PartSpecs", "TpdeLinear", "TpdeWeightStore", "base_weight_torch",
    "encoded_of", "has_delta", "holder_weight", "meta_values", "parts_of", "reconstruct_base", "reconstruct_exact",
    "register_parts", "set_tpde_attrs", "validate_holder", "weight_for_forward",
]
