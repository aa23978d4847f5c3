"""Which stored tensors to convert, decided from the architecture without materialising any weight.

The model class named in ``config.json`` is built on the ``meta`` device (no memory, no init), and
every checkpoint key is resolved to the model parameter it loads into through transformers' own
key mapping (renamings such as ViT's ``encoder.layer.N.attention.attention.query`` ->
``layers.N.attention.q_proj``, and converters such as the per-expert MoE weights that Mixtral and
Qwen2-MoE fuse into 3-D parameters: :class:`tpde_hf.load_plan.KeyMap`, the same code the loader
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
import logging
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tpde_hf.conversion.errors import ConversionError
from tpde_hf.conversion.streaming import TensorInfo, read_header
from tpde_hf.format import CODEC_DTYPES

logger = logging.getLogger("tpde_hf.conversion")

#: Kinds of linear-like checkpoint tensors that tpde stores (see the module docstring).
ENCODABLE_KINDS = ("linear", "conv1d", "router", "experts", "converted-linear", "experts-3d")
NOT_LINEAR = "not a linear-like weight"
LARGER = "larger when encoded"
#: Why the loader cannot hold some linear-like tensors in tpde form yet (they are kept dense).
UNSUPPORTED_3D = "3-D tensor whose per-expert tpde parts the model would load elsewhere: not supported yet"
UNSUPPORTED_SPLIT = "split by the model into several parameters: not supported yet"
UNSUPPORTED_MHA = "nn.MultiheadAttention in_proj_weight: not supported yet"
UNSUPPORTED_NAME = "checkpoint name does not end in .weight: not supported yet"
UNSUPPORTED_RENAME = "the model renames .weight itself, its tpde parts would not load: not supported yet"
UNSUPPORTED_CONVERTER = "the model's converter reads names not ending in .weight: not supported yet"


@dataclass(frozen=True)
class WeightRole:
    """What one linear-like checkpoint tensor is to the model.

    ``kind``: one of :data:`ENCODABLE_KINDS`, or ``"unsupported"`` (then ``note`` says why);
    ``module``: the model module that uses it; ``target``: the model parameter it loads into;
    ``group``: the fused parameter it is one of several inputs of (converted all together or not at all);
    ``tied_to``: the parameter it is tied to, if any; ``transposed`` (kind ``experts-3d``): each expert is
    stored transposed (the model computes ``x @ W[e]``).
    """

    kind: str
    module: str
    target: str
    group: str | None = None
    tied_to: str | None = None
    note: str | None = None
    transposed: bool = False


@dataclass
class ModelLayout:
    """What the architecture says about a checkpoint: the role of each linear-like key."""

    architecture: str | None
    linear: set[str]  # every linear-like module of the model (stored weight or not, e.g. a tied lm_head)
    base_model_prefix: str
    tied_output: str | None  # the output-embedding module when tied to the input embeddings
    model_type: str | None
    roles: dict[str, WeightRole] = field(default_factory=dict)  # checkpoint key -> role (linear-like keys only)

    def to_dict(self) -> dict:
        return {"architecture": self.architecture, "linear": sorted(self.linear),
                "base_model_prefix": self.base_model_prefix, "tied_output": self.tied_output,
                "model_type": self.model_type, "roles": {k: asdict(r) for k, r in self.roles.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> ModelLayout:
        return cls(d["architecture"], set(d["linear"]), d["base_model_prefix"], d["tied_output"], d["model_type"],
                   {k: WeightRole(**r) for k, r in d["roles"].items()})


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


def _checkpoint_keys(folder: Path) -> list[str]:
    """The tensor names of ``folder``'s safetensors files (headers only)."""
    keys: list[str] = []
    for f in sorted(folder.glob("*.safetensors")):
        keys.extend(read_header(f))
    return keys


def _build_meta_model(folder: Path, trust_remote_code: bool) -> tuple[Any, str | None, torch.nn.Module]:
    """``(config, architecture, model)``: the model of ``folder/config.json`` on the meta device (no memory)."""
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
            f"{cfg_path}: cannot build architecture {arch or config.model_type!r} to find its linear modules "
            f"({type(exc).__name__}: {exc}). For custom-code models pass trust_remote_code=True "
            "(--trust-remote-code); or name the weights to convert with include= (--include REGEX)."
        ) from None
    finally:
        t_logger.setLevel(level)
    return config, arch, model


