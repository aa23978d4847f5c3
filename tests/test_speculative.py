"""The draft view (the embedded 4-bit base as an assisted-generation draft) and exact generation with it.

* the draft shares the exact model's base tensors (``data_ptr``) and holds no dense weight; each
  backend computes the 4-bit prediction (``dequantize`` bit for bit, ``int4`` / ``triton`` within the
  scale rounding), including padded group and row counts;
* ``generate_exact`` gives plain ``lossless`` greedy tokens bit for bit; ``model.generate(assistant_model=draft)``
  gives them up to near-ties of the exact logits (the ``k + 1``-row verification rounds differently);
* ``pipeline(..., assistant_model=draft)`` works; ``do_sample=True`` runs transformers' speculative sampling;
* unsupported models and modes are refused with an error that names the cause.

Tiny random models only (no timing asserts); SmolLM2 figures are in benchmarks/bench_speculative.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tpde_repo_helpers import save_pair, tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

import tpde_hf
from tpde_hf import TpdeConfig, TpdeLinear
from tpde_hf.codec import CodecParams
from tpde_hf.speculative import DraftError, TpdeDraftLinear, draft_layers, draft_memory, draft_model
from tpde_hf.speculative.draft import linear_reference
from tpde_hf.speculative.exact import exact_verifier, generate_exact
from tpde_hf.speculative.stats import track

PROMPTS = [[1, 5, 17, 42, 99, 3], [1, 77, 120, 8], [1, 61, 33, 150, 12, 400, 7, 9, 300]]
NEW = 24


def _load(repo: Path, mode: str = "lossless", **kwargs):
    return AutoModelForCausalLM.from_pretrained(repo, quantization_config=TpdeConfig(mode=mode), **kwargs).eval()


@pytest.fixture(scope="module")
def tiny_repo(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The conftest tiny Llama (bf16, untied lm_head, tokenizer), converted with tpde_hf.conversion.convert."""
    from tpde_hf.conversion import convert

    out = tmp_path_factory.mktemp("spec") / "tpde"
    convert(tiny_llama_dir, out)
    return out


@pytest.fixture(scope="module")
def exact(tiny_repo: Path):
    return _load(tiny_repo)


@pytest.fixture(scope="module")
def odd_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Sizes the int4 kernel cannot take as they are: in=96 and in=200 with groups of 64 (padded K),
    out=200 and out=48 (not multiples of 16: padded rows), and a converted lm_head (untied)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=200, hidden_size=96, intermediate_size=200, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    _, tpde = save_pair(model, tmp_path_factory.mktemp("odd"), keep_dense=(), params=CodecParams(group_size=64))
    return tpde


def _plain(model, ids: list[int], new: int = NEW) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False, pad_token_id=0)


# ==================================================================== the view shares, holds no dense weight
@pytest.mark.parametrize("backend", ["int4", "dequantize"])
def test_draft_shares_base_tensors_and_holds_no_dense_weight(exact, backend: str):
    draft = draft_model(exact, backend=backend)
    originals = {n: m for n, m in exact.named_modules() if isinstance(m, TpdeLinear)}
    layers = draft_layers(draft)
    assert {n for n, _ in layers} == set(originals) and layers
    assert type(draft.lm_head) is torch.nn.Linear and draft.lm_head.weight is exact.lm_head.weight
    for name, layer in layers:
        orig = originals[name]
        assert layer.backend == backend
        for s in ("qweight", "scales", "zeros", "meta"):
            assert getattr(layer, s).data_ptr() == orig._parameters[s].data_ptr(), (name, s)
        if orig.bias is not None:
            assert layer.bias.data_ptr() == orig.bias.data_ptr()
        for t in list(layer.parameters()) + list(layer.buffers()):  # nothing [out, in] in a float dtype
            assert not (t.is_floating_point() and tuple(t.shape) == (layer.out_features, layer.in_features)), name
    # every other tensor is the exact model's own
    exact_ptrs = {p.data_ptr() for p in exact.parameters()} | {b.data_ptr() for b in exact.buffers()}
    assert all(p.data_ptr() in exact_ptrs for p in draft.parameters())
    mem = draft_memory(draft)
    assert mem["backends"] == {backend: len(layers)} and mem["copy_bytes"] == 0
    if backend == "dequantize":
        assert mem["added_bytes"] == 0
    else:  # the int4 kernel's repacked codes + scale/zero pairs: about the size of the base, never dense
        dense_bytes = sum(m.in_features * m.out_features * 2 for _, m in layers)
        assert 0 < mem["added_bytes"] < dense_bytes / 2
    # the exact model is untouched
    assert all(isinstance(exact.get_submodule(n), TpdeLinear) for n in originals)
    assert draft.generation_config is not exact.generation_config


