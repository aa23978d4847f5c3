"""The draft view of a ``lossless`` tpde model: the same model running its embedded 4-bit base.

:func:`draft_model` returns a second model object for transformers' assisted generation. It is a
*structural* copy of the exact model: every ``nn.Module`` object is new (so replacing a layer in
the draft never touches the exact model), but every parameter and buffer is the same tensor object
(embeddings, norms, the dense ``lm_head``, rotary buffers). Each :class:`~tpde_hf.nn.TpdeLinear`
becomes a :class:`TpdeDraftLinear` that references the layer's own ``qweight``, ``scales``,
``zeros`` (and ``bias``) and computes ``x @ P.T + bias`` with the 4-bit prediction ``P``; the delta
is never read. transformers gives the assistant its own KV cache, so the two models share weights
but no state.

What the draft adds in memory depends on its backend (:mod:`tpde_hf.speculative.base_paths`):
nothing for ``dequantize`` and ``triton``; a repacked copy of the 4-bit codes and scales for ``int4``
(the CPU default: about the size of the base); a dense copy of every converted weight for ``dense``.
:func:`draft_memory` reports it.

Not supported yet (refused with an error naming the module): fused MoE experts and other weights
rebuilt by a forward hook (``TpdeWeightStore``), models whose parts are offloaded to disk, and
``base`` / ``dequantize`` models (a ``base`` model *is* the draft; a ``dequantize`` model holds no
4-bit base).

In ``lossless-offload`` (a CUDA mode) the base is resident and the delta streams from pinned host
memory; the draft needs only the base, so each verification forward streams every delta once for up to
``k + 1`` tokens, instead of once per token.

Example::

    exact = AutoModelForCausalLM.from_pretrained(repo, quantization_config=tpde_hf.TpdeConfig(mode="lossless"))
    draft = tpde_hf.draft_model(exact)
    out = exact.generate(**enc, assistant_model=draft, do_sample=False, max_new_tokens=64)
"""

from __future__ import annotations

import copy
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tpde_hf.codec.ordinal import CODE_DTYPES
from tpde_hf.nn import TpdeLinear, TpdeWeightStore
from tpde_hf.nn.holder import meta_values
from tpde_hf.speculative.base_paths import PATHS, choose_backend

#: Draft defaults for transformers' assisted generation (``draft.generation_config``), from
#: benchmarks/results/speculative.md (SmolLM2-135M, CPU, 2026-12-06): 6 and 8 drafted tokens were the fastest
#: there (a draft token costs about 1/30 of a verification), the ``heuristic`` schedule and transformers'
#: confidence stop were slower.
DEFAULT_NUM_ASSISTANT_TOKENS = 6
DEFAULT_SCHEDULE = "constant"
#: 0 disables transformers' early stop of a draft on a low-confidence token (its own default is 0.4):
#: drafting costs a few percent of a verification here, so a longer draft is cheap.
DEFAULT_CONFIDENCE_THRESHOLD = 0.0


class DraftError(ValueError):
    """The model cannot be drafted by its base (mode, layer kind or placement not supported)."""


