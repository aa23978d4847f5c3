"""The peer side of ``benchmarks/bench_peers.py``: each peer tool's adapter, run in the peers' interpreter.

Peers are never dependencies of tpde-hf: ``scripts/install_peers.sh`` installs them into ``.venv-peers``, and
``bench_peers.run_peer`` runs ``<peers python> peer_adapters.py --adapter TOOL ...`` in a subprocess per tool
and dtype. An adapter compresses and decompresses one safetensors file, times both, and writes what it
decoded (``decoded.bin`` + ``decoded.json``) for the caller to compare bit for bit. This module therefore
imports only the standard library and numpy at its top; each peer is imported inside its adapter, so a
peer that is missing is a result ("not installed"), not a crash.

Example (what ``run_peer`` runs)::

    .venv-peers/bin/python benchmarks/peer_adapters.py --adapter zipnn --input in.safetensors \
        --workdir work/ --result work/result.json --repeat 3 --budget-s 20
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import struct
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DTYPES = ("bf16", "fp16", "fp32")


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


def main(argv: list[str] | None = None) -> int:
    """Command line of the peers' interpreter: one adapter on one input (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", required=True, choices=sorted(ADAPTERS))
    ap.add_argument("--input", type=Path, required=True)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--result", type=Path, required=True)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=20.0)
    args = ap.parse_args(argv)
    return adapter_main(args.adapter, args.input, args.workdir, args.result, args.repeat, args.budget_s)


if __name__ == "__main__":
    sys.exit(main())
