"""Token-tree verification (``generate_exact``'s default), proven-row batching, speculative sampling.

* every verified row of a tree forward (chain rows and leaves) has the logits of plain one-token decoding
  of its own path, bit for bit, with and without row batching;
* ``generate_exact`` (tree) gives plain greedy tokens, stops where plain greedy stops (end token,
  ``max_new_tokens``), streams, and leaves generation with logits processors to transformers' loop;
* :mod:`tpde_hf.speculative.rowcheck` batches only shapes proven row-identical, and a real batched call
  that differs from its one-row calls disproves its shape (the one-row results are used);
* sampling: the first sampled token follows the exact model's distribution, not the draft's.

Tiny random models only (no timing asserts).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from tpde_hf import TpdeConfig
from tpde_hf.speculative import draft_model, rowcheck
from tpde_hf.speculative.exact import RowwiseLinear, exact_verifier, generate_exact
from tpde_hf.speculative.stats import track
from tpde_hf.speculative.tree import TreeOptions

PROMPTS = [[1, 5, 17, 42, 99, 3], [1, 77, 120, 8], [1, 61, 33, 150, 12, 400, 7, 9, 300]]
NEW = 20
#: a tree as wide as the tiny model allows: every depth drafted, three leaves per depth
WIDE = TreeOptions(max_depth=5, chain_min=0.0, leaf_min=0.0, alternatives=3, max_rows=20)


@pytest.fixture(scope="module")
def exact(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from tpde_hf.conversion import convert

    out = tmp_path_factory.mktemp("tree") / "tpde"
    convert(tiny_llama_dir, out)
    return AutoModelForCausalLM.from_pretrained(out, quantization_config=TpdeConfig(mode="lossless")).eval()


def _plain(model, ids: list[int], new: int = NEW, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False, pad_token_id=0, **kw)


def _one_token_logits(model, prompt: list[int], path: list[int]) -> torch.Tensor:
    """Plain decoding: the prompt in one forward, then one token per forward; the last row's logits."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(torch.tensor([prompt]), cache=cache, logits_to_keep=1).logits[0, -1]
        for t in path:
            out = model(torch.tensor([[t]]), cache=cache).logits[0, -1]
    return out


@pytest.mark.parametrize("batch", [False, True])
def test_tree_rows_are_one_token_rows(exact, batch: bool):
    """A tree forward after a prompt and after a first round: every row is its path's one-token row."""
    prompt, chain, leaves = PROMPTS[2], [10, 11, 12], [(1, 20), (2, 21), (2, 22), (3, 23)]
    view = exact_verifier(exact)
    rows = view.__dict__["_tpde_rows"]
    rows.batch = batch
    cache = DynamicCache(config=exact.config)
    p = len(prompt)
    # round 1: prompt (one segment, as plain prefill) + chain + leaves, each leaf attending to its ancestors
    ids = prompt + chain + [t for _, t in leaves]
    keys = [None] * (1 + len(chain)) + [torch.cat([torch.arange(p + d - 1), torch.tensor([p + 3 + i])])
                                        for i, (d, _) in enumerate(leaves)]
    pos = list(range(p)) + [p - 1 + j for j in (1, 2, 3)] + [p - 1 + d for d, _ in leaves]
    rows.plan([p] + [1] * (len(ids) - p), keys)
    with torch.no_grad():
        got = view(torch.tensor([ids]), position_ids=torch.tensor([pos]), cache=cache,
                   logits_to_keep=1 + len(chain) + len(leaves)).logits[0]
    paths = [[], *[chain[:j] for j in (1, 2, 3)], *[chain[:d - 1] + [t] for d, t in leaves]]
    for row, path in enumerate(paths):
        assert torch.equal(got[row], _one_token_logits(exact, prompt, path).to(got.dtype)), (batch, path)
    # keep the path prompt + chain[:1] + leaf (2, 22), as generate_tree does; then a second tree from token 5
    keep = torch.cat([torch.arange(p + 1), torch.tensor([p + 3 + 2])])
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys.index_select(-2, keep), layer.values.index_select(-2, keep)
    base = p + 3
    ids2 = [5, 30, 31]  # the pending token, then a chain of two
    keys2 = [None, None, None, torch.cat([torch.arange(base), torch.tensor([base + 2])])]
    rows.plan([1, 1, 1, 1], keys2)
    with torch.no_grad():
        got2 = view(torch.tensor([ids2 + [40]]), position_ids=torch.tensor([[base - 1, base, base + 1, base]]),
                    cache=cache, logits_to_keep=4).logits[0]
    before = [chain[0], 22]
    for row, path in enumerate([[5], [5, 30], [5, 30, 31], [5, 40]]):
        assert torch.equal(got2[row], _one_token_logits(exact, prompt, before + path).to(got2.dtype)), path