class TpdeDraftLinear(nn.Module):
    """The base path of one :class:`~tpde_hf.nn.TpdeLinear`, on the *same* base tensors.

    ``qweight``, ``scales``, ``zeros``, ``meta`` and ``bias`` are the exact layer's parameter objects
    (``data_ptr`` equal); a backend may add buffers (``int4_packed``...: see
    :mod:`~tpde_hf.speculative.base_paths`). No dense weight is held unless ``backend="dense"``.
    :meth:`quantized` instead drafts a dense ``nn.Linear`` (e.g. a tied ``lm_head`` that tpde keeps
    dense) with a 4-bit copy of its own, held as buffers.
    """

    def __init__(self, layer: TpdeLinear | None, backend: str = "auto", *, _parts: dict | None = None):
        super().__init__()
        if layer is not None:
            for s in ("qweight", "scales", "zeros", "meta"):
                self.register_parameter(s, layer._parameters[s])
            self.register_parameter("bias", layer._parameters.get("bias"))
            vals = meta_values(layer)
            self.in_features, self.out_features = layer.in_features, layer.out_features
            self.transposed = layer.transposed
            self.out_rows, self.in_cols = vals[2], vals[3]  # the stored weight's shape ([in, out] for Conv1D)
            self.group_size = vals[4]
            self.source_dtype = CODE_DTYPES[vals[1]]
            self.compute_dtype = layer.compute_dtype or self.source_dtype
            self.tpde_name = layer.__dict__.get("_tpde_name", "weight")
        else:  # a 4-bit copy of a dense layer (see quantized())
            p = dict(_parts or {})
            for s in ("qweight", "scales", "zeros"):
                self.register_buffer(s, p.pop(s), persistent=False)
            self.register_parameter("bias", p.pop("bias"))
            for k, v in p.items():
                setattr(self, k, v)
        self.backend = choose_backend(backend, self.qweight.device, self.transposed, self.group_size)
        self._path = PATHS[self.backend](self)
        for name, t in self._path.extra_tensors().items():
            self.register_buffer(name, t, persistent=False)

    @classmethod
    def quantized(cls, linear: nn.Linear, backend: str = "auto", group_size: int = 128,
                  name: str = "weight") -> TpdeDraftLinear:
        """A draft layer for a dense ``nn.Linear``: tpde's own 4-bit round-to-nearest of its weight (a copy:
        ``out * in / 2`` bytes of codes plus the scales), the bias shared."""
        from tpde_hf.codec.base_quant import quantize

        w = linear.weight.detach()
        base = quantize(w.to("cpu"), group_size)
        parts = {"qweight": base.qweight.to(w.device), "scales": base.scales.to(w.device),
                 "zeros": base.zeros.to(w.device), "bias": linear._parameters.get("bias"),
                 "in_features": linear.in_features, "out_features": linear.out_features, "transposed": False,
                 "out_rows": w.shape[0], "in_cols": w.shape[1], "group_size": group_size,
                 "source_dtype": w.dtype, "compute_dtype": w.dtype, "tpde_name": name}
        return cls(None, backend, _parts=parts)

    @property
    def weight(self) -> torch.Tensor:
        """The 4-bit prediction ``P`` this layer drafts with (rebuilt on each read; for model code that
        reads ``.weight``). The ``int4`` backend computes with ``P``'s scales rounded to the compute dtype."""
        return PATHS["dequantize"](self).weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        y = self._path(x2)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def _apply(self, fn, recurse: bool = True):
        _refuse_apply(fn, recurse)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"backend={self.backend}, shares={self.tpde_name}")


# ==================================================================== building the view
def _check_supported(model: nn.Module) -> list[tuple[str, TpdeLinear]]:
    """The model's TpdeLinear layers; raises :class:`DraftError` for anything the draft cannot run."""
    if isinstance(model, TpdeDraftLinear) or getattr(model, "_tpde_is_draft", False):
        raise DraftError("tpde draft: this model is already a draft view; pass the exact (lossless) model")
    layers: list[tuple[str, TpdeLinear]] = []
    for name, m in model.named_modules():
        if isinstance(m, TpdeLinear):
            mode = m.mode
            if mode == "base":
                raise DraftError(
                    f"tpde draft: the model was loaded with mode='base' (layer {name!r}): it already runs the 4-bit "
                    "base and has no exact weights to verify with. Load it with TpdeConfig(mode='lossless') and "
                    "draft with tpde_hf.draft_model(model), or use the base model directly."
                )
            # lossless-offload keeps the base resident (the delta streams from host memory): the draft needs
            # only the base, so a verification forward streams each delta once for k drafted tokens
            if mode not in ("lossless", "lossless-offload"):
                raise DraftError(f"tpde draft: layer {name!r} has mode {mode!r}; the draft view needs 'lossless' "
                                 "or 'lossless-offload'")
            for s in ("qweight", "scales", "zeros", "meta"):
                p = m._parameters.get(s)
                if p is None or p.device.type == "meta":
                    raise DraftError(
                        f"tpde draft: the base of layer {name!r} is not in memory ({s} "
                        f"{'missing' if p is None else 'on the meta device, offloaded to disk'}); the draft view "
                        "needs every layer resident (no disk offload)"
                    )
            layers.append((name, m))
        elif isinstance(m, TpdeWeightStore) or ("qweight" in m._parameters and "meta" in m._parameters):
            raise DraftError(
                f"tpde draft: module {name!r} ({type(m).__name__}) holds a tpde weight that a forward hook rebuilds "
                "(fused MoE experts, or a weight that is not an nn.Linear); the draft view supports only models whose "
                "converted weights are all TpdeLinear layers (dense and attention layers of Llama, Qwen, Mistral, "
                "GPT-2, Phi-3, ...) for now"
            )
    if not layers:
        raise DraftError(
            f"tpde draft: {type(model).__name__} has no TpdeLinear layers, so no 4-bit base to draft with: not a "
            "tpde model loaded in 'lossless' mode. A tpde repo loaded with mode='dequantize' (the CPU default) "
            "holds only the dense exact weights: reload it with TpdeConfig(mode='lossless')."
        )
    return layers


