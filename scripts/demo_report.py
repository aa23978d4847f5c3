"""What ``scripts/demo.py`` prints: wrapped text, step headings, the generations and the figures table.

Example::

    heading("4. Results")
    say("a long paragraph, wrapped to the demo width", indent=2)
    print_table(variants, exact)  # variants: demo_models.Variant, exact: demo_models.compare_logits by key
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from demo_models import Variant

WIDTH = 100


def say(text: str = "", indent: int = 0) -> None:
    """Print wrapped to the demo width (flushed: the conversion subprocess writes to the same terminal)."""
    if not text:
        print(flush=True)
        return
    for para in text.split("\n"):
        print(textwrap.fill(para, WIDTH, initial_indent=" " * indent, subsequent_indent=" " * indent) or "",
              flush=True)


def heading(text: str) -> None:
    """A step's title between two rules of the demo width."""
    print(f"\n{'=' * WIDTH}\n{text}\n{'=' * WIDTH}", flush=True)


def mb(n: float | None) -> str:
    """Bytes as MB for the text: ``mb(1.5e6) == '1.5 MB'``."""
    return "n/a" if n is None else f"{n / 1e6:,.1f} MB"


def print_outputs(variants: list[Variant], prompts: Sequence[str]) -> None:
    """The generations of every variant, prompt by prompt, marked where they equal the original's."""
    heading("Generations (greedy, chat template)")
    ref = variants[0]
    for i, prompt in enumerate(prompts):
        say(f"\nprompt {i + 1}: {prompt}")
        for v in variants:
            if i >= len(v.outputs):
                continue
            same = v is not ref and v.outputs[i] == ref.outputs[i]
            tag = " (same text as original)" if same else ""
            print(f"  {v.title}{tag}:", flush=True)
            say(v.outputs[i] or "(empty)", indent=6)


def print_table(variants: list[Variant], exact: dict[str, dict]) -> None:
    """The figures of every variant side by side (``exact``: logits comparisons by key), then what they mean."""
    heading("Figures (what each one means is explained below the table)")
    cols = [v for v in variants if v.key != "tpde_dequantize"] + [v for v in variants if v.key == "tpde_dequantize"]
    names = [v.title for v in cols]
    rows: list[tuple[str, list[str]]] = []
    orig = variants[0]
    rows.append(("mode at load", [v.mode or "(plain bf16)" for v in cols]))
    rows.append(("weights on disk", [f"{mb(v.disk_weight_bytes)} ({v.disk_weight_bytes / orig.disk_weight_bytes:.0%})"
                                     for v in cols]))
    rows.append(("resident weight memory", [f"{mb(v.weight_bytes)} ({v.weight_bytes / orig.weight_bytes:.0%})"
                                            for v in cols]))
    rows.append(("load time", [f"{v.load_s:.1f} s" for v in cols]))
    rows.append(("tokens/s: best prompt (overall)",
                 [f"{v.best_tokens_per_s:.1f} ({v.tokens_per_s:.1f})" if v.tokens_per_s else "not run" for v in cols]))

    def exact_cell(v: Variant) -> str:
        if v.key == "original":
            return "(reference)"
        e = exact.get(v.key, {})
        if e.get("bit_identical"):
            return "BIT-IDENTICAL"
        return f"differ: max {e.get('max_abs_diff', float('nan')):.3g}, top-1 {e.get('top1_agreement', 0):.1%}"

    rows.append(("logits vs original", [exact_cell(v) for v in cols]))
    w0 = max(len(r[0]) for r in rows)
    widths = [max(len(n), *(len(r[1][j]) for r in rows)) for j, n in enumerate(names)]
    print(f"{'':<{w0}}  " + "  ".join(f"{n:<{w}}" for n, w in zip(names, widths, strict=True)))
    print(f"{'-' * w0}  " + "  ".join("-" * w for w in widths))
    for label, cells in rows:
        print(f"{label:<{w0}}  " + "  ".join(f"{c:<{w}}" for c, w in zip(cells, widths, strict=True)))
    say()
    say("What the figures mean:")
    for line in (
        "weights on disk: bytes of the *.safetensors files (percent of the original bf16 checkpoint). The tpde "
        "repo holds the 4-bit base and the entropy-coded delta of every linear layer; embeddings, norms and the "
        "tied lm_head stay as they were.",
        "resident weight memory: bytes of all parameters and buffers of the loaded model (tied tensors counted "
        "once): what the weights occupy in RAM, not the process's whole memory.",
        "load time: from_pretrained wall time. The original's safetensors are memory-mapped, so its load is "
        "nearly free; the default CPU mode (dequantize) decodes every weight once here; base mode reads only "
        "the 4-bit base.",
        "tokens/s: new tokens per second of pipeline('text-generation'), batch 1, greedy, on this CPU, after one "
        "warm-up call: the fastest of the 3 prompts, and in brackets all new tokens over all generation time. "
        "The machine may be shared, so the fastest prompt is the fairest figure; the models take turns on each "
        "prompt so that other load hits all of them alike. The default mode runs plain dense layers, so it should "
        "match the original; base mode rebuilds each 4-bit weight at every forward on CPU, hence slower here (its "
        "speed case is the GPU kernels).",
        "logits vs original: the bf16 logits of the 3 chat-templated prompts as one padded batch. BIT-IDENTICAL "
        "means every one of the logits has the same 16-bit pattern (torch.equal on the int16 view). 'base' "
        "is the lossy 4-bit model: max is the largest absolute logit difference, top-1 the share of "
        "positions whose most likely next token is the same.",
    ):
        say(f"- {line}", indent=2)
