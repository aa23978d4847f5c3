"""The weight of a tpde layer, for its own forward and for model code that reads ``.weight``.

Model code reads a layer's ``.weight`` outside the layer's forward: T5's feed-forward block checks
``self.wo.weight`` (``isinstance`` and ``.dtype``) before calling ``self.wo``;
``nn.MultiheadAttention`` hands ``self.out_proj.weight`` to ``F.multi_head_attention_forward`` and
never calls ``out_proj`` at all. :func:`exposed_weight` answers such reads with the weight the layer
computes with -- exact in ``lossless`` / ``lossless-offload``, the 4-bit prediction in ``base`` --
rebuilt on demand, so no dense copy stays resident.

The cost, and how it is bounded: every rebuild is a decode. T5 reads ``wo.weight`` three or four
times per call and then calls ``wo``; decoding on each read would decode that layer five times.
Such reads happen in the forward of the layer's *parent* module, so that forward is the cache's
lifetime: while the parent runs, the first read keeps the weight, later reads return it, the
layer's own forward takes it (:func:`weight_for_forward`: reads + forward cost one decode), and
the parent's forward hook drops whatever is left when it returns. Outside a parent's forward
(user code) each read decodes afresh and nothing is kept. The parent's hooks are installed on the
first read, so models that never read ``.weight`` (Llama, Qwen, ...) get no hooks at all.

Example::

    remember_parent(layer, parent)   # the loader does this when it swaps ``parent.wo`` for ``layer``
    w = exposed_weight(layer)        # == the original weight, bit for bit, in lossless mode
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from tpde_hf.nn.holder import parts_key, reconstruct_base, reconstruct_exact
from tpde_hf.nn.offload import offloaded_exact_weight

_CACHE = "_tpde_weight_cache"  # on a holder: (key, weight) built by a read inside its parent's forward
_WINDOW = "_tpde_read_window"  # on a parent: its _ReadWindow
# holder -> weakref(parent). Outside the modules' __dict__ so that pickling a model never meets a weakref.
_PARENTS: weakref.WeakKeyDictionary[nn.Module, weakref.ReferenceType[nn.Module]] = weakref.WeakKeyDictionary()


def holder_weight(holder: nn.Module, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight a forward uses, rebuilt now: exact (lossless modes) or 4-bit (base), in the compute dtype."""
    mode = holder.__dict__.get("_tpde_mode", "lossless")
    if mode == "base":
        w = reconstruct_base(holder, device)
    elif mode == "lossless-offload":
        w = offloaded_exact_weight(holder, device)
    else:
        w = reconstruct_exact(holder, device)
    dtype = dtype or holder.__dict__.get("_tpde_compute_dtype")
    return w if dtype is None or w.dtype == dtype else w.to(dtype)


def _cache_key(holder: nn.Module, device: torch.device) -> tuple:
    # everything the weight depends on: a moved or reloaded part, a cast or a mode change misses
    return (str(device), holder.__dict__.get("_tpde_mode"), holder.__dict__.get("_tpde_compute_dtype"),
            parts_key(holder))


def take_cached_weight(holder: nn.Module, device: torch.device) -> torch.Tensor | None:
    """The weight a ``.weight`` read in this parent call already built for ``device`` (removed from the cache)."""
    cached = holder.__dict__.pop(_CACHE, None)
    if cached is None or cached[0] != _cache_key(holder, device):
        return None
    return cached[1]


@torch.compiler.disable
def weight_for_forward(holder: nn.Module, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight for a forward: the one a ``.weight`` read just built, else rebuilt now.

    Outside any compiled graph: the decoder is data-dependent and uses numpy.
    """
    w = take_cached_weight(holder, device)
    if w is not None and (dtype is None or w.dtype == dtype):
        return w
    return holder_weight(holder, device, dtype)


@torch.compiler.disable
def exposed_weight(holder: nn.Module) -> torch.Tensor:
    """What ``holder.weight`` gives: the weight as the replaced layer held it, on the parts' device.

    Parts not loaded yet (the meta device, as while transformers builds the model, or offloaded to
    disk by accelerate): an empty meta tensor of the weight's shape, as an unloaded ``nn.Linear`` has.
    """
    qweight = holder._parameters["qweight"]
    if qweight.device.type == "meta" and "_tpde_shape" in holder.__dict__:
        dtype = holder.__dict__.get("_tpde_compute_dtype") or torch.get_default_dtype()
        return torch.empty(holder.__dict__["_tpde_shape"], dtype=dtype, device="meta")
    device = qweight.device
    key = _cache_key(holder, device)
    cached = holder.__dict__.get(_CACHE)
    if cached is not None and cached[0] == key:
        return cached[1]
    w = holder_weight(holder, device)
    parent = _parent_of(holder)
    if parent is None:
        return w
    window = parent.__dict__.get(_WINDOW)
    if window is None:
        _ReadWindow.install(parent)  # from the next call of the parent on, reads there are cached
    elif window.depth > 0:
        holder.__dict__[_CACHE] = (key, w)
    return w


def remember_parent(holder: nn.Module, parent: nn.Module) -> None:
    """Record the module whose forward reads ``holder.weight`` (the one ``holder`` is an attribute of)."""
    _PARENTS[holder] = weakref.ref(parent)


def _parent_of(holder: nn.Module) -> nn.Module | None:
    ref = _PARENTS.get(holder)
    parent = ref() if ref is not None else None
    # a module that was moved elsewhere (or a copy of the model) keeps no stale window
    if parent is None or not any(m is holder for m in parent._modules.values()):
        return None
    return parent


class _ReadWindow:
    """Forward hooks of a parent module: while it runs, its tpde children keep a weight they were asked for."""

    def __init__(self) -> None:
        self.depth = 0

    @classmethod
    def install(cls, parent: nn.Module) -> None:
        window = cls()
        parent.__dict__[_WINDOW] = window
        parent.register_forward_pre_hook(window.pre)
        parent.register_forward_hook(window.post, always_call=True)

    @torch.compiler.disable
    def pre(self, parent: nn.Module, args: tuple) -> None:
        self.depth += 1

    @torch.compiler.disable
    def post(self, parent: nn.Module, args: tuple, output: object) -> None:
        # max(): a window installed during a call sees its post hook without its pre hook
        self.depth = max(0, self.depth - 1)
        if self.depth == 0:
            for child in parent._modules.values():
                if child is not None:
                    child.__dict__.pop(_CACHE, None)


__all__ = ["exposed_weight", "holder_weight", "remember_parent", "take_cached_weight", "weight_for_forward"]