def test_lm_head_option(exact):
    """A dense lm_head: shared by default, drafted by a 4-bit copy of its own with lm_head="int4"."""
    assert type(draft_model(exact).lm_head) is torch.nn.Linear
    draft = draft_model(exact, lm_head="int4")
    head = draft.lm_head
    assert isinstance(head, TpdeDraftLinear) and head.backend == "int4"
    assert "qweight" in head._buffers and not list(head.parameters(recurse=False))  # its own copy, no shared tensor
    out, k = exact.lm_head.out_features, exact.lm_head.in_features
    ng = -(-k // 128)
    assert draft_memory(draft)["copy_bytes"] == out * ng * 128 // 2 + out * ng * 2 + out * ((ng + 1) // 2)
    x = torch.randn(2, k, dtype=torch.bfloat16)
    with torch.no_grad():
        err = (head(x).float() - exact.lm_head(x).float()).abs().max().item()
    assert err < 0.2 * exact.lm_head(x).float().abs().max().item()
    with pytest.raises(ValueError, match="lm_head"):
        draft_model(exact, lm_head="fp8")


def test_dense_backend_holds_the_dense_base(exact):
    draft = draft_model(exact, backend="dense")
    mem = draft_memory(draft)
    layers = draft_layers(draft)
    assert mem["added_bytes"] == sum(m.in_features * m.out_features * 2 for _, m in layers)


@pytest.mark.parametrize("backend", ["dequantize", "dense", "int4", "triton"])
def test_draft_layers_compute_the_4bit_prediction(odd_repo: Path, backend: str):
    model = _load(odd_repo)
    draft = draft_model(model, backend=backend)
    layers = draft_layers(draft)
    assert any(n.endswith("lm_head") for n, _ in layers)  # the converted lm_head is drafted too
    torch.manual_seed(0)
    for name, layer in layers:
        assert layer.backend == backend, name
        x = torch.randn(3, layer.in_features, dtype=torch.bfloat16)
        with torch.no_grad():
            got, ref = layer(x), linear_reference(layer, x)
        assert got.shape == ref.shape == (3, layer.out_features)
        if backend in ("dequantize", "dense"):
            assert torch.equal(got, ref), name
        else:  # int4: scales rounded to bf16 inside the kernel; triton: its own accumulation order
            tol = 0.02 * ref.float().abs().max().item() + 0.02
            assert (got.float() - ref.float()).abs().max().item() <= tol, name
        if backend == "triton":
            break  # the interpreter is slow: one layer is enough


def test_draft_is_the_base_model(odd_repo: Path):
    """The draft's logits are those of the same repo loaded in ``base`` mode (same 4-bit prediction)."""
    exact_model, base = _load(odd_repo), _load(odd_repo, mode="base")
    draft = draft_model(exact_model, backend="dequantize")
    ids = torch.tensor([PROMPTS[0] + [150, 12, 7]])  # the odd model's vocabulary has 200 tokens
    with torch.no_grad():
        assert torch.equal(draft(ids).logits, base(ids).logits)
        approx = draft_model(exact_model)(ids).logits  # int4: close, and far from the exact model's difference
        assert (approx.float() - base(ids).logits.float()).abs().max() < 0.5


# ==================================================================== generation
def test_generate_exact_equals_plain_lossless(exact):
    draft = draft_model(exact, num_assistant_tokens=4)
    for ids in PROMPTS:
        plain = _plain(exact, ids)
        with track() as stats:
            got = generate_exact(exact, torch.tensor([ids]), draft=draft, max_new_tokens=NEW, do_sample=False,
                                 pad_token_id=0)
        assert torch.equal(got, plain), ids
        assert stats.rounds >= 1 and sum(stats.accepted) <= sum(stats.drafted)
        assert sum(stats.accepted) + stats.rounds >= got.shape[1] - len(ids)  # crops at max_new_tokens only


def _near_tie_ok(exact, plain: torch.Tensor, got: torch.Tensor, prompt_len: int) -> None:
    """``got`` equals ``plain`` up to a position where the exact model's two best logits nearly tie."""
    n = min(plain.shape[1], got.shape[1])
    diff = (plain[0, :n] != got[0, :n]).nonzero()
    if diff.numel() == 0:
        assert plain.shape == got.shape
        return
    i = int(diff[0])
    assert i >= prompt_len
    with torch.no_grad():
        logits = exact(plain[:, :i]).logits[0, -1].float()
    top = torch.topk(logits, 2).values
    assert (top[0] - top[1]).item() <= 0.05 * top[0].abs().item() + 0.05, f"diverged at {i} without a near-tie"


def test_assisted_generate_is_exact_greedy(exact):
    """The ecosystem path: ``model.generate(assistant_model=draft)`` verifies with the exact weights."""
    for k in (2, 5):
        draft = draft_model(exact, num_assistant_tokens=k)
        for ids in PROMPTS:
            plain = _plain(exact, ids)
            with torch.no_grad():
                got = exact.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                                     assistant_model=draft)
            _near_tie_ok(exact, plain, got, len(ids))