def load_layout(folder: Path, keys: Iterable[str] | None = None, *, trust_remote_code: bool = False) -> ModelLayout:
    """Build the model of ``folder/config.json`` on the meta device and find the role of every checkpoint key.

    ``keys``: the checkpoint's tensor names (default: read from ``folder``'s safetensors headers).
    Raises :class:`ConversionError` naming the config if the architecture cannot be built.
    """
    from transformers.core_model_loading import dot_natural_key

    from tpde_hf.load_plan import KeyMap

    keys = list(keys) if keys is not None else _checkpoint_keys(folder)
    config, arch, model = _build_meta_model(folder, trust_remote_code)
    try:
        keymap = KeyMap(model)
    except Exception as exc:  # a custom model without a usable conversion mapping
        raise ConversionError(f"{folder / 'config.json'}: cannot read the key mapping of {arch!r} "
                              f"({type(exc).__name__}: {exc})") from None
    names = {id(m): n for n, m in model.named_modules()}
    tied = _tied_parameters(model, config, names)
    params = dict(model.named_parameters(remove_duplicate=False))
    roles: dict[str, WeightRole] = {}
    for key in sorted(keys, key=dot_natural_key):
        role = _role_of(model, keymap, keymap.resolve(key), params, tied)
        if role is not None:
            roles[key] = role
    linear = {n for n, m in model.named_modules() if _is_linear(m)} | {r.module for r in roles.values()}
    tied_output = next((t[: -len(".weight")] for t in tied if t.endswith(".weight") and
                        _is_linear(_submodule(model, t[: -len(".weight")]))), None)
    return ModelLayout(arch or type(model).__name__, linear, getattr(model, "base_model_prefix", "") or "",
                       tied_output, getattr(config, "model_type", None), roles)


def _submodule(model: torch.nn.Module, path: str) -> torch.nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _tied_parameters(model: torch.nn.Module, config: Any, names: dict[int, str]) -> dict[str, str]:
    """``{parameter: the parameter it is tied to}``, both directions (transformers' tied keys, else the
    output embeddings when the config ties them)."""
    tied: dict[str, str] = {}
    for a, b in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        tied[a], tied[b] = b, a
    try:
        text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
        out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
        if out_emb is not None and in_emb is not None and getattr(text_cfg, "tie_word_embeddings", False):
            a, b = f"{names.get(id(out_emb))}.weight", f"{names.get(id(in_emb))}.weight"
            tied.setdefault(a, b)
            tied.setdefault(b, a)
    except (AttributeError, NotImplementedError):
        pass
    return tied


def _is_linear(module: torch.nn.Module | None) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (torch.nn.Linear, Conv1D))


_ROUTER_CLASS = re.compile(r"router|gate", re.IGNORECASE)


def _is_router(module: torch.nn.Module | None, param_name: str, param: torch.Tensor) -> bool:
    """An MoE router: a leaf module named like one whose 2-D ``weight`` scores the experts (``F.linear``)."""
    return (module is not None and param_name == "weight" and param.dim() == 2
            and not isinstance(module, torch.nn.Embedding) and not list(module.children())
            and bool(_ROUTER_CLASS.search(type(module).__name__)))


def _is_experts(module: torch.nn.Module | None, target: str) -> bool:
    """A module holding one matrix per expert as 3-D parameters (``experts.gate_up_proj`` [E, 2I, H])."""
    return module is not None and ("expert" in type(module).__name__.lower() or ".experts." in f".{target}")


