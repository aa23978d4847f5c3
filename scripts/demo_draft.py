"""Demo step 5: the exact model drafted by its own 4-bit base (self-speculative decoding), on CPU.

Loads a tpde repo in ``lossless`` mode (weights stay compressed; each layer is rebuilt at every forward),
then generates the same greedy continuation of one prompt twice, in alternation:

* plain: ``model.generate(...)``, one rebuild of every layer per token;
* drafted: ``tpde_hf.generate_exact(model, ...)``: the 4-bit base that the repo carries drafts a few tokens
  (a chain, plus its runner-up tokens as leaves: a small token tree), and the exact model verifies them all
  with one rebuild of its weights, so the rebuild is paid once per verification.

It prints tokens/s of both and whether the two texts are the same token for token (they must be: the
verifier computes each drafted row exactly as a one-token forward would). The demo runs it in a
subprocess started with ``OMP_WAIT_POLICY=PASSIVE``, which must be set before torch loads (torch's OpenMP
threads otherwise spin against the delta decoder's threads).

Run: ``OMP_WAIT_POLICY=PASSIVE python scripts/demo_draft.py demo_out/smollm2-tpde --tokenizer demo_out/smollm2-bf16``.
Prints one JSON line at the end (prefixed ``RESULT``) for the demo to collect.
"""

from __future__ import annotations

import argparse
import json
import time

PROMPT = "Give me three tips for staying focused while studying."


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("repo")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    args = ap.parse_args(argv)

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tpde_hf

    transformers.utils.logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    model = AutoModelForCausalLM.from_pretrained(args.repo, quantization_config=tpde_hf.TpdeConfig(mode="lossless"))
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    gen = {"max_new_tokens": args.max_new_tokens, "do_sample": False, "pad_token_id": tok.eos_token_id}
    draft = tpde_hf.draft_model(model)
    generate_exact = tpde_hf.generate_exact
    with torch.no_grad():
        generate_exact(model, ids["input_ids"], draft=draft, max_new_tokens=2)  # warm-up: the draft's repack
        t0 = time.perf_counter()
        plain = model.generate(**ids, **gen)
        t_plain = time.perf_counter() - t0
        t0 = time.perf_counter()
        drafted = generate_exact(model, ids["input_ids"], draft=draft, **gen)
        t_drafted = time.perf_counter() - t0
    n_prompt = ids["input_ids"].shape[1]
    new_plain, new_drafted = plain[0, n_prompt:], drafted[0, n_prompt:]
    result = {
        "prompt": PROMPT,
        "plain_tokens_per_s": new_plain.numel() / t_plain,
        "drafted_tokens_per_s": new_drafted.numel() / t_drafted,
        "speedup": (new_drafted.numel() / t_drafted) / (new_plain.numel() / t_plain),
        "same_tokens": bool(torch.equal(new_plain, new_drafted)),
        "text": tok.decode(new_drafted, skip_special_tokens=True),
    }
    print("RESULT " + json.dumps(result), flush=True)
    return 0 if result["same_tokens"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
