"""Which stored tensors to convert, decided from the architecture without materialising any weight.

The model class named in ``config.json`` is built on the ``meta`` device (no memory, no init);
its ``nn.Linear`` modules are the candidates. A checkpoint key ``X.weight`` is converted when
``X`` is such a module (allowing for the ``base_model_prefix``, e.g. ``bert.``), its dtype is
bf16/fp16/fp32, it is 2-D, and the user's ``keep_dense`` / ``include`` / ``exclude`` allow it.
A ``lm_head`` tied to the input embeddings stays dense whatever was asked: converting one copy of
a tied pair would untie it.

Building the architecture means importing transformers' modeling code: seconds on a small
machine. :func:`likely_linear_weights` guesses from the checkpoint alone which weights to start
encoding meanwhile; the guess only decides what starts early, never what is kept.

Example::

    plan = select_tensors(folder, headers, keep_dense=("lm_head",), include=None, exclude=r"\\.k_proj$")
    plan.encoded  # ["model.layers.0.self_attn.q_proj.weight", ...]
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tpde_hf.conversion.errors import ConversionError
from tpde_hf.conversion.streaming import TensorInfo
from tpde_hf.format import CODEC_DTYPES

logger = logging.getLogger("tpde_hf.conversion")


@dataclass
class ModelLayout:
    """What the architecture says: its Linear modules and how checkpoint keys map onto them."""

    architecture: str | None
    linear: set[str]
    base_model_prefix: str
    tied_output: str | None  # the output-embedding module when tied to the input embeddings
    model_type: str | None

    def module_for(self, prefix: str) -> str | None:
        """Model module name for checkpoint prefix ``prefix`` if it is a Linear, else None."""
        if prefix in self.linear:
            return prefix
        bp = self.base_model_prefix
        if bp:
            if f"{bp}.{prefix}" in self.linear:
                return f"{bp}.{prefix}"
            if prefix.startswith(bp + ".") and prefix[len(bp) + 1 :] in self.linear:
                return prefix[len(bp) + 1 :]
        return None


@dataclass
class Selection:
    """The decision for every stored tensor: ``encoded`` names, and why each other one stays dense."""

    encoded: list[str] = field(default_factory=list)
    dense: dict[str, str] = field(default_factory=dict)  # name -> reason
    modules_to_not_convert: list[str] = field(default_factory=list)
    dense_linears: list[str] = field(default_factory=list)  # stored Linear weights left dense, by name
    source_dtype: str | None = None

    def reasons(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.dense.values():
            out[r] = out.get(r, 0) + 1
        return out


def load_layout(folder: Path, *, trust_remote_code: bool = False) -> ModelLayout:
    """Build the model of ``folder/config.json`` on the meta device and list its Linear modules.

    Raises :class:`ConversionError` naming the config if the architecture cannot be built.
    """
    import transformers
    from transformers import AutoConfig, AutoModel

    cfg_path = folder / "config.json"
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ConversionError(f"{cfg_path}: transformers cannot read this config ({exc})") from None
    qc = getattr(config, "quantization_config", None)
    if qc:
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", qc)
        raise ConversionError(
            f"{cfg_path}: the source is already quantized (quant_method={method}); tpde needs the original "
            "bf16/fp16/fp32 weights"
        )
    archs = list(getattr(config, "architectures", None) or [])
    arch = archs[0] if archs else None
    cls = getattr(transformers, arch, None) if arch else None
    t_logger = logging.getLogger("transformers")
    level = t_logger.level
    t_logger.setLevel(logging.ERROR)  # meta-device construction warnings are noise here
    try:
        with torch.device("meta"):
            if cls is not None:
                model = cls._from_config(config) if hasattr(cls, "_from_config") else cls(config)
            else:
                model = AutoModel.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ConversionError(
            f"{cfg_path}: cannot build architecture {arch or config.model_type!r} to find its nn.Linear modules "
            f"({type(exc).__name__}: {exc}). For custom-code models pass trust_remote_code=True "
            "(--trust-remote-code); or name the weights to convert with include= (--include REGEX)."
        ) from None
    finally:
        t_logger.setLevel(level)
    names = {id(m): n for n, m in model.named_modules()}
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    tied_output = None
    try:
        text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
        out_emb = model.get_output_embeddings()
        if out_emb is not None and getattr(text_cfg, "tie_word_embeddings", False):
            tied_output = names.get(id(out_emb))
    except (AttributeError, NotImplementedError):
        pass
    return ModelLayout(arch or type(model).__name__, linear, getattr(model, "base_model_prefix", "") or "",
                       tied_output, getattr(config, "model_type", None))


#: Names that usually belong to embeddings or output heads: those wait for the architecture.
_EMBEDDING_LIKE = re.compile(r"emb|wte|wpe|shared|lm_head", re.IGNORECASE)


def config_vocab_sizes(folder: Path) -> set[int]:
    """Every ``vocab_size`` in ``folder/config.json`` (nested text configs included); empty if unreadable."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return set()
    sizes: set[int] = set()
    stack = [config]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("vocab_size"), int):
                sizes.add(node["vocab_size"])
            stack.extend(node.values())
    return sizes


