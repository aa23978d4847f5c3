"""The load plan: which stored tpde weight goes where in a transformers model skeleton.

* :func:`read_checkpoint_index` reads the safetensors headers (a few KB per shard, no tensor
  data) and checks every shard is complete, naming the file that is not;
* :func:`build_load_plan` maps every weight stored in tpde form to its place in the model, through
  the model's own key renamings and weight converters (e.g. per-expert MoE weights that
  transformers 5.x fuses into 3-D parameters), and gathers the per-expert slices of expert
  tensors stored natively as 3-D (:class:`ExpertStack`).

Weights laid out on disk by a base storage (``X.tpde_storage.S.<part>``, :mod:`tpde_hf.storage_format`) join
the plan with the resident parts' specs read from their meta. The conversion ops that execute the plan live in
:mod:`tpde_hf.loading.ops`.

Example::

    index = read_checkpoint_index(["/repo/model.safetensors"])
    plan = build_load_plan(model, index)  # model: a skeleton on the meta device
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.core_model_loading import (
    ConversionOps,
    WeightConverter,
    WeightRenaming,
    dot_natural_key,
    rename_source_key,
)

from tpde_hf.codec import SUFFIXES
from tpde_hf.errors import TpdeFormatError
from tpde_hf.format import (
    SAFETENSORS_DTYPES,
    encoded_prefixes,
    expert_slice_prefix,
    parse_expert_slice,
    stack_expert_slices,
)
from tpde_hf.storage_format import (
    META_PART,
    StoredWeight,
    is_base_part,
    storage_suffixes,
    storage_weights,
)

DELTA_SUFFIXES = ("delta", "lanes", "tables")
BASE_SUFFIXES = tuple(s for s in SUFFIXES if s not in DELTA_SUFFIXES)


# ==================================================================== checkpoint headers
@dataclass(frozen=True)
class TensorInfo:
    """Where one stored tensor lives and what it is (from the safetensors header only)."""

    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def read_safetensors_header(path: str) -> dict[str, TensorInfo]:
    """Parse one shard's header and check that the file holds every byte it announces.

    The parse is :func:`tpde_hf.integrity.read_shard_header`'s (one parser for the load and its checks).
    Raises :class:`TpdeFormatError` naming ``path`` for a truncated or corrupt shard.
    """
    from tpde_hf.integrity import read_shard_header

    out: dict[str, TensorInfo] = {}
    for name, t in read_shard_header(path).tensors.items():
        dtype = getattr(torch, SAFETENSORS_DTYPES.get(t.dtype, ""), None)
        if not isinstance(dtype, torch.dtype):
            raise TpdeFormatError(path, f"corrupt safetensors shard: unknown dtype {t.dtype!r} for {name!r}")
        out[name] = TensorInfo(path, dtype, t.shape)
    return out


def read_checkpoint_index(files: Iterable[str]) -> dict[str, TensorInfo]:
    """Merge the headers of all shards: ``{tensor name: TensorInfo}``."""
    index: dict[str, TensorInfo] = {}
    for path in files:
        if not str(path).endswith(".safetensors"):
            raise TpdeFormatError(str(path), "tpde repos are stored as safetensors; this checkpoint file is not one")
        index.update(read_safetensors_header(str(path)))
    return index


# ==================================================================== stacking expert slices
class StackExperts(ConversionOps):
    """Rebuild a 3-D expert tensor ``[E, A, B]`` from its ``E`` decoded slices (``[A, B]``, or ``[B, A]`` when
    stored transposed), bit for bit: in ``dequantize`` mode after :class:`TpdeDequantize`, in the other modes in
    the experts' forward hook (:mod:`tpde_hf.nn.fused`, which decodes only the experts the router picked).

    Input: one ``{pattern: [slice, ...]}`` entry; output: ``{target_patterns[0]: tensor}``.

    Example::

        StackExperts("mlp.experts.down_proj", 4, True).convert({"x": slices}, target_patterns=["down_proj"])
    """

    merges_experts = True  # the forward hook may leave the experts the router did not pick as zeros

    def __init__(self, name: str, n_experts: int, transposed: bool):
        self.name, self.n_experts, self.transposed = name, n_experts, transposed

    @torch.no_grad()
    def convert(self, input_dict: dict[str, Any], source_patterns: list[str] | None = None,
                target_patterns: list[str] | None = None, **kwargs: Any) -> dict[str, torch.Tensor]:
        if len(input_dict) != 1:
            raise TpdeFormatError(self.name, f"expected the expert slices of one tensor, got {sorted(input_dict)}")
        slices = next(iter(input_dict.values()))
        slices = slices if isinstance(slices, list) else [slices]
        if len(slices) != self.n_experts:
            raise TpdeFormatError(self.name, f"{len(slices)} expert slices loaded, expected {self.n_experts}")
        target = target_patterns[0] if target_patterns else self.name
        return {target: stack_expert_slices(slices, self.transposed)}

    @property
    def reverse_op(self) -> ConversionOps:
        from transformers.core_model_loading import _IdentityOp

        return _IdentityOp()



# ==================================================================== the load plan
@dataclass
class EncodedWeight:
    """One weight stored in tpde form: its checkpoint prefix and the header entry of each part."""

    prefix: str
    parts: dict[str, TensorInfo]
    label: str | None = None  # an expert slice: ``'<3-D tensor> [expert 3]'``
    storage: str | None = None  # laid out by this base storage: ``parts`` are its parts (``meta``, ``base_*`` ...)
    resident: dict[str, tuple[torch.dtype, tuple[int, ...]]] | None = None  # then: the resident parts' specs

    @property
    def name(self) -> str:
        """The original tensor name, used in every error message (``'...up_proj.weight'``; an expert slice:
        ``'...experts.gate_up_proj [expert 3]'``)."""
        return self.label or f"{self.prefix}.weight"

    @property
    def file(self) -> str:
        return self.parts["meta"].file

    def specs(self, suffixes: Iterable[str]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """The resident parts' dtypes and shapes (of a storage-laid weight: from its meta; its delta parts,
        rebuilt at load, have placeholder shapes)."""
        if self.resident is not None:
            return {s: self.resident[s] for s in suffixes}
        return {s: (self.parts[s].dtype, self.parts[s].shape) for s in suffixes}

    def storage_suffixes(self) -> list[str]:
        """The key suffixes of a storage-laid weight's parts (``tpde_storage.S.meta`` first), else ``SUFFIXES``."""
        if self.storage is None:
            return list(SUFFIXES)
        return storage_suffixes([StoredWeight(self.prefix, self.storage, {p: "" for p in self.parts})])[self.storage]


