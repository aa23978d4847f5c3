"""The model card of a converted repo, rendered from ``model_cards/tpde_model_card.md``.

Metadata (validated by huggingface_hub's ``ModelCardData``): ``base_model`` (when the source is a
Hub repo, or given), ``base_model_relation: quantized``, ``library_name: transformers``, tags, and
``pipeline_tag`` / ``license`` / ``language`` / ``datasets`` copied from the source card.

Example::

    card = render_card(report, repo_id="me/model-tpde")
    card.save("out/README.md")
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from tpde_hf.conversion.errors import ConversionError
from tpde_hf.conversion.report import ConversionReport

TEMPLATE_NAME = "tpde_model_card.md"
TAGS = ["tpde", "quantized", "4-bit", "lossless", "compressed"]
_COPIED = ("license", "language", "datasets", "pipeline_tag", "license_name", "license_link")
_REPO_ID_RE = re.compile(r"^[\w.\-]{1,96}/[\w.\-]{1,96}$")

MODES = [
    ("lossless", "Default. Base and delta stay in memory ({linear_pct}% of the source size for the converted "
                 "linears) and weights are rebuilt exactly."),
    ("lossless-offload", "For models larger than the GPU: the base stays on the device, the delta in pinned host "
                         "memory, prefetched a layer ahead. Output is bit-identical."),
    ("base", "Fastest and smallest: only the 4-bit base is loaded; the delta is never read from disk. Lossy."),
    ("dequantize", "The original dense weights are rebuilt once at load: use this repo as a smaller download."),
]
#: Per delta code: how the card's summary names the delta, and what its Format section says of it.
DELTA_DESCRIPTIONS = {
    "rans": ("an entropy-coded (rANS) delta", "entropy-coded in independently decodable lanes"),
    "class-width": ("a class-width coded delta (fixed-width fields, decoded in parallel on a GPU)",
                    "one field width per group and class, with a bit offset per 1024 columns; format version 2, "
                    "read by tpde-hf 0.2 and later"),
}
_PIPELINES = {  # architecture suffix -> (Auto class, pipeline tag) when the source card names none
    "ForCausalLM": ("AutoModelForCausalLM", "text-generation"),
    "ForConditionalGeneration": ("AutoModelForSeq2SeqLM", "text2text-generation"),
    "ForMaskedLM": ("AutoModelForMaskedLM", "fill-mask"),
    "ForSequenceClassification": ("AutoModelForSequenceClassification", "text-classification"),
    "ForTokenClassification": ("AutoModelForTokenClassification", "token-classification"),
    "ForQuestionAnswering": ("AutoModelForQuestionAnswering", "question-answering"),
}


def template_path() -> Path:
    """The card template: ``model_cards/`` of a source checkout, or ``<prefix>/share/tpde-hf/model_cards``
    where a wheel install puts it (pyproject's ``data-files``)."""
    here = Path(__file__).resolve()
    roots = [*here.parents, Path(sys.prefix) / "share" / "tpde-hf"]
    for root in roots:
        candidate = root / "model_cards" / TEMPLATE_NAME
        if candidate.is_file():
            return candidate
    raise ConversionError(f"model card template {TEMPLATE_NAME} not found next to the tpde_hf package")


def auto_class(architecture: str | None) -> tuple[str, str | None]:
    """``("AutoModelForCausalLM", "text-generation")`` for ``LlamaForCausalLM``; ``AutoModel`` otherwise."""
    for suffix, pair in _PIPELINES.items():
        if architecture and architecture.endswith(suffix):
            return pair
    return "AutoModel", None


def card_data(report: ConversionReport, source_meta: dict, base_model: str | None) -> ModelCardData:
    """The YAML metadata of the card."""
    meta = {k: source_meta[k] for k in _COPIED if source_meta.get(k)}
    _, default_tag = auto_class(report.architecture)
    if "pipeline_tag" not in meta and default_tag:
        meta["pipeline_tag"] = default_tag
    tags = list(dict.fromkeys(TAGS + [t for t in (source_meta.get("tags") or []) if isinstance(t, str)]))
    extra = {}
    if base_model:
        # a fine-tune stored as deltas against its base (tpde_hf.reference) keeps the relation its card names
        relation = "finetune" if source_meta.get("base_model_relation") == "finetune" else "quantized"
        extra = {"base_model": base_model, "base_model_relation": relation}
    return ModelCardData(library_name="transformers", tags=tags, **extra, **meta)


def _dense_note(linears: list[str]) -> str:
    if not linears:
        return "biases"
    shown = ", ".join(f"`{m}`" for m in linears[:3]) + (f" and {len(linears) - 3} more" if len(linears) > 3 else "")
    return f"biases, and the linear layers {shown}"


def render_card(report: ConversionReport, *, repo_id: str | None = None, source_meta: dict | None = None,
                base_model: str | None = None, template: str | Path | None = None) -> ModelCard:
    """Render the card for ``report``; ``repo_id`` is used in the snippets (a placeholder when None)."""
    from tpde_hf import __version__
    from tpde_hf.codec import CodecParams

    source_meta = source_meta or {}
    if base_model is None and report.source_kind == "hub" and report.repo_id and _REPO_ID_RE.match(report.repo_id):
        base_model = report.repo_id
    cls, _ = auto_class(report.architecture)
    bpw = report.bits_per_weight()
    verification = (
        f"All {report.verified_tensors} converted tensors were decoded after writing and compared bit for bit "
        f"with the {'cast ' if report.cast else ''}source before this repo was declared complete; the other "
        f"{report.n_dense} tensors are stored {'as cast' if report.cast else 'unchanged'} and checksummed."
        if report.verified
        else "Verification was **skipped** during conversion (`verify=False`). Run `tpde verify` before relying on it."
    )
    dense = [m for m in report.modules_to_not_convert if m]
    dense_linears = [n.removesuffix(".weight") for n in report.dense_linears]  # 3-D expert tensors have no suffix
    name = (repo_id or Path(report.output).name).split("/")[-1]
    delta_code = report.codec.get("delta_code", "rans")
    card = ModelCard.from_template(
        card_data(report, source_meta, base_model),
        template_path=str(template or template_path()),
        model_name=name,
        repo_id=repo_id or f"your-username/{name}",
        base_model=base_model,
        source=report.repo_id or base_model or Path(report.source).name,  # no local paths in a public card
        commit=report.commit,
        source_dtype=report.source_dtype or "source",
        group_size=report.group_size,
        dense_note=_dense_note(dense_linears),
        tpde_version=__version__,
        summary_table="\n".join(report.summary_lines(markdown=True)),
        verification=verification,
        bits=f"{bpw['total']:.2f}",
        modes=[{"name": n, "description": d.format(linear_pct=f"{100 * report.ratio_to_source()['linear']:.0f}")}
               for n, d in MODES],
        auto_class=cls,
        format_version=CodecParams(delta_code=delta_code).format_version,
        delta_code=delta_code,
        delta_description=DELTA_DESCRIPTIONS[delta_code][0],
        delta_layout=DELTA_DESCRIPTIONS[delta_code][1],
        modules_to_not_convert=", ".join(f"`{m}`" for m in dense) or "none",
        license=source_meta.get("license"),
        cast=bool(report.cast),
        cast_from=", ".join(report.cast["cast_from"]) if report.cast else None,
        cast_tensors=report.cast["tensors"] if report.cast else 0,
        gguf=report.source_kind == "gguf",
    )
    if base_model and source_meta.get("base_model_relation") == "finetune":
        from tpde_hf.reference.convert import card_section

        card.text += card_section(base_model)
    return card
