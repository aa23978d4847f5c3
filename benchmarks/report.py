"""Render ``BENCHMARKS.md`` and its plots from the JSON files in ``benchmarks/results/``.

Every benchmark script writes one JSON file (``codec.json``, ``delta_codes.json``, ``kernels.json``,
``conversion.json``, ``modes.json``). This module turns whatever is there into Markdown:

* a status table (which benchmark was measured, when, on what machine, on CPU or GPU);
* one section per result file: a dedicated table of the key figures for the files whose layout
  is known (codec, delta_codes, conversion, modes, kernels), and a generic flattening of every number for any
  other file or any layout it does not recognise, so a new or changed benchmark still shows up;
* GPU rows read "not measured (no GPU lent in this session)" unless the JSON says it was measured
  on a GPU;
* PNG plots (matplotlib, Agg backend): bits per weight per method (from ``codec.json``) and
  tokens/s per runtime mode (from ``modes.json``), embedded in the Markdown.

Missing files, missing keys and odd values never raise: they are shown as "n/a" or skipped.

Example::

    from benchmarks.report import render_report
    result = render_report(Path("benchmarks/results"), Path("BENCHMARKS.md"))
    print(result.plots)   # [PosixPath('benchmarks/results/bits_per_weight.png'), ...]
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Known benchmarks, in report order: name -> (result file, producing script, one-line purpose).
BENCHMARKS: dict[str, tuple[str, str, str]] = {
    "codec": ("codec.json", "bench_codec.py",
              "bits per weight of the format on real weights, against general-purpose and model-specific coders"),
    "delta_codes": ("delta_codes.json", "bench_delta_codes.py",
                    "the rANS delta against the class-width delta code (the GPU-oriented option) on real weights: "
                    "exact bits per weight, per-class widths, CPU encode and decode time"),
    "kernels": ("kernels.json", "bench_kernels.py",
                "decode / fused matmul kernels: throughput and speed against a dense bf16 matmul"),
    "conversion": ("conversion.json", "bench_conversion.py",
                   "conversion of whole models: time, throughput, peak memory, size"),
    "modes": ("modes.json", "bench_modes.py",
              "runtime modes of a loaded model: load time, resident memory, tokens/s, exactness"),
    "integrity": ("integrity.json", "bench_integrity.py",
                  "load time with the default integrity checks (xxh3 of every stored byte) against the opt-out, "
                  "in the same run"),
    "peers": ("peers.json", "bench_peers.py",
              "tpde against the other lossless tools (ZipNN, lmzip, glyd, bigsmall plain and dual, DFloat11's "
              "encoder, zstd) on the same bytes in the same run: bits per weight, MB/s both ways, bit-exact check"),
    "speculative": ("speculative.json", "bench_speculative.py",
                    "exact generation drafted by the embedded 4-bit base (self-speculative decoding), CPU batch 1: "
                    "tokens/s against plain lossless and dense bf16, acceptance by draft length, token identity"),
    "base_options": ("base_options.json", "bench_base_options.py",
                     "the 4-bit base quantizers (minmax, search) in the same run: top-1 agreement, perplexity, "
                     "simulated draft acceptance, delta bits per weight"),
    "bits": ("bits.json", "bench_bits.py",
             "on-disk bits per weight of the narrow-rans storage layer, step by step from the resident layout, "
             "with its encode/decode speed against the resident codec in the same run"),
    "storage_load": ("storage_load.json", "bench_storage_load.py",
                     "from_pretrained load time per storage layout (resident, narrow-rans) in every mode"),
    "reference_minilm": ("reference_minilm.json", "bench_reference.py",
                         "fine-tunes stored as exact deltas against their base, against BitX, zstd on the XOR, an "
                         "FM-Delta-style coder, ZipNN and tpde standalone, on pairs trained here"),
    "checkpoints": ("checkpoints.json", "bench_checkpoints.py",
                    "training checkpoints as exact deltas against the previous one: bits per value, step time "
                    "with the callback, restore speed, against raw, zstd and ZipNN"),
    "sass": ("sass_counts.json", "sass_counts.py",
             "static SASS of each Triton kernel's hot loop (compiled for sm_90, nothing run): instructions per "
             "weight and the issue ceiling they set"),
}
NO_GPU = "not measured (no GPU lent in this session)"
NA = "n/a"
_META_KEYS = ("benchmark", "date", "machine", "device", "gpu", "torch_threads", "model", "note", "notes")
_GPU_WORDS = ("cuda", "gpu", "nvidia", "h100", "h200", "a100", "rocm")


@dataclass
class RenderResult:
    """What :func:`render_report` produced."""

    markdown: str
    output: Path
    plots: list[Path] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)  # benchmark names that had a result file
    notes: list[str] = field(default_factory=list)  # unreadable files, failed plots


# ==================================================================== small helpers
def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: numbers with ``digits`` significant figures (thousands separators for ints)."""
    if value is None:
        return NA
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value == 0:
            return "0"
        mag = abs(value)
        if mag >= 10 ** digits:
            return f"{value:,.0f}"
        decimals = max(0, digits - 1 - int(math.floor(math.log10(mag))))
        return f"{value:.{min(decimals, 6)}f}"
    if isinstance(value, (list, tuple)):
        if all(not isinstance(v, (dict, list, tuple)) for v in value):
            # Plain str for ints: lists are shapes and ids, where thousands separators only confuse.
            return ", ".join(str(v) if isinstance(v, int) else fmt(v, digits) for v in value) if value else "(none)"
        return f"({len(value)} entries)"
    if isinstance(value, dict):
        return f"({len(value)} fields)"
    return str(value).replace("|", "\\|").replace("\n", " ")


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub Markdown table; cells that are not strings go through :func:`fmt`."""
    rows = [[c if isinstance(c, str) else fmt(c) for c in r] for r in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def get(data: Any, *path: str | int, default: Any = None) -> Any:
    """``data[p0][p1]...`` or ``default`` when any step is missing or of the wrong type."""
    for p in path:
        try:
            data = data[p]
        except (KeyError, IndexError, TypeError):
            return default
    return data


def num(value: Any) -> float | None:
    """``value`` as a finite float, else ``None`` (strings such as 'not installed' included)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def flatten(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Leaves of nested dicts as ``("a.b.c", value)``; lists of scalars stay one leaf."""
    if isinstance(data, dict):
        out: list[tuple[str, Any]] = []
        for k, v in data.items():
            out += flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        out = []
        for i, v in enumerate(data):
            out += flatten(v, f"{prefix}[{i}]")
        return out
    return [(prefix, data)]


def _says_gpu(value: Any) -> bool:
    """Whether one ``gpu`` / ``device`` field names a GPU that was actually used."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        low = value.lower().strip()
        # "not measured", "not lent: not measured", "no GPU lent", ...: a note that no GPU ran
        if not low or low in ("none", "no", "false", "cpu") or "not measured" in low or "not lent" in low:
            return False
        return True
    if isinstance(value, dict):
        status = value.get("status")
        if isinstance(status, str) and "not measured" in status.lower():
            return False
        return bool(value.get("device") or value.get("rows") or value.get("name"))
    return False


def measured_on_gpu(data: dict) -> bool:
    """Whether a result file says it was measured on a GPU.

    Looks at a top-level ``gpu`` (bool, name, or a section whose ``status`` is not "not measured"),
    a ``device`` naming CUDA/a GPU, and the same keys inside a ``machine`` dict.
    """
    places = [data]
    if isinstance(data.get("machine"), dict):
        places.append(data["machine"])
    for place in places:
        if "gpu" in place and _says_gpu(place["gpu"]):
            return True
        device = place.get("device")
        if isinstance(device, str) and any(w in device.lower() for w in _GPU_WORDS):
            return True
    return False


def machine_text(data: dict) -> str:
    """One line for the ``machine`` field, whether a string or a dict of facts."""
    m = data.get("machine")
    if isinstance(m, str):
        return m
    if not isinstance(m, dict):
        return "unknown"
    cores = _first(m, "cores", "cpu_cores", "cpu_count")
    bits = []
    if m.get("platform"):
        bits.append(str(m["platform"]).split("-with-")[0])
    if cores is not None:
        bits.append(f"{cores} cores")
    if m.get("torch"):
        bits.append(f"torch {m['torch']}")
    if m.get("torch_threads") is not None:
        bits.append(f"{m['torch_threads']} threads")
    if _says_gpu(m.get("gpu")):
        bits.append(f"GPU {m['gpu']}")
    elif m.get("device"):
        bits.append(f"device {m['device']}")
    return ", ".join(bits) or "unknown"


def date_text(data: dict) -> str:
    """The ``date`` field (ISO timestamps shortened to the minute), else the result file's time."""
    d = data.get("date")
    if isinstance(d, str) and d:
        return d.replace("T", " ")[:16] if "T" in d else d
    mtime = data.get("_mtime")
    if isinstance(mtime, (int, float)):
        from datetime import datetime, timezone

        return datetime.fromtimestamp(mtime, timezone.utc).strftime("%Y-%m-%d") + " (file time)"
    return "date unknown"


def _run_label(run: dict, index: int) -> str:
    """A column label for one entry of a ``runs`` list."""
    for key in ("label", "name", "mode", "model", "dtype", "shape", "kernel", "case"):
        if isinstance(run.get(key), (str, int, float)):
            return str(run[key])
        if isinstance(run.get(key), list):
            return "x".join(str(v) for v in run[key])
    return f"run {index}"


# ==================================================================== generic section
def generic_tables(data: dict, max_cols: int = 8, max_rows: int = 60) -> str:
    """Every number of a result file, flattened: scalars in a key/value table, lists of dicts side by side."""
    parts: list[str] = []
    own = {k: v for k, v in data.items() if k not in _META_KEYS and not k.startswith("_")}
    scalars = [(k, v) for k, v in own.items() if not isinstance(v, (dict, list))]
    nested = [(k, v) for k, v in own.items() if isinstance(v, dict)]
    for k, v in nested:
        scalars += flatten(v, k)
    if scalars:
        parts.append(md_table(["figure", "value"], scalars[:max_rows]))
        if len(scalars) > max_rows:
            parts.append(f"_({len(scalars) - max_rows} more figures in the JSON file)_")
    for key, value in own.items():
        if not (isinstance(value, list) and value and all(isinstance(v, dict) for v in value)):
            continue
        for start in range(0, len(value), max_cols):
            chunk = value[start:start + max_cols]
            flat = [dict(flatten(r)) for r in chunk]
            keys = list(dict.fromkeys(k for f in flat for k in f))[:max_rows]
            labels = [_run_label(r, start + i) for i, r in enumerate(chunk)]
            table = md_table(["figure", *labels], [[k, *(f.get(k) for f in flat)] for k in keys])
            parts.append(f"`{key}`:\n\n{table}")
    return "\n\n".join(parts) if parts else "_No figures in this file._"


# ==================================================================== dedicated sections
def codec_section(data: dict) -> str:
    """Bits per weight per method and dtype, coder comparison, throughput (``codec.json``)."""
    runs = [r for r in data.get("runs", []) if isinstance(r, dict)]
    if not runs:
        return generic_tables(data)
    cols = [str(r.get("dtype", f"run {i}")) for i, r in enumerate(runs)]
    source_bits = {"bfloat16": 16, "float16": 16, "float32": 32}

    def row(label: str, fn: Callable[[dict], Any]) -> list[Any]:
        return [label, *(fn(r) for r in runs)]

    bpw = [
        row("source dtype (uncompressed)", lambda r: source_bits.get(str(r.get("dtype")))),
        row("**tpde total (lossless: base + delta + metadata)**", lambda r: num(get(r, "bits_per_weight", "total"))),
        row("tpde base (the 4-bit model inside, lossy)", lambda r: num(get(r, "bits_per_weight", "base"))),
        row("tpde delta (entropy-coded, incl. tables and lane offsets)",
            lambda r: num(get(r, "bits_per_weight", "delta"))),
        row("bound for the delta, H(r given context), per tensor",
            lambda r: num(get(r, "bound_bits_per_weight", "per_tensor"))),
        row("bound for the delta, pooled over all tensors",
            lambda r: num(get(r, "bound_bits_per_weight", "pooled"))),
        row("tpde total, base also zstd-19'd for storage",
            lambda r: num(get(r, "storage_with_zstd_base", "total_bits"))),
        row("zstd-3 on the raw weights", lambda r: num(get(r, "baselines", "zstd3", "bits_per_weight"))),
        row("zstd-19 on the raw weights", lambda r: num(get(r, "baselines", "zstd19", "bits_per_weight"))),
        row("ZipNN", lambda r: num(get(r, "baselines", "zipnn", "bits_per_weight"))),
        row("order-0 entropy of the values (DFloat11 bound)",
            lambda r: num(get(r, "baselines", "order0_entropy_bits"))),
    ]
    ratio = [
        row("tpde total / source size", lambda r: num(get(r, "ratio_to_source"))),
        row("delta over its bound", lambda r: _pct(get(r, "delta_over_bound"))),
        row("rANS payload (as stored), bits/weight", lambda r: num(get(r, "coder_comparison_payload_bits", "rans"))),
        row("12-bit Huffman on the same symbols, bits/weight",
            lambda r: num(get(r, "coder_comparison_payload_bits", "huffman12"))),
    ]
    speed = [
        row("tpde encode (CPU, compiled, all cores), MB/s of source", lambda r: num(get(r, "encode_MBps"))),
        row("tpde decode (CPU, compiled, all cores), MB/s", lambda r: num(get(r, "decode_MBps"))),
        row("tpde encode (CPU, compiled, 1 thread), MB/s",
            lambda r: num(get(r, "throughput", "compiled_1_thread", "encode_MBps"))),
        row("tpde decode (CPU, compiled, 1 thread), MB/s",
            lambda r: num(get(r, "throughput", "compiled_1_thread", "decode_MBps"))),
        row("tpde encode (numpy reference), MB/s",
            lambda r: num(get(r, "throughput", "numpy_reference", "encode_MBps"))),
        row("tpde decode (numpy reference), MB/s",
            lambda r: num(get(r, "throughput", "numpy_reference", "decode_MBps"))),
        row("ZipNN encode, MB/s", lambda r: num(get(r, "baselines", "zipnn", "encode_MBps"))),
        row("ZipNN decode, MB/s", lambda r: num(get(r, "baselines", "zipnn", "decode_MBps"))),
        row("zstd-19 encode, s", lambda r: num(get(r, "baselines", "zstd19", "encode_s"))),
    ]
    if measured_on_gpu(data):
        speed.append(row("tpde decode on GPU, MB/s", lambda r: num(get(r, "gpu_decode_MBps"))))
    else:  # one GPU row, stated once rather than repeated per dtype
        speed.append(["tpde decode on GPU", NO_GPU, *(["\u2014"] * (len(runs) - 1))])
    weights = runs[0].get("weights")
    intro = (f"{fmt(weights)} weights in {fmt(runs[0].get('tensors'))} tensors of {data.get('model', 'the model')}; "
             f"codec parameters {fmt(', '.join(f'{k}={v}' for k, v in (data.get('params') or {}).items()))}. "
             "Bits per weight, lower is better; every tpde figure is a bit-exact round trip (checked in the run).")
    return "\n\n".join([
        intro,
        md_table(["bits per weight", *cols], bpw),
        md_table(["figure", *cols], ratio),
        md_table(["throughput", *cols], speed),
    ])


def delta_codes_section(data: dict) -> str:
    """rANS against class-width delta, per model, dtype and group size (``delta_codes.json``)."""
    runs = [r for r in data.get("runs", []) if isinstance(r, dict)]
    if not runs:
        return generic_tables(data)
    cols = [_run_label(r, i) for i, r in enumerate(runs)]

    def row(label: str, fn: Callable[[dict], Any]) -> list[Any]:
        return [label, *(fn(r) for r in runs)]

    def b(*path: str) -> Callable[[dict], Any]:
        return lambda r: num(get(r, "bits_per_weight", *path))

    sizes = [
        row("source dtype (uncompressed)", lambda r: r.get("source_bits")),
        row("weights (tensors)", lambda r: f"{fmt(r.get('weights'))} ({fmt(r.get('tensors'))})"),
        row("**rANS delta, as stored** (format v1)", b("rans_delta")),
        row("\u2003rANS payload + lanes + tables + meta",
            lambda r: " + ".join(fmt(num(get(r, "bits_per_weight", "rans_parts", k)))
                                 for k in ("delta", "lanes", "tables", "meta"))),
        row("**class-width delta, as stored** (format v2)", b("class_width_delta")),
        row("\u2003class-width header + offsets + payload + meta",
            lambda r: " + ".join(fmt(num(get(r, "bits_per_weight", "class_width_parts", k)))
                                 for k in ("header", "offsets", "payload", "meta"))),
        row("bound for the delta, H(r given context), per tensor", b("bound")),
        row("class-width delta over rANS delta", lambda r: _pct(r.get("class_width_over_rans"))),
        row("rANS delta over the bound", lambda r: _pct(r.get("rans_over_bound"))),
        row("class-width delta over the bound", lambda r: _pct(r.get("class_width_over_bound"))),
        row("base (4-bit, shared by both codes)", b("base")),
        row("**total, rANS** (base + delta)", b("total_rans")),
        row("**total, class-width** (base + delta)", b("total_class_width")),
        row("total / source, rANS", lambda r: num(get(r, "ratio_to_source", "rans"))),
        row("total / source, class-width", lambda r: num(get(r, "ratio_to_source", "class_width"))),
        row("bit-exact round trips (rANS, class-width)",
            lambda r: f"{fmt(get(r, 'verified_bit_exact', 'rans'))}, {fmt(get(r, 'verified_bit_exact', 'class_width'))}"
            if isinstance(r.get("verified_bit_exact"), dict) else NA),
    ]
    n_classes = max((len(r.get("classes") or []) for r in runs), default=0)
    classes = []
    for k in range(n_classes):
        levels = next((get(r, "classes", k, "levels") for r in runs if get(r, "classes", k, "levels")), str(k))
        share = [_class_figure(r, k, "share") for r in runs]
        width = [_class_figure(r, k, "mean_width") for r in runs]
        payload = [_class_figure(r, k, "payload_bits_per_weight") for r in runs]
        bound = [_class_figure(r, k, "bound_bits_per_weight") for r in runs]
        classes += [
            [f"class {k} (levels {levels}): share of elements", *(_pct_plain(v) for v in share)],
            [f"class {k}: mean field width, bits", *width],
            [f"class {k}: payload bits per weight (bound)",
             *(None if p is None else f"{fmt(p)} ({fmt(q)})" for p, q in zip(payload, bound, strict=True))],
        ]

    def t(*path: str) -> Callable[[dict], Any]:
        return lambda r: num(get(r, "timing", *path))

    threads = get(runs[0], "timing", "rans", "threads")
    speed = [
        row(f"rANS encode (compiled, {fmt(threads)} threads, incl. its quantization), MB/s of source",
            t("rans", "encode_MBps")),
        row("rANS decode (compiled, `decode_tensor`), MB/s", t("rans", "decode_MBps")),
        row("class-width encode (torch reference, given the base), MB/s", t("class_width", "encode_MBps")),
        row("class-width encode incl. the torch base quantizer, MB/s", t("class_width", "encode_with_base_MBps")),
        row("class-width decode (torch reference), MB/s", t("class_width", "decode_MBps")),
        row("class-width encode (compiled, given the base), MB/s", t("class_width_compiled", "encode_MBps")),
        row("class-width decode (compiled, what `decode_tensor` runs), MB/s", t("class_width_compiled", "decode_MBps")),
        row("base quantizer alone (torch), MB/s", t("base_quantize_MBps")),
        row("load average, 1 min (before, after)", lambda r: r.get("load_avg_1min")),
    ]
    if measured_on_gpu(data):
        speed.append(row("class-width decode on GPU, MB/s", t("class_width", "gpu_decode_MBps")))
    else:
        speed.append(["class-width decode on GPU", NO_GPU, *(["\u2014"] * (len(runs) - 1))])
    edges = get(data, "class_width", "class_edges")
    intro = (f"{data.get('model', 'the model')}. Both delta codes sit on the same 4-bit base (checked bit for bit in "
             f"the run){'; class edges ' + fmt(edges) if edges else ''}. Bits per weight, lower is better"
             f"{'; quick smoke run, figures not representative' if data.get('quick') else ''}.")
    return "\n\n".join([
        intro,
        md_table(["bits per weight", *cols], sizes),
        "Per context class of the class-width code: every field of a class in a group has the width of that "
        "class's widest field there. Payload and bound are in bits per weight of all the weights, so the classes "
        "add up to the payload and to the bound above:",
        md_table(["class", *cols], classes),
        md_table(["CPU time (best of the repeats)", *cols], speed),
        _details(data),
    ])


def _class_figure(run: dict, k: int, key: str) -> float | None:
    entries = run.get("classes")
    return num(get(entries[k], key)) if isinstance(entries, list) and k < len(entries) else None


def _pct_plain(value: Any) -> str | None:
    v = num(value)
    return None if v is None else f"{100 * v:.1f}%"


def conversion_section(data: dict) -> str:
    """Whole-model conversions: per model and worker count, time, throughput, memory, size (``conversion.json``)."""
    models = data.get("models")
    if not isinstance(models, dict) or not models:
        return generic_tables(data)
    rows = []
    for name, m in models.items():
        if not isinstance(m, dict):
            continue
        base = m.get("baseline_load_save") if isinstance(m.get("baseline_load_save"), dict) else {}
        for c in m.get("conversion") or []:
            if not isinstance(c, dict):
                continue
            rows.append([
                f"{name} ({m.get('source_dtype', '?')})", num(m.get("source_mb")),
                f"{c.get('workers')} x {c.get('threads', 1)}", c.get("layout", "cold"),
                num(get(c, "seconds", "total")), num(c.get("throughput_mb_s_end_to_end")),
                num(c.get("throughput_mb_s_encode_verify")), num(base.get("mb_per_s")),
                num(c.get("peak_above_baseline_mb")), num(c.get("peak_rss_over_largest_tensor")),
                _bpw_text(c.get("bits_per_weight")), num(get(c, "ratio_to_source", "model")),
                c.get("verified_tensors"),
            ])
    if not rows:
        return generic_tables(data)
    parts = []
    if isinstance(data.get("goal"), str):
        parts.append(f"Goal: {data['goal']}.")
    parts.append(md_table(
        ["model (source dtype)", "source MB", "processes x threads", "layout", "total s", "MB/s end to end",
         "MB/s encode+verify", "MB/s plain load+save", "peak RSS above baseline, MB", "peak / largest tensor",
         "bits per converted weight (base + delta = total)", "size / source (whole model)", "tensors verified"],
        rows))
    parts.append("MB/s are MB of source weights per second, timed from the call to `convert` (the interpreter and "
                 "`import torch` are done); \"plain load+save\" is loading the source and saving it again as "
                 "safetensors, the floor for any conversion. Layout `cold`: the architecture is built "
                 "(transformers' modeling imports: 2 to 4 s of one core here), as on the first conversion of an "
                 "architecture and config; `warm`: it comes from the layout cache, as on every later one. "
                 "Encoding starts while the architecture is built, so \"encode+verify\" runs from the first "
                 "task to the last and, cold, spans the plan it overlaps. Each figure is the best of the repeats "
                 "(the machine may be shared).")
    cli = [(n, m["cli_cold"]) for n, m in models.items() if isinstance(m, dict) and isinstance(m.get("cli_cold"), dict)]
    if cli:
        parts.append("The whole `tpde convert` command, cold, timed from outside (interpreter start and imports "
                     "included): " + "; ".join(f"{n} {num(c.get('seconds'))} s ({num(c.get('mb_per_s'))} MB/s)"
                                               for n, c in cli) + ".")
    if "llama-synthetic" in models:
        parts.append("llama-synthetic is a 1.2 GB bf16 Llama-architecture checkpoint with random weights, measured "
                     "for its throughput at a size where start-up costs stop dominating; its bits per weight and "
                     "ratio describe random mantissas, not a trained model.")
    parts.append(_details(data))
    return "\n\n".join(parts)


def modes_section(data: dict) -> str:
    """Runtime modes of a loaded model: load, memory, speed, exactness (``modes.json``)."""
    modes = data.get("modes")
    entries = [v for v in modes.values() if isinstance(v, dict)] if isinstance(modes, dict) else _entries(data)
    if not entries:
        return generic_tables(data)
    batches = sorted({r.get("batch") for e in entries for r in e.get("runs") or [] if isinstance(r, dict)
                      and isinstance(r.get("batch"), int)})
    headers = ["mode", "load s", "weights MiB", "RSS growth at load, MiB"]  # bench_modes reports 2**20 units
    for b in batches:
        headers += [f"decode tok/s, batch {b}", f"time to first token s, batch {b}"]
    headers += ["greedy tokens equal original", "new tokens per batch size"]
    requested = data.get("new_tokens_requested")
    rows = []
    for e in entries:
        name = str(e.get("mode", "?"))
        if e.get("error"):
            rows.append([name, f"failed: {str(e['error']).strip().splitlines()[-1][:80]}",
                         *([""] * (len(headers) - 2))])
            continue
        runs = {r.get("batch"): r for r in e.get("runs") or [] if isinstance(r, dict)}
        row: list[Any] = [name, num(e.get("load_s")), num(e.get("model_mb")), num(e.get("rss_load_mb"))]
        for b in batches:
            r = runs.get(b, {})
            row += [num(r.get("decode_tokens_per_s")), num(r.get("ttft_s"))]
        eq = [r.get("tokens_equal_original") for r in runs.values() if "tokens_equal_original" in r]
        row.append("(reference)" if name == "original" else ("yes" if eq and all(eq) else "no" if eq else NA))
        cut = any(r.get("complete") is False for r in runs.values())
        row.append(" / ".join(str(r.get("new_tokens")) for r in runs.values())
                   + (f" of {requested}" if requested else "") + (" (stopped by its time budget)" if cut else ""))
        rows.append(row)
    parts = []
    if isinstance(data.get("model"), str):
        parts.append(f"Model: {data['model']}.")
    parts.append(md_table(headers, rows))
    if data.get("cpu_default_mode"):
        parts.append(f"CPU default mode: **{data['cpu_default_mode']}**. {data.get('cpu_default_reason', '')}")
    if not measured_on_gpu(data):
        gpu_rows = [[m, NO_GPU] for m in ("lossless", "lossless-offload", "base", "dequantize")]
        parts.append("On a GPU:\n\n" + md_table(["mode", "tokens/s, memory"], gpu_rows))
    parts.append(_details(data))
    return "\n\n".join(parts)


def _kernel_rows(rows: list[dict]) -> list[list[Any]]:
    out = []
    for r in rows:
        if not isinstance(r, dict):
            continue
        shape = "x".join(str(v) for v in r.get("shape") or [])
        if r.get("scaled_from"):
            shape += f" (from {'x'.join(str(v) for v in r['scaled_from'])})"
        prefill = next((p for p in r.get("prefill") or [] if isinstance(p, dict)), {})
        out.append([
            shape, num(get(r, "bits_per_weight", "total")), num(get(r, "reconstruct", "ms")),
            num(get(r, "reconstruct", "GBps_dense_bf16_written")), num(get(r, "gemv_batch1", "bf16_F_linear_ms")),
            num(get(r, "gemv_batch1", "lossless_ms")), num(get(r, "gemv_batch1", "base4bit_ms")),
            num(get(r, "gemv_batch1", "lossless_time_over_bf16")),
            num(get(r, "gemv_batch1", "base4bit_time_over_bf16")),
            num(prefill.get("lossless_time_over_bf16")),
        ])
    return out


_KERNEL_HEADERS = ["shape (out x in)", "bits/weight", "reconstruct ms", "reconstruct GB/s (bf16 written)",
                   "bf16 GEMV ms", "lossless GEMV ms", "base 4-bit GEMV ms", "lossless / bf16 time",
                   "base / bf16 time", "prefill lossless / bf16 time"]


def kernels_section(data: dict) -> str:
    """Decode and matmul kernels on CPU (torch) and GPU (Triton) when measured there (``kernels.json``)."""
    parts = []
    cpu_rows = get(data, "cpu", "rows")
    if isinstance(cpu_rows, list) and cpu_rows:
        parts.append(f"CPU, backend {get(data, 'cpu', 'backend', default='?')}"
                     f"{' (quick smoke run)' if data.get('quick') else ''}; times are per call, lower is better:")
        parts.append(md_table(_KERNEL_HEADERS, _kernel_rows(cpu_rows)))
    gpu = data.get("gpu")
    gpu_rows = get(gpu, "rows") if isinstance(gpu, dict) else None
    if measured_on_gpu(data) and isinstance(gpu_rows, list) and gpu_rows:
        parts.append(f"GPU {get(gpu, 'device', default='')}, backend {get(gpu, 'backend', default='?')}:")
        parts.append(md_table(_KERNEL_HEADERS, _kernel_rows(gpu_rows)))
        cw_rows = [r for r in gpu_rows if isinstance(r, dict) and isinstance(r.get("class_width"), dict)]
        if cw_rows:
            parts.append("Class-width delta code (`--delta-code class-width`, GPU_NOTES.md), same shapes and run:")
            parts.append(md_table(_CLASS_WIDTH_HEADERS, [_class_width_row(r) for r in cw_rows]))
    else:
        shapes = ["x".join(str(v) for v in (r.get("shape") or [])) for r in gpu_rows or [] if isinstance(r, dict)]
        parts.append("GPU (Triton):\n\n" + md_table(["shape", "fused decode + GEMV, reconstruct, prefill"],
                                                     [[sh or "all", NO_GPU] for sh in shapes or ["all shapes"]]))
    if not parts:
        return generic_tables(data)
    parts.append(_details(data))
    return "\n\n".join(parts)


_CLASS_WIDTH_HEADERS = ["shape", "delta bits/weight", "reconstruct ms", "reconstruct GB/s (bf16 written)",
                        "fused GEMV batch 1 ms", "fused GEMV / bf16 time", "fused GEMV batch 16 ms",
                        "prefill / bf16 time (batch)"]


def _class_width_row(row: dict) -> list:
    cw = row["class_width"]
    prefill = [p for p in cw.get("prefill") or [] if isinstance(p, dict)]
    return ["x".join(str(v) for v in row.get("shape") or []), num(cw.get("delta_bits_per_weight")),
            num(cw.get("reconstruct_ms")), num(cw.get("reconstruct_GBps_dense_bf16_written")),
            num(cw.get("fused_gemv_ms")), num(cw.get("fused_gemv_time_over_bf16")),
            num(cw.get("fused_gemv_batch16_ms")),
            ", ".join(f"{fmt(p.get('lossless_time_over_bf16'))} ({p.get('batch')})" for p in prefill) or None]


def _details(data: dict) -> str:
    """Every figure of the file, folded away under the key tables."""
    return f"<details><summary>all figures in the JSON file</summary>\n\n{generic_tables(data)}\n\n</details>"


def sass_section(data: dict) -> str:
    """Instructions per element of each kernel's hot loop, registers, spills (``sass_counts.json``)."""
    kernels = data.get("kernels")
    if not isinstance(kernels, dict) or not kernels:
        return generic_tables(data)
    rows = [[name, num(k.get("instructions_per_element")), num(k.get("elements_per_cycle_per_sm")),
             k.get("registers"), k.get("stack")] for name, k in kernels.items() if isinstance(k, dict)]
    head = (f"Static figures, Triton {data.get('triton', '?')}, target {data.get('target', '?')}: an SM issues "
            "4 warp-instructions per cycle, so N instructions per element allow at most 128 / N elements per "
            "cycle per SM with every latency hidden. A ceiling, not a measurement of speed.")
    return "\n\n".join([head, md_table(["kernel (launch default)", "instructions / element",
                                         "elements / cycle / SM (ceiling)", "registers", "stack bytes (spills)"],
                                        rows), _details(data)])


def _percent(value: Any) -> str | None:
    """A figure already in percent: ``2.34`` -> ``'2.3%'``."""
    v = num(value)
    return None if v is None else f"{v:.1f}%"


def integrity_section(data: dict) -> str:
    """Load time with and without the integrity checks, per model and mode (``integrity.json``)."""
    models = data.get("models")
    if not isinstance(models, dict) or not models:
        return generic_tables(data)
    rows = []
    for name, m in models.items():
        for mode, r in (get(m, "modes", default={}) or {}).items():
            if not isinstance(r, dict):
                continue
            rows.append([name, mode, num(m.get("repo_mb")), num(r.get("median_on_s")), num(r.get("median_off_s")),
                         num(r.get("overhead_s")), _percent(r.get("overhead_pct_of_cpu_default_load")),
                         _percent(r.get("overhead_pct_of_mode_load")), num(r.get("median_check_in_load_s")),
                         _percent(r.get("check_in_load_pct_of_cpu_default_load")), num(r.get("check_alone_s")),
                         num(r.get("hash_gb_per_s")), len(r.get("on_s") or [])])
    if not rows:
        return generic_tables(data)
    parts = []
    if isinstance(data.get("goal"), str):
        parts.append(f"Goal: {data['goal']}.")
    parts.append(md_table(
        ["model", "mode", "repo MB", "load s, checks on (median)", "load s, check_integrity=False (median)",
         "overhead s", "overhead / CPU default-mode load", "overhead / this mode's load",
         "check inside the load s (median)", "check inside the load / CPU default-mode load", "check alone s (best)",
         "hash GB/s (check alone)", "pairs"], rows))
    parts.append("Each pair loads the repo twice in one process, with the checks and with "
                 "`TpdeConfig(check_integrity=False)`, alternating which goes first, after a discarded warm-up load "
                 "(warm page cache). The overhead is the difference of the medians. \"Check inside the load\" is "
                 "the time the checked loads spent in `tpde_hf.integrity.check_checkpoint`, the whole of what the "
                 "checks add; \"check alone\" times it again outside any load on the same files. The CPU default "
                 "mode is `dequantize`. On a shared machine the load times of a pair vary by more than the check "
                 "costs, so the difference of medians is noisy (even negative): the check-inside-the-load column "
                 "is the steady figure.")
    notes = [f"{n}: {m['note']}." for n, m in models.items() if isinstance(m, dict) and isinstance(m.get("note"), str)]
    if notes:
        parts.append("\n".join(f"- {n}" for n in notes))
    parts.append(_details(data))
    return "\n\n".join(parts)


def _rendered_by(script: str) -> Callable[[dict], str]:
    """A section whose tables the benchmark script itself renders (its ``render_markdown(data)``)."""

    def section(data: dict) -> str:
        import importlib.util
        import sys

        name = Path(script).stem
        module = sys.modules.get(name)
        if module is None:
            spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(script))
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # its dataclasses look their module up while being defined
            spec.loader.exec_module(module)
        return module.render_markdown(data)

    return section


