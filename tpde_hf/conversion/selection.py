"""Which stored tensors to convert, decided from the architecture without materialising any weight.

The architecture's side lives in :mod:`tpde_hf.conversion.model_layout` (its names are importable from here
too): the model class named in ``config.json`` is built on the ``meta`` device (no memory, no init), and
every checkpoint key is resolved to the model parameter it loads into through transformers' own
key mapping (renamings such as ViT's ``encoder.layer.N.attention.attention.query`` ->
``layers.N.attention.q_proj``, and converters such as the per-expert MoE weights that Mixtral and
Qwen2-MoE fuse into 3-D parameters: :class:`tpde_hf.loading.plan.KeyMap`, the same code the loader
uses). A key is *linear-like* when that parameter is

* the weight of an ``nn.Linear`` (subclasses included) or of GPT-2's ``Conv1D``;
* the weight of an MoE router (a leaf module named ``*Router*`` / ``*Gate*`` with a 2-D ``weight``);
* a fused expert parameter (3-D) that the model's converter builds from per-expert 2-D tensors, or
  a linear weight that a converter builds from one checkpoint tensor (e.g. a transpose);
* an expert tensor the checkpoint stores natively as 3-D (GPT-OSS, Llama 4 ``experts.gate_up_proj``;
  GraniteMoE ``input_linear.weight``, renamed to ``experts.gate_up_proj``): kind ``experts-3d``, stored as
  one 2-D tpde weight per expert (:func:`tpde_hf.format.expert_slice_prefix`), transposed where the model
  computes ``x @ W[e]`` so that the 4-bit groups run along the input dimension.

A linear-like key is converted unless a reason keeps it dense, which the summary shows: the user's
``keep_dense`` / ``include`` / ``exclude``, a weight tied to another (a tied ``lm_head``: converting
one copy of a tied pair would untie it), its dtype, its shape, or a layout tpde cannot store yet
(one tensor split into several parameters, ``nn.MultiheadAttention``'s ``in_proj_weight``, a 3-D expert
tensor whose per-expert parts the model would rename elsewhere). Once encoded, a weight whose tpde
parts would take at least as many bytes as the weight itself (all its experts together, for a 3-D
tensor) is stored dense as well (:meth:`Selection.keep_dense`, reason ``larger when
encoded``): a repo never grows. The tensors of one fused parameter are converted all together or
not at all: the loader cannot build a parameter from tpde and dense tensors at once.

Names: ``keep_dense`` entries match a checkpoint name (without ``.weight``) or a model module name,
exactly or as a dotted suffix (``lm_head``, ``o_proj``, ``experts``). ``include`` / ``exclude`` are
regular expressions searched in both the checkpoint name (without ``.weight``) and the model module
name, so ``--include encoder`` (a ViT checkpoint name) and ``--include q_proj`` (its module name)
both work. ``modules_to_not_convert`` lists the model modules with a linear-like weight stored dense
(or none stored at all, e.g. a tied ``lm_head``), and the ``keep_dense`` entries.

Building the architecture means importing transformers' modeling code: seconds on a small
machine. :func:`likely_linear_weights` guesses from the checkpoint alone which weights to start
encoding meanwhile; the guess only decides what starts early, never what is kept.

Example::

    plan = select_tensors(infos, load_layout(folder), keep_dense=("lm_head",), include=None, exclude=r"\\.k_proj$")
    plan.encoded  # ["model.layers.0.self_attn.q_proj.weight", ...]
    plan.dense    # {"model.norm.weight": "not a linear-like weight", "lm_head.weight": "kept dense (lm_head)", ...}
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tpde_hf.conversion.errors import ConversionError
from tpde_hf.conversion.model_layout import (  # noqa: F401 (load_layout ...: re-exported, imported from here)
    UNSUPPORTED_3D,
    UNSUPPORTED_CONVERTER,
    UNSUPPORTED_MHA,
    UNSUPPORTED_NAME,
    UNSUPPORTED_RENAME,
    UNSUPPORTED_SPLIT,
    ModelLayout,
    WeightRole,
    _build_meta_model,
    _checkpoint_keys,
    load_layout,
)
from tpde_hf.conversion.streaming import TensorInfo
from tpde_hf.format import CODEC_DTYPES

#: Kinds of linear-like checkpoint tensors that tpde stores (see the module docstring).
ENCODABLE_KINDS = ("linear", "conv1d", "router", "experts", "converted-linear", "experts-3d")
NOT_LINEAR = "not a linear-like weight"
LARGER = "larger when encoded"


@dataclass
class Selection:
    """The decision for every stored tensor: ``encoded`` names, and why each other one stays dense.

    ``dense_linears`` are the linear-like tensors among the dense ones: the summary lists them with
    their reasons. :meth:`keep_dense` moves encoded names back (e.g. those larger when encoded).
    """

    encoded: list[str] = field(default_factory=list)
    dense: dict[str, str] = field(default_factory=dict)  # name -> reason
    modules_to_not_convert: list[str] = field(default_factory=list)
    dense_linears: list[str] = field(default_factory=list)  # stored linear-like tensors left dense, by name
    source_dtype: str | None = None
    roles: dict[str, WeightRole] = field(default_factory=dict)  # every linear-like stored tensor
    dtypes: dict[str, tuple[str, int]] = field(default_factory=dict, repr=False)  # name -> (dtype, numel)
    all_linear: set[str] = field(default_factory=set, repr=False)
    keep: tuple[str, ...] = ()

    def reasons(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.dense.values():
            out[r] = out.get(r, 0) + 1
        return out

    def dense_linear_reasons(self) -> dict[str, str]:
        """``{name: reason}`` of every linear-like tensor stored dense."""
        return {n: self.dense[n] for n in self.dense_linears}

    def keep_dense(self, reasons: dict[str, str]) -> list[str]:
        """Store the encoded tensors ``reasons`` names dense instead, with the other inputs of their fused
        parameters; return every name moved. Updates ``modules_to_not_convert`` and ``source_dtype``."""
        moved = [n for n in self.encoded if n in reasons]
        for n in moved:
            self._make_dense(n, reasons[n])
        gone = set(moved)
        self.encoded = [n for n in self.encoded if n not in gone]
        moved += self._settle_groups()
        self._finish()
        return moved

    # ---------------------------------------------------------------- internals
    def _make_dense(self, name: str, reason: str) -> None:
        """Record ``name`` (linear-like, not in ``encoded``) as dense for ``reason``."""
        self.dense[name] = reason
        self.dense_linears.append(name)

    def _settle_groups(self) -> list[str]:
        """All inputs of one fused parameter stay dense if one does (the loader builds a parameter from tpde
        tensors only, or from dense ones only); returns the names moved."""
        first_dense: dict[str, str] = {}
        for n in self.dense_linears:
            g = self.roles[n].group if n in self.roles else None
            if g and g not in first_dense:
                first_dense[g] = n
        moved = [n for n in self.encoded if self.roles[n].group in first_dense]
        for n in moved:
            first = first_dense[self.roles[n].group]
            self._make_dense(n, f"kept dense with the other inputs of its fused parameter ({self.dense[first]})")
        gone = set(moved)
        self.encoded = [n for n in self.encoded if n not in gone]
        return moved

    def _finish(self) -> None:
        converted = {self.roles[n].module for n in self.encoded if n in self.roles}
        not_converted = {self.roles[n].module for n in self.dense_linears if n in self.roles}
        not_converted |= {m for m in self.all_linear if m not in converted}
        self.modules_to_not_convert = sorted(not_converted | set(self.keep))
        sizes: dict[str, int] = {}
        for n in self.encoded:
            dtype, numel = self.dtypes[n]
            sizes[dtype] = sizes.get(dtype, 0) + numel
        self.source_dtype = max(sizes, key=sizes.get) if sizes else None


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
    """Decide, for every stored tensor, whether it is converted. ``layout=None``: ``include`` decides alone
    (every 2-D ``X.weight`` it matches). See the module docstring for how names are matched."""
    keep = tuple(keep_dense or ())
    inc = _compile(include, "include")
    exc = _compile(exclude, "exclude")
    sel = Selection(keep=keep, all_linear=set(layout.linear) if layout is not None else set())
    for info in infos:
        name = info.name
        prefix = name[: -len(".weight")] if name.endswith(".weight") else name
        if layout is not None:
            role = layout.roles.get(name)
        else:
            role = WeightRole("linear", prefix, name) if inc and name.endswith(".weight") else None
        if role is None:
            sel.dense[name] = NOT_LINEAR
            continue
        sel.roles[name] = role
        sel.dtypes[name] = (info.torch_dtype_name, info.numel)
        reason = _dense_reason(info, prefix, role, keep, inc, exc)
        if reason:
            sel._make_dense(name, reason)
        else:
            sel.encoded.append(name)
    sel._settle_groups()
    sel._finish()
    return sel


def _dense_reason(info: TensorInfo, prefix: str, role: WeightRole, keep: tuple[str, ...],
                  inc: re.Pattern | None, exc: re.Pattern | None) -> str | None:
    """Why a linear-like tensor stays dense (the user's options first), or None to convert it."""
    if (k := _matches_keep(prefix, keep)) or (k := _matches_keep(role.module, keep)):
        return f"kept dense ({k})"
    if role.tied_to:
        return f"tied to {role.tied_to}"  # converting one copy of a tied pair would untie it
    if inc and not (inc.search(prefix) or inc.search(role.module)):
        return "not matched by include"
    if exc and (exc.search(prefix) or exc.search(role.module)):
        return "matched by exclude"
    if role.kind not in ENCODABLE_KINDS:
        return role.note or "not supported yet"
    if info.torch_dtype_name not in CODEC_DTYPES:
        return f"dtype {info.torch_dtype_name} not supported by the codec"
    if role.kind == "experts-3d":  # one matrix per expert
        if len(info.shape) != 3 or info.numel == 0:
            return f"shape {list(info.shape)} is not a non-empty stack of matrices"
        return None
    if len(info.shape) != 2 or info.numel == 0:
        return f"shape {list(info.shape)} is not a non-empty matrix"
    return None


def _compile(pattern: str | None, what: str) -> re.Pattern | None:
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ConversionError(f"{what} regex {pattern!r} is invalid: {err}") from None
