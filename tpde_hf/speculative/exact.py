"""Assisted generation whose tokens are bit-identical to plain greedy decoding of the exact model.

Plain greedy decoding runs the exact model one token at a time: each forward multiplies one row
(``M = 1``) by every weight and attends with one query. Assisted generation verifies ``k`` drafted
tokens in *one* forward: ``M = k + 1`` rows. The weights are the same (exact), but a matrix product
of ``k + 1`` rows is not always computed like ``k + 1`` products of one row: the CPU bf16 GEMM picks
its kernel by ``M`` (on SmolLM2 the first op to differ on equal inputs was layer 0's ``mlp.down_proj``,
1536 -> 576, at ``M = 10``), and attention with ``k + 1`` queries blocks differently too. The logits
then differ in their last bits; bf16 logits of SmolLM2 are often tied or one bf16 step apart (0.125
at a logit of 16), so the argmax flips there. The output is still the greedy output of the exact
weights, under different rounding, but not the token sequence of plain ``lossless`` generation:
over 4 prompts x 64 tokens every prompt diverged (benchmarks/results/speculative.md).

:func:`exact_verifier` removes that difference. It returns a view of the model (new module objects,
the same tensors, like :func:`~tpde_hf.speculative.draft_model`) in which a verification forward of
``M`` rows computes every row as plain decoding would have:

* each linear layer rebuilds its exact weight **once** per forward (the cost the draft amortizes) and
  multiplies it row by row (``F.linear`` on a ``[1, 1, in]`` tensor of its own, as plain decoding
  passes it: a view into the ``k + 1`` rows ran several times slower here, another kernel path); in the
  first forward the prompt rows are multiplied together, as the plain prefill did; the ``lm_head``
  (which plain decoding applies to one row, prefill included) always row by row;
* attention runs per row through transformers' own ``sdpa_attention_forward``, each query against
  the keys up to its position, in the layouts plain decoding passes (keys and values copied
  contiguous, as the plain decode's cache holds them);
* everything else (embeddings, norms, rotary, activations, residuals) is elementwise or reduces
  within a row, so a row's result does not depend on how many rows the tensor holds.

:func:`generate_exact` verifies with that view. Greedy generation (the default ``speculation="tree"``)
runs :mod:`~tpde_hf.speculative.tree`: per rebuild it verifies the draft's chain plus the draft's runner-up
tokens as leaves (each leaf row attends to its own ancestors); with ``TreeOptions(batch=True)``
consecutive one-row products are merged into chunks that :mod:`~tpde_hf.speculative.rowcheck` found
row-identical at run time (off by default). Sampling, processors and ``speculation="chain"`` run
transformers' assisted generation with that view as the verifier and the base as the draft. The extra
cost is one one-row product per row and layer instead of one product of all rows, and one small
attention call per row: on SmolLM2 (2-core CPU) about 0.03 s per drafted row, 15% of a verification at
``k = 6`` (the weight rebuild dominates).

Scope (checked, else :class:`~tpde_hf.speculative.draft.DraftError`): batch 1 without padding, CPU, models
whose attention goes through transformers' attention interface with SDPA and full causal attention
(no sliding window in use), greedy or sampling (sampling: speculative sampling; same distribution,
not the same random draws as plain sampling).

Example::

    out = tpde_hf.generate_exact(model, **tok(["Hello"], return_tensors="pt"), max_new_tokens=64)
"""

from __future__ import annotations

import copy
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tpde_hf.nn import TpdeLinear
from tpde_hf.nn.weight_access import weight_for_forward
from tpde_hf.speculative import headmax, rowcheck
from tpde_hf.speculative.draft import DraftError, _structural_copy, draft_model, is_draft
from tpde_hf.speculative.rowcheck import torch_threads
from tpde_hf.speculative.stats import record_tree_round
from tpde_hf.speculative.tree import TreeOptions, generate_tree

ATTN_NAME = "tpde_rowwise_sdpa"
_DRAFTS: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()