@pytest.mark.parametrize("opts", [TreeOptions(), WIDE, TreeOptions(alternatives=0, batch=False)],
                         ids=["default", "wide", "chain-only"])
def test_tree_generation_equals_plain_greedy(exact, opts: TreeOptions):
    draft = draft_model(exact)
    leaf_hits = 0
    for ids in PROMPTS:
        plain = _plain(exact, ids)
        with track() as stats:
            got = generate_exact(exact, torch.tensor([ids]), draft=draft, max_new_tokens=NEW, do_sample=False,
                                 pad_token_id=0, tree=opts)
        assert torch.equal(got, plain), (ids, opts)
        assert stats.rounds >= 1 and stats.rows  # the tree loop ran (transformers' loop records no rows)
        assert sum(stats.accepted) + stats.rounds >= NEW  # every round emits its accepted tokens plus one
        if opts.alternatives == 0:
            assert sum(stats.rows) == sum(stats.drafted) and not any(stats.leaf_hits)
        leaf_hits += sum(stats.leaf_hits)
    if opts is WIDE:
        assert leaf_hits > 0  # the leaf path (its cache bookkeeping) was exercised


def test_tree_stops_at_the_end_token_and_streams(exact):
    ids = PROMPTS[0]
    plain = _plain(exact, ids)
    eos = int(plain[0, len(ids) + 6])  # a token plain greedy emits as its 7th new token
    want = _plain(exact, ids, eos_token_id=eos)
    assert want.shape[1] <= len(ids) + 7

    class Collect:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, t):
            self.chunks.append(t.reshape(-1).tolist())

        def end(self):
            self.ended = True

    streamer = Collect()
    got = generate_exact(exact, torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                         eos_token_id=eos, streamer=streamer, tree=WIDE)
    assert torch.equal(got, want)
    assert streamer.ended and sum(streamer.chunks, []) == got[0].tolist()
    for n in (1, 2, 3):  # max_new_tokens shorter than a tree
        assert torch.equal(generate_exact(exact, torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                          pad_token_id=0, tree=WIDE), _plain(exact, ids, n))


def test_logits_processors_take_transformers_loop(exact):
    ids = PROMPTS[1]
    plain = _plain(exact, ids, repetition_penalty=1.3)
    with track() as stats:
        got = generate_exact(exact, torch.tensor([ids]), draft=draft_model(exact, num_assistant_tokens=3),
                             max_new_tokens=NEW, do_sample=False, pad_token_id=0, repetition_penalty=1.3)
    assert torch.equal(got, plain)
    assert stats.rounds >= 1 and not stats.rows  # transformers' assisted loop, not the tree
    with pytest.raises(ValueError, match="speculation"):
        generate_exact(exact, torch.tensor([ids]), max_new_tokens=2, speculation="beam")
    with pytest.raises(ValueError, match="leaf_min"):
        TreeOptions(leaf_min=1.5)