@dataclass
class DirectTarget:
    """A stored weight that is exactly one module's ``weight`` (``nn.Linear``, ``Conv1D`` or other)."""

    module_path: str
    weight: EncodedWeight


@dataclass
class FusedTarget:
    """A model parameter built from several stored weights by one of the model's converters.

    ``sources`` maps each of the converter's source patterns to the stored weights it collects,
    in checkpoint order (e.g. one per expert); ``storage_paths`` gives, for each stored weight,
    the module path (relative to the host module) where its parts are loaded.
    """

    host_path: str
    param_name: str
    converter: WeightConverter
    sources: dict[str, list[EncodedWeight]] = field(default_factory=dict)
    storage_paths: dict[str, str] = field(default_factory=dict)
    error: TpdeFormatError | None = None  # why the parts cannot be placed (only ``dequantize`` can load them)


@dataclass
class ExpertStack:
    """A 3-D expert tensor stored as one tpde weight per expert (:func:`tpde_hf.format.expert_slice_prefix`).

    ``key``: its checkpoint name; ``target``: the model parameter; ``renamed``: ``key`` after the model's
    renamings (what transformers' converters see); ``weights``: the slices, in expert order.
    """

    key: str
    target: str
    renamed: str
    transposed: bool
    weights: list[EncodedWeight]

    def stack_op(self) -> StackExperts:
        return StackExperts(self.key, len(self.weights), self.transposed)


@dataclass
class LoadPlan:
    direct: list[DirectTarget]
    fused: list[FusedTarget]
    weights: dict[str, EncodedWeight]
    dense_fused_targets: set[str]
    stacks: list[ExpertStack] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.weights


def _model_transforms(model) -> tuple[list[WeightRenaming], list[WeightConverter]]:
    from transformers.conversion_mapping import get_model_conversion_mapping

    mapping = get_model_conversion_mapping(model)
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    return renamings, converters