peers_section = _rendered_by("bench_peers.py")


SECTIONS: dict[str, Callable[[dict], str]] = {
    "peers": peers_section,
    "speculative": _rendered_by("bench_speculative.py"),
    "base_options": _rendered_by("bench_base_options.py"),
    "integrity": integrity_section,
    "sass": sass_section,
    "codec": codec_section,
    "delta_codes": delta_codes_section,
    "conversion": conversion_section,
    "modes": modes_section,
    "kernels": kernels_section,
}


def _entries(data: dict) -> list[dict]:
    """The per-case records of a result file: its ``runs`` / ``results`` / ``modes`` list or dict."""
    for key in ("runs", "results", "modes", "models", "cases"):
        value = data.get(key)
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            return value
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            return [{"label": k, **v} for k, v in value.items()]
    return []


def _first(d: dict, *keys: str) -> Any:
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    return None


def _mb(value: Any) -> float | None:
    v = num(value)
    return None if v is None else v / 1e6


def _pct(value: Any) -> str | None:
    v = num(value)
    return None if v is None else f"{100 * v:+.1f}%"


def _bpw_text(b: Any) -> str | None:
    if not isinstance(b, dict) or num(b.get("total")) is None:
        return None
    base, delta, total = num(b.get("base")), num(b.get("delta")), num(b.get("total"))
    return f"{fmt(base)} + {fmt(delta)} = {fmt(total)}" if base is not None and delta is not None else fmt(total)


