"""Make real (base, fine-tune) pairs for the reference-delta benchmark, by real training on real text, on CPU.

Two pairs, each written under ``benchmarks/results/tmp/reference/<name>/{base,finetune}`` (gitignored) with a
``recipe.json`` that records what was done:

* ``smollm2``: SmolLM2-135M-Instruct (the example GGUF, staged as bf16: its weights lie on GGUF's 4-bit
  grid), full fine-tune as a causal LM;
* ``minilm``: all-MiniLM-L6-v2 cast to bf16, full fine-tune with the unsupervised SimCSE objective
  (dropout views of one sentence as positives, the batch as negatives; mean pooling), as
  sentence-transformers users fine-tune it.

Both train fp32 master weights (initialised from the bf16 base) with AdamW and save the result in bf16, as a
user who trains in mixed precision and uploads bf16 does. The text is English prose found on this machine (no
network here): the GNU GPL v3 text and Python's IDLE NEWS files (see :func:`corpus`).

Example::

    python benchmarks/make_finetunes.py --pair minilm --steps 200
    python benchmarks/make_finetunes.py --pair smollm2 --steps 200 --seq 64 --batch 4
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent / "results" / "tmp" / "reference"
TEXT_GLOBS = ("/root/.rustup/toolchains/*/share/doc/rust/licenses/GPL-3.0-or-later.txt",
              "/root/.pyenv/versions/*/lib/python3*/idlelib/NEWS*.txt", "/usr/share/common-licenses/GPL-3")


def corpus(max_chars: int = 2_000_000) -> tuple[str, list[str]]:
    """English prose from text files on this machine, deduplicated by content; returns (text, files used)."""
    seen, texts, used = set(), [], []
    for pattern in TEXT_GLOBS:
        for f in sorted(glob.glob(pattern)):
            try:
                t = Path(f).read_text(encoding="utf-8", errors="ignore")
            except OSError:
                continue
            h = hash(t)
            if h in seen or len(t) < 10_000:
                continue
            seen.add(h)
            texts.append(t)
            used.append(f)
    text = "\n\n".join(texts)[:max_chars]
    if len(text) < 50_000:
        raise SystemExit("make_finetunes: found too little text on this machine")
    return text, used


def changed_fraction(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor]) -> tuple[float, dict]:
    """Fraction of floating weights whose bf16 bits differ from the base, overall and per tensor."""
    total = changed = 0
    per = {}
    for k, b in base.items():
        t = tuned[k]
        if not b.is_floating_point():
            continue
        n = int((b.view(torch.int16) != t.view(torch.int16)).sum()) if b.dtype == torch.bfloat16 else \
            int((b != t).sum())
        per[k] = n / max(b.numel(), 1)
        total += b.numel()
        changed += n
    return changed / max(total, 1), per


def stage_base(pair: str, dest: Path) -> None:
    """Write the pair's base model as a bf16 HF folder at ``dest`` (atomically: a partial folder is renamed)."""
    from tpde_hf.examples import example_path

    if (dest / "config.json").exists():
        return
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    if pair == "smollm2":
        from tpde_hf.conversion.sources import resolve_source, stage_weights

        stage_weights(resolve_source(example_path("smollm2")), partial, dtype=torch.bfloat16)
    else:
        from transformers import AutoModel, AutoTokenizer

        src = example_path("minilm")
        AutoModel.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(partial)
        AutoTokenizer.from_pretrained(src).save_pretrained(partial)
    partial.rename(dest)


def _train_steps(steps: int, deadline: float, opt: torch.optim.Optimizer,
                 step_loss: Callable[[], torch.Tensor]) -> list[float]:
    """Run up to ``steps`` optimizer steps on ``step_loss()``, stopping at ``deadline`` (this shared machine may be
    slow: the steps done are recorded). Returns the losses."""
    losses = []
    for step in range(steps):
        if time.monotonic() > deadline:
            break
        loss = step_loss()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        if step % 20 == 0:
            print(f"step {step} loss {losses[-1]:.3f}", flush=True)
    return losses


