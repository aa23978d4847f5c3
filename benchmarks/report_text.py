"""Formatting helpers of the benchmark report (:mod:`benchmarks.report`): numbers, Markdown tables, the
machine and date of a result file, whether it was measured on a GPU, and the generic view of any result.

Example::

    from benchmarks.report_text import fmt, md_table
    md_table(["a", "b"], [[1, 2.5]])   # '| a | b |\n|---|---|\n| 1 | 2.5 |'
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

NO_GPU = "not measured (no GPU lent in this session)"
NA = "n/a"
_META_KEYS = ("benchmark", "date", "machine", "device", "gpu", "torch_threads", "model", "note", "notes")
_GPU_WORDS = ("cuda", "gpu", "nvidia", "h100", "h200", "a100", "rocm")


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
