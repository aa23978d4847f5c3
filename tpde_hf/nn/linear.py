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
everywhere else the torch path (the codec's reference decoder) runs. All device-specific choices
go through :func:`reconstruct_exact` / :func:`reconstruct_base`, so switching backends is one line.

``Conv1D`` weights are stored as in the checkpoint (``[in, out]``, i.e. transposed with respect to
``nn.Linear``), so the 4-bit groups of a GPT-2 layer run along its output features.

Example::

    layer = TpdeLinear.from_dense(torch.nn.Linear(256, 64, dtype=torch.bfloat16))
    y = layer(torch.randn(2, 256, dtype=torch.bfloat16))   # == the nn.Linear's output, bit for bit
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tpde_hf.codec import SUFFIXES, CodecParams, EncodedTensor, decode_tensor, encode_tensor
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


def _parts_key(holder: nn.Module) -> tuple:
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
    key = _parts_key(holder)
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
    from tpde_hf.codec.tensor_codec import parse_meta

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


def _save_host_delta(holder: nn.Module, destination: dict, prefix: str) -> None:
    """In offload mode the delta is not a parameter; a state dict (e.g. ``save_pretrained``) still has it."""
    if holder.__dict__.get("_tpde_mode") != "lossless-offload":
        return
    from tpde_hf.nn.offload import host_delta

    host = host_delta(holder)
    if host:
        for s in DELTA_SUFFIXES:
            destination[prefix + s] = host[s]


def set_tpde_attrs(holder: nn.Module, name: str, mode: str, compute_dtype: torch.dtype | None) -> None:
    holder.__dict__["_tpde_name"] = name
    holder.__dict__["_tpde_mode"] = mode
    holder.__dict__["_tpde_compute_dtype"] = compute_dtype


def holder_weight(holder: nn.Module, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight a forward uses: exact (lossless modes) or 4-bit (base), in the compute dtype."""
    mode = holder.__dict__.get("_tpde_mode", "lossless")
    if mode == "base":
        w = reconstruct_base(holder, device)
    elif mode == "lossless-offload":
        from tpde_hf.nn.offload import offloaded_exact_weight

        w = offloaded_exact_weight(holder, device)
    else:
        w = reconstruct_exact(holder, device)
    dtype = dtype or holder.__dict__.get("_tpde_compute_dtype")
    return w if dtype is None or w.dtype == dtype else w.to(dtype)


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
    """Module holding tpde parts: dtype casts never touch the stored bytes, and a host-held delta is saved too."""

    def _apply(self, fn, recurse: bool = True):
        out = super()._apply(_keep_part_dtypes(self, fn), recurse)
        _follow_dtype_cast(self, fn)
        return out

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        _save_host_delta(self, destination, prefix)


class TpdeWeightStore(_StoredPartsModule):
    """Holds one tpde weight (no forward): per-expert storage under a fused-expert module."""

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
        return _weight_for_forward(self, device or self._parameters["qweight"].device, dtype)

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
        w = _weight_for_forward(self, x.device, None)
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
    if mode == "base":
        return tk.base_linear(x, _packed(layer, tk, x.device), layer.bias)
    fused = True if layer.__dict__.get("_tpde_fused_gemv") else False
    if mode == "lossless-offload":
        from tpde_hf.nn.offload import fetch_packed

        pw = fetch_packed(layer, tk, x.device)
    else:
        pw = _packed(layer, tk, x.device)
    return tk.lossless_linear(x, pw, layer.bias, fused=None if fused else False)


@torch.compiler.disable
def _weight_for_forward(holder: nn.Module, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    """Rebuild the weight outside any compiled graph (the decoder is data-dependent and uses numpy)."""
    return holder_weight(holder, device, dtype)