@dataclass(frozen=True)
class KeyTarget:
    """Where one checkpoint key loads: the model parameter, and the converter that builds it (if any).

    ``pattern`` is the converter's source pattern that matched (``None``: a plain, possibly renamed, key);
    ``storage`` is where the tpde parts of a ``X.weight`` key (``X.qweight``, ...) land in the model
    after the same renamings (``None`` for a key that does not end in ``.weight``, or whose parts would
    land in different places).
    """

    key: str
    target: str
    pattern: str | None
    converter: WeightConverter | None
    storage: str | None

    @property
    def host_path(self) -> str:
        return self.target.rpartition(".")[0]

    @property
    def param_name(self) -> str:
        return self.target.rpartition(".")[2]

    def parts_follow(self) -> bool:
        """Whether the tpde parts of this key land next to the parameter they rebuild.

        A direct weight's parts must land in the weight's own module; a converter's inputs anywhere
        under the module that holds the fused parameter (e.g. ``experts.3.w1`` under ``experts``).
        A renaming that names ``.weight`` itself (``router.layer.weight`` -> ``router.weight``) does not
        carry over to ``router.layer.qweight``.
        """
        if self.pattern is None:
            return self.storage is not None and self.param_name == "weight" and self.storage == self.host_path
        return self.storage_under_host() is not None

    def storage_under_host(self) -> str | None:
        """``storage`` relative to the module holding the parameter (``'3.w1'`` under ``...experts``), or None."""
        if self.storage is None:
            return None
        if not self.host_path:
            return self.storage
        return self.storage[len(self.host_path) + 1 :] if self.storage.startswith(self.host_path + ".") else None


class KeyMap:
    """The model's own load-time key mapping (transformers' renamings and converters), shared by the
    converter (to decide what to encode) and the loader (to place what was encoded).

    ``model`` is a skeleton (the meta device is enough). Keys must be resolved in checkpoint order
    (:func:`dot_natural_key`), as transformers does: some renamings are stateful.

    Example::

        km = KeyMap(model)
        km.resolve("encoder.layer.0.attention.attention.query.weight").target
        # 'layers.0.attention.q_proj.weight' (ViT as saved by transformers 5.x)
    """

    def __init__(self, model: torch.nn.Module):
        self.renamings, self.converters = _model_transforms(model)
        self.meta_state = model.state_dict()
        self.base_model_prefix = getattr(model, "base_model_prefix", "") or ""
        self._by_pattern = {pat: c for c in self.converters for pat in c.source_patterns}

    def resolve(self, key: str) -> KeyTarget:
        target, pattern = rename_source_key(key, self.renamings, self.converters, self.base_model_prefix,
                                            self.meta_state)
        storage = None
        if key.endswith(".weight"):  # every part must land in the same place (transformers renames each key)
            places = {self.renamed_prefix(key[: -len(".weight")], target, s) for s in SUFFIXES}
            storage = places.pop() if len(places) == 1 else None
        return KeyTarget(key, target, pattern, self._by_pattern.get(pattern) if pattern else None, storage)

    def slice_storage(self, prefix: str, target: str) -> str | None:
        """Where every tpde part of ``prefix`` lands (a 3-D expert tensor's slice, ``K.tpde_expert.3``), the
        base-model prefix fixed like ``target``; None if the parts land in different places or one of the
        model's converters takes them (it would try to build its own parameter from them)."""
        places = set()
        for s in SUFFIXES:
            _, pattern = rename_source_key(f"{prefix}.{s}", self.renamings, self.converters)
            if pattern is not None:
                return None
            places.add(self.renamed_prefix(prefix, target, s))
        return places.pop() if len(places) == 1 else None

    def renamed_prefix(self, prefix: str, target: str, suffix: str = "qweight") -> str:
        """Where ``prefix.<suffix>`` lands after the model's renamings, the base-model prefix fixed like ``target``."""
        renamed, _ = rename_source_key(f"{prefix}.{suffix}", self.renamings, [])
        renamed = renamed[: -len(suffix) - 1]
        bmp = self.base_model_prefix
        if bmp:
            if target.startswith(bmp + ".") and not renamed.startswith(bmp + "."):
                renamed = f"{bmp}.{renamed}"
            elif not target.startswith(bmp + ".") and renamed.startswith(bmp + "."):
                renamed = renamed[len(bmp) + 1 :]
        return renamed