def _role_of(model: torch.nn.Module, keymap: Any, kt: Any, params: dict[str, torch.Tensor],
             tied: dict[str, str]) -> WeightRole | None:
    """The role of one resolved checkpoint key (``kt``: :class:`tpde_hf.load_plan.KeyTarget`); None if not
    linear-like."""
    from transformers.pytorch_utils import Conv1D

    param = params.get(kt.target)
    if param is None:
        return None  # the model has no such parameter (transformers reports it as unexpected)
    module = _submodule(model, kt.host_path)
    name = kt.param_name
    if kt.pattern is None:
        if isinstance(module, torch.nn.MultiheadAttention) and name == "in_proj_weight":
            return WeightRole("unsupported", kt.host_path, kt.target, note=UNSUPPORTED_MHA)
        if name == "weight" and _is_linear(module):
            kind = "conv1d" if isinstance(module, Conv1D) else "linear"
        elif _is_router(module, name, param):
            kind = "router"
        elif param.dim() == 3 and _is_experts(module, kt.target):
            return _experts_3d_role(model, keymap, kt, module, param)
        else:
            return None
        role = WeightRole(kind, kt.host_path, kt.target, tied_to=tied.get(kt.target))
        if not kt.key.endswith(".weight"):
            return WeightRole("unsupported", role.module, role.target, note=UNSUPPORTED_NAME)
        if not kt.parts_follow():
            return WeightRole("unsupported", role.module, role.target, note=UNSUPPORTED_RENAME)
        return role
    # A converter builds the parameter (fused experts, transposes, concatenations, splits).
    conv = kt.converter
    if param.dim() == 3:
        kind = "experts"
    elif (name == "weight" and _is_linear(module)) or _is_router(module, name, param):
        kind = "converted-linear"
    else:
        return None
    if len(conv.target_patterns) > 1:
        return WeightRole("unsupported", kt.host_path, kt.target, note=UNSUPPORTED_SPLIT)
    if not kt.key.endswith(".weight"):
        return WeightRole("unsupported", kt.host_path, kt.target, note=UNSUPPORTED_NAME)
    if not all(p.endswith(".weight") for p in conv._original_source_patterns) or not kt.parts_follow():
        return WeightRole("unsupported", kt.host_path, kt.target, note=UNSUPPORTED_CONVERTER)
    return WeightRole(kind, kt.host_path, kt.target, group=kt.target, tied_to=tied.get(kt.target))


def _experts_3d_role(model: torch.nn.Module, keymap: Any, kt: Any, module: torch.nn.Module,
                     param: torch.Tensor) -> WeightRole:
    """The role of an expert tensor stored natively as 3-D: ``experts-3d`` when the parts of its per-expert
    slices (``K.tpde_expert.<e>.qweight`` ...) land, through the model's renamings, under the parameter itself
    (``<target>.tpde_expert.<e>``) and no converter takes them; else unsupported."""
    from tpde_hf.format import expert_slice_prefix

    transposed = _computes_transposed(model, module, kt.param_name, param)
    for e in sorted({0, param.shape[0] - 1}):
        want = expert_slice_prefix(kt.target, e, transposed)
        if keymap.slice_storage(expert_slice_prefix(kt.key, e, transposed), kt.target) != want:
            return WeightRole("unsupported", kt.host_path, kt.target, note=UNSUPPORTED_3D)
    return WeightRole("experts-3d", kt.host_path, kt.target, transposed=transposed)


_OUTPUT_SIDE = re.compile(r"down|w2|output", re.IGNORECASE)  # expert matrices whose output is the hidden state


def _computes_transposed(model: torch.nn.Module, module: torch.nn.Module, name: str, param: torch.Tensor) -> bool:
    """Whether the model computes ``x @ W[e]`` with the 3-D parameter ``W`` (``[E, in, out]``, GPT-OSS, Llama 4)
    rather than ``x @ W[e].T`` (``[E, out, in]``, GraniteMoE).

    transformers' experts say so in ``is_transposed`` (``@use_experts_implementation``). Others (Llama 4's
    ``torch.bmm(x, W)``) are told by the dimension of the hidden size: the input of ``gate_up_proj``, the output
    of ``down_proj``. A square matrix without the flag counts as not transposed. Only the 4-bit groups' direction
    depends on it; the orientation is recorded in the stored names, so the weights are exact either way.
    """
    flag = getattr(module, "is_transposed", None)
    if isinstance(flag, bool):
        return flag
    config = getattr(model, "config", None)
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    hidden = getattr(module, "hidden_size", None) or getattr(text, "hidden_size", None)
    a, b = int(param.shape[1]), int(param.shape[2])
    if not isinstance(hidden, int) or a == b:
        return False
    return b == hidden if _OUTPUT_SIDE.search(name) else a == hidden


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