def likely_linear_weights(
    infos: Iterable[TensorInfo],
    *,
    keep_dense: Iterable[str] = ("lm_head",),
    include: str | None = None,
    exclude: str | None = None,
    vocab_sizes: Iterable[int] = (),
) -> list[TensorInfo]:
    """The weights worth encoding before the architecture is known: those :func:`select_tensors` will
    almost surely convert.

    A stored 2-D bf16/fp16/fp32 ``X.weight`` that the options allow, unless its name or its row count
    (a vocabulary size) says embedding or output head. A wrong guess costs time, never bits: the
    final selection still comes from the architecture, and a guessed weight it rejects is dropped.
    """
    keep = tuple(keep_dense or ())
    inc = _compile(include, "include")
    exc = _compile(exclude, "exclude")
    vocab = set(vocab_sizes)
    out = []
    for info in infos:
        if not info.name.endswith(".weight") or len(info.shape) != 2 or info.numel == 0:
            continue
        prefix = info.name[: -len(".weight")]
        if info.torch_dtype_name not in CODEC_DTYPES or _matches_keep(prefix, keep):
            continue
        if (inc and not inc.search(prefix)) or (exc and exc.search(prefix)):
            continue
        if _EMBEDDING_LIKE.search(prefix) or info.shape[0] in vocab:
            continue
        out.append(info)
    return out


def _matches_keep(name: str, keep: Iterable[str]) -> str | None:
    for k in keep:
        if name == k or name.endswith("." + k):
            return k
    return None


def select_tensors(
    infos: Iterable[TensorInfo],
    layout: ModelLayout | None,
    *,
    keep_dense: Iterable[str] = ("lm_head",),
    include: str | None = None,
    exclude: str | None = None,
) -> Selection:
    """Decide, for every stored tensor, whether it is converted. ``layout=None``: ``include`` decides alone."""
    keep = tuple(keep_dense or ())
    inc = _compile(include, "include")
    exc = _compile(exclude, "exclude")
    sel = Selection()
    not_converted: set[str] = set()
    dtypes: dict[str, int] = {}
    for info in infos:
        name = info.name
        prefix = name[: -len(".weight")] if name.endswith(".weight") else None
        module = None
        if prefix is not None:
            module = layout.module_for(prefix) if layout is not None else (prefix if inc else None)
        if module is None:
            sel.dense[name] = "not an nn.Linear weight"
            continue
        reason = None
        if (k := _matches_keep(prefix, keep)) or (k := _matches_keep(module, keep)):
            reason = f"kept dense ({k})"
        elif layout is not None and layout.tied_output and module == layout.tied_output:
            reason = "tied to the input embeddings"
        elif inc and not (inc.search(prefix) or inc.search(module)):
            reason = "not matched by include"
        elif exc and (exc.search(prefix) or exc.search(module)):
            reason = "matched by exclude"
        elif info.torch_dtype_name not in CODEC_DTYPES:
            reason = f"dtype {info.torch_dtype_name} not supported by the codec"
        elif len(info.shape) != 2 or info.numel == 0:
            reason = f"shape {list(info.shape)} is not a non-empty matrix"
        if reason:
            sel.dense[name] = reason
            sel.dense_linears.append(name)
            not_converted.add(module)
            continue
        sel.encoded.append(name)
        dtypes[info.torch_dtype_name] = dtypes.get(info.torch_dtype_name, 0) + info.numel
    if layout is not None:
        # Linear modules with no stored weight of their own (a tied lm_head) stay dense too.
        converted = {layout.module_for(n[: -len(".weight")]) for n in sel.encoded}
        not_converted |= {m for m in layout.linear if m not in converted}
    not_converted |= set(keep)
    sel.modules_to_not_convert = sorted(not_converted)
    sel.source_dtype = max(dtypes, key=dtypes.get) if dtypes else None
    return sel


def _compile(pattern: str | None, what: str) -> re.Pattern | None:
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ConversionError(f"{what} regex {pattern!r} is invalid: {err}") from None
