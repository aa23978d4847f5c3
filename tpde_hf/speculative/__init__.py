"""Exact generation drafted by the embedded 4-bit base (self-speculative decoding).

Every tpde repo carries a 4-bit model with the exact model's architecture and tokenizer; in
``lossless`` mode it is already resident. :func:`draft_model` turns it into a draft model for
transformers' assisted generation, sharing the base tensors with the exact model:

    exact = AutoModelForCausalLM.from_pretrained(repo, quantization_config=tpde_hf.TpdeConfig(mode="lossless"))
    draft = tpde_hf.draft_model(exact)
    out = exact.generate(**enc, assistant_model=draft, do_sample=False, max_new_tokens=128)
    pipe = pipeline("text-generation", model=exact, tokenizer=tok, assistant_model=draft)

* :mod:`~tpde_hf.speculative.draft`: the draft view and its refusals;
* :mod:`~tpde_hf.speculative.exact`: :func:`generate_exact`, whose greedy tokens are bit-identical to plain
  ``lossless`` decoding (the verifier computes each drafted row as a one-token forward would);
* :mod:`~tpde_hf.speculative.tree`: the token tree ``generate_exact`` verifies per weight rebuild (the draft's
  chain plus its runner-up tokens as leaves), :class:`TreeOptions`;
* :mod:`~tpde_hf.speculative.rowcheck`: which batched linear products a run-time check found
  row-identical (evidence, not proof; off by default);
* :mod:`~tpde_hf.speculative.stats`: :func:`track`, acceptance counts of assisted generation;
* :mod:`~tpde_hf.speculative.base_paths`: how a draft layer applies the base (CPU int4 kernel, Triton,
  dequantize per forward, cached dense).
"""

from tpde_hf.speculative.draft import (
    DraftError,
    TpdeDraftLinear,
    draft_layers,
    draft_memory,
    draft_model,
    is_draft,
)
from tpde_hf.speculative.exact import exact_verifier, generate_exact
from tpde_hf.speculative.stats import SpeculationStats, track
from tpde_hf.speculative.tree import TreeOptions

__all__ = ["DraftError", "SpeculationStats", "TpdeDraftLinear", "TreeOptions", "draft_layers", "draft_memory",
           "draft_model", "exact_verifier", "generate_exact", "is_draft", "track"]