def _as_offloaded(model) -> list:
    """``model`` (lossless, CPU) turned into what ``lossless-offload`` holds: the base resident, the delta
    in host memory (``_tpde_host_delta``) and decoded from there at each forward. The real mode needs CUDA
    (pinned memory, Triton); this keeps its CPU fallback path (``offloaded_exact_weight``)."""
    from tpde_hf.nn.holder import DELTA_SUFFIXES

    layers = [m for m in model.modules() if isinstance(m, TpdeLinear)]
    for m in layers:
        m.__dict__["_tpde_host_delta"] = {s: m._parameters.pop(s).data for s in DELTA_SUFFIXES}
        m.__dict__["_tpde_mode"] = "lossless-offload"
        m.__dict__.pop("_tpde_enc", None)
    return layers


def test_offload_draft_streams_each_delta_once_per_verification(tiny_repo: Path, monkeypatch):
    """lossless-offload: the draft runs on the resident base; each verification forward decodes every delta
    once for several tokens, and greedy tokens stay those of transformers' assisted decoding on lossless."""
    import tpde_hf.nn.offload as offload

    ids = PROMPTS[0]
    ref_model = _load(tiny_repo)
    with torch.no_grad():
        want = ref_model.generate(torch.tensor([ids]), assistant_model=draft_model(ref_model, num_assistant_tokens=4),
                                  max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    model = _load(tiny_repo)
    layers = _as_offloaded(model)
    draft = draft_model(model, num_assistant_tokens=4)
    decodes: list[int] = []
    real = offload.decode_tensor
    monkeypatch.setattr(offload, "decode_tensor", lambda enc, *a, **k: decodes.append(1) or real(enc, *a, **k))
    with track() as stats, torch.no_grad():
        got = model.generate(torch.tensor([ids]), assistant_model=draft, max_new_tokens=NEW, do_sample=False,
                             pad_token_id=0)
    assert torch.equal(got, want)
    forwards = len(stats.drafted)  # one verification forward per round (the first one carries the prompt)
    assert len(decodes) == forwards * len(layers)
    assert forwards < got.shape[1] - len(ids)  # fewer delta passes than new tokens
    assert all("delta" not in m._parameters for m in layers)  # the delta never became resident


def test_exact_verifier_logits_are_one_token_logits(exact):
    """A verifier forward of several rows gives, per row, the logits of plain one-token decoding, bit for bit."""
    from transformers import DynamicCache

    ids = torch.tensor([PROMPTS[2]])
    p = 4
    with torch.no_grad():
        cache = DynamicCache(config=exact.config)
        rows = [exact(ids[:, :p], cache=cache, logits_to_keep=1).logits[:, -1]]
        for i in range(p, ids.shape[1]):
            rows.append(exact(ids[:, i:i + 1], cache=cache).logits[:, -1])
        view = exact_verifier(exact)
        view._tpde_rows.prompt_len = p
        got = view(ids, cache=DynamicCache(config=exact.config), logits_to_keep=ids.shape[1] - p + 1).logits
    assert torch.equal(got[0], torch.cat(rows).to(got.dtype))


def test_pipeline_with_assistant_model(exact, tiny_llama_dir: Path):
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    draft = draft_model(exact, num_assistant_tokens=3)
    text = "w5 w17 w42 w99"
    kwargs = dict(max_new_tokens=12, do_sample=False, return_full_text=False)
    pipe = pipeline("text-generation", model=exact, tokenizer=tok, assistant_model=draft)
    assert pipe.assistant_model is draft
    with track() as stats:
        out = pipe(text, **kwargs)[0]["generated_text"]
    assert stats.rounds >= 1  # the pipeline really drafted
    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        ref = exact.generate(**enc, assistant_model=draft, max_new_tokens=12, do_sample=False)
    assert out.strip() == tok.decode(ref[0, enc.input_ids.shape[1]:], skip_special_tokens=True).strip()
    # also as a call argument of a plain pipeline
    plain_pipe = pipeline("text-generation", model=exact, tokenizer=tok)
    assert plain_pipe(text, assistant_model=draft, **kwargs)[0]["generated_text"] == out


def test_sampling_runs_speculative_sampling(exact, monkeypatch):
    import transformers.generation.utils as gen_utils

    calls = []
    original = gen_utils._speculative_sampling

    def spy(candidate_input_ids, candidate_logits, candidate_length, new_logits, **kw):
        calls.append((candidate_logits.shape, new_logits.shape))
        return original(candidate_input_ids, candidate_logits, candidate_length, new_logits, **kw)

    monkeypatch.setattr(gen_utils, "_speculative_sampling", spy)
    draft = draft_model(exact, num_assistant_tokens=3)
    torch.manual_seed(0)
    with torch.no_grad():
        out = exact.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=10, do_sample=True, top_k=0,
                             assistant_model=draft, pad_token_id=0)
    assert out.shape[1] > len(PROMPTS[0])
    assert calls, "assisted sampling did not run speculative sampling (no draft logits?)"
    (cand, new), vocab = calls[0], exact.config.vocab_size
    assert cand[-1] == vocab and new[-1] == vocab and new[1] == cand[1] + 1


