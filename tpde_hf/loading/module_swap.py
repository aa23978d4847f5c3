"""Swap a model's layers for tpde holders before its weights load, and back to dense ones on ``dequantize()``.

:func:`replace_modules` follows the load plan (:mod:`tpde_hf.loading.plan`): an ``nn.Linear`` / ``Conv1D``
becomes a :class:`~tpde_hf.nn.TpdeLinear`; any other module keeps its class and gets its weight rebuilt by
a forward hook; a fused parameter (MoE experts) gets one :class:`~tpde_hf.nn.linear.TpdeWeightStore` per
stored weight plus a hook (:mod:`tpde_hf.nn.fused`). Every part gets its exact stored shape, so accelerate's
``device_map="auto"`` plans with the real sizes. :func:`dense_model` undoes it.

Example::

    holders: dict[str, nn.Module] = {}
    replace_modules(model, plan, "lossless", torch.bfloat16, holders)  # model: a skeleton on meta
    ...  # transformers loads the parts
    dense_model(model, holders, "lossless")  # model.dequantize(): plain dense layers again
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tpde_hf.codec import SUFFIXES
from tpde_hf.errors import TpdeFormatError


def replace_modules(model: nn.Module, plan: Any, mode: str, dtype: torch.dtype | None,
                    holders: dict[str, nn.Module]) -> None:
    """Put a tpde holder wherever ``plan`` (a :class:`~tpde_hf.loading.plan.LoadPlan`) stores a weight.

    ``holders`` receives ``{weight prefix: holder module}``. Raises :class:`TpdeFormatError` for a tied
    weight stored in tpde form, or the error a fused target recorded while the plan was built.
    """
    from transformers.pytorch_utils import Conv1D

    from tpde_hf.loading.ops import BASE_SUFFIXES
    from tpde_hf.nn.fused import HookTarget, attach_param_hook
    from tpde_hf.nn.linear import TpdeLinear, TpdeWeightStore, register_parts, set_tpde_attrs
    from tpde_hf.nn.weight_access import remember_parent

    suffixes = SUFFIXES if mode == "lossless" else BASE_SUFFIXES
    tied = set()
    for k, v in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        tied.update((k, v))
    for d in plan.direct:
        wname = f"{d.module_path}.weight"
        if wname in tied:
            raise TpdeFormatError(
                d.weight.name,
                f"is stored in tpde form but {wname} is tied to another weight; mode={mode!r} cannot share it. "
                "Load with TpdeConfig(mode='dequantize') (or convert with the tied weight kept dense).",
            )
        module = model.get_submodule(d.module_path)
        specs = d.weight.specs(suffixes)
        parent_path, _, child = d.module_path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        if computes_as_linear(module, Conv1D):
            transposed = isinstance(module, Conv1D)
            w = module.weight
            in_f, out_f = (w.shape[0], w.shape[1]) if transposed else (w.shape[1], w.shape[0])
            bias = module.bias
            new = TpdeLinear(in_f, out_f, bias is not None, specs, mode, d.weight.name, dtype or w.dtype,
                             transposed, device="meta", bias_dtype=bias.dtype if bias is not None else None)
            if bias is not None:
                new.bias = bias
            new.train(module.training)
            parent._modules[child] = new
            remember_parent(new, parent)  # where model code reads `.weight` (T5's wo, MHA's out_proj)
            mark_initialized(new, parent)
            holders[d.weight.prefix] = new
        else:  # any other module: its weight is rebuilt by a forward hook
            w = module._parameters["weight"]
            register_parts(module, specs)
            set_tpde_attrs(module, d.weight.name, mode, w.dtype)
            attach_param_hook(module, [HookTarget("weight", None, [("weight", [""])], w.dtype)])
            mark_initialized(module, parent)
            holders[d.weight.prefix] = module
    for f in plan.fused:
        if f.error is not None:
            raise f.error
        host = model.get_submodule(f.host_path)
        pdtype = host._parameters[f.param_name].dtype
        sources = []
        for pattern, weights in f.sources.items():
            paths = []
            for w in weights:
                rel = f.storage_paths[w.prefix]
                store = TpdeWeightStore(w.name, w.specs(suffixes), mode, pdtype)
                set_submodule(host, rel, store)
                holders[w.prefix] = store
                paths.append(rel)
            sources.append((pattern, paths))
        attach_param_hook(host, [HookTarget(f.param_name, f.converter, sources, pdtype)])
        mark_initialized(host)


def dense_model(model: nn.Module, holders: dict[str, nn.Module], mode: str,
                dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every tpde layer of a loaded model by its dense original (``model.dequantize()``); empties
    ``holders``. Raises ValueError when the delta was never read (``base``) or some parts are on disk."""
    from tpde_hf.nn.fused import detach_param_hook
    from tpde_hf.nn.linear import TpdeLinear

    if mode == "base":
        raise ValueError(
            "tpde: this model was loaded with mode='base', so its delta was never read and the original weights "
            "cannot be rebuilt. Reload with TpdeConfig(mode='lossless') or TpdeConfig(mode='dequantize')."
        )
    for holder in holders.values():
        for p in holder.parameters(recurse=False):
            if p.device.type == "meta":
                raise ValueError(
                    "tpde: model.dequantize() needs every weight in memory, but some are offloaded to disk; "
                    "load with TpdeConfig(mode='dequantize') instead"
                )
    hosts = []
    for name, module in list(model.named_modules()):
        if isinstance(module, TpdeLinear):
            dense = module.dense_module()
            if dtype is not None and dense.weight.dtype != dtype:
                dense = dense.to(dtype)
            set_submodule(model, name, dense)
        elif "_tpde_param_hook" in module.__dict__:
            hosts.append(module)
    for host in hosts:
        detach_param_hook(host)
    holders.clear()
    model.__dict__.pop("save_pretrained", None)
    return model


def computes_as_linear(module: nn.Module, conv1d: type) -> bool:
    """Whether ``module`` is an ``nn.Linear`` / ``Conv1D``, or a subclass that computes exactly as one (it keeps
    their ``forward``), e.g. ``nn.MultiheadAttention``'s ``out_proj`` (``NonDynamicallyQuantizableLinear``).

    Such a module becomes a :class:`~tpde_hf.nn.TpdeLinear`, whose ``weight`` model code can read; a subclass
    with its own ``forward`` keeps its class, and a forward hook rebuilds its weight.
    """
    return any(isinstance(module, base) and type(module).forward is base.forward for base in (nn.Linear, conv1d))


def mark_initialized(*modules: nn.Module) -> None:
    """Keep transformers' weight init (run after loading) away from modules whose weights are tpde parts.

    ``_init_weights`` of a layer may touch its children's ``weight`` (GPT-2's ``c_proj``) or its fused
    parameters (MoE experts), which a tpde layer does not have as tensors.
    """
    for m in modules:
        m._is_hf_initialized = True


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Set ``root.<path> = module``, creating empty containers for missing intermediate names."""
    parts = path.split(".")
    node = root
    for p in parts[:-1]:
        child = node._modules.get(p)
        if child is None:
            child = nn.Module()
            node._modules[p] = child
        node = child
    node._modules[parts[-1]] = module
