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
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root makes ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report_plots import PLOTS  # noqa: E402
from benchmarks.report_sections import SECTIONS  # noqa: E402
from benchmarks.report_text import (  # noqa: E402,F401 (re-exported: tests and scripts import them from here)
    NA,
    NO_GPU,
    date_text,
    fmt,
    generic_tables,
    machine_text,
    md_table,
    measured_on_gpu,
)

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


@dataclass
class RenderResult:
    """What :func:`render_report` produced."""

    markdown: str
    output: Path
    plots: list[Path] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)  # benchmark names that had a result file
    notes: list[str] = field(default_factory=list)  # unreadable files, failed plots


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