# ==================================================================== what is refused
def test_refuses_base_dequantize_and_dense_models(tiny_repo: Path, tiny_llama_dir: Path):
    with pytest.raises(DraftError, match="mode='base'"):
        draft_model(_load(tiny_repo, mode="base"))
    with pytest.raises(DraftError, match=r"no TpdeLinear.*mode='dequantize'.*mode='lossless'"):
        draft_model(_load(tiny_repo, mode="dequantize"))
    with pytest.raises(DraftError, match="no TpdeLinear"):
        draft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir))


def test_refuses_a_draft_and_protects_the_shared_tensors(exact):
    draft = draft_model(exact)
    with pytest.raises(DraftError, match="already a draft"):
        draft_model(draft)
    with pytest.raises(RuntimeError, match="shares its tensors"):
        draft.to(torch.float32)
    with pytest.raises(RuntimeError, match="save the exact model"):
        draft.save_pretrained("/nonexistent")
    assert next(exact.parameters()).dtype == torch.bfloat16


def test_refuses_fused_moe(tmp_path: Path):
    _, tpde = save_pair(tiny_model("mixtral"), tmp_path)
    model = _load(tpde)
    with pytest.raises(DraftError, match=r"experts.*forward hook"):
        draft_model(model)


def test_generate_exact_refusals(exact, tiny_repo: Path):
    ids = torch.tensor([PROMPTS[0]])
    with pytest.raises(DraftError, match="one prompt"):
        generate_exact(exact, torch.tensor([PROMPTS[0], PROMPTS[0]]), max_new_tokens=2)
    with pytest.raises(DraftError, match="padding"):
        generate_exact(exact, ids, attention_mask=torch.tensor([[0] + [1] * (ids.shape[1] - 1)]), max_new_tokens=2)
    eager = _load(tiny_repo, attn_implementation="eager")
    with pytest.raises(DraftError, match="attention implementation 'eager'"):
        generate_exact(eager, ids, max_new_tokens=2)
    # bit_identical=False: transformers' own verification works with any attention
    out = generate_exact(eager, ids, bit_identical=False, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + 4


def test_public_exports():
    assert tpde_hf.draft_model is draft_model
    assert tpde_hf.generate_exact is generate_exact
    assert issubclass(TpdeDraftLinear, torch.nn.Module)
