"""The weight converters of a ``dequantize`` load, and their removal once the model is loaded.

In ``mode="dequantize"`` transformers decodes each tpde weight as it reads it: a ``WeightConverter`` runs
:class:`~tpde_hf.loading.TpdeDequantize` on the weight's parts. :func:`dequantize_converters` makes those
converters (the model's own converters widened to read the tpde parts too, 3-D expert stacks first;
:func:`catch_all_converters` goes last); :func:`restore_converters` puts the model's own converters back
after loading, so that ``save_pretrained`` writes the checkpoint's original key layout.

Example::

    conversions = dequantize_converters(quantizer, model_conversions, storage_suffixes, stacks, originals)
    conversions += catch_all_converters(quantizer)  # the parts no other converter took
    ...  # transformers loads through them
    restore_converters(model, originals)
"""

from __future__ import annotations

from typing import Any

from torch import nn

from tpde_hf.codec import SUFFIXES


def catch_all_converters(hf_quantizer: Any) -> list:
    """One converter that decodes every remaining ``X.{qweight,...}`` group into ``X.weight``."""
    from transformers.core_model_loading import WeightConverter

    from tpde_hf.loading.ops import TpdeDequantize

    return [WeightConverter(list(SUFFIXES), "weight", [TpdeDequantize(hf_quantizer)], force_cpu=True)]


def dequantize_converters(hf_quantizer: Any, weight_conversions: list, storage: dict[str, Any], stacks: list,
                          originals: dict[int, Any]) -> list:
    """The converters of a ``dequantize`` load that go before all others: the 3-D expert stacks, then the
    model's own converters widened to read the tpde parts (transformers tries them in order).

    ``storage``: the tpde parts of weights laid out by a base storage (``storage_dequantize_suffixes``);
    ``stacks``: the plan's 3-D expert stacks; ``originals`` receives ``{id(widened): the model's converter}``.
    """
    from transformers.core_model_loading import WeightConverter

    from tpde_hf.loading.ops import TpdeDequantize, expert_stack_dequantize_converter

    extra = [s for sfx in storage.values() for s in sfx]
    updated = []
    for conv in weight_conversions:
        sources = getattr(conv, "_original_source_patterns", None)
        if not isinstance(conv, WeightConverter) or not sources or not all(s.endswith(".weight") for s in sources):
            updated.append(conv)
            continue
        all_sources = [s[: -len("weight")] + suffix for s in sources
                       for suffix in ("weight", *SUFFIXES, *extra)]
        new = conv.copy(all_sources, conv._original_target_patterns,
                        operations=[TpdeDequantize(hf_quantizer, None, storage), *conv.operations])
        originals[id(new)] = conv
        updated.append(new)
    # 3-D expert tensors stored as one tpde weight per expert: first, so that no other converter takes their
    # parts; the longest names first, so that one tensor's name inside another's never takes the other's slices
    stacked = [expert_stack_dequantize_converter(st, hf_quantizer)
               for st in sorted(stacks, key=lambda st: -len(st.renamed))]
    return stacked + updated


def restore_converters(model: nn.Module, originals: dict[int, Any]) -> None:
    """A dequantized model saves as a plain one: drop the tpde ops from its saved conversions."""
    from tpde_hf.loading.ops import TpdeDequantize

    kept = []
    for conv in getattr(model, "_weight_conversions", None) or []:
        ops = getattr(conv, "operations", [])
        original = originals.get(id(conv))
        if original is not None:
            original._was_used = True
            kept.append(original)
        elif any(isinstance(op, TpdeDequantize) for op in ops):
            continue
        else:
            kept.append(conv)
    model._weight_conversions = kept
