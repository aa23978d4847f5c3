"""Which 4-bit base drafts best (issue 19): min-max against an error-minimizing search, same run.

For each base option (``minmax``, the default; ``search``, :func:`tpde_hf.codec.base_search.quantize_search`)
the model's converted linear weights are replaced by the base's prediction (what ``base`` mode and the draft
compute), and one run measures:

* **top-1 agreement** with the exact model, teacher-forced on the exact model's greedy continuations of
  fixed prompts;
* **draft acceptance by draft length k**: for greedy drafting, the tokens a draft of length ``k`` gets
  accepted are the run of consecutive positions where its top-1 matches the exact model's token, so a
  teacher-forced pass over the exact trajectory gives them. This is a simulation of greedy assisted
  generation (one forward over the whole sequence instead of incremental steps), stated as such;
* **perplexity** on a fixed real text shipped with an installed package (huggingface_hub's package
  description, METADATA: its path and xxh3 are recorded), 512-token windows;
* **delta bits per weight**: every converted weight encoded with that base (the file's delta: words,
  raw bits, lane headers and tables), and the base's own bits;
* quantize time.

Models: SmolLM2-135M-Instruct from the bundled Q4_1 GGUF (its weights lie on a 4-bit grid of group 32, so
its figures are **unrepresentative** of real checkpoints: no base option should be tuned to that grid), and
all-MiniLM-L6-v2 (real fp32 weights; an encoder, so only delta bits and weight error are measured for it).

Usage::

    python benchmarks/bench_base_options.py                 # writes results/base_options.json
    python benchmarks/bench_base_options.py --new-tokens 32 --prompts 2 --out /tmp/b.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402
import xxhash  # noqa: E402

from tpde_hf.codec import CodecParams, base_quant, encode_tensor  # noqa: E402
from tpde_hf.codec.base_search import quantize_search  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
WORK = RESULTS / "tmp" / "speculative"
GROUP = 128
QUANTIZERS = {"minmax": base_quant.quantize, "search": quantize_search}
PROMPTS = [
    "Explain why the sky is blue.",
    "Write a short story about a robot who learns to paint.",
    "List five tips for staying productive when working from home.",
    "What is the difference between a virus and a bacterium?",
]
KS = (2, 4, 6, 8)


def _text() -> tuple[str, str, str]:
    import huggingface_hub

    dist = f"huggingface_hub-{huggingface_hub.__version__}.dist-info"
    meta = Path(huggingface_hub.__file__).parent.parent / dist / "METADATA"
    text = meta.read_text(encoding="utf-8")
    return text, str(meta.relative_to(meta.parents[2])), xxhash.xxh3_64_hexdigest(text.encode())


def converted_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The linear layers ``tpde convert`` encodes by default (every ``nn.Linear`` but ``lm_head``)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")}


def apply_base(model: torch.nn.Module, quantizer) -> dict:
    """Replace each converted weight by its base's prediction; returns bits and timing of the base."""
    t0, n, sq = time.perf_counter(), 0, 0.0
    bases = {}
    for name, lin in converted_linears(model).items():
        w = lin.weight.data
        base = quantizer(w, GROUP)
        pred = base_quant.predict(base, tuple(w.shape), GROUP, w.dtype)
        sq += float((pred.float() - w.float()).square().sum())
        n += w.numel()
        bases[name] = base
        lin.weight.data = pred
    return {"quantize_s": time.perf_counter() - t0, "weight_mse": sq / n, "bases": bases}


