"""The Markdown of a ``bench_peers.py`` result: bits per weight for every dtype, then speeds and checks.

:func:`render_markdown` makes ``peers.md`` and the report's peers section from the JSON alone;
:func:`progress_line` is the one-line summary printed as each tool finishes.

Example::

    text = render_markdown(json.loads(Path("benchmarks/results/peers.json").read_text()))
"""

from __future__ import annotations

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


def progress_line(dt: str, e: dict) -> str:
    """One tool's figures for one dtype, as printed while the benchmark runs."""
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
