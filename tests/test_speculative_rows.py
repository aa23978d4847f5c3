"""Cheaper verifier rows that keep plain decoding's bits: the certified lm_head argmax and fewer row threads.

* :func:`~tpde_hf.speculative.headmax.certified_argmax` returns plain one-row ``argmax`` (first index on ties)
  or ``None``, never another index: random and heavy-tailed rows, exact ties, bf16 and fp32 weights;
  non-finite inputs and modified weights are refused;
* the tree loop takes its tokens from it (and still equals plain greedy); a model that changes the lm_head's
  output makes the loop redo the forward with real logits;
* one-row products run at one torch thread only where their bits were found unchanged; the thread count is
  restored after generation.

Tiny random models and synthetic weights only (no timing asserts).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from tpde_hf import TpdeConfig
from tpde_hf.speculative import draft_model, headmax, rowcheck, tree
from tpde_hf.speculative.exact import exact_verifier
from tpde_hf.speculative.tree import TreeOptions, generate_tree

PROMPTS = [[1, 5, 17, 42, 99, 3], [1, 61, 33, 150, 12, 400, 7, 9, 300]]
NEW = 16


def _plain_argmax(h: torch.Tensor, w: torch.Tensor) -> list[int]:
    return [int(F.linear(h[i:i + 1].reshape(1, 1, -1).clone(), w).to(torch.float32).argmax()) for i in range(len(h))]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_certified_argmax_is_plain_argmax_or_none(dtype: torch.dtype):
    g = torch.Generator().manual_seed(3)
    n, k = 3000, 96
    certified = 0
    for trial in range(8):
        w = torch.randn(n, k, generator=g) * 0.05
        if trial % 2:  # heavy tails: wildly different product sizes
            w = w * torch.exp2(torch.randint(-10, 11, (n, k), generator=g).float())
        w[10:20] = w[0]  # exact duplicates of row 0: ties resolved by the first index
        w[2000] = w[1500]
        w = w.to(dtype)
        h = (torch.randn(6, k, generator=g) * (0.3, 3.0)[trial % 2]).to(dtype)
        h[5] = 0  # all logits 0: a tie over every index
        norms = headmax.HeadNorms.of(w)
        got = headmax.certified_argmax(h, w, norms)
        want = _plain_argmax(h, w)
        for gi, wi in zip(got, want, strict=True):
            assert gi is None or gi == wi, (trial, got, want)
        certified += sum(x is not None for x in got)
    assert certified >= 24  # it does certify most rows (else it would only be a slower fallback)


def test_certified_argmax_refuses_what_it_cannot_bound():
    w = torch.randn(200, 32).bfloat16()
    norms = headmax.HeadNorms.of(w)
    h = torch.randn(3, 32).bfloat16()
    h[1, 4] = float("nan")
    assert headmax.certified_argmax(h, w, norms) == [None] * 3
    w_inf = w.clone()
    w_inf[7, 3] = float("inf")
    assert headmax.certified_argmax(torch.randn(2, 32).bfloat16(), w_inf, headmax.HeadNorms.of(w_inf)) == [None] * 2
    w.add_(1)  # an in-place change bumps the version: the old norms no longer fit
    with pytest.raises(ValueError, match="norms"):
        headmax.certified_argmax(h, w, norms)
    assert not headmax.supported(w, h, torch.zeros(200).bfloat16())
    assert not headmax.supported(w, h.half(), None)
    assert headmax.supported(w, h, None)


@pytest.fixture(scope="module")
def exact(tmp_path_factory: pytest.TempPathFactory):
    """A tiny Llama whose lm_head is tied to the embeddings (tpde keeps it a dense nn.Linear)."""
    from conftest import make_tiny_llama

    from tpde_hf.conversion import convert

    root = tmp_path_factory.mktemp("rows")
    dense = make_tiny_llama(root / "dense", tie_word_embeddings=True, seed=5)
    convert(dense, root / "tpde")
    return AutoModelForCausalLM.from_pretrained(root / "tpde", quantization_config=TpdeConfig(mode="lossless")).eval()


def _plain(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, pad_token_id=0)


def _tree(model, draft, ids: list[int], opts: TreeOptions):
    view = exact_verifier(model)
    view._tpde_rows.prompt_len = len(ids)
    out = generate_tree(view, draft, torch.tensor([ids]), max_new_tokens=NEW, eos_token_ids=set(), opts=opts)
    return out, view._tpde_rows


def test_tree_takes_certified_tokens_and_equals_plain(exact):
    draft = draft_model(exact)
    threads = torch.get_num_threads()
    wide = TreeOptions(max_depth=4, chain_min=0.0, leaf_min=0.0, max_rows=12, head_argmax=True)
    for ids in PROMPTS:
        out, rows = _tree(exact, draft, ids, wide)
        assert torch.equal(out, _plain(exact, ids)[:, :out.shape[1]]) and out.shape[1] == len(ids) + NEW
        assert rows.head_rows > 0 and rows.head_fallbacks < rows.head_rows  # the certified path ran
        off, rows_off = _tree(exact, draft, ids, TreeOptions(max_depth=4, chain_min=0.0, head_argmax=False))
        assert torch.equal(off, out) and rows_off.head_rows == 0
    assert torch.get_num_threads() == threads


def test_postprocessed_logits_redo_the_forward(exact, monkeypatch):
    """A model whose forward changes the lm_head output (here: multiplies it by 1) gets real logits."""
    cls = type(exact)
    real = cls.forward

    def scaled(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        out.logits = out.logits * 1
        return out

    monkeypatch.setattr(cls, "forward", scaled)
    monkeypatch.setattr(tree, "_HEAD_POSTPROCESSED", set())
    ids = PROMPTS[0]
    out, rows = _tree(exact, draft_model(exact), ids, TreeOptions(head_argmax=True))
    assert torch.equal(out, _plain(exact, ids))
    assert cls in tree._HEAD_POSTPROCESSED


def test_row_threads_checked_per_shape_and_options():
    rowcheck.reset()
    assert rowcheck.threads_identical(64, 48, torch.bfloat16, False, 2, 2)  # same count: nothing to check
    got = rowcheck.threads_identical(96, 40, torch.bfloat16, True, 1, 2)
    assert isinstance(got, bool) and ("threads", 96, 40, torch.bfloat16, True, 1, 2) in rowcheck._PROVEN
    assert not rowcheck.threads_identical(96, 40, torch.int8, False, 1, 2)
    rowcheck.reset()
    with pytest.raises(ValueError, match="row_threads"):
        TreeOptions(row_threads=0)
    assert TreeOptions().row_threads == 1 and TreeOptions(draft_threads=None).draft_threads is None


def test_one_thread_rows_equal_plain(exact):
    """Generation with one-thread rows (the default) and with the plain thread count give the same tokens."""
    if torch.get_num_threads() < 2:
        pytest.skip("one torch thread only: nothing to compare")
    draft = draft_model(exact)
    ids = PROMPTS[1]
    one, _ = _tree(exact, draft, ids, TreeOptions())
    same, _ = _tree(exact, draft, ids, TreeOptions(row_threads=None, draft_threads=None))
    assert torch.equal(one, same) and torch.equal(one, _plain(exact, ids))