def delta_bits(weights: dict[str, torch.Tensor], bases: dict, quantizer_name: str) -> dict:
    """Bits per weight of the delta (and of the base) when each weight is encoded with that quantizer.

    The encoder runs the quantizer itself (``CodecParams.base_quantizer``); its base must be the one measured
    above, which this checks.
    """
    params = CodecParams(group_size=GROUP, base_quantizer=quantizer_name)
    n = delta = base = 0
    t0 = time.perf_counter()
    for name, w in weights.items():
        enc = encode_tensor(w, params, name=name)
        if not torch.equal(enc.qweight, bases[name].qweight):
            raise RuntimeError(f"{name}: the encoder's base differs from the measured one")
        n += w.numel()
        delta += sum(t.numel() * t.element_size() for t in (enc.delta, enc.lanes, enc.tables)) * 8
        base += sum(t.numel() * t.element_size() for t in (enc.qweight, enc.scales, enc.zeros)) * 8
    return {"delta_bits": delta / n, "base_bits": base / n, "weights": n, "encode_s": time.perf_counter() - t0}


@torch.no_grad()
def greedy(model, tok, prompts: list[str], new_tokens: int) -> list[torch.Tensor]:
    out = []
    for p in prompts:
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, return_tensors="pt")
        ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
        seq = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
        out.append((seq[0], ids.shape[1]))
    return out


@torch.no_grad()
def teacher_forced(model, seqs) -> list[torch.Tensor]:
    """Per sequence: whether the model's top-1 equals the next token, over the generated positions."""
    hits = []
    for seq, start in seqs:
        logits = model(seq[None]).logits[0]
        pred = logits[start - 1 : -1].argmax(-1)
        hits.append(pred == seq[start:])
    return hits


def acceptance(hits: list[torch.Tensor], k: int) -> dict:
    """Greedy assisted decoding with a k-token draft, replayed on teacher-forced top-1 matches."""
    verifications = drafted = accepted = tokens = 0
    for h in hits:
        h, pos = h.tolist(), 0
        while pos < len(h):
            run = 0
            while run < k and pos + run < len(h) and h[pos + run]:
                run += 1
            verifications += 1
            drafted += min(k, len(h) - pos)
            accepted += run
            pos += run + 1  # the accepted run plus the verifier's own token
            tokens += run + 1
    return {"acceptance": accepted / drafted, "tokens_per_verification": tokens / verifications}


@torch.no_grad()
def perplexity(model, tok, text: str, window: int = 512) -> float:
    ids = tok(text, return_tensors="pt")["input_ids"][0]
    nll, n = 0.0, 0
    for s in range(0, ids.numel() - 1, window):
        chunk = ids[s : s + window + 1]
        if chunk.numel() < 2:
            break
        logits = model(chunk[None, :-1]).logits[0].float()
        nll += float(torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum"))
        n += chunk.numel() - 1
    return float(torch.exp(torch.tensor(nll / n)))


def smollm2(args) -> dict:
    from bench_modes import prepare
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dense_dir, _ = prepare(WORK)
    tok = AutoTokenizer.from_pretrained(dense_dir)
    exact = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.bfloat16).eval()
    text, text_path, text_hash = _text()
    seqs = greedy(exact, tok, PROMPTS[: args.prompts], args.new_tokens)
    out = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF origin: unrepresentative)", "text": text_path,
           "text_xxh3": text_hash, "new_tokens": args.new_tokens, "prompts": args.prompts,
           "exact_perplexity": perplexity(exact, tok, text), "options": {}}
    weights = {n: m.weight.data.clone() for n, m in converted_linears(exact).items()}
    for qname in args.quantizers:
        model = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.bfloat16).eval()
        info = apply_base(model, QUANTIZERS[qname])
        hits = teacher_forced(model, seqs)
        allh = torch.cat(hits)
        row = {"quantize_s": info["quantize_s"], "weight_mse": info["weight_mse"],
               "top1_agreement": float(allh.float().mean()), "perplexity": perplexity(model, tok, text),
               "by_k": {k: acceptance(hits, k) for k in KS}, **delta_bits(weights, info["bases"], qname)}
        out["options"][qname] = row
        print(qname, json.dumps({k: v for k, v in row.items() if k != "by_k"}), flush=True)
    return out


