"""The kernel benchmark runs end to end (tiny shapes) and never invents GPU figures."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_kernels.py"


def test_bench_kernels_quick_run_writes_json(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
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
