"""The PNG plots of the benchmark report (matplotlib, Agg backend): bits per weight per method (``codec.json``)
and tokens/s per runtime mode (``modes.json``).

Example::

    from benchmarks.report_plots import PLOTS
    file, plot, title = PLOTS["codec"]; plot(codec_json, Path("benchmarks/results") / file)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from benchmarks.report_text import _entries, get, num


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