class _Rows:
    """How the rows of the current forward are grouped: as the plain decode would have computed them.

    ``segments``: row groups, each computed as one plain forward would have (the prompt together in the
    first forward, then one row each). ``keys``: per segment, the cache positions its query attends to
    (``None``: every position up to its own, as in a chain; a tensor: a token tree's row, its ancestors).
    ``batch``: whether consecutive one-row groups may share one linear call where :mod:`.rowcheck` has found
    that call row-identical for its shape.
    """

    def __init__(self) -> None:
        self.prompt_len = 0
        self.calls = 0
        self.segments: list[int] = []
        self.keys: list[torch.Tensor | None] = []
        self.batch = False
        #: torch's thread count of plain decoding while a forward runs with fewer (``TreeOptions.row_threads``):
        #: products that must or should run as plain decoding runs them switch back to it (``RowwiseLinear``)
        self.ambient: int | None = None
        #: set by the tree loop: the lm_head returns ``placeholder`` and leaves each row's plain argmax in ``best``
        #: (:mod:`~tpde_hf.speculative.headmax`); ``head_fallbacks`` counts rows it had to compute in full
        self.want_argmax = False
        self.best: list[int] | None = None
        self.placeholder: torch.Tensor | None = None
        self.head_fallbacks = 0
        self.head_rows = 0
        self._planned: tuple[list[int], list[torch.Tensor | None]] | None = None

    def plan(self, segments: list[int], keys: list[torch.Tensor | None]) -> None:
        """The grouping (and tree attention) of the next forward, set by a caller that builds its rows."""
        self._planned = (list(segments), list(keys))

    def start_forward(self, m: int) -> None:
        if self._planned is not None:
            self.segments, self.keys = self._planned
            self._planned = None
            if sum(self.segments) != m:
                raise DraftError(f"tpde exact verifier: planned {sum(self.segments)} rows, the forward has {m}")
        elif self.calls == 0 and self.prompt_len > 0:  # plain prefill: the prompt in one forward
            p = min(self.prompt_len, m)
            self.segments = [p] + [1] * (m - p)
            self.keys = [None] * len(self.segments)
        else:
            self.segments = [1] * m
            self.keys = [None] * m
        self.calls += 1

    def split(self, m: int) -> list[int]:
        """Row groups for a tensor of ``m`` rows; a tensor of other length (``lm_head`` after
        ``logits_to_keep``, which plain decoding always applies to one row) goes row by row."""
        return self.segments if sum(self.segments) == m else [1] * m


#: weights this large (``out * in``) keep plain decoding's thread count in a reduced-thread forward: SmolLM2's
#: tied ``lm_head`` (49152 x 576) ran 5.1 ms per row on 2 threads against 7.7 on one; its 576..1536-wide
#: products ran faster on one (2-core EPYC, OMP_WAIT_POLICY=PASSIVE, 2026-12-07)
FEW_THREADS_MAX_NUMEL = 1 << 22