def minilm(args) -> dict:
    from transformers import AutoModel

    from tpde_hf.examples import example_path

    out = {"model": "all-MiniLM-L6-v2 (fp32; bf16 rows: cast to bf16)", "options": {}}
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModel.from_pretrained(example_path("minilm"), dtype=dtype).eval()
        weights = {n: m.weight.data.clone() for n, m in converted_linears(model).items()}
        for qname in args.quantizers:
            info = apply_base(model, QUANTIZERS[qname])
            for n, m in converted_linears(model).items():
                m.weight.data = weights[n].clone()
            row = {"quantize_s": info["quantize_s"], "weight_mse": info["weight_mse"],
                   **delta_bits(weights, info["bases"], qname)}
            out["options"][f"{qname}@{str(dtype).removeprefix('torch.')}"] = row
            print("minilm", qname, dtype, json.dumps(row), flush=True)
    return out


def render_markdown(data: dict) -> str:
    """The run's tables as markdown (BENCHMARKS.md's base_options section, via report.py)."""
    lines = [f"Measured {data['date_utc']} on {data['machine']}; 4-bit groups of {data['group_size']}.", ""]
    m = data.get("minilm")
    if m:
        lines += [f"**{m['model']}**: every converted linear weight (37 tensors) encoded with each base.", "",
                  "| base | dtype | weight MSE | delta bits/weight | base bits/weight | quantize s | encode s |",
                  "|---|---|---|---|---|---|---|"]
        for key, r in m["options"].items():
            q, dt = key.split("@")
            lines.append(f"| {q} | {dt} | {r['weight_mse']:.3e} | {r['delta_bits']:.3f} | {r['base_bits']:.3f} "
                         f"| {r['quantize_s']:.1f} | {r['encode_s']:.1f} |")
        lines.append("")
    s = data.get("smollm2")
    if s:
        ks = sorted({int(k) for r in s["options"].values() for k in r["by_k"]})
        lines += [f"**{s['model']}**: exact model = the dense bf16 model (the lossless model's outputs are "
                  f"bit-identical to it); {s['prompts']} chat prompts x {s['new_tokens']} greedy tokens; perplexity "
                  f"on {s['text']} (xxh3 {s['text_xxh3']}), exact model {s['exact_perplexity']:.3f}.", "",
                  "| base | top-1 agreement | perplexity | " + " | ".join(f"acceptance k={k}" for k in ks)
                  + " | " + " | ".join(f"tokens/verification k={k}" for k in ks)
                  + " | delta bits/weight | weight MSE |",
                  "|---|---|---|" + "---|" * (2 * len(ks)) + "---|---|"]
        for q, r in s["options"].items():
            by_k = {int(k): v for k, v in r["by_k"].items()}  # JSON made the keys strings
            acc = " | ".join(f"{by_k[k]['acceptance']:.1%}" for k in ks)
            tpv = " | ".join(f"{by_k[k]['tokens_per_verification']:.2f}" for k in ks)
            lines.append(f"| {q} | {r['top1_agreement']:.1%} | {r['perplexity']:.3f} | {acc} | {tpv} "
                         f"| {r['delta_bits']:.3f} | {r['weight_mse']:.3e} |")
        lines += ["", "Acceptance is replayed from teacher-forced top-1 matches on the exact model's greedy "
                  "continuations (greedy drafting accepts the run of consecutive matches, capped at k); it is a "
                  "simulation of assisted generation, not a timed run. SmolLM2 comes from a Q4_1 GGUF (groups of "
                  "32), so its weights lie on a 4-bit grid: its agreement, perplexity and delta bits are "
                  "unrepresentative of models with real bf16 weights, and no base option is tuned to that grid."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--quantizers", default="minmax,search")
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "base_options.json"))
    args = ap.parse_args(argv)
    args.quantizers = args.quantizers.split(",")
    torch.manual_seed(0)
    result = {"date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": f"{platform.node()} ({torch.get_num_threads()} threads), shared VM", "group_size": GROUP,
              "minilm": minilm(args)}
    if not args.skip_smollm2:
        result["smollm2"] = smollm2(args)
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
