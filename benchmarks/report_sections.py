"""The dedicated sections of the benchmark report: one function per known result layout (codec, delta codes,
conversion, modes, kernels, sass, integrity), and the sections whose benchmark script renders its own tables.

A section takes the parsed JSON of one result file and returns Markdown; :data:`SECTIONS` maps a benchmark
name to its section (:mod:`benchmarks.report` falls back to :func:`benchmarks.report_text.generic_tables`).

Example::

    from benchmarks.report_sections import SECTIONS
    SECTIONS["codec"](json.loads(Path("benchmarks/results/codec.json").read_text()))
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.report_text import (
    NA,
    NO_GPU,
    _bpw_text,
    _entries,
    _pct,
    _run_label,
    fmt,
    generic_tables,
    get,
    md_table,
    measured_on_gpu,
    num,
)


# ==================================================================== what the sections share
def _runs(data: dict) -> list[dict]:
    """The ``runs`` of a result (one per dtype, model or group size), each a dict; empty when there are none."""
    return [r for r in data.get("runs", []) if isinstance(r, dict)]


def _models(data: dict) -> dict | None:
    """The ``models`` of a result (``{name: figures}``), or None when the file has none."""
    models = data.get("models")
    return models if isinstance(models, dict) and models else None


def _row_maker(runs: list[dict]) -> Callable[[str, Callable[[dict], Any]], list[Any]]:
    """``row(label, fn)``: a table row of ``label`` then ``fn(run)`` for every run (one column per run)."""

    def row(label: str, fn: Callable[[dict], Any]) -> list[Any]:
        return [label, *(fn(r) for r in runs)]

    return row


def _gpu_row(data: dict, runs: list[dict], label: str, fn: Callable[[dict], Any], not_measured: str) -> list[Any]:
    """The GPU row of a per-run table: measured, or ``not_measured`` with the no-GPU note stated once."""
    if measured_on_gpu(data):
        return _row_maker(runs)(label, fn)
    return [not_measured, NO_GPU, *(["\u2014"] * (len(runs) - 1))]


def _stated(data: dict, key: str = "goal", label: str = "Goal") -> list[str]:
    """The opening paragraph of a section whose result file states its ``key`` (none otherwise)."""
    return [f"{label}: {data[key]}."] if isinstance(data.get(key), str) else []


def _with_details(data: dict, parts: list[str]) -> str:
    """A section's paragraphs and tables, then every figure of its file folded away (:func:`_details`)."""
    return "\n\n".join([*parts, _details(data)])


# ==================================================================== dedicated sections
def codec_section(data: dict) -> str:
    """Bits per weight per method and dtype, coder comparison, throughput (``codec.json``)."""
    runs = _runs(data)
    if not runs:
        return generic_tables(data)
    cols = [str(r.get("dtype", f"run {i}")) for i, r in enumerate(runs)]
    source_bits = {"bfloat16": 16, "float16": 16, "float32": 32}
    row = _row_maker(runs)
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
    # one GPU row, its absence stated once rather than repeated per dtype
    speed.append(_gpu_row(data, runs, "tpde decode on GPU, MB/s", lambda r: num(get(r, "gpu_decode_MBps")),
                          "tpde decode on GPU"))
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
    runs = _runs(data)
    if not runs:
        return generic_tables(data)
    cols = [_run_label(r, i) for i, r in enumerate(runs)]
    row = _row_maker(runs)

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
    speed.append(_gpu_row(data, runs, "class-width decode on GPU, MB/s", t("class_width", "gpu_decode_MBps"),
                          "class-width decode on GPU"))
    edges = get(data, "class_width", "class_edges")
    intro = (f"{data.get('model', 'the model')}. Both delta codes sit on the same 4-bit base (checked bit for bit in "
             f"the run){'; class edges ' + fmt(edges) if edges else ''}. Bits per weight, lower is better"
             f"{'; quick smoke run, figures not representative' if data.get('quick') else ''}.")
    return _with_details(data, [
        intro,
        md_table(["bits per weight", *cols], sizes),
        "Per context class of the class-width code: every field of a class in a group has the width of that "
        "class's widest field there. Payload and bound are in bits per weight of all the weights, so the classes "
        "add up to the payload and to the bound above:",
        md_table(["class", *cols], classes),
        md_table(["CPU time (best of the repeats)", *cols], speed),
    ])


def _class_figure(run: dict, k: int, key: str) -> float | None:
    entries = run.get("classes")
    return num(get(entries[k], key)) if isinstance(entries, list) and k < len(entries) else None


def _pct_plain(value: Any) -> str | None:
    """A fraction as a percent: ``0.0234`` -> ``'2.3%'``."""
    v = num(value)
    return None if v is None else _percent(100 * v)


def conversion_section(data: dict) -> str:
    """Whole-model conversions: per model and worker count, time, throughput, memory, size (``conversion.json``)."""
    models = _models(data)
    if models is None:
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
    parts = _stated(data)
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
    return _with_details(data, parts)


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
    parts = _stated(data, "model", "Model")
    parts.append(md_table(headers, rows))
    if data.get("cpu_default_mode"):
        parts.append(f"CPU default mode: **{data['cpu_default_mode']}**. {data.get('cpu_default_reason', '')}")
    if not measured_on_gpu(data):
        gpu_rows = [[m, NO_GPU] for m in ("lossless", "lossless-offload", "base", "dequantize")]
        parts.append("On a GPU:\n\n" + md_table(["mode", "tokens/s, memory"], gpu_rows))
    return _with_details(data, parts)


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
    return _with_details(data, parts)


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
    return _with_details(data, [head, md_table(["kernel (launch default)", "instructions / element",
                                                "elements / cycle / SM (ceiling)", "registers",
                                                "stack bytes (spills)"], rows)])


def _percent(value: Any) -> str | None:
    """A figure already in percent: ``2.34`` -> ``'2.3%'``."""
    v = num(value)
    return None if v is None else f"{v:.1f}%"


def integrity_section(data: dict) -> str:
    """Load time with and without the integrity checks, per model and mode (``integrity.json``)."""
    models = _models(data)
    if models is None:
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
    parts = _stated(data)
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
    return _with_details(data, parts)


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