class RowwiseLinear(nn.Module):
    """A linear layer (``TpdeLinear`` in lossless mode, ``nn.Linear`` or ``Conv1D``) applied per row group."""

    def __init__(self, source: nn.Module, rows: _Rows):
        super().__init__()
        self.source = source
        self.rows = rows
        self.transposed = type(source).__name__ == "Conv1D" or bool(getattr(source, "transposed", False))
        self.head_argmax = False  # the output layer, a plain resident nn.Linear (exact_verifier sets it)
        self._norms: headmax.HeadNorms | None = None

    def _weight(self, device: torch.device) -> torch.Tensor:
        if isinstance(self.source, TpdeLinear):  # one rebuild per forward
            return weight_for_forward(self.source, device, None)
        return self.source.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._weight(x.device)
        bias = self.source.bias
        ambient = self.rows.ambient
        if ambient is not None and ambient != torch.get_num_threads() and not self._few_threads_ok(w, x, bias):
            with torch_threads(ambient):
                return self._rows(x, w, bias)
        return self._rows(x, w, bias)

    def _argmax_rows(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Each row's plain greedy token (certified, else from the plain one-row product) into ``rows.best``;
        returns a placeholder the caller recognises (no logits are materialized)."""
        if self._norms is None or self._norms.key != headmax.HeadNorms.key_of(w):
            self._norms = headmax.HeadNorms.of(w)
        h = x.reshape(-1, x.shape[-1])
        best = headmax.certified_argmax(h, w, self._norms)
        for i, b in enumerate(best):
            if b is None:  # plain decoding's own product and its argmax of the float32 copy
                best[i] = int(self._one(h[i:i + 1].view(1, 1, -1), w, None).to(torch.float32).argmax())
                self.rows.head_fallbacks += 1
        self.rows.head_rows += len(best)
        self.rows.best = best
        self.rows.placeholder = x.new_empty((*x.shape[:-1], 0))
        return self.rows.placeholder

    def _few_threads_ok(self, w: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> bool:
        """Whether this product may run at the forward's reduced thread count: one-row products of a weight
        under :data:`FEW_THREADS_MAX_NUMEL` (a large one, the ``lm_head``, is faster on every thread) whose
        one-row bits :func:`~tpde_hf.speculative.rowcheck.threads_identical` found unchanged."""
        if self.rows.batch or x.dim() < 2 or x.shape[-2] != len(self.rows.split(x.shape[-2])) or self.transposed:
            return False
        if w.numel() >= FEW_THREADS_MAX_NUMEL or rowcheck.unsupported(w, x.dtype):
            return False
        return rowcheck.threads_identical(w.shape[1], w.shape[0], w.dtype, bias is not None,
                                          torch.get_num_threads(), self.rows.ambient)

    def _rows(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.head_argmax and self.rows.want_argmax and x.dim() >= 2 and headmax.supported(w, x, bias):
            return self._argmax_rows(x, w)
        if x.dim() < 2:
            return self._one(x, w, bias)
        parts, start = [], 0
        for n, merged in self._groups(x.shape[-2], w, bias, x.dtype):
            xs = x[..., start:start + n, :]
            if merged and not rowcheck.confirmed(w, n, bias):
                # first real call of this shape: the one-row products (always right), compared with the batch
                rows = [self._one(xs[..., i:i + 1, :], w, bias) for i in range(n)]
                rowcheck.record(w, n, bias, torch.equal(rowcheck.bits(torch.cat(rows, dim=-2)),
                                                        rowcheck.bits(self._one(xs, w, bias))))
                parts.extend(rows)
            else:
                parts.append(self._one(xs, w, bias))
            start += n
        return torch.cat(parts, dim=-2) if len(parts) > 1 else parts[0]

    def _groups(self, m: int, w: torch.Tensor, bias: torch.Tensor | None,
                dtype: torch.dtype) -> list[tuple[int, bool]]:
        """The row groups of ``_Rows.split`` (``merged`` False), with runs of one-row groups merged into chunks
        whose batched product :func:`~tpde_hf.speculative.rowcheck.rows_identical` has found row-identical."""
        groups = self.rows.split(m)
        if not self.rows.batch or self.transposed or rowcheck.unsupported(w, dtype):
            return [(n, False) for n in groups]
        out: list[tuple[int, bool]] = []
        run = 0
        for n in [*groups, 0]:
            if n == 1:
                run += 1
                continue
            while run:
                c = rowcheck.largest_identical_chunk(w.shape[1], w.shape[0], run, dtype, bias is not None)
                out.append((c, c > 1))
                run -= c
            if n:
                out.append((n, False))
        return out

    def _one(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # a tensor of its own, as plain decoding's activations are (a view into the k + 1 rows can take
        # another kernel path: same shape, different storage)
        x = x.clone(memory_format=torch.contiguous_format)
        if self.transposed:  # exactly Conv1D.forward / TpdeLinear's transposed path
            size_out = x.size()[:-1] + (w.shape[1],)
            return torch.addmm(bias, x.view(-1, x.size(-1)), w).view(size_out)
        return F.linear(x, w, bias)


def _rowwise_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs: Any):
    """SDPA per row group: each query against the keys up to its own position, with no mask (plain
    batch-1 decoding without padding passes none: full causal attention is implied)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rows: _Rows | None = module.__dict__.get("_tpde_rows")
    m, total = query.shape[2], key.shape[2]
    if rows is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    past = total - m
    outs, start = [], 0
    for n in rows.split(m):
        end = past + start + n
        # the layouts plain decoding passes: the query a [1, n, heads, dim] tensor of its own seen as
        # [1, heads, n, dim]; keys and values the cache's contiguous [1, kv_heads, end, dim]
        q = query[:, :, start:start + n].transpose(1, 2).clone(memory_format=torch.contiguous_format).transpose(1, 2)
        idx = rows.keys[len(outs)] if len(rows.keys) == len(rows.segments) and sum(rows.segments) == m else None
        if idx is not None:  # a tree row: its ancestors' keys, gathered into the contiguous layout of a cache
            k, v = key.index_select(2, idx), value.index_select(2, idx)
        else:
            k = key[:, :, :end].clone(memory_format=torch.contiguous_format) if end != total else key
            v = value[:, :, :end].clone(memory_format=torch.contiguous_format) if end != total else value
        out, _ = sdpa_attention_forward(module, q, k, v, None, **kwargs)
        outs.append(out)
        start += n
    return (torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]), None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, _rowwise_sdpa)
    if ATTN_NAME not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def _check_verifiable(model: nn.Module) -> None:
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise DraftError("tpde exact verifier: the model has no config (not a transformers model)")
    impl = getattr(cfg, "_attn_implementation", None)
    if impl not in ("sdpa", ATTN_NAME):
        raise DraftError(
            f"tpde exact verifier: the model uses attention implementation {impl!r}; the bit-identical verifier "
            "reproduces plain decoding's SDPA calls (load with attn_implementation='sdpa'), or call "
            "generate_exact(..., bit_identical=False)"
        )
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if getattr(text, "is_encoder_decoder", False):
        raise DraftError("tpde exact verifier: encoder-decoder models are not supported")
    types = set(getattr(text, "layer_types", None) or ["full_attention"])
    if types != {"full_attention"} or getattr(text, "sliding_window", None) not in (None, 0):
        raise DraftError(
            f"tpde exact verifier: layer types {sorted(types)} / sliding_window="
            f"{getattr(text, 'sliding_window', None)}: only full causal attention is reproduced row by row; "
            "call generate_exact(..., bit_identical=False)"
        )
    for name, m in model.named_modules():
        if isinstance(m, TpdeLinear) and m.mode != "lossless":
            raise DraftError(f"tpde exact verifier: layer {name!r} has mode {m.mode!r}; needs 'lossless'")
        p = next(m.parameters(recurse=False), None)
        if p is not None and p.device.type != "cpu":
            raise DraftError(
                f"tpde exact verifier: module {name!r} is on {p.device}; the bit-identical verifier is CPU-only "
                "for now (GPU plain decoding uses the Triton kernels' own shapes); call "
                "generate_exact(..., bit_identical=False)"
            )


