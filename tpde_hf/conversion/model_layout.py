"""The role of every checkpoint tensor in its model, read from the architecture built on the ``meta`` device.

:func:`load_layout` builds the model class named in ``config.json`` without memory or init, and resolves
every checkpoint key to the model parameter it loads into through transformers' own key mapping
(:class:`tpde_hf.loading.plan.KeyMap`, the same code the loader uses). A key is *linear-like* when that
parameter is an ``nn.Linear`` / ``Conv1D`` weight, an MoE router's weight, a fused expert parameter, a linear
weight a converter builds, or an expert tensor stored natively as 3-D (kind ``experts-3d``); its
:class:`WeightRole` says which, or why tpde cannot store it yet (kind ``unsupported``). What is then
converted is decided in :mod:`tpde_hf.conversion.selection`.

Example::

    layout = load_layout(Path("/models/llama"))
    layout.roles["model.layers.0.self_attn.q_proj.weight"].kind  # 'linear'
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tpde_hf.conversion.errors import ConversionError
from tpde_hf.conversion.streaming import read_header

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

    from tpde_hf.loading.plan import KeyMap

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
    """The role of one resolved checkpoint key (``kt``: :class:`tpde_hf.loading.plan.KeyTarget`); None if not
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