def _structural_copy(module: nn.Module, memo: dict[int, nn.Module]) -> nn.Module:
    """New module objects all the way down; parameters, buffers and other attributes are shared."""
    done = memo.get(id(module))
    if done is not None:
        return done
    new = copy.copy(module)
    memo[id(module)] = new
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    for hooks in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                  "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called", "_state_dict_hooks",
                  "_load_state_dict_pre_hooks", "_state_dict_pre_hooks", "_load_state_dict_post_hooks"):
        if hooks in module.__dict__:
            new.__dict__[hooks] = copy.copy(module.__dict__[hooks])
    new._modules = {k: (None if c is None else _structural_copy(c, memo)) for k, c in module._modules.items()}
    return new


def draft_model(model: nn.Module, *, backend: str = "auto", num_assistant_tokens: int | None = None,
                schedule: str | None = None, confidence_threshold: float | None = None,
                lm_head: str = "shared") -> nn.Module:
    """A draft view of ``model`` (a tpde model loaded in ``lossless`` mode) for assisted generation.

    Args:
        model: the exact model; it is not modified.
        backend: how the draft applies the 4-bit base: ``"auto"`` (``int4`` on CPU, ``triton`` on CUDA),
            ``"int4"``, ``"triton"``, ``"dequantize"`` or ``"dense"`` (see :mod:`tpde_hf.speculative.base_paths`).
        num_assistant_tokens: tokens drafted per verification (``draft.generation_config.num_assistant_tokens``;
            default :data:`DEFAULT_NUM_ASSISTANT_TOKENS`).
        schedule: transformers' ``num_assistant_tokens_schedule`` (``"constant"``, ``"heuristic"``,
            ``"heuristic_transient"``); default :data:`DEFAULT_SCHEDULE`.
        confidence_threshold: transformers' ``assistant_confidence_threshold``: the draft stops early when its top
            probability falls below it; ``0`` disables it; default :data:`DEFAULT_CONFIDENCE_THRESHOLD`.
        lm_head: what the draft does with an output layer that tpde kept dense (tpde's default for ``lm_head``,
            often tied to the embeddings): ``"shared"`` (default) runs the exact model's own dense layer;
            ``"int4"`` drafts with a 4-bit copy of it (:meth:`TpdeDraftLinear.quantized`: about ``out * in / 2``
            bytes more). On SmolLM2 the copy cut top-1 agreement from 64% to 57% for a few percent of draft
            speed: not the default.

    Returns:
        A model of the same class, sharing every tensor with ``model``: pass it as ``assistant_model`` to
        ``model.generate`` or to a ``pipeline``. Greedy output is the exact model's (see the README for what
        is bit-identical); with ``do_sample=True`` transformers runs speculative sampling, which preserves the
        exact model's distribution.

    Raises:
        DraftError: the model is not a fully resident ``lossless`` tpde model of supported layers.
    """
    layers = _check_supported(model)
    memo: dict[int, nn.Module] = {}
    draft = _structural_copy(model, memo)
    for name, layer in layers:
        parent_path, _, child = name.rpartition(".")
        parent = draft.get_submodule(parent_path) if parent_path else draft
        parent._modules[child] = TpdeDraftLinear(layer, backend)
    if lm_head not in ("shared", "int4"):
        raise ValueError(f"tpde draft: lm_head={lm_head!r}; expected 'shared' or 'int4'")
    out = draft.get_output_embeddings() if hasattr(draft, "get_output_embeddings") else None
    if lm_head == "int4" and type(out) is nn.Linear:
        head_name = next(n for n, m in draft.named_modules() if m is out)
        parent_path, _, child = head_name.rpartition(".")
        parent = draft.get_submodule(parent_path) if parent_path else draft
        parent._modules[child] = TpdeDraftLinear.quantized(out, backend, name=f"{head_name}.weight (draft copy)")
    # its own generation settings; the exact model's stay as they were
    if getattr(model, "generation_config", None) is not None:
        gc = copy.deepcopy(model.generation_config)
        gc.num_assistant_tokens = num_assistant_tokens or DEFAULT_NUM_ASSISTANT_TOKENS
        gc.num_assistant_tokens_schedule = schedule or DEFAULT_SCHEDULE
        gc.assistant_confidence_threshold = (DEFAULT_CONFIDENCE_THRESHOLD if confidence_threshold is None
                                             else float(confidence_threshold))
        draft.__dict__["generation_config"] = gc
    draft.__dict__.pop("save_pretrained", None)  # the exact model's wrapper (bound to the exact model)
    draft.__dict__["save_pretrained"] = _refuse_save
    draft.__dict__["_apply"] = _refuse_apply  # .to() / .float() / .cuda() would move the exact model's tensors
    draft.__dict__["_tpde_is_draft"] = True
    draft.__dict__["_tpde_draft_of"] = weakref.ref(model)  # weak: generate_exact caches drafts by model
    return draft


