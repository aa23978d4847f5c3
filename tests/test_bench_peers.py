"""``benchmarks/bench_peers.py`` on two small tensors: tpde and zstd measured and bit-exact, every peer reported.

The peers (ZipNN, lmzip, glyd, bigsmall, DFloat11) live in ``.venv-peers`` (``scripts/install_peers.sh``)
and are absent here: the tests point the benchmark at a missing interpreter and check that each peer is
reported as not installed rather than dropped, and drive the subprocess path with adapters that fail or
die. No timing is asserted.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_peers.py"
PEERS = ("zipnn", "lmzip", "glyd", "bigsmall", "bigsmall-dual", "dfloat11")
IN_PROCESS = ("tpde-rans", "tpde-class-width", "tpde-narrow-rans", "zstd-3", "zstd-19")


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_peers", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_peers"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def _weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"encoder.layer.0.dense.weight": torch.randn(48, 256, generator=g) * 0.02,
            "encoder.layer.1.dense.weight": torch.randn(32, 200, generator=g) * 0.05}  # 200: a padded group


@pytest.fixture(scope="module")
def result(bench: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> dict:
    missing = tmp_path_factory.mktemp("nopeers") / "bin" / "python"
    return bench.run_benchmark(_weights(), ["bf16", "fp16", "fp32"], list(bench.TOOLS), missing, repeat=1,
                               budget_s=0.0, workdir=tmp_path_factory.mktemp("work"), log=lambda _: None)


def test_tpde_and_zstd_are_measured_and_exact(result: dict) -> None:
    n = sum(w.numel() for w in _weights().values())
    for dt in ("bf16", "fp16", "fp32"):
        run = result["runs"][dt]
        assert run["weights"] == n and run["tensors"] == 2
        for name in IN_PROCESS:
            e = run["tools"][name]
            assert e["status"] == "ok", e
            assert e["exact"] is True, e["exact_note"]
            assert e["bits_per_weight"] == pytest.approx(8 * e["stored_bytes"] / n)
            assert 0 < e["bits_per_weight"] < 40
            assert e["compress_MBps"] > 0 and e["decompress_MBps"] > 0
            assert e["version"]
        for name in ("tpde-rans", "tpde-class-width"):
            e = run["tools"][name]
            assert sum(e["parts_bytes"].values()) == e["stored_bytes"]
            assert set(e["parts_bits_per_weight"]) == {"base", "delta", "meta"}
        bounds = run["bounds_bits_per_weight"]
        key = "symbol16" if dt != "fp32" else "high16_coded_low16_raw"
        for how in ("per_tensor", "pooled"):
            assert 0 < bounds[f"{key}_{how}"] <= bounds[f"exponent_coded_rest_raw_{how}"] + 1e-9
        assert bounds[f"{key}_per_tensor"] <= bounds[f"{key}_pooled"] + 1e-9


def test_missing_peers_are_reported_not_dropped(result: dict) -> None:
    for dt, run in result["runs"].items():
        assert list(run["tools"]) == [*IN_PROCESS, *PEERS]
        for name in PEERS:
            e = run["tools"][name]
            if dt != "bf16" and name in ("bigsmall-dual", "dfloat11"):
                assert e["status"] == "n/a" and "bf16" in e["error"]
            else:
                assert e["status"] == "not installed", e
                assert "install_peers.sh" in e["error"]
                assert f"{dt}/{name}" in result["not_reported_ok"]
    json.dumps(result)  # the whole result is JSON


def test_markdown_names_every_tool_and_status(bench: ModuleType, result: dict) -> None:
    md = bench.render_markdown(result)
    for name in (*IN_PROCESS, *PEERS):
        assert f"| {name} |" in md
    assert "not installed" in md and "n/a" in md
    assert result["date_cmd"] in md
    widths: list[int] = []  # unescaped pipes per line of each table: a stray pipe in a cell breaks a row
    for line in [*md.splitlines(), ""]:
        if line.startswith("|"):
            widths.append(line.replace("\\|", "").count("|"))
        elif widths:
            assert len(set(widths)) == 1, widths
            widths = []


def _input_file(bench: ModuleType, tmp_path: Path) -> Path:
    src = tmp_path / "weights.safetensors"
    bench._write_input({k: v.to(torch.bfloat16) for k, v in _weights().items()}, src)
    return src


def test_safetensors_reader_and_exact_check(bench: ModuleType, tmp_path: Path) -> None:
    weights = {k: v.to(torch.bfloat16) for k, v in _weights().items()}
    src = _input_file(bench, tmp_path)
    tensors = bench.read_safetensors(src)
    assert {t.name for t in tensors} == set(weights)
    for t in tensors:
        assert t.dtype == "BF16" and t.shape == tuple(weights[t.name].shape)
        assert t.data == weights[t.name].view(torch.uint8).numpy().tobytes()
    bench._write_decoded(tmp_path, [(t.name, t.data) for t in tensors])
    assert bench.check_decoded(tmp_path, weights)[0] is True
    flipped = bytearray(tensors[0].data)
    flipped[5] ^= 0x01
    bench._write_decoded(tmp_path, [(tensors[0].name, bytes(flipped)), *[(t.name, t.data) for t in tensors[1:]]])
    ok, note = bench.check_decoded(tmp_path, weights)
    assert ok is False and tensors[0].name in note


def test_peer_failures_are_reported(bench: ModuleType, tmp_path: Path) -> None:
    src = _input_file(bench, tmp_path)
    python = Path(sys.executable)
    failed = bench.run_peer(bench.Tool("_fail", "test"), src, tmp_path / "fail", python, 1, 0.0, 120)
    assert failed["status"] == "failed" and "deliberate failure" in failed["error"]
    died = bench.run_peer(bench.Tool("_exit", "test"), src, tmp_path / "exit", python, 1, 0.0, 120)
    assert died["status"] == "failed" and "exited with code 3" in died["error"]
    if importlib.util.find_spec("glyd") is None:  # a peer this interpreter lacks: its import fails
        absent = bench.run_peer(bench.TOOLS["glyd"], src, tmp_path / "glyd", python, 1, 0.0, 120)
        assert absent["status"] == "not installed" and "glyd" in absent["error"]


def test_failed_pip_install_is_reported(bench: ModuleType, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    (venv / "install-logs").mkdir()
    (venv / "install-logs" / "glyd.failed").write_text(
        "Collecting glyd==0.32.1\nERROR: No matching distribution found for glyd==0.32.1\n")
    e = bench.run_peer(bench.TOOLS["glyd"], tmp_path / "unused", tmp_path / "w", venv / "bin" / "python", 1, 0.0, 60)
    assert e["status"] == "not installed"
    assert "No matching distribution found for glyd==0.32.1" in e["error"]
