"""Step 3 of ``scripts/demo.py``: load each variant of the model, compare its logits bit for bit, generate.

Example::

    model, load_s = load_model(Path("demo_out/smollm2-tpde"), "dequantize", tpde=True)
    batch = prompt_batch(tokenizer)
    compare_logits(batch_logits(original, batch), batch_logits(model, batch), batch["attention_mask"])
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from demo_report import say

PROMPTS = (
    "What is the capital of France?",
    "Write a Python function that returns the square of a number.",
    "Give me three tips for staying focused while studying.",
)


def folder_bytes(folder: Path, pattern: str = "*") -> int:
    """Total size of the files matching ``pattern`` in ``folder`` (not recursive)."""
    return sum(p.stat().st_size for p in folder.glob(pattern) if p.is_file())


def weight_bytes(model: Any) -> int:
    """Bytes of every parameter and buffer the model holds, each storage counted once (tied weights)."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "meta":
            continue
        key = (str(t.device), t.untyped_storage().data_ptr())
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def resolved_mode(model: Any) -> str:
    """Which tpde mode a loaded model runs in: that of its TpdeLinear layers, or dense weights (dequantize)."""
    from tpde_hf.nn import TpdeLinear

    modes = {m.mode for m in model.modules() if isinstance(m, TpdeLinear)}
    if not modes:
        return "dequantize"
    return ",".join(sorted(modes))


@dataclass
class Variant:
    """One loaded model and its figures."""

    key: str  # original | tpde_default | tpde_base | tpde_dequantize
    title: str
    folder: str
    mode: str | None  # tpde mode as resolved at load (None for the original)
    disk_weight_bytes: int
    load_s: float
    weight_bytes: int
    logits_bit_identical: bool | None = None
    max_abs_logit_diff: float | None = None
    top1_agreement: float | None = None
    new_tokens: int = 0
    generate_s: float = 0.0
    outputs: list[str] = field(default_factory=list)
    prompt_tokens_per_s: list[float] = field(default_factory=list)  # one rate per prompt

    @property
    def tokens_per_s(self) -> float | None:
        """All new tokens over all generation time."""
        return self.new_tokens / self.generate_s if self.generate_s > 0 else None

    @property
    def best_tokens_per_s(self) -> float | None:
        """The fastest prompt's rate: the least disturbed by other processes on a shared machine."""
        return max(self.prompt_tokens_per_s) if self.prompt_tokens_per_s else None


def load_model(folder: Path, mode: str | None, tpde: bool) -> tuple[Any, float]:
    """``AutoModelForCausalLM.from_pretrained`` (timed); ``mode`` only for tpde repos (``None`` = default)."""
    import torch
    from transformers import AutoModelForCausalLM

    import tpde_hf

    kwargs: dict[str, Any] = {}
    if not tpde:
        kwargs["dtype"] = torch.bfloat16
    elif mode is not None:
        kwargs["quantization_config"] = tpde_hf.TpdeConfig(mode=mode)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    load_s = time.perf_counter() - t0
    model.eval()
    return model, load_s


def prompt_batch(tokenizer: Any) -> dict[str, Any]:
    """The fixed logits batch: every prompt through the chat template, right-padded, with its mask."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in PROMPTS]
    return dict(tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False))


def batch_logits(model: Any, batch: dict[str, Any]) -> Any:
    """The model's logits for ``batch`` (no autograd)."""
    import torch

    with torch.inference_mode():
        return model(**batch).logits


def compare_logits(ref: Any, got: Any, mask: Any) -> dict[str, Any]:
    """Bit-for-bit equality of the whole logits tensor, plus max |diff| and top-1 agreement on real tokens."""
    import torch

    same_dtype = ref.dtype == got.dtype and ref.shape == got.shape
    bits = {2: torch.int16, 4: torch.int32}.get(ref.element_size())
    identical = bool(same_dtype and bits is not None and torch.equal(ref.view(bits), got.view(bits)))
    m = mask.bool()
    diff = (ref.float() - got.float()).abs()[m]
    top1 = (ref.argmax(-1) == got.argmax(-1))[m].float().mean()
    return {"bit_identical": identical, "max_abs_diff": float(diff.max()), "top1_agreement": float(top1),
            "dtype": str(got.dtype).replace("torch.", "")}


def generate_round_robin(models: dict[str, Any], variants: dict[str, Variant], tokenizer: Any,
                         max_new_tokens: int, deadline: float) -> None:
    """Greedy chat generation of every prompt by every model through ``pipeline``, prompt by prompt.

    The models take turns on each prompt, so that load from other processes on a shared machine
    spreads over all of them instead of skewing one model's tokens/s. The new tokens are counted
    exactly (``return_tensors=True`` gives the ids; the prompt's length comes from the chat
    template). When the demo's time budget is nearly spent, the remaining prompts get fewer new
    tokens (marked in the text) so the demo stays within its 10 minutes.
    """
    from transformers import pipeline

    gen = {"do_sample": False, "return_tensors": True}
    pipes = {k: pipeline("text-generation", model=m, tokenizer=tokenizer) for k, m in models.items()}
    for pipe in pipes.values():
        pipe([{"role": "user", "content": "Hi"}], max_new_tokens=2, **gen)  # one-off set-up out of tokens/s
    for i, prompt in enumerate(PROMPTS):
        msgs = [{"role": "user", "content": prompt}]
        n_prompt = len(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)["input_ids"])
        # Seconds per token of one round so far; cut this round if it cannot finish before the deadline.
        spt = sum(v.generate_s / v.new_tokens for v in variants.values() if v.new_tokens and v.key in pipes)
        budget = max_new_tokens
        if spt and time.monotonic() + budget * spt > deadline:
            budget = max(4, int((deadline - time.monotonic()) / spt))
        for key, pipe in pipes.items():
            v = variants[key]
            t0 = time.perf_counter()
            out = pipe(msgs, max_new_tokens=budget, **gen)
            dt = time.perf_counter() - t0
            ids = out[0]["generated_token_ids"][n_prompt:]
            v.generate_s += dt
            v.new_tokens += len(ids)
            v.prompt_tokens_per_s.append(len(ids) / dt)
            text = tokenizer.decode(ids, skip_special_tokens=True).strip()
            if budget < max_new_tokens:
                text += f"  [cut to {budget} new tokens: demo time budget]"
            v.outputs.append(text)
        say(f"  prompt {i + 1}/{len(PROMPTS)} done by " + ", ".join(
            f"{variants[k].title} ({variants[k].prompt_tokens_per_s[-1]:.1f} tok/s)" for k in pipes))