# ==================================================================== plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on benchmark machines
    import matplotlib.pyplot as plt

    return plt


def plot_bits_per_weight(codec: dict, path: Path) -> Path | None:
    """Bars of bits per weight per method, one panel per source dtype; tpde stacked as base + delta."""
    runs = [r for r in codec.get("runs", []) if isinstance(r, dict) and num(get(r, "bits_per_weight", "total"))]
    if not runs:
        return None
    plt = _pyplot()
    methods = [
        ("zstd-3", lambda r: get(r, "baselines", "zstd3", "bits_per_weight")),
        ("zstd-19", lambda r: get(r, "baselines", "zstd19", "bits_per_weight")),
        ("ZipNN", lambda r: get(r, "baselines", "zipnn", "bits_per_weight")),
        ("order-0\nentropy", lambda r: get(r, "baselines", "order0_entropy_bits")),
    ]
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 4.2), squeeze=False)
    for ax, r in zip(axes[0], runs, strict=True):
        b = r["bits_per_weight"]
        base, total = num(b.get("base")) or 0.0, num(b.get("total")) or 0.0
        ax.bar(["tpde"], [base], color="#4c72b0", label="tpde base (4-bit)")
        ax.bar(["tpde"], [total - base], bottom=[base], color="#dd8452", label="tpde delta (+ metadata)")
        ax.text(0, total, f"{total:.2f}", ha="center", va="bottom", fontsize=8)
        for name, fn in methods:
            v = num(fn(r))
            if v is None:
                continue
            ax.bar([name], [v], color="#8c8c8c")
            ax.text(name, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
        src = {"bfloat16": 16, "float16": 16, "float32": 32}.get(str(r.get("dtype")))
        if src:
            ax.axhline(src, color="k", lw=0.8, ls="--", label="uncompressed source")
        ax.set_title(str(r.get("dtype", "")))
        ax.set_ylabel("bits per weight (lower is better)")
        ax.tick_params(axis="x", labelsize=8)
    # One legend for all panels, under them, so that it never hides a bar.
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(f"Lossless size per method: {str(codec.get('model', '')).split(' (')[0]}", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_tokens_per_s(modes: dict, path: Path) -> Path | None:
    """Grouped bars of decode tokens/s per runtime mode, one bar per batch size (log scale when spread wide)."""
    table = modes.get("modes")
    entries = [v for v in table.values() if isinstance(v, dict)] if isinstance(table, dict) else _entries(modes)
    series: dict[int, dict[str, float]] = {}
    names: list[str] = []
    for e in entries:
        name = str(e.get("mode", "?"))
        for r in e.get("runs") or []:
            v = num(r.get("decode_tokens_per_s")) if isinstance(r, dict) else None
            if v is None or v <= 0:
                continue
            series.setdefault(int(r.get("batch") or 1), {})[name] = v
            if name not in names:
                names.append(name)
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(names) + 1.5), 4.0))
    width = 0.8 / len(series)
    values = [v for s in series.values() for v in s.values()]
    for k, (batch, points) in enumerate(sorted(series.items())):
        xs = [i + (k - (len(series) - 1) / 2) * width for i, n in enumerate(names) if n in points]
        ys = [points[n] for n in names if n in points]
        ax.bar(xs, ys, width=width, label=f"batch {batch}")
        for x, y in zip(xs, ys, strict=True):
            ax.text(x, y, f"{y:.3g}", ha="center", va="bottom", fontsize=7)
    if max(values) / min(values) > 50:  # lossless on CPU is orders of magnitude slower: keep all bars visible
        ax.set_yscale("log")
    ax.set_xticks(range(len(names)), names)
    log = " (log scale)" if ax.get_yscale() == "log" else ""
    ax.set_ylabel(f"decode tokens/s{log}, higher is better")
    device = get(modes, "machine", "device", default="")
    ax.set_title(f"Generation speed per mode{f' ({device})' if device else ''}: "
                 f"{str(modes.get('model', '')).split(' (')[0]}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


PLOTS: dict[str, tuple[str, Callable[[dict, Path], Path | None], str]] = {
    "codec": ("bits_per_weight.png", plot_bits_per_weight, "Bits per weight per method"),
    "modes": ("tokens_per_s.png", plot_tokens_per_s, "Tokens/s per runtime mode"),
}


# ==================================================================== the document
def load_results(results_dir: Path) -> tuple[dict[str, dict], list[str]]:
    """Parse every ``*.json`` in ``results_dir``: ``({name: data}, notes about unreadable files)``.

    The name is the ``benchmark`` field, else the file stem; known benchmarks come first, in order.
    """
    found: dict[str, dict] = {}
    notes: list[str] = []
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            notes.append(f"`{path.name}` could not be read ({exc}); skipped.")
            continue
        if not isinstance(data, dict):
            notes.append(f"`{path.name}` is not a JSON object; skipped.")
            continue
        data.setdefault("_file", path.name)
        data.setdefault("_mtime", path.stat().st_mtime)
        beside = path.with_suffix(".md")  # tables the benchmark rendered itself, from this same run
        if beside.is_file():
            text = beside.read_text()
            if text.startswith("# "):  # its own title: the section has one
                text = text.split("\n", 1)[-1].lstrip("\n")
            data.setdefault("_markdown", text)
        name = path.stem if path.stem in BENCHMARKS else str(data.get("benchmark") or path.stem)
        if name in found:  # two runs of one benchmark (a repeat, an A/B): keep both, by file name
            name = path.stem
        found[name] = data
    order = [n for n in BENCHMARKS if n in found] + sorted(n for n in found if n not in BENCHMARKS)
    return {n: found[n] for n in order}, notes


def _script_for(name: str) -> str:
    """The script that writes result ``name``: its registered one, else the ``bench_<prefix>.py`` with the longest
    prefix of the name that exists (``checkpoints_run4`` -> ``bench_checkpoints.py``)."""
    if name in BENCHMARKS:
        return BENCHMARKS[name][1]
    here = Path(__file__).parent
    stem = name.replace(" ", "_").split("_--")[0]
    parts = stem.removeprefix("bench_").split("_")
    for n in range(len(parts), 0, -1):
        candidate = f"bench_{'_'.join(parts[:n])}.py"
        if (here / candidate).exists():
            return candidate
    return f"bench_{stem}.py"


def _measured_line(name: str, data: dict, results_rel: str) -> str:
    script = _script_for(name)
    where = "on a GPU" if measured_on_gpu(data) else "CPU only"
    return (f"**Measured** {date_text(data)} on {machine_text(data)} ({where}). "
            f"From `{results_rel}/{data.get('_file', name + '.json')}`, written by `benchmarks/{script}`.")


def _notes(data: dict) -> list[str]:
    """The ``note`` / ``notes`` of a result file (a string, a list or a dict of strings) as quote lines."""
    out = []
    for key in ("note", "notes"):
        note = data.get(key)
        if isinstance(note, str):
            out.append(f"> {note}")
        elif isinstance(note, list):
            out += [f"> {n}" for n in note if isinstance(n, str)]
        elif isinstance(note, dict):
            out += [f"> {k}: {v}" for k, v in note.items() if isinstance(v, str)]
    return [line for pair in zip(out, [">"] * len(out), strict=True) for line in pair][:-1]


def render_markdown(results: dict[str, dict], plots: dict[str, Path], out_dir: Path,
                    results_rel: str = "benchmarks/results", notes: Sequence[str] = ()) -> str:
    """The text of ``BENCHMARKS.md``; ``plots`` maps a benchmark name to its PNG (linked relative to ``out_dir``)."""
    lines = [
        "# Benchmarks",
        "",
        "_Generated by `python benchmarks/run_all.py` (or `--report-only` to re-render) from the JSON files in "
        f"`{results_rel}/`; do not edit by hand._ Every figure below was **measured** by the script named in its "
        "section, on the machine and date it states. Nothing is estimated or copied from papers.",
        "",
        "## Status",
        "",
    ]
    rows = []
    for name, (_file, _script, purpose) in BENCHMARKS.items():
        data = results.get(name)
        if data is None:
            rows.append([name, "not run (no result file)", NA, NA, NO_GPU, purpose])
        else:
            gpu = "measured" if measured_on_gpu(data) else NO_GPU
            rows.append([name, "measured", date_text(data), machine_text(data), gpu, purpose])
    for name, data in results.items():
        if name not in BENCHMARKS:
            gpu = "measured" if measured_on_gpu(data) else NO_GPU
            rows.append([name, "measured", date_text(data), machine_text(data), gpu, ""])
    lines += [md_table(["benchmark", "status", "date", "machine", "GPU", "what it measures"], rows), ""]
    for name, data in results.items():
        lines += [f"## {name}", ""]
        purpose = BENCHMARKS.get(name, ("", "", ""))[2]
        if purpose:
            lines += [f"What: {purpose}.", ""]
        lines += [_measured_line(name, data, results_rel), ""]
        notes_lines = _notes(data)
        if notes_lines:
            lines += [*notes_lines, ""]
        try:
            default = (lambda d: d["_markdown"]) if "_markdown" in data else generic_tables
            body = SECTIONS.get(name, default)(data)
        except Exception as exc:  # a changed layout: fall back to the generic view, never lose the section
            body = f"_(dedicated table failed: {exc!r}; generic view)_\n\n" + generic_tables(data)
        lines += [body, ""]
        if name in plots:
            rel = os.path.relpath(plots[name], out_dir).replace(os.sep, "/")
            lines += [f"![{PLOTS[name][2]}]({rel})", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def render_report(results_dir: Path, output: Path, plots_dir: Path | None = None,
                  results_rel: str | None = None) -> RenderResult:
    """Render ``output`` (``BENCHMARKS.md``) and the PNG plots from ``results_dir``; returns what was made."""
    results_dir, output = Path(results_dir), Path(output)
    plots_dir = Path(plots_dir) if plots_dir is not None else results_dir
    if results_rel is None:
        try:
            results_rel = os.path.relpath(results_dir, output.parent).replace(os.sep, "/")
        except ValueError:  # different drives on Windows
            results_rel = str(results_dir)
    results, notes = load_results(results_dir)
    plots: dict[str, Path] = {}
    for name, (file, fn, _title) in PLOTS.items():
        if name not in results:
            continue
        try:
            made = fn(results[name], plots_dir / file)
        except Exception as exc:  # a plot must not cost the tables
            notes.append(f"plot `{file}` failed: {exc!r}")
            continue
        if made is not None:
            plots[name] = made
    text = render_markdown(results, plots, output.parent, results_rel, notes)
    output.write_text(text)
    return RenderResult(text, output, list(plots.values()), list(results), notes)


if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    res = render_report(root / "benchmarks" / "results", root / "BENCHMARKS.md")
    print(f"wrote {res.output} ({len(res.sections)} sections, plots: {[p.name for p in res.plots]})")