def build_load_plan(model: torch.nn.Module, index: dict[str, TensorInfo]) -> LoadPlan:
    """Map every tpde-stored weight of ``index`` to the module or fused parameter it loads into.

    ``model`` is the freshly built skeleton (before any module replacement).
    """
    keys = sorted(index, key=dot_natural_key)
    prefixes = encoded_prefixes(keys)
    weights = {p: EncodedWeight(p, {s: index[f"{p}.{s}"] for s in SUFFIXES}) for p in prefixes}
    stored = storage_weights(keys)
    both = sorted(set(stored) & set(weights))
    if both:
        raise TpdeFormatError(f"{both[0]}.weight", "stored both as tpde tensors and by a base storage")
    weights.update(_storage_weights(stored, index))
    prefixes = prefixes + list(stored)
    if not prefixes:  # e.g. a fine-tune stored against its reference only: skip the model's key mapping
        return LoadPlan([], [], {}, set(), [])
    keymap = KeyMap(model)
    meta_sd = keymap.meta_state

    direct: list[DirectTarget] = []
    fused: dict[str, FusedTarget] = {}
    slices: dict[str, list[tuple[int, bool, str]]] = {}
    for prefix in sorted(prefixes, key=dot_natural_key):
        if (parsed := parse_expert_slice(prefix)) is not None:
            slices.setdefault(parsed[0], []).append((parsed[1], parsed[2], prefix))
            continue
        w = weights[prefix]
        kt = keymap.resolve(w.name)
        target = kt.target
        if kt.pattern is None:
            if target not in meta_sd or not target.endswith(".weight"):
                continue  # the model has no such weight: transformers reports the keys as unexpected
            direct.append(DirectTarget(target[: -len(".weight")], w))
            continue
        if target not in meta_sd:
            continue
        ft = fused.setdefault(target, FusedTarget(kt.host_path, kt.param_name, kt.converter))
        ft.sources.setdefault(kt.pattern, []).append(w)
        relative = kt.storage_under_host()
        if relative is None:
            raise TpdeFormatError(
                w.name,
                f"cannot place this tpde weight under {kt.host_path} (it renames to {kt.storage}); "
                "use mode='dequantize'",
            )
        ft.storage_paths[prefix] = relative
    stacks = [st for key in sorted(slices, key=dot_natural_key)
              if (st := _expert_stack(keymap, key, slices[key], weights, index)) is not None]
    for st in stacks:
        fused[st.target] = _stack_target(keymap, st)

    # Fused parameters that also collect dense (non-tpde) tensors cannot be held in tpde form.
    dense_fused: set[str] = set()
    encoded_keys = {f"{p}.{s}" for p in prefixes for s in SUFFIXES}
    for key in keys:
        if key in encoded_keys or not key.endswith(".weight"):
            continue
        kt = keymap.resolve(key)
        if kt.pattern is not None and kt.target in fused:
            dense_fused.add(kt.target)
    return LoadPlan(direct, list(fused.values()), weights, dense_fused, stacks)


