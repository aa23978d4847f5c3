"""The tools ``bench_peers.py`` measures in its own process (tpde, zstd), and the check of a peer's decoded bytes.

Each ``measure_*`` returns a tool's result entry (stored bytes, every timed run, the bit-exact check on
integer views); :func:`check_decoded` compares what a peer adapter wrote back with the originals;
:func:`entropy_bounds` gives the order-0 limits the table quotes. torch and tpde_hf are imported inside the
functions: the module loads in the project's interpreter only.

Example::

    entry = measure_zstd(19, {"w": torch.randn(256, 256).to(torch.bfloat16)}, repeat=1, budget_s=5.0)
    entry["exact"], entry["stored_bytes"]
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from peer_adapters import timed_runs

if TYPE_CHECKING:
    import torch


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
