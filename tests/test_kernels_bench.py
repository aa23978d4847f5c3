"""The kernel benchmark runs end to end (tiny shapes) and never invents GPU figures."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_kernels.py"


@pytest.fixture
def bench():
    """benchmarks/bench_kernels.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_kernels_quick_run_writes_json(bench, tmp_path, monkeypatch):
    out = tmp_path / "kernels.json"
    monkeypatch.setattr(sys, "argv", ["bench_kernels.py", "--quick", "--out", str(out)])
    bench.main()
    result = json.loads(out.read_text())
    rows = result["cpu"]["rows"]
    assert [r["scaled_from"] for r in rows] == [list(s) for s in bench.SHAPES]
    for row in rows:
        assert row["reconstruct"]["GBps_dense_bf16_written"] > 0
        assert row["gemv_batch1"]["bf16_F_linear_ms"] > 0 and row["prefill"][0]["lossless_ms"] > 0
    if not torch.cuda.is_available():
        assert result["gpu"]["status"] == "not measured"
        assert all(v == "not measured" for r in result["gpu"]["rows"] for k, v in r.items() if k != "shape")


def test_merge_gpu_keeps_the_cpu_section_and_refuses_a_run_without_gpu_figures(bench, tmp_path, monkeypatch):
    cpu_file = tmp_path / "kernels.json"
    monkeypatch.setattr(sys, "argv", ["bench_kernels.py", "--quick", "--out", str(cpu_file)])
    bench.main()
    cpu_run = json.loads(cpu_file.read_text())
    if not torch.cuda.is_available():  # a CPU run has no GPU figures: merging it is refused, nothing written
        with pytest.raises(SystemExit, match="holds no GPU figures"):
            bench.merge_gpu(cpu_file, cpu_file)
        assert json.loads(cpu_file.read_text()) == cpu_run
    # The merge plumbing, with a GPU-shaped section (the CPU rows stand in for GPU rows here).
    gpu_run = {**cpu_run, "date": "2030-01-01", "machine": {"gpu": "a GPU"},
               "gpu": {"backend": "triton", "device": "a GPU", "rows": cpu_run["cpu"]["rows"]},
               "sweep": {"device": "cuda", "encoder": [], "base": []}}
    gpu_file = tmp_path / "gpu.json"
    gpu_file.write_text(json.dumps(gpu_run))
    bench.merge_gpu(gpu_file, cpu_file)
    merged = json.loads(cpu_file.read_text())
    assert merged["cpu"] == cpu_run["cpu"] and merged["machine"] == cpu_run["machine"]
    assert merged["gpu"]["device"] == "a GPU" and merged["gpu"]["date"] == "2030-01-01"
    assert merged["gpu"]["machine"] == {"gpu": "a GPU"} and merged["sweep"] == gpu_run["sweep"]


def test_bench_kernels_sweep_runs_every_configuration(bench, tmp_path, monkeypatch):
    """The GPU sweep's code (encoder choices, base-matmul launches) runs under the interpreter, with
    bit-exact reconstruction for every encoder choice (asserted by the benchmark itself)."""
    from tpde_hf.triton_kernels import triton_available

    if torch.cuda.is_available() or not triton_available("cpu"):
        pytest.skip("runs the sweep under TRITON_INTERPRET=1 on a machine without a GPU")
    pool = tmp_path / "pool.npy"
    monkeypatch.setattr(sys, "argv", ["bench_kernels.py", "--write-value-pool", str(pool)])
    bench.main()
    out = tmp_path / "kernels.json"
    monkeypatch.setattr(sys, "argv", ["bench_kernels.py", "--quick", "--sweep", "--skip-cpu", "--value-pool",
                                      str(pool), "--out", str(out)])
    bench.main()
    result = json.loads(out.read_text())
    assert result["cpu"]["rows"] == [] and "from pool.npy" in result["weights"]
    encoder = {(r["lane_len"], r["prob_bits"], r["tables"]): r for r in result["sweep"]["encoder"]}
    assert list(encoder) == [(*c, t) for c in bench.ENCODER_SWEEP for t in ("fused", "split")]
    assert all(r["bits_per_weight"] > 0 and r["reconstruct_ms"] > 0 and r["fused_gemv_ms"] > 0
               for r in encoder.values())
    base = result["sweep"]["base"]
    assert [(r["block_n"], r["block_k_bytes"], None if r["split"] == "auto" else r["split"])
            for r in base] == bench.BASE_SWEEP
    assert all(0 < r["relative_error_vs_fp32"] < 1e-2 and r["ms"] > 0 for r in base)
