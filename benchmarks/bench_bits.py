"""Where the bits go: an ablation from today's layout (raw base + rANS delta) to the ``narrow-rans`` storage codec.

Input: the 37 MiniLM linear weights (``bench_codec.minilm_linear_weights``), as bf16 (rounded), fp16 (cast)
and fp32 (the originals); base: ``base_quant.quantize`` with G = 128. Every figure is bits per weight of
stored bytes, all parts counted (tables, block indexes, headers), measured by encoding, except the lines
marked ``bound`` (entropies, table cost not counted). Steps:

0. ``today``: resident layout on disk: raw base (4-bit q, fp16 scales, 4-bit zeros) + rANS delta (format v1);
1. ``q coded``: q rANS-coded with the group's zero point as context (one 16 x 16 table per tensor);
2. ``+ scales, zeros coded``: fp16 scales as two zstd byte planes, zero points zstd;
3. ``+ range-narrowed delta``: each weight coded inside its quantization bin, frequencies derived from the
   bin's geometry, no tables (every tensor on its dtype's own grid);
4. ``+ coarse grid per tensor`` (= narrow-rans): a tensor whose weights all lie on a coarser grid (MiniLM's
   pooler: fp16 values stored as fp32, 13 low mantissa bits zero) is coded on that grid.

Speeds: encode / decode / decode_base MB/s of tensor bytes for narrow-rans and, in the same run, the
resident codec's ``encode_tensor`` / ``decode_tensor`` (best of ``--repeat``); the machine is shared, so
compare the two only within one run. Run: ``python benchmarks/bench_bits.py [--dtypes bf16,fp16,fp32]``
-> ``benchmarks/results/bits.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_codec import best_of, minilm_linear_weights  # noqa: E402

from tpde_hf.codec import base_quant, decode_tensor, encode_tensor  # noqa: E402
from tpde_hf.codec.registry import CodecContext  # noqa: E402
from tpde_hf.codec.storage import NarrowRans  # noqa: E402
from tpde_hf.codec.storage import codec as sc  # noqa: E402
from tpde_hf.codec.storage.blob import unpack_blob  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def blob_components(parts: dict[str, torch.Tensor]) -> dict[str, int]:
    """Bytes of each component of a narrow-rans tensor (headers = blob headers and section lengths)."""
    _, base = unpack_blob(parts["base_blob"], sc._BASE, 6, "t")
    _, delta = unpack_blob(parts["delta_blob"], sc._DELTA, 3, "t")
    sizes = [len(s) for s in base]
    dsizes = [len(s) for s in delta]
    total = parts["base_blob"].numel() + parts["delta_blob"].numel()
    comp = {"q": sizes[0] + sizes[1], "q_table": sizes[2], "scales": sizes[3] + sizes[4], "zeros": sizes[5],
            "delta": dsizes[0] + dsizes[1], "exceptions": dsizes[2]}
    comp["headers"] = total - sum(comp.values())
    return comp


def _h(x: np.ndarray, ctx: np.ndarray | None = None) -> float:
    """Total plug-in entropy in bits of ``x`` (given ``ctx``), no table cost."""
    def h(v: np.ndarray) -> float:
        _, c = np.unique(v, return_counts=True)
        return float(-(c * np.log2(c / v.size)).sum())
    if ctx is None:
        return h(x)
    key = x.astype(np.int64) * (int(ctx.max()) + 1) + ctx
    return h(key) - h(ctx)


def best(fn, repeat: int) -> float:
    """Fastest of ``repeat`` wall times after one warm-up call (numba compiles on the first)."""
    fn()
    return best_of(fn, repeat)


def run_dtype(weights32: dict[str, torch.Tensor], dtype: torch.dtype, repeat: int) -> dict:
    codec = NarrowRans()
    ws = {k: v.to(dtype) for k, v in weights32.items()}
    bases = {k: base_quant.quantize(w, 128) for k, w in ws.items()}
    n = sum(w.numel() for w in ws.values())
    nbytes = sum(w.numel() * w.element_size() for w in ws.values())
    comp: dict[str, int] = {}
    today = {"base": 0, "delta": 0, "meta": 0}
    bounds = {"H(q | zero)": 0.0, "H(w) order-0 per tensor (16-bit dtypes)": 0.0}
    parts_all = {}
    fine_delta = 0
    for k, w in ws.items():
        b = bases[k]
        parts = codec.encode(w, b.__dict__, CodecContext(k))
        fine = codec.encode(w, b.__dict__, CodecContext(k, options={"coarse_grid": False}))
        fine_delta += fine["delta_blob"].numel()
        parts_all[k] = parts
        for c, v in blob_components(parts).items():
            comp[c] = comp.get(c, 0) + v
        enc = encode_tensor(w, name=k)
        for c, v in enc.nbytes().items():
            if c in today:
                today[c] += v
        in_f = w.shape[1]
        q = base_quant.unpack_nibbles(b.qweight, in_f).numpy().ravel()
        z = base_quant.unpack_nibbles(b.zeros, b.scales.shape[1]).numpy().repeat(128, 1)[:, :in_f].ravel()
        bounds["H(q | zero)"] += _h(q, z)
        if w.element_size() == 2:
            bounds["H(w) order-0 per tensor (16-bit dtypes)"] += _h(w.view(torch.int16).numpy().ravel())
    bpw = {c: 8 * v / n for c, v in comp.items()}
    raw_side = sum(16 * b.scales.numel() + 8 * b.zeros.numel() for b in bases.values()) / n
    today_bpw = {c: 8 * v / n for c, v in today.items()}
    q_coded = bpw["q"] + bpw["q_table"]
    base_head = 8 * len(ws) * (sc._BASE.size + 4 * 6) / n  # the base blob's share of the headers
    steps = [
        {"step": "0 today: raw base + rANS delta (format v1)", "base": today_bpw["base"],
         "delta": today_bpw["delta"], "other": today_bpw["meta"]},
        {"step": "1 q rANS-coded (context: zero point), scales/zeros raw", "base": q_coded + raw_side,
         "delta": today_bpw["delta"], "other": today_bpw["meta"] + bpw["headers"]},
        {"step": "2 + scales, zeros zstd-coded", "base": q_coded + bpw["scales"] + bpw["zeros"],
         "delta": today_bpw["delta"], "other": today_bpw["meta"] + bpw["headers"]},
        {"step": "3 + range-narrowed delta (dtype grid)", "base": q_coded + bpw["scales"] + bpw["zeros"],
         "delta": 8 * fine_delta / n - (bpw["headers"] - base_head), "other": bpw["headers"]},
        {"step": "4 + coarse grid per tensor (narrow-rans)", "base": q_coded + bpw["scales"] + bpw["zeros"],
         "delta": bpw["delta"] + bpw["exceptions"], "other": bpw["headers"]},
    ]
    for s in steps:
        s["total"] = s["base"] + s["delta"] + s["other"]
    # Speeds, same run: narrow-rans against the resident codec.
    encs = {k: encode_tensor(w, name=k) for k, w in ws.items()}
    t_enc = best(lambda: [codec.encode(w, bases[k].__dict__, CodecContext(k)) for k, w in ws.items()], repeat)
    t_dec = best(lambda: [codec.decode(p, CodecContext(k)) for k, p in parts_all.items()], repeat)
    t_base = best(lambda: [codec.decode_base(p, CodecContext(k)) for k, p in parts_all.items()], repeat)
    t_old_enc = best(lambda: [encode_tensor(w, name=k) for k, w in ws.items()], repeat)
    t_old_dec = best(lambda: [decode_tensor(e) for e in encs.values()], repeat)
    t_quant = best(lambda: [base_quant.quantize(w, 128) for w in ws.values()], repeat)
    exact = all(torch.equal(codec.decode(p, CodecContext(k)).view(torch.uint8), ws[k].view(torch.uint8))
                for k, p in parts_all.items())
    mbs = lambda t: nbytes / t / 1e6  # noqa: E731
    return {"weights": n, "tensor_bytes": nbytes, "exact": exact,
            "components_bits_per_weight": bpw, "total_bits_per_weight": sum(bpw.values()),
            "raw_scales_zeros_bits_per_weight": raw_side, "steps": steps,
            "bounds_bits_per_weight": {k: v / n for k, v in bounds.items()},
            "speed_mb_s": {"narrow-rans encode (base given)": mbs(t_enc), "narrow-rans decode": mbs(t_dec),
                           "narrow-rans decode_base": mbs(t_base), "quantize (base_quant)": mbs(t_quant),
                           "resident encode_tensor": mbs(t_old_enc), "resident decode_tensor": mbs(t_old_dec)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="bf16,fp16,fp32")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "results" / "bits.json"))
    args = ap.parse_args()
    w32 = minilm_linear_weights()
    res = {"date": subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip(),
           "utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
           "load_average": os.getloadavg(), "threads": os.environ.get("TPDE_CODEC_THREADS", "all cores"),
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
           "input": "37 MiniLM linear weights (bench_codec.minilm_linear_weights), G = 128", "dtypes": {}}
    for d in args.dtypes.split(","):
        r = run_dtype(w32, DTYPES[d], args.repeat)
        res["dtypes"][d] = r
        print(f"== {d}: {r['total_bits_per_weight']:.4f} bits/weight, exact={r['exact']}")
        for s in r["steps"]:
            print(f"  {s['step']:58s} base {s['base']:.4f} delta {s['delta']:.4f} other {s['other']:.4f}"
                  f" = {s['total']:.4f}")
        print("  components:", {k: round(v, 4) for k, v in r["components_bits_per_weight"].items()})
        print("  bounds:", {k: round(v, 4) for k, v in r["bounds_bits_per_weight"].items()})
        print("  MB/s:", {k: round(v, 1) for k, v in r["speed_mb_s"].items()})
    res["load_average_end"] = os.getloadavg()
    res["narrow_rans_layout"] = sc.VERSION
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