def exact_verifier(model: nn.Module) -> nn.Module:
    """A view of ``model`` whose forwards compute each row as plain one-token decoding does (module docstring)."""
    if is_draft(model):
        raise DraftError("tpde exact verifier: pass the exact model, not its draft view")
    _check_verifiable(model)
    _register_attention()
    view = _structural_copy(model, {})
    rows = _Rows()
    config = copy.deepcopy(model.config)
    config._attn_implementation = ATTN_NAME
    from transformers.pytorch_utils import Conv1D

    for m in list(view.modules()):
        for attr, value in list(m.__dict__.items()):
            if value is model.config:
                m.__dict__[attr] = config
        m.__dict__["_tpde_rows"] = rows  # every module: the attention function finds it on whichever calls it
        for child_name, child in list(m._modules.items()):
            if isinstance(child, TpdeLinear) or type(child) in (nn.Linear, Conv1D):
                m._modules[child_name] = RowwiseLinear(child, rows)

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        rows.start_forward(int(ids.shape[1]))

    head = view.get_output_embeddings() if hasattr(view, "get_output_embeddings") else None
    if isinstance(head, RowwiseLinear) and type(head.source) is nn.Linear:
        head.head_argmax = True
    view.register_forward_pre_hook(pre, with_kwargs=True)
    view.__dict__.pop("save_pretrained", None)
    view.__dict__["_tpde_rows"] = rows
    view.__dict__["_tpde_is_verifier"] = True
    return view


#: generate() arguments the token-tree loop reproduces; any other sends generation to transformers' loop
_TREE_KWARGS = {"max_new_tokens", "do_sample", "pad_token_id", "eos_token_id", "streamer", "num_beams", "use_cache"}
#: generation settings that add a logits processor to plain greedy decoding (then transformers' loop runs)
_PROCESSORS = {"repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,),
               "min_new_tokens": (None, 0), "min_length": (None, 0), "forced_bos_token_id": (None,),
               "forced_eos_token_id": (None,), "suppress_tokens": (None,), "begin_suppress_tokens": (None,),
               "sequence_bias": (None,), "encoder_repetition_penalty": (None, 1.0), "guidance_scale": (None, 1.0),
               "exponential_decay_length_penalty": (None,), "stop_strings": (None,), "max_time": (None,),
               "watermarking_config": (None,), "renormalize_logits": (None, False), "num_beams": (None, 1)}