def train_smollm2(base: Path, text: str, steps: int, seq: int, batch: int, lr: float, seed: int,
                  deadline: float = float("inf")):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)  # fp32 master weights
    ids = torch.tensor(tok(text)["input_ids"], dtype=torch.long)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=True)  # fused: fewer passes on CPU
    model.train()

    def step_loss() -> torch.Tensor:
        starts = [rng.randrange(0, len(ids) - seq - 1) for _ in range(batch)]
        x = torch.stack([ids[s : s + seq] for s in starts])
        return model(input_ids=x, labels=x).loss

    losses = _train_steps(steps, deadline, opt, step_loss)
    return model, tok, losses, {"tokens_in_corpus": len(ids)}


def train_minilm(base: Path, text: str, steps: int, seq: int, batch: int, lr: float, seed: int,
                 deadline: float = float("inf")):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModel.from_pretrained(base, dtype=torch.float32)
    sents = [s.strip() for s in text.replace("\n", " ").split(". ") if 30 <= len(s.strip()) <= 400]
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()  # dropout on: two passes give the two SimCSE views

    def step_loss() -> torch.Tensor:
        b = tok(rng.sample(sents, batch), padding=True, truncation=True, max_length=seq, return_tensors="pt")
        mask = b["attention_mask"].unsqueeze(-1).float()

        def embed() -> torch.Tensor:
            h = model(**b).last_hidden_state
            return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)

        e1, e2 = embed(), embed()  # dropout differs between the two passes
        return torch.nn.functional.cross_entropy(e1 @ e2.T / 0.05, torch.arange(batch))

    losses = _train_steps(steps, deadline, opt, step_loss)
    return model, tok, losses, {"sentences": len(sents)}


def make_pair(pair: str, steps: int, seq: int, batch: int, lr: float, seed: int = 0,
              max_minutes: float = 35.0) -> Path:
    """Stage the base, fine-tune it, save the fine-tune in bf16 and write ``recipe.json``; returns the pair folder."""
    from safetensors.torch import load_file

    torch.manual_seed(seed)
    folder = ROOT / pair
    base = folder / "base"
    stage_base(pair, base)
    text, files = corpus()
    t0 = time.perf_counter()
    train = train_smollm2 if pair == "smollm2" else train_minilm
    deadline = time.monotonic() + 60 * max_minutes
    model, tok, losses, extra = train(base, text, steps, seq, batch, lr, seed, deadline)
    seconds = time.perf_counter() - t0
    out = folder / "finetune"
    partial = out.with_name("finetune.partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(partial)  # what a user uploads: bf16
    tok.save_pretrained(partial)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    frac, per = changed_fraction(load_file(base / "model.safetensors"), load_file(out / "model.safetensors"))
    recipe = {
        "pair": pair, "objective": "causal LM" if pair == "smollm2" else "unsupervised SimCSE (mean pooling, t=0.05)",
        "optimizer": "AdamW(weight_decay=0)" + (", fused" if pair == "smollm2" else ""), "lr": lr,
        "steps": len(losses), "steps_planned": steps,
        "seq_len": seq, "batch": batch, "seed": seed,
        "master_weights": "float32", "saved_dtype": "bfloat16", "text_files": files, "text_chars": len(text),
        "loss_first": losses[0], "loss_last_10_mean": sum(losses[-10:]) / len(losses[-10:]),
        "train_seconds": round(seconds, 1), "fraction_of_weights_changed": frac,
        "fraction_changed_per_tensor_min_max": [min(per.values()), max(per.values())],
        "date_utc": subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip(),
        "machine": f"{os.cpu_count()} CPU cores (shared), torch {torch.__version__}, threads {torch.get_num_threads()}",
        **extra,
    }
    (folder / "recipe.json").write_text(json.dumps(recipe, indent=1) + "\n")
    print(json.dumps(recipe, indent=1))
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pair", choices=["smollm2", "minilm"], required=True)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-minutes", type=float, default=35.0, help="stop training after this long (steps recorded)")
    ap.add_argument("--lr", type=float, default=None, help="default: 5e-5 (smollm2), 2e-5 (minilm)")
    a = ap.parse_args()
    lr = a.lr if a.lr is not None else (5e-5 if a.pair == "smollm2" else 2e-5)
    make_pair(a.pair, a.steps, a.seq, a.batch, lr, max_minutes=a.max_minutes)


if __name__ == "__main__":
    main()
