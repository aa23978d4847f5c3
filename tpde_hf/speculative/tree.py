"""Greedy exact generation that verifies a small token tree per weight rebuild.

In ``lossless`` mode a verification forward costs one rebuild of every weight (about one plain token)
plus one cheap one-row forward per verified row. So a round should verify as many *likely* candidates as
the rebuild allows. :func:`generate_tree` drafts a greedy chain with the 4-bit draft (one draft forward
per token), and adds as leaves the draft's 2nd/3rd choices at each depth: they cost no draft forward, and
when the exact token at depth ``j`` is not the chain's but is a leaf's, the leaf's own exact row gives one
more token. Candidates are chosen by the draft's probabilities: the chain stops when the probability of
reaching the next depth (the product of the draft's top probabilities) falls below ``chain_min``; a leaf
is kept when the probability of reaching it times the draft's probability of it is at least
``leaf_min``; ``max_rows`` caps the tree.

Every verified row is computed as plain one-token decoding computes it: the verifier view
(:func:`~tpde_hf.speculative.exact.exact_verifier`) multiplies rows one at a time (or in chunks found
row-identical, :mod:`~tpde_hf.speculative.rowcheck`) and runs attention per row over exactly its own
prefix's keys (a leaf: the keys of its ancestors, gathered into the contiguous layout a plain cache has),
at its own position. After a round the exact cache keeps the accepted rows only, in order, so each row's
keys and values are those plain decoding would have stored. The emitted tokens are the exact model's
greedy tokens, bit for bit.

Two things make the rows cheaper without changing a bit (``TreeOptions``): after the prefill the forward runs
at one torch thread (one-row products and attention calls are too small to share; a product keeps the plain
thread count unless :func:`~tpde_hf.speculative.rowcheck.threads_identical` found its one-row bits unchanged);
and, opt-in (``head_argmax=True``), each row's greedy token comes from
:func:`~tpde_hf.speculative.headmax.certified_argmax` (one batched ``lm_head`` product and error bounds that pin
plain decoding's argmax; a row it cannot certify runs the plain one-row product).

Example::

    out = generate_tree(verifier, draft, input_ids, max_new_tokens=64, eos_token_ids={2})
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from tpde_hf.speculative.rowcheck import torch_threads


@dataclass(frozen=True)
class TreeOptions:
    """How many candidates a round verifies (module docstring).

    ``max_depth``: chain tokens drafted at most; ``chain_min``: stop the chain once the draft's probability of
    reaching the next depth is below it; ``leaf_min``: the least estimated probability of a kept leaf;
    ``alternatives``: leaves considered per depth (the draft's 2nd, 3rd... choices); ``max_rows``: chain
    plus leaves at most; ``batch``: let the verifier batch rows where :mod:`.rowcheck` found them row-identical
    (off by default: a random check is evidence, not proof; with a weaker check, batching changed SmolLM2's
    greedy tokens at exact logit ties, benchmarks/results/speculative_tree.md). ``row_threads``: torch threads
    of a verification forward after the prefill (``None``: unchanged): its one-row products and attention calls
    are too small to share between threads (with ``OMP_WAIT_POLICY=PASSIVE`` each call wakes the other
    threads); a product keeps the plain thread count where its one-row bits could differ
    (:func:`~tpde_hf.speculative.rowcheck.threads_identical`) or where it is large (the ``lm_head``).
    ``draft_threads``: torch threads while drafting (the draft's output need not match anything).
    ``head_argmax``: take each row's greedy token from one batched ``lm_head`` product and error bounds that
    certify plain decoding's argmax (:mod:`~tpde_hf.speculative.headmax`; uncertified rows run the plain product).
    Off by default: its gain measured within the noise on SmolLM2 (1.854 vs 1.836 tokens/s), and it assumes the
    plain kernel accumulates in fp32 and rounds once, which the row-by-row path does not need to assume.
    """

    max_depth: int = 8
    chain_min: float = 0.15
    leaf_min: float = 0.04
    alternatives: int = 3
    max_rows: int = 14
    batch: bool = False
    row_threads: int | None = 1
    draft_threads: int | None = 1
    head_argmax: bool = False  # opt-in: measured within the noise of the plain head, and it rests on a bound

    def __post_init__(self) -> None:
        if self.max_depth < 0 or self.alternatives < 0 or self.max_rows < 0:
            raise ValueError(f"tpde TreeOptions: negative sizes in {self}")
        if not (0.0 <= self.chain_min <= 1.0 and 0.0 <= self.leaf_min <= 1.0):
            raise ValueError(f"tpde TreeOptions: chain_min / leaf_min must lie in [0, 1] ({self})")
        if any(t is not None and t < 1 for t in (self.row_threads, self.draft_threads)):
            raise ValueError(f"tpde TreeOptions: row_threads / draft_threads must be >= 1 or None ({self})")


#: model classes whose forward changes the lm_head's output: the certified argmax does not apply to them
_HEAD_POSTPROCESSED: set[type] = set()


@dataclass
class _Tree:
    chain: list[int]
    leaves: list[tuple[int, int]]  # (depth 1..len(chain)+1, token)


def _draft_tree(draft: nn.Module, cache, feed: list[int], depth_cap: int, opts: TreeOptions) -> tuple[_Tree, int]:
    """The draft's greedy chain and leaf candidates; returns the tree and how many tokens the draft consumed."""
    chain: list[int] = []
    cands: list[tuple[float, int, int]] = []  # (estimated probability, depth, token)
    reach, fed = 1.0, 0
    while len(chain) < depth_cap:
        with torch_threads(opts.draft_threads):
            out = draft(input_ids=torch.tensor([feed]), cache=cache, use_cache=True, logits_to_keep=1)
        fed += len(feed)
        probs = out.logits[0, -1].float().softmax(-1)
        top = torch.topk(probs, 1 + opts.alternatives)
        vals, idx = top.values.tolist(), top.indices.tolist()
        depth = len(chain) + 1
        cands += [(reach * q, depth, t) for q, t in zip(vals[1:], idx[1:], strict=True)]
        chain.append(idx[0])
        reach *= vals[0]
        if reach < opts.chain_min:
            break
        feed = [idx[0]]
    room = max(0, opts.max_rows - len(chain))
    leaves = [(d, t) for p, d, t in sorted(cands, reverse=True) if p >= opts.leaf_min][:room]
    return _Tree(chain, sorted(leaves)), fed


def _keep_rows(cache, keep: torch.Tensor) -> None:
    """Keep the cache positions ``keep`` (in order) in every layer."""
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(-2, keep)
        layer.values = layer.values.index_select(-2, keep)


def _crop(cache, length: int) -> None:
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)  # transformers 5: a negative count of tokens to remove


def generate_tree(verifier: nn.Module, draft: nn.Module, input_ids: torch.Tensor, *, max_new_tokens: int,
                  eos_token_ids: set[int], opts: TreeOptions | None = None, streamer=None,
                  on_round: Callable[[int, int, int, int], None] | None = None) -> torch.Tensor:
    """Greedy tokens of the exact model (bit for bit), drafted as a token tree; see the module docstring.

    Args:
        verifier: :func:`~tpde_hf.speculative.exact.exact_verifier` of the exact model.
        draft: the draft model (``draft_model(model)``).
        input_ids: ``[1, length]``.
        max_new_tokens, eos_token_ids: when plain greedy generation would stop (after an end token, included).
        opts: :class:`TreeOptions`.
        streamer: a transformers streamer (``put`` / ``end``), fed as tokens are accepted.
        on_round: called per round with (chain length, chain tokens accepted, leaf accepted 0/1, rows verified).

    Returns:
        ``[1, length + new]``: the prompt and the new tokens.
    """
    from transformers import DynamicCache

    opts = opts or TreeOptions()
    rows = verifier.__dict__["_tpde_rows"]
    rows.batch = opts.batch
    ambient = torch.get_num_threads()
    seq: list[int] = input_ids[0].tolist()
    prompt_len = len(seq)
    cache, dcache = DynamicCache(config=verifier.config), DynamicCache(config=draft.config)
    n_exact, n_draft = 0, 0  # tokens whose keys and values each cache holds
    if streamer is not None:
        streamer.put(input_ids.cpu())
    try:
        while True:
            new = len(seq) - prompt_len
            pending = seq[n_exact:]  # the prompt in the first round, then the last emitted token
            # the root row yields one token; a chain deeper than the tokens still wanted is wasted
            depth_cap = min(opts.max_depth, max_new_tokens - new - 1)
            tree, fed = (_draft_tree(draft, dcache, seq[n_draft:], depth_cap, opts) if depth_cap > 0
                         else (_Tree([], []), 0))
            n_draft += fed
            k = len(tree.chain)
            base = n_exact + len(pending)  # cache length through the root (the last pending token)
            ids = pending + tree.chain + [t for _, t in tree.leaves]
            positions = list(range(n_exact, base)) + [base - 1 + j for j in range(1, k + 1)]
            positions += [base - 1 + d for d, _ in tree.leaves]
            segments = ([len(pending)] if n_exact == 0 else [1] * len(pending)) + [1] * (k + len(tree.leaves))
            keys: list[torch.Tensor | None] = [None] * (len(segments) - len(tree.leaves))
            for i, (d, _) in enumerate(tree.leaves):
                keys.append(torch.cat([torch.arange(base + d - 1), torch.tensor([base + k + i])]))
            n_logits = 1 + k + len(tree.leaves)
            # after the prefill every row is a one-row product: fewer threads where that keeps the bits (TreeOptions)
            few = opts.row_threads if n_exact > 0 and (opts.row_threads or ambient) < ambient else None
            argmax = opts.head_argmax and type(verifier) not in _HEAD_POSTPROCESSED
            while True:
                rows.plan(segments, keys)
                rows.want_argmax, rows.best, rows.placeholder = argmax, None, None
                rows.ambient = ambient if few is not None else None
                try:
                    with torch.no_grad(), torch_threads(few):
                        logits = verifier(input_ids=torch.tensor([ids]), position_ids=torch.tensor([positions]),
                                          cache=cache, use_cache=True, logits_to_keep=n_logits).logits
                finally:
                    rows.ambient, rows.want_argmax = None, False
                if rows.best is None or logits is rows.placeholder:
                    break
                # the model changed the lm_head's output (scaled, capped...): this forward again, with real logits
                _HEAD_POSTPROCESSED.add(type(verifier))
                argmax = False
                _crop(cache, n_exact)
            if rows.best is not None:
                best = rows.best
            else:  # plain greedy decoding: argmax of the float32 copy of each row's logits
                best = logits[0].to(dtype=torch.float32).argmax(-1).tolist()
            emitted, accepted, leaf = [], 0, None
            t = best[0]
            while True:
                emitted.append(t)
                if t in eos_token_ids or new + len(emitted) >= max_new_tokens:
                    break
                if accepted < k and t == tree.chain[accepted]:
                    accepted += 1
                    t = best[accepted]
                    continue
                hit = next((i for i, (d, tok) in enumerate(tree.leaves) if d == accepted + 1 and tok == t), None)
                if hit is not None:  # the exact token is a leaf: its own exact row gives one more
                    leaf = hit
                    t = best[1 + k + hit]
                    emitted.append(t)
                break
            if on_round is not None:
                on_round(k, accepted, int(leaf is not None), k + len(tree.leaves))
            seq += emitted
            if streamer is not None:
                streamer.put(torch.tensor(emitted))
            done = emitted[-1] in eos_token_ids or len(seq) - prompt_len >= max_new_tokens
            if done:
                break
            # the exact cache keeps the accepted rows only, in order (the last emitted token is not in it yet)
            keep = torch.arange(base + accepted)
            if leaf is not None:
                keep = torch.cat([keep, torch.tensor([base + k + leaf])])
            _keep_rows(cache, keep)
            n_exact = len(seq) - 1
            # the draft holds the tokens it was fed; keep those still on the accepted path
            n_draft = min(n_draft, base + accepted)
            _crop(dcache, n_draft)
    finally:
        rows.ambient = None
    if streamer is not None:
        streamer.end()
    return torch.tensor([seq])


__all__ = ["TreeOptions", "generate_tree", "torch_threads"]