def _storage_weights(stored: dict[str, StoredWeight], index: dict[str, TensorInfo]) -> dict[str, EncodedWeight]:
    """The :class:`EncodedWeight` of each storage-laid weight, with the resident parts' specs from its meta
    (read here: a few dozen bytes per weight). The delta parts are rebuilt at load, so their size is known only
    then (the quantizer lets the loaded ones replace the placeholders): ``delta`` is planned with the bytes of the
    storage's own delta parts (:func:`_stored_delta_bytes`), so that accelerate's ``device_map`` counts it."""
    from safetensors import safe_open

    from tpde_hf.codec.encoded import parse_meta

    by_file: dict[str, list[StoredWeight]] = defaultdict(list)
    for w in stored.values():
        by_file[index[w.parts[META_PART]].file].append(w)
    out = {}
    for path, ws in by_file.items():
        with safe_open(path, framework="pt") as fh:
            for w in ws:
                meta = parse_meta(fh.get_tensor(w.parts[META_PART]), w.name)
                (out_f, in_f), g = meta.shape, meta.params.group_size
                ng = -(-in_f // g)
                resident = {"qweight": (torch.uint8, (out_f, ng * g // 2)), "scales": (torch.float16, (out_f, ng)),
                            "zeros": (torch.uint8, (out_f, -(-ng // 2))),
                            "meta": (torch.int64, tuple(index[w.parts[META_PART]].shape)),
                            **{s: (torch.uint8, (0,)) for s in DELTA_SUFFIXES},
                            "delta": (torch.uint8, (_stored_delta_bytes(w, index),))}
                out[w.prefix] = EncodedWeight(w.prefix, {p: index[k] for p, k in w.parts.items()},
                                              storage=w.storage, resident=resident)
    return out


def _stored_delta_bytes(w: StoredWeight, index: dict[str, TensorInfo]) -> int:
    """The bytes of ``w``'s stored delta parts (those neither ``meta`` nor ``base_*``): what a ``device_map``
    plans for the rebuilt resident delta. An estimate: the rebuilt delta codes the same residual, in a layout
    made for decoding rather than for size (MiniLM bf16: 7.40 bits per weight resident against 7.03 on disk for
    narrow-rans, so the plan is about 5% low)."""
    return sum(index[k].nbytes for p, k in w.parts.items() if not is_base_part(p))


def _expert_stack(keymap: KeyMap, key: str, found: list[tuple[int, bool, str]], weights: dict[str, EncodedWeight],
                  index: dict[str, TensorInfo]) -> ExpertStack | None:
    """The :class:`ExpertStack` of the 3-D tensor ``key`` from its stored slices ``(expert, transposed, prefix)``;
    None when the model has no such 3-D parameter (transformers then reports the parts as unexpected).

    Raises :class:`TpdeFormatError` naming the tensor and its file when a slice is missing or the slices
    disagree on their orientation: a 3-D tensor is rebuilt whole or not at all.
    """
    kt = keymap.resolve(key)
    param = keymap.meta_state.get(kt.target)
    if kt.pattern is not None or param is None or param.dim() != 3:
        return None
    n = int(param.shape[0])
    file = weights[found[0][2]].file
    orientations = {t for _, t, _ in found}
    if len(orientations) != 1:
        raise TpdeFormatError(key, f"its expert slices are stored both transposed and not (in {file})")
    transposed = orientations.pop()
    by_index = {e: p for e, _, p in found}
    missing = [e for e in range(n) if e not in by_index]
    extra = sorted(e for e in by_index if e >= n)
    if missing or extra:
        what = f"expert slice(s) {missing} missing" if missing else f"expert slice(s) {extra} beyond the model's {n}"
        raise TpdeFormatError(key, f"{what} (in {file}); the model has {n} experts")
    stored = [weights[by_index[e]] for e in range(n)]
    for e, w in enumerate(stored):
        w.label = f"{key} [expert {e}]"
    # what transformers' converters will see: the slices' keys after the model's renamings
    first, _ = rename_source_key(f"{stored[0].prefix}.qweight", keymap.renamings, [])
    tail = expert_slice_prefix("", 0, transposed) + ".qweight"
    renamed = first[: -len(tail)] if first.endswith(tail) else rename_source_key(key, keymap.renamings, [])[0]
    return ExpertStack(key, kt.target, renamed, transposed, stored)


def _stack_target(keymap: KeyMap, st: ExpertStack) -> FusedTarget:
    """The experts module's hooked parameter for ``st``: each slice's parts are loaded under the parameter's
    name (``gate_up_proj.tpde_expert.3``), where the model's renamings put them."""
    host, _, param = st.target.rpartition(".")
    token = expert_slice_prefix(param, 0, st.transposed)[: -len(".0")]
    conv = WeightConverter([f"{token}.*"], param, [st.stack_op()])
    ft = FusedTarget(host, param, conv, {f"{token}.*": list(st.weights)})
    for e, w in enumerate(st.weights):
        place = keymap.slice_storage(w.prefix, st.target)
        want = expert_slice_prefix(st.target, e, st.transposed)
        if place != want and ft.error is None:  # raised where the parts are placed (not in dequantize mode)
            ft.error = TpdeFormatError(w.name, f"cannot place this tpde weight at {want} (it loads into {place}); "
                                               "use mode='dequantize'")
        ft.storage_paths[w.prefix] = want[len(host) + 1 :] if host else want
    return ft