def _refuse_apply(fn: Any = None, recurse: bool = True) -> None:
    raise RuntimeError(
        "tpde draft: a draft view shares its tensors with the exact model; move or cast the exact model, "
        "then build a new draft with tpde_hf.draft_model(model)"
    )


def _refuse_save(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError("tpde draft: a draft view has no delta and shares its tensors; save the exact model instead")


def draft_layers(draft: nn.Module) -> list[tuple[str, TpdeDraftLinear]]:
    """The draft's converted layers."""
    return [(n, m) for n, m in draft.named_modules() if isinstance(m, TpdeDraftLinear)]


def draft_memory(draft: nn.Module) -> dict[str, Any]:
    """Bytes of the draft's converted layers: shared with the exact model, and added by the draft.

    ``shared_base_bytes``: the exact model's base tensors the draft reads (no copy). ``backend_bytes``: what
    the backends hold besides (the int4 kernel's repacked codes and scales, or a dense copy).
    ``copy_bytes``: 4-bit copies of layers the exact model keeps dense (``lm_head="int4"``).
    ``added_bytes``: the last two together.
    """
    shared, backend_bytes, copies, backends = 0, 0, 0, {}
    seen: set[int] = set()
    for _, m in draft_layers(draft):
        backends[m.backend] = backends.get(m.backend, 0) + 1
        for s in ("qweight", "scales", "zeros"):
            t = m._parameters.get(s)
            if t is not None and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                shared += t.numel() * t.element_size()
        for name, t in m._buffers.items():
            if t is None:
                continue
            if name in ("qweight", "scales", "zeros"):
                copies += t.numel() * t.element_size()
            else:
                backend_bytes += t.numel() * t.element_size()
    return {"shared_base_bytes": shared, "backend_bytes": backend_bytes, "copy_bytes": copies,
            "added_bytes": backend_bytes + copies, "backends": backends}


def is_draft(model: nn.Module) -> bool:
    return bool(model.__dict__.get("_tpde_is_draft"))


def linear_reference(layer: TpdeDraftLinear, x: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, P, bias)`` with the exact 4-bit prediction (what every backend approximates or equals)."""
    w = PATHS["dequantize"](layer).weight().to(x.dtype)
    if layer.transposed:
        y = x @ w
        return y + layer.bias.to(y.dtype) if layer.bias is not None else y
    return F.linear(x, w, None if layer.bias is None else layer.bias.to(x.dtype))


__all__ = ["DEFAULT_NUM_ASSISTANT_TOKENS", "DEFAULT_SCHEDULE", "DraftError", "TpdeDraftLinear", "draft_layers",
           "draft_memory", "draft_model", "is_draft", "linear_reference"]
