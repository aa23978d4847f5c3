"""The conversion summary: sizes per tensor class, bits per weight, ratio, time, throughput, memory.

Example::

    report = convert("./model", "./model-tpde")
    print(report.summary_table())
    Path("report.json").write_text(report.to_json())
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

MB = 1e6


@dataclass
class ClassSizes:
    """Sizes of one class of tensors (bytes)."""

    tensors: int = 0
    params: int = 0
    source_bytes: int = 0
    output_bytes: int = 0
    base_bytes: int = 0  # tpde classes only
    delta_bytes: int = 0
    meta_bytes: int = 0

    def add(self, params: int, source: int, output: int, base: int = 0, delta: int = 0, meta: int = 0) -> None:
        self.tensors += 1
        self.params += params
        self.source_bytes += source
        self.output_bytes += output
        self.base_bytes += base
        self.delta_bytes += delta
        self.meta_bytes += meta


def tensor_class(name: str, encoded: bool, ndim: int) -> str:
    """Coarse class of a tensor for the summary: converted linears, dense linears, embeddings, others."""
    if encoded:
        return "linear (tpde)"
    low = name.lower()
    if ndim < 2 or not low.endswith(".weight"):
        return "norms, biases, buffers"
    if "embed" in low or low.endswith(("wte.weight", "wpe.weight")):
        return "embedding"
    if "lm_head" in low:
        return "lm_head (dense)"
    return "other matrices (dense)"


@dataclass
class ConversionReport:
    """Everything measured during a conversion; ``to_json()`` is what ``tpde_conversion.json`` holds."""

    source: str
    output: str
    source_kind: str
    repo_id: str | None = None
    commit: str | None = None
    architecture: str | None = None
    source_dtype: str | None = None  # the dtype of the stored weights (after a ``dtype=`` cast, the cast dtype)
    # A ``dtype=`` cast (:class:`~tpde_hf.conversion.cast.Cast` as a dict: dtype, cast_from, tensors, floating);
    # None when every tensor kept its stored dtype.
    cast: dict | None = None
    group_size: int = 128
    codec: dict = field(default_factory=dict)
    n_tensors: int = 0
    n_encoded: int = 0
    n_dense: int = 0
    dense_reasons: dict[str, int] = field(default_factory=dict)
    modules_to_not_convert: list[str] = field(default_factory=list)
    dense_linears: list[str] = field(default_factory=list)  # stored linear-like weights left dense
    dense_linear_reasons: dict[str, str] = field(default_factory=dict)  # each of them -> why it stays dense
    classes: dict[str, ClassSizes] = field(default_factory=dict)
    source_bytes: int = 0  # every stored tensor of the source
    output_bytes: int = 0  # every stored tensor of the output (shards, excluding headers)
    output_file_bytes: int = 0  # all files written, headers, tokenizer and card included
    n_shards: int = 0
    largest_tensor_bytes: int = 0
    largest_tensor: str | None = None
    workers: int = 1  # processes encoding (1: this one)
    threads: int = 1  # encode tasks at once per process
    layout_cached: bool = False  # the layout came from the layout cache (no modeling import)
    seconds: dict[str, float] = field(default_factory=dict)
    plan_peak_rss_bytes: int = 0  # main process peak while fetching and staging (GGUF, .bin)
    baseline_rss_bytes: int = 0  # main process RSS when encoding starts (torch imported, headers read)
    peak_rss_bytes: int = 0  # main process peak RSS during the conversion
    worker_peak_rss_bytes: int = 0  # highest peak RSS of a worker process (0: all work ran in the main one)
    peak_above_baseline_bytes: int = 0  # most memory the conversion added to any one process
    total_peak_rss_bytes: int = 0  # upper bound for the whole run: main peak + workers x worker peak
    verified: bool = False
    verified_tensors: int = 0
    resumed_tensors: int = 0
    warnings: list[str] = field(default_factory=list)
    pushed_to: str | None = None

    # ---------------------------------------------------------------- derived figures
    @property
    def tpde(self) -> ClassSizes:
        return self.classes.get("linear (tpde)", ClassSizes())

    def bits_per_weight(self) -> dict[str, float]:
        """Over the converted linears: base, delta (with lane table and code tables), total."""
        c = self.tpde
        if not c.params:
            return {"base": 0.0, "delta": 0.0, "total": 0.0, "source": 0.0}
        return {
            "base": 8 * c.base_bytes / c.params,
            "delta": 8 * (c.delta_bytes + c.meta_bytes) / c.params,
            "total": 8 * c.output_bytes / c.params,
            "source": 8 * c.source_bytes / c.params,
        }

    def ratio_to_source(self) -> dict[str, float]:
        """Output / source bytes, for the converted linears and for all tensors."""
        c = self.tpde
        return {
            "linear": c.output_bytes / c.source_bytes if c.source_bytes else 1.0,
            "model": self.output_bytes / self.source_bytes if self.source_bytes else 1.0,
        }

    def throughput_mb_s(self) -> dict[str, float]:
        """MB (1e6 B) of source weights per second: end to end, and in the encode+verify stage alone."""
        total = self.seconds.get("total", 0.0)
        enc = self.seconds.get("encode_verify", 0.0)
        return {
            "end_to_end": self.source_bytes / MB / total if total else 0.0,
            "encode_verify": self.tpde.source_bytes / MB / enc if enc else 0.0,
        }

    def peak_rss_over_largest_tensor(self) -> float:
        """Memory added by the conversion (per process, above its baseline) / the largest tensor."""
        if not self.largest_tensor_bytes:
            return 0.0
        return self.peak_above_baseline_bytes / self.largest_tensor_bytes

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bits_per_weight"] = self.bits_per_weight()
        d["ratio_to_source"] = self.ratio_to_source()
        d["throughput_mb_s"] = self.throughput_mb_s()
        d["peak_rss_over_largest_tensor"] = self.peak_rss_over_largest_tensor()
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> ConversionReport:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        known["classes"] = {k: ClassSizes(**v) for k, v in known.get("classes", {}).items()}
        return cls(**known)

    def cast_note(self) -> str | None:
        """``'exact copy of the source cast to bfloat16 (the source is float32)'``; None without a cast."""
        if not self.cast:
            return None
        from tpde_hf.conversion.cast import Cast  # torch: only for a report that has a cast

        return Cast(**self.cast).describe()

    # ---------------------------------------------------------------- rendering
    def summary_table(self) -> str:
        """A plain-text table (also used, as markdown, in the model card)."""
        return "\n".join(self.summary_lines(markdown=False))

    def summary_lines(self, markdown: bool = True) -> list[str]:
        rows = [("tensor class", "tensors", "params", "source MB", "output MB", "ratio")]
        for name in sorted(self.classes, key=lambda k: -self.classes[k].source_bytes):
            c = self.classes[name]
            ratio = c.output_bytes / c.source_bytes if c.source_bytes else 1.0
            rows.append((name, str(c.tensors), f"{c.params:,}", f"{c.source_bytes / MB:.2f}",
                         f"{c.output_bytes / MB:.2f}", f"{ratio:.3f}"))
        rows.append(("total", str(self.n_tensors), f"{sum(c.params for c in self.classes.values()):,}",
                     f"{self.source_bytes / MB:.2f}", f"{self.output_bytes / MB:.2f}",
                     f"{self.ratio_to_source()['model']:.3f}"))
        lines = _table(rows, markdown)
        bpw = self.bits_per_weight()
        tp = self.throughput_mb_s()
        sec = self.seconds
        mem = (
            f"+{self.peak_above_baseline_bytes / MB:.0f} MB above baseline per process = "
            f"{self.peak_rss_over_largest_tensor():.1f}x the largest tensor ({self.largest_tensor_bytes / MB:.1f} MB); "
            f"peak RSS {self.peak_rss_bytes / MB:.0f} MB main"
        )
        if self.worker_peak_rss_bytes:
            mem += f", {self.worker_peak_rss_bytes / MB:.0f} MB per worker"
        after_cast = " after the cast" if self.cast else ""  # "source" below is then the cast source
        facts = [
            *([("weights", self.cast_note() or "")] if self.cast else []),
            ("bits per converted weight", f"base {bpw['base']:.2f} + delta {bpw['delta']:.2f} = "
                                          f"{bpw['total']:.2f} (source {bpw['source']:.0f}{after_cast}; "
                                          f"group size {self.group_size}, "
                                          f"{self.codec.get('delta_code', 'rans')} delta)"),
            (f"ratio to source{after_cast}", f"converted linears {self.ratio_to_source()['linear']:.3f}, "
                                f"whole model {self.ratio_to_source()['model']:.3f}"),
            ("time", f"{sec.get('total', 0):.1f} s total (encode+verify {sec.get('encode_verify', 0):.1f} s, "
                     f"overlapping the {sec.get('plan', 0):.1f} s plan"
                     f"{' (layout cached)' if self.layout_cached else ''}; "
                     f"{self.workers} process{'es' if self.workers != 1 else ''} x {self.threads} "
                     f"thread{'s' if self.threads != 1 else ''})"),
            ("throughput", f"{tp['end_to_end']:.1f} MB/s of source weights end to end "
                           f"({tp['encode_verify']:.1f} MB/s encode+verify)"),
            ("peak memory", mem),
            ("verification", f"{self.verified_tensors}/{self.n_encoded} converted tensors decoded bit-exact"
                             if self.verified else "skipped"),
        ]
        lines.append("")
        lines += _table([("figure", "value"), *facts], markdown, right_align=False)
        lines += self.dense_lines(markdown)
        return lines

    def dense_by_reason(self) -> dict[str, list[str]]:
        """The linear-like weights stored dense, grouped by reason (``kept dense (lm_head)``, ``larger when
        encoded``, ...), each group in natural order (``experts.2`` before ``experts.10``)."""
        out: dict[str, list[str]] = {}
        for name in self.dense_linears:
            out.setdefault(self.dense_linear_reasons.get(name, "kept dense"), []).append(name)
        return {r: sorted(names, key=_natural_key) for r, names in out.items()}

    def dense_lines(self, markdown: bool = True, max_names: int = 12) -> list[str]:
        """Lines saying which linear-like weights stay dense and why (nothing when every one is converted).

        Names that differ only in their numbers (layers, experts) are shown once, with ``*`` for the
        numbers and their count: ``model.layers.*.mlp.gate.weight (x24)``. Example::

            linear-like weights stored dense: 25
              kept dense (lm_head) (1): lm_head.weight
              larger when encoded (24): model.layers.*.mlp.gate.weight (x24)
        """
        groups = self.dense_by_reason()
        if not groups:
            return []
        lines = ["", f"linear-like weights stored dense: {len(self.dense_linears)}"]
        for reason, names in groups.items():
            shown = [f"`{n}`" if markdown else n for n in _collapse_numbers(names)]
            text = ", ".join(shown[:max_names])
            if len(shown) > max_names:
                text += f", ... and {len(shown) - max_names} more (all in tpde_conversion.json)"
            lines.append(f"{'- ' if markdown else '  '}{reason} ({len(names)}): {text}")
        return lines


def _natural_key(name: str) -> list:
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name)]


def _collapse_numbers(names: list[str]) -> list[str]:
    """``[a.0.w, a.1.w, b]`` -> ``["a.*.w (x2)", "b"]``: one entry per name pattern, in order of first appearance."""
    patterns: dict[str, list[str]] = {}
    for n in names:
        patterns.setdefault(re.sub(r"(?<=\.)\d+(?=\.|$)", "*", n), []).append(n)
    return [members[0] if len(members) == 1 else f"{pat} (x{len(members)})" for pat, members in patterns.items()]


def _table(rows: list[tuple[str, ...]], markdown: bool, right_align: bool = True) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    if markdown:
        out = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join("---" for _ in rows[0]) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
        return out
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 or not right_align else f"{{:>{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*rows[0]).rstrip(), "  ".join("-" * w for w in widths)]
    out += [fmt.format(*r).rstrip() for r in rows[1:]]
    return out
