"""tpde weights that are not a whole ``nn.Linear``: fused MoE experts and other modules' weights.

transformers 5.x fuses per-expert checkpoint weights (``experts.3.w1.weight``...) into 3-D
parameters (``experts.gate_up_proj``) with the model's own ``WeightConverter`` ops. A tpde repo
stores the per-expert weights; here they are loaded into :class:`~tpde_hf.nn.linear.TpdeWeightStore`
children of the experts module (named as in the checkpoint), and a forward pre-hook rebuilds
the fused parameter with the *same* converter ops just before the experts' own forward runs,
then drops it. Only the experts that the router picked are decoded; the others are zeros,
which the experts' forward never reads. The computation is the original module's, on the
original tensors, so the outputs are bit-identical in ``lossless`` mode.

The same hook serves any other module whose weight is stored in tpde form (e.g. a router
``weight`` that is not an ``nn.Linear``): the "converter" is then the identity. Expert tensors
that the checkpoint stores natively as 3-D (GPT-OSS ``experts.gate_up_proj``) are stored one
tpde weight per expert, held under the parameter's own name (``gate_up_proj.tpde_expert.3``,
where the model's renamings load them: the hooked parameter itself is never a registered
attribute, and the forward's value shadows the container), and stacked back by
:class:`tpde_hf.loading.plan.StackExperts`.

Example::

    attach_param_hook(experts, [HookTarget("gate_up_proj", converter, sources, torch.bfloat16)])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tpde_hf.nn.holder import meta_values
from tpde_hf.nn.weight_access import holder_weight


@dataclass
class HookTarget:
    """One parameter of the host module, rebuilt from stored weights before each forward.

    ``sources`` is a list of ``(source_pattern, [storage path relative to the host, ...])``;
    the empty path means the parts are registered on the host itself.
    """

    param_name: str
    converter: Any | None
    sources: list[tuple[str, list[str]]]
    dtype: torch.dtype


def _storage(host: nn.Module, path: str) -> nn.Module:
    return host if path == "" else host.get_submodule(path)


def _hit_experts(host: nn.Module, target: HookTarget, args: tuple, kwargs: dict) -> set[int] | None:
    """Indices of the experts the router picked, when the forward's signature says so."""
    n = getattr(host, "num_experts", None)
    if target.converter is None or not isinstance(n, int):
        return None
    first = target.converter.operations[0] if target.converter.operations else None
    stacks = getattr(first, "merges_experts", False) or (  # tpde's StackExperts, or transformers' own merge
        type(first).__name__ == "MergeModulelist" and getattr(first, "dim", None) == 0)
    if not stacks:
        return None
    if any(len(paths) != n for _, paths in target.sources):
        return None
    idx = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
    if not isinstance(idx, torch.Tensor) or idx.is_floating_point():
        return None
    return {int(i) for i in torch.unique(idx).tolist() if 0 <= int(i) < n}


@torch.compiler.disable
def build_param(host: nn.Module, target: HookTarget, device: torch.device, hit: set[int] | None = None) -> torch.Tensor:
    """Rebuild ``target`` on ``device``: decode the stored weights, then run the model's converter ops."""
    lists: dict[str, list[torch.Tensor]] = {}
    for pattern, paths in target.sources:
        tensors = []
        for i, path in enumerate(paths):
            holder = _storage(host, path)
            if hit is None or i in hit:
                tensors.append(holder_weight(holder, device, target.dtype))
            else:
                vals = meta_values(holder)
                tensors.append(torch.zeros((vals[2], vals[3]), dtype=target.dtype, device=device))
        lists[pattern] = tensors
    if target.converter is None:
        return lists[target.sources[0][0]][0]
    conv = target.converter
    data: dict[str, Any] = lists
    for op in conv.operations:
        data = op.convert(data, source_patterns=conv.source_patterns, target_patterns=conv.target_patterns,
                          full_layer_name=target.param_name, model=None, config=getattr(host, "config", None),
                          missing_keys=None)
    if len(data) != 1:
        raise RuntimeError(f"tpde: rebuilding {target.param_name} produced {list(data)}; expected one tensor")
    out = next(iter(data.values()))
    return out[0] if isinstance(out, list) else out


class TpdeParamHook:
    """Forward pre/post hooks that materialize the tpde-stored parameters of a host module."""

    def __init__(self, targets: list[HookTarget]):
        self.targets = targets
        self.handles: list[Any] = []

    def _device(self, host: nn.Module, args: tuple) -> torch.device:
        if args and isinstance(args[0], torch.Tensor):
            return args[0].device
        return next(host.parameters()).device

    def pre(self, host: nn.Module, args: tuple, kwargs: dict):
        device = self._device(host, args)
        for t in self.targets:
            host.__dict__[t.param_name] = build_param(host, t, device, _hit_experts(host, t, args, kwargs))
        return None

    def post(self, host: nn.Module, args: tuple, kwargs: dict, output: Any):
        for t in self.targets:
            host.__dict__.pop(t.param_name, None)
        return None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def attach_param_hook(host: nn.Module, targets: list[HookTarget]) -> TpdeParamHook:
    """Install (or extend) the hook on ``host``; removes the dense parameters it replaces."""
    hook: TpdeParamHook | None = host.__dict__.get("_tpde_param_hook")
    if hook is None:
        hook = TpdeParamHook([])
        hook.handles.append(host.register_forward_pre_hook(hook.pre, with_kwargs=True))
        hook.handles.append(host.register_forward_hook(hook.post, with_kwargs=True, always_call=True))
        host.__dict__["_tpde_param_hook"] = hook
    for t in targets:
        host._parameters.pop(t.param_name, None)
        hook.targets.append(t)
    return hook


def detach_param_hook(host: nn.Module, device: torch.device | None = None) -> None:
    """Turn the hooked parameters back into ordinary exact parameters (``model.dequantize()``)."""
    hook: TpdeParamHook | None = host.__dict__.pop("_tpde_param_hook", None)
    if hook is None:
        return
    for t in hook.targets:
        first = _storage(host, t.sources[0][1][0])
        dev = device or first._parameters["qweight"].device
        value = build_param(host, t, dev, None)
        host.__dict__.pop(t.param_name, None)
        for _, paths in t.sources:  # first: the storage may sit under the parameter's own name
            for path in paths:
                _drop_storage(host, path)
        host.register_parameter(t.param_name, nn.Parameter(value))
    hook.remove()


def _drop_storage(host: nn.Module, path: str) -> None:
    from tpde_hf.codec import SUFFIXES

    if path == "":
        for s in SUFFIXES:
            host._parameters.pop(s, None)
        return
    parent_path, _, child = path.rpartition(".")
    parent = _storage(host, parent_path)
    parent._modules.pop(child, None)
    # remove now-empty containers
    while parent_path and not list(parent.children()) and not list(parent.parameters(recurse=False)):
        grand_path, _, name = parent_path.rpartition(".")
        grand = _storage(host, grand_path)
        grand._modules.pop(name, None)
        parent_path, parent = grand_path, grand