# ==================================================================== proven-row batching
def test_rowcheck_caches_and_refuses_unproven():
    rowcheck.reset()
    assert rowcheck.rows_identical(64, 48, 1, torch.bfloat16, False)
    first = rowcheck.rows_identical(64, 48, 3, torch.bfloat16, False)
    assert any(k[:3] == (64, 48, 3) for k in rowcheck._PROVEN)
    assert rowcheck.rows_identical(64, 48, 3, torch.bfloat16, False) is first
    assert not rowcheck.rows_identical(64, 48, 3, torch.int8, False)
    assert not rowcheck.rows_identical(64, 48, rowcheck.MAX_CHUNK + 1, torch.bfloat16, False)
    w = torch.zeros(48, 64, dtype=torch.bfloat16)
    rowcheck.record(w, 3, None, False)  # a disproof is final
    assert rowcheck.confirmed(w, 3, None) and not rowcheck.rows_identical(64, 48, 3, torch.bfloat16, False)
    assert rowcheck.largest_identical_chunk(64, 48, 3, torch.bfloat16, False) in (1, 2)
    rowcheck.reset()


def test_batched_call_that_differs_is_caught(exact, monkeypatch):
    """If a batched product ever differed from its one-row calls, the verifier keeps the one-row results and
    stops batching that shape (simulated: batched calls made to round differently)."""
    rowcheck.reset()
    # claim every shape proven, until a real call disproves it
    monkeypatch.setattr(rowcheck, "rows_identical", lambda *a: rowcheck._PROVEN.get(rowcheck._key(*a), True))
    real = RowwiseLinear._one

    def skewed(self, x, w, bias):
        y = real(self, x, w, bias)
        return y + 1 if x.shape[-2] > 1 and not self.rows.segments[0] > 1 else y

    monkeypatch.setattr(RowwiseLinear, "_one", skewed)
    ids = PROMPTS[0]
    got = generate_exact(exact, torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=0,
                         tree=dataclasses.replace(WIDE, batch=True))
    assert torch.equal(got, _plain(exact, ids, 8))
    assert any(rowcheck._PROVEN.get(k) is False for k in rowcheck._CONFIRMED)  # disproved by real calls
    rowcheck.reset()


# ==================================================================== speculative sampling
def _chi2(counts: torch.Tensor, probs: torch.Tensor, n: int) -> tuple[float, float]:
    """Chi-square statistic of ``counts`` against ``probs`` (tokens expected < 5 times pooled) and its 0.1%
    critical value (Wilson-Hilferty)."""
    big = probs * n >= 5
    obs = torch.cat([counts[big], counts[~big].sum().reshape(1)]).double()
    exp = torch.cat([probs[big], probs[~big].sum().reshape(1)]).double() * n
    stat = float(((obs - exp) ** 2 / exp.clamp_min(1e-12)).sum())
    df = obs.numel() - 1
    crit = df * (1 - 2 / (9 * df) + 3.09 * (2 / (9 * df)) ** 0.5) ** 3
    return stat, crit


@pytest.mark.slow
def test_sampling_keeps_the_exact_distribution(exact, make_tiny, tmp_path: Path):
    """The first sampled token over many seeds follows the exact model's distribution (chi-square, 0.1%),
    drafted by a deliberately different model (another random init) whose distribution the test rejects."""
    other = AutoModelForCausalLM.from_pretrained(make_tiny(tmp_path / "other", seed=7)).eval()
    ids, n, temp = PROMPTS[0], 150, 0.05  # temperature: a peaked exact distribution, a tight test
    with torch.no_grad():
        p = (exact(torch.tensor([ids])).logits[0, -1].float() / temp).softmax(-1)
        q = (other(torch.tensor([ids])).logits[0, -1].float() / temp).softmax(-1)
    counts = torch.zeros_like(p)
    with track() as stats:
        for seed in range(n):
            torch.manual_seed(seed)
            out = generate_exact(exact, torch.tensor([ids]), draft=other, max_new_tokens=2, do_sample=True,
                                 temperature=temp, top_k=0, top_p=1.0, pad_token_id=0)
            counts[int(out[0, len(ids)])] += 1
    assert sum(stats.drafted) >= n  # every sample was drafted (then accepted or resampled)
    stat, crit = _chi2(counts, p, n)
    assert stat < crit, f"first-token distribution differs from the exact model's: chi2 {stat:.1f} >= {crit:.1f}"
    # the test can fail: the draft's own distribution, as expected counts, is far outside the bound
    draft_stat, _ = _chi2(q * n, p, n)
    assert draft_stat > 3 * crit