def _tree_settings(model: nn.Module, kwargs: dict[str, Any], prompt_len: int) -> tuple[int, set[int]] | None:
    """``(max_new_tokens, end tokens)`` when plain generation would be greedy with no logits processor, else None."""
    if set(kwargs) - _TREE_KWARGS:
        return None
    gc = copy.deepcopy(model.generation_config)
    gc.update(**{k: v for k, v in kwargs.items() if k != "streamer"})
    if gc.do_sample or any(getattr(gc, k, None) not in ok for k, ok in _PROCESSORS.items()):
        return None
    new = gc.max_new_tokens if gc.max_new_tokens is not None else gc.max_length - prompt_len
    eos = gc.eos_token_id
    eos = set() if eos is None else ({int(eos)} if isinstance(eos, int) else {int(e) for e in eos})
    return max(0, int(new)), eos


def generate_exact(model: nn.Module, input_ids: torch.Tensor | None = None, *, draft: nn.Module | None = None,
                   bit_identical: bool = True, attention_mask: torch.Tensor | None = None,
                   speculation: str = "tree", tree: TreeOptions | None = None, **generate_kwargs: Any):
    """``model.generate(...)`` drafted by the model's own 4-bit base; greedy tokens equal plain ``lossless``'s.

    Args:
        model: a tpde model loaded in ``lossless`` mode (CPU for ``bit_identical``).
        input_ids, attention_mask: one prompt (batch 1, no padding).
        draft: the draft model (default: ``draft_model(model)``, built once per model and kept).
        bit_identical: verify row by row (:func:`exact_verifier`), so that greedy tokens are bit-identical to
            plain greedy decoding of ``model``; ``False`` uses transformers' one-forward verification
            (exact weights, the ``k + 1``-row kernels' rounding).
        speculation: ``"tree"`` (default): greedy generation verifies the draft's chain plus its runner-up
            tokens as leaves per rebuild (:mod:`~tpde_hf.speculative.tree`, options ``tree``); ``"chain"``:
            transformers' assisted generation (``draft.generation_config.num_assistant_tokens`` tokens per
            round). Sampling, beam search, logits processors and ``bit_identical=False`` always take the chain
            (sampling: transformers' speculative sampling, which keeps the exact model's distribution).
        tree: :class:`~tpde_hf.speculative.tree.TreeOptions` of the tree.
        generate_kwargs: passed to ``generate`` (``max_new_tokens``, ``do_sample``, ``streamer``...).
    """
    if input_ids is None or input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise DraftError("tpde generate_exact: pass input_ids of one prompt, shape [1, length]")
    if attention_mask is not None and not bool(attention_mask.all()):
        raise DraftError("tpde generate_exact: the attention mask has padding; pass one unpadded prompt")
    if "assistant_model" in generate_kwargs:
        raise DraftError("tpde generate_exact: pass the draft as draft=..., not assistant_model=")
    if speculation not in ("tree", "chain"):
        raise ValueError(f"tpde generate_exact: speculation={speculation!r}; expected 'tree' or 'chain'")
    if draft is None:
        draft = _DRAFTS.get(model)
        if draft is None:
            draft = draft_model(model)
            _DRAFTS[model] = draft
    verifier = model
    if bit_identical:
        verifier = exact_verifier(model)
        verifier._tpde_rows.prompt_len = int(input_ids.shape[1])
        settings = _tree_settings(model, generate_kwargs, int(input_ids.shape[1])) if speculation == "tree" else None
        if settings is not None:
            with torch.no_grad():
                return generate_tree(verifier, draft, input_ids, max_new_tokens=settings[0], eos_token_ids=settings[1],
                                     opts=tree, streamer=generate_kwargs.get("streamer"), on_round=record_tree_round)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    with torch.no_grad():
        return verifier.generate(input_ids=input_ids, attention_mask=attention_mask, assistant_model=draft,
                                 **generate_kwargs)


__all__ = ["ATTN_NAME", "FEW_THREADS_MAX_NUMEL", "RowwiseLinear", "exact_verifier", "generate_exact"]
