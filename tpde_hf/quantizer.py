"""``TpdeHfQuantizer``: loads tpde repos through transformers' own ``from_pretrained``.

Registered under ``quant_method="tpde"`` (by ``import tpde_hf``, or automatically when
transformers is imported, see :mod:`tpde_hf._autoregister`). The loading uses the transformers
5.x API as the built-in quantizers do:

1. ``validate_environment`` checks the stored format and resolves the runtime ``mode``;
2. ``preprocess_model`` reads the safetensors headers (no tensor data), maps every stored tpde
   weight to the model through the model's own renamings and converters, and replaces the
   layers: ``nn.Linear`` / ``Conv1D`` -> :class:`~tpde_hf.nn.TpdeLinear`; fused MoE expert
   parameters (per-expert checkpoint weights, or 3-D expert tensors stored one tpde weight per
   expert) and other modules' weights -> per-weight storage plus a forward hook
   (:mod:`tpde_hf.nn.fused`). Every part gets its exact stored shape, so accelerate's
   ``device_map="auto"`` and ``max_memory`` plan with the real sizes;
3. transformers loads the parts as ordinary parameters (``mode="dequantize"``: a conversion op,
   :class:`~tpde_hf.loading.TpdeDequantize`, decodes each weight as it is read instead);
4. ``postprocess_model`` validates every tensor (``verify=True``: also decodes and checks each
   checksum), moves the delta to pinned host memory for ``lossless-offload``, and makes
   ``save_pretrained`` add ``tpde_manifest.json``.

Example::

    import tpde_hf  # registers the quantizer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained("some/tpde-repo")                     # auto mode
    model = AutoModelForCausalLM.from_pretrained("some/tpde-repo", quantization_config=tpde_hf.TpdeConfig(mode="base"))
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
from torch import nn
from transformers.quantizers.base import HfQuantizer

from tpde_hf.codec import SUFFIXES, decode_tensors
from tpde_hf.config import DEFAULT_CPU_MODE, DEFAULT_GPU_MODE, TpdeConfig
from tpde_hf.errors import TpdeFormatError
from tpde_hf.format import QUANT_METHOD

_KNOWN_DEVICE_TYPES = ("cpu", "cuda", "disk", "meta", "mps", "xpu")
_DECODE_CHUNK_ELEMENTS = 1 << 24


def _device_types(device_map: Any) -> set[str]:
    """Device types a ``device_map`` (None, a string or a dict) puts weights on."""
    if device_map is None:
        return {"cpu"}
    if isinstance(device_map, str):
        if device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
            return {"cuda"} if torch.cuda.is_available() else {"cpu"}
        return {torch.device(device_map).type}
    if isinstance(device_map, torch.device):
        return {device_map.type}
    if isinstance(device_map, int):
        return {"cuda"}
    types = set()
    for v in device_map.values():
        if isinstance(v, int):
            types.add("cuda")
        elif isinstance(v, torch.device):
            types.add(v.type)
        elif v == "disk":
            types.add("disk")
        else:
            types.add(torch.device(v).type)
    return types


class TpdeHfQuantizer(HfQuantizer):
    """transformers quantizer for tpde repos (see the module docstring)."""

    requires_calibration = False
    quantization_config: TpdeConfig

    def __init__(self, quantization_config: TpdeConfig, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)
        if not self.pre_quantized:
            raise ValueError(
                "tpde: TpdeConfig loads tpde repos (config.json with quantization_config.quant_method='tpde'); "
                "this checkpoint is a dense model. Convert it first: "
                "`from tpde_hf.conversion import convert; convert(local_folder, out_dir)` (or `tpde convert`)."
            )
        self._errors: list[Exception] = []
        from tpde_hf.reference.load import warm_up_reference_decode

        warm_up_reference_decode(self)  # a delta repo: its decode kernels load while transformers sets up
        self._plan: Any = None
        self._dtype: torch.dtype | None = None
        self._original_converters: dict[int, Any] = {}
        self._holders: dict[str, nn.Module] = {}

    # ------------------------------------------------------------------ environment and dtype
    def validate_environment(self, *args: Any, device_map: Any = None, **kwargs: Any) -> None:
        cfg = self.quantization_config
        cfg.check_format("config.json (quantization_config)")
        cfg.check_requested_format()
        cfg._check_mode()
        try:
            types = _device_types(device_map)
        except (RuntimeError, TypeError, ValueError):
            raise ValueError(f"tpde: cannot tell which devices device_map={device_map!r} uses") from None
        unknown = types - set(_KNOWN_DEVICE_TYPES)
        if unknown:
            raise ValueError(
                f"tpde: device type(s) {sorted(unknown)} are not supported; tpde models run on CUDA GPUs "
                "(Triton kernels or the torch path) and on CPU, MPS and XPU (torch path)"
            )
        if cfg.mode is None:
            cfg.mode = DEFAULT_GPU_MODE if "cuda" in types else DEFAULT_CPU_MODE
        if cfg.mode == "lossless-offload" and ("cuda" not in types or not torch.cuda.is_available()):
            raise RuntimeError(
                "tpde: mode 'lossless-offload' keeps the delta in pinned host memory and streams it to a CUDA GPU, "
                f"but this load has no CUDA device (device_map={device_map!r}, "
                f"torch.cuda.is_available()={torch.cuda.is_available()}). On this machine use mode='dequantize' "
                "(the CPU default) or mode='lossless'; 'lossless-offload' runs with device_map='cuda' or 'auto' "
                "on a machine with an NVIDIA GPU."
            )
        if cfg.verify and cfg.mode == "base":
            raise ValueError(
                "tpde: verify=True checks decoded weights against the original checksums, but mode='base' never "
                "reads the delta; use verify with mode 'lossless', 'lossless-offload' or 'dequantize'"
            )

    def update_dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        if dtype is None:
            src = self.quantization_config.source_dtype
            dtype = getattr(torch, src) if isinstance(src, str) and hasattr(torch, src) else torch.bfloat16
        self._dtype = dtype
        return dtype

    # ------------------------------------------------------------------ before loading: replace modules
    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files: list[str] | None = None,
                                             **kwargs: Any) -> nn.Module:
        from tpde_hf.load_messages import watch_load
        from tpde_hf.loading import read_checkpoint_index

        watch_load(self, model)  # a recorded error hides transformers' load report of this load

        files = [str(f) for f in (checkpoint_files or [])]
        self._tpde_checkpoint_files = files  # the shards of this load (the reference decode pool reads its blobs ahead)
        if not files:
            raise TpdeFormatError("config.json", "tpde repo without safetensors weights (model.safetensors missing)")
        from tpde_hf.reference.load import start_reference_prefetch

        start_reference_prefetch(self)  # a delta repo: its decode runs from here on, beside transformers' set-up
        index = read_checkpoint_index(files)
        from tpde_hf.integrity import check_checkpoint
        from tpde_hf.loading import DELTA_SUFFIXES, build_load_plan

        cfg = self.quantization_config  # every stored byte this load reads must match its checksum (base: no delta)
        check_checkpoint(files, integrity=cfg.integrity, enabled=getattr(cfg, "check_integrity", True),
                         skip_suffixes=DELTA_SUFFIXES if cfg.mode == "base" else (),
                         skip_storage_delta=cfg.mode == "base")

        plan = build_load_plan(model, index)
        from tpde_hf.reference.load import has_reference_parts

        if plan.empty and not has_reference_parts(index):  # a delta repo may store no standalone tpde weight
            raise TpdeFormatError(
                files[0], "no tpde tensors (X.qweight, X.scales, ... X.meta) in the checkpoint: not a tpde repo, "
                "or an incomplete download"
            )
        self._plan = plan
        mode = self.quantization_config.mode
        if mode == "dequantize":
            return model
        if plan.dense_fused_targets:
            raise TpdeFormatError(
                sorted(plan.dense_fused_targets)[0],
                f"this parameter is built from both tpde and dense checkpoint tensors; mode={mode!r} cannot hold it. "
                "Load with TpdeConfig(mode='dequantize').",
            )
        self._replace_modules(model, plan, mode)
        for prefix, holder in self._holders.items():  # storage-laid: its delta parts are rebuilt at load
            holder.__dict__["_tpde_storage"] = plan.weights[prefix].storage
        if mode in ("base", "lossless-offload"):
            ignore = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])
            ignore.add(r"\.(delta|lanes|tables)$")
            ignore.add(r"\.tpde_storage\.[a-z0-9-]+\.(?!meta$|base_)\w+$")  # storage parts beside the base
            model._keys_to_ignore_on_load_unexpected = ignore
        return model

    def _replace_modules(self, model: nn.Module, plan: Any, mode: str) -> None:
        from transformers.pytorch_utils import Conv1D

        from tpde_hf.loading import BASE_SUFFIXES
        from tpde_hf.nn.fused import HookTarget, attach_param_hook
        from tpde_hf.nn.linear import TpdeLinear, TpdeWeightStore, register_parts, set_tpde_attrs
        from tpde_hf.nn.weight_access import remember_parent

        suffixes = SUFFIXES if mode == "lossless" else BASE_SUFFIXES
        tied = set()
        for k, v in (getattr(model, "all_tied_weights_keys", None) or {}).items():
            tied.update((k, v))
        dtype = self._dtype
        for d in plan.direct:
            wname = f"{d.module_path}.weight"
            if wname in tied:
                raise TpdeFormatError(
                    d.weight.name,
                    f"is stored in tpde form but {wname} is tied to another weight; mode={mode!r} cannot share it. "
                    "Load with TpdeConfig(mode='dequantize') (or convert with the tied weight kept dense).",
                )
            module = model.get_submodule(d.module_path)
            specs = d.weight.specs(suffixes)
            parent_path, _, child = d.module_path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            if _computes_as_linear(module, Conv1D):
                transposed = isinstance(module, Conv1D)
                w = module.weight
                in_f, out_f = (w.shape[0], w.shape[1]) if transposed else (w.shape[1], w.shape[0])
                bias = module.bias
                new = TpdeLinear(in_f, out_f, bias is not None, specs, mode, d.weight.name, dtype or w.dtype,
                                 transposed, device="meta", bias_dtype=bias.dtype if bias is not None else None)
                if bias is not None:
                    new.bias = bias
                new.train(module.training)
                parent._modules[child] = new
                remember_parent(new, parent)  # where model code reads `.weight` (T5's wo, MHA's out_proj)
                _mark_initialized(new, parent)
                self._holders[d.weight.prefix] = new
            else:  # any other module: its weight is rebuilt by a forward hook
                w = module._parameters["weight"]
                register_parts(module, specs)
                set_tpde_attrs(module, d.weight.name, mode, w.dtype)
                attach_param_hook(module, [HookTarget("weight", None, [("weight", [""])], w.dtype)])
                _mark_initialized(module, parent)
                self._holders[d.weight.prefix] = module
        for f in plan.fused:
            if f.error is not None:
                raise f.error
            host = model.get_submodule(f.host_path)
            pdtype = host._parameters[f.param_name].dtype
            sources = []
            for pattern, weights in f.sources.items():
                paths = []
                for w in weights:
                    rel = f.storage_paths[w.prefix]
                    store = TpdeWeightStore(w.name, w.specs(suffixes), mode, pdtype)
                    _set_submodule(host, rel, store)
                    self._holders[w.prefix] = store
                    paths.append(rel)
                sources.append((pattern, paths))
            attach_param_hook(host, [HookTarget(f.param_name, f.converter, sources, pdtype)])
            _mark_initialized(host)

    # ------------------------------------------------------------------ weight conversions (dequantize mode)
    def get_weight_conversions(self) -> list:
        if not self.quantization_config.dequantize:
            return []
        from transformers.core_model_loading import WeightConverter

        from tpde_hf.loading import TpdeDequantize

        return [WeightConverter(list(SUFFIXES), "weight", [TpdeDequantize(self)], force_cpu=True)]

    def update_weight_conversions(self, weight_conversions: list, model: nn.Module) -> list:
        from tpde_hf.reference.load import reference_converters, reference_info

        # tensors coded against a reference model: decoded in every mode, matched before any other converter
        refs = reference_converters(self) if reference_info(self) is not None else []
        if refs:
            weight_conversions = refs + list(weight_conversions)
        from tpde_hf.storage_loading import storage_converters, storage_dequantize_suffixes

        stored = storage_converters(self, self._plan, self.quantization_config.mode)  # weights laid out by a storage
        if not self.quantization_config.dequantize:
            return stored + list(weight_conversions)
        from transformers.core_model_loading import WeightConverter

        from tpde_hf.loading import TpdeDequantize, expert_stack_dequantize_converter

        storage = storage_dequantize_suffixes(self._plan)
        extra = [s for sfx in storage.values() for s in sfx]
        updated = []
        for conv in weight_conversions:
            sources = getattr(conv, "_original_source_patterns", None)
            if not isinstance(conv, WeightConverter) or not sources or not all(s.endswith(".weight") for s in sources):
                updated.append(conv)
                continue
            all_sources = [s[: -len("weight")] + suffix for s in sources
                           for suffix in ("weight", *SUFFIXES, *extra)]
            new = conv.copy(all_sources, conv._original_target_patterns,
                            operations=[TpdeDequantize(self, None, storage), *conv.operations])
            self._original_converters[id(new)] = conv
            updated.append(new)
        # 3-D expert tensors stored as one tpde weight per expert: first, so that no other converter takes their
        # parts; the longest names first, so that one tensor's name inside another's never takes the other's slices
        stacks = sorted(self._plan.stacks if self._plan is not None else [], key=lambda st: -len(st.renamed))
        stacked = [expert_stack_dequantize_converter(st, self) for st in stacks]
        return stacked + updated + stored + self.get_weight_conversions()

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        """True for the delta parts of a weight laid out by a base storage: transformers then accepts their
        rebuilt shapes (unknown before the load, so registered empty) instead of reporting a mismatch."""
        path, _, leaf = param_name.rpartition(".")
        if leaf not in ("delta", "lanes", "tables"):
            return False
        try:
            return model.get_submodule(path).__dict__.get("_tpde_storage") is not None
        except AttributeError:
            return False

    def record_error(self, exc: Exception) -> None:
        """Called by the load ops: the first error is raised after loading, with its own message.

        Until then transformers' load report of this load is not printed (it would list the damaged
        weight as "MISSING ... newly initialized"): see :mod:`tpde_hf.load_messages`.
        """
        self._errors.append(exc)

    # ------------------------------------------------------------------ after loading
    def remove_quantization_config(self, model: nn.Module) -> None:
        """transformers (5.2x) drops the quantization config of a dequantized model, and with it the
        weight conversions it loaded through; without them ``save_pretrained`` would not write the
        checkpoint's original key layout (e.g. per-expert MoE weights). Keep them:
        :meth:`_restore_converters` then takes the tpde ops out."""
        conversions = getattr(model, "_weight_conversions", None)
        super().remove_quantization_config(model)
        if conversions is not None:
            model._weight_conversions = conversions

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        from tpde_hf.load_messages import end_watch

        end_watch(self)
        if self._errors:
            raise self._errors[0]
        from tpde_hf.reference.load import strip_converters

        strip_converters(model)  # a loaded model saves its reference-coded tensors dense
        from tpde_hf.storage_loading import strip_storage_converters

        strip_storage_converters(model)  # the model holds the resident layout whatever the repo's storage
        cfg = self.quantization_config
        if cfg.dequantize:
            self._restore_converters(model)
            return model
        from tpde_hf.nn.linear import validate_holder

        for holder in self._holders.values():
            _own_cpu_parts(holder)
            validate_holder(holder)
        if cfg.verify and cfg.mode == "lossless":
            self._verify(model)
        if cfg.mode == "lossless-offload":
            from tpde_hf.nn.offload import setup_offload

            setup_offload(self._holders, self._plan.weights, verify=cfg.verify)
        for holder in self._holders.values():
            holder.__dict__["_tpde_fused_gemv"] = bool(cfg.fused_gemv)
        if cfg.mode == "lossless":
            self._pack_for_gpu()
        cfg.storage = None  # a loaded model holds, and saves, the resident layout (whatever the repo's storage)
        _wrap_save_pretrained(model)
        return model

    def _pack_for_gpu(self) -> None:
        """On CUDA with the kernels: build each layer's packed form now and keep the file-form delta on the host.

        The kernels decode from their own delta layout, so keeping the stored ``delta, lanes, tables``
        on the GPU as well would hold the delta twice; they move to host memory (``save_pretrained``
        still finds them there).
        """
        from tpde_hf.nn.linear import DELTA_SUFFIXES, _kernels, _packed

        for holder in self._holders.values():
            device = holder._parameters["qweight"].device
            tk = _kernels(device)
            if tk is None:
                continue
            _packed(holder, tk, device)
            for s in DELTA_SUFFIXES:
                p = holder._parameters[s]
                holder._parameters[s] = nn.Parameter(p.data.to("cpu"), requires_grad=False)

    def _verify(self, model: nn.Module) -> None:
        from tpde_hf.nn.linear import encoded_of

        batch, size = [], 0
        for holder in self._holders.values():
            if holder._parameters["meta"].device.type == "meta":
                continue
            enc = encoded_of(holder)
            batch.append(enc)
            size += enc.numel
            if size >= _DECODE_CHUNK_ELEMENTS:
                decode_tensors(batch, verify=True)
                batch, size = [], 0
        decode_tensors(batch, verify=True)

    def _restore_converters(self, model: nn.Module) -> None:
        """A dequantized model saves as a plain one: drop the tpde ops from its saved conversions."""
        from tpde_hf.loading import TpdeDequantize

        kept = []
        for conv in getattr(model, "_weight_conversions", None) or []:
            ops = getattr(conv, "operations", [])
            original = self._original_converters.get(id(conv))
            if original is not None:
                original._was_used = True
                kept.append(original)
            elif any(isinstance(op, TpdeDequantize) for op in ops):
                continue
            else:
                kept.append(conv)
        model._weight_conversions = kept

    # ------------------------------------------------------------------ dequantize / serialization
    def _dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        from tpde_hf.nn.fused import detach_param_hook
        from tpde_hf.nn.linear import TpdeLinear

        if self.quantization_config.mode == "base":
            raise ValueError(
                "tpde: this model was loaded with mode='base', so its delta was never read and the original weights "
                "cannot be rebuilt. Reload with TpdeConfig(mode='lossless') or TpdeConfig(mode='dequantize')."
            )
        for holder in self._holders.values():
            for p in holder.parameters(recurse=False):
                if p.device.type == "meta":
                    raise ValueError(
                        "tpde: model.dequantize() needs every weight in memory, but some are offloaded to disk; "
                        "load with TpdeConfig(mode='dequantize') instead"
                    )
        hosts = []
        for name, module in list(model.named_modules()):
            if isinstance(module, TpdeLinear):
                dense = module.dense_module()
                if dtype is not None and dense.weight.dtype != dtype:
                    dense = dense.to(dtype)
                _set_submodule(model, name, dense)
            elif "_tpde_param_hook" in module.__dict__:
                hosts.append(module)
        for host in hosts:
            detach_param_hook(host)
        self._holders.clear()
        model.__dict__.pop("save_pretrained", None)
        return model

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        if self.quantization_config.mode == "base":
            from transformers.utils import logging

            logging.get_logger(__name__).warning(
                "tpde: a model loaded with mode='base' has no delta and cannot be saved as a tpde repo; "
                "reload with mode='lossless' to save it"
            )
            return False
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


def _own_cpu_parts(holder: nn.Module) -> None:
    """Copy CPU parts out of the checkpoint's memory map into ordinary memory.

    transformers leaves CPU tensors as views of the mmapped safetensors file. The per-forward
    reconstruction reads every part at every step, and reading file-backed pages measured 10-30x
    slower than private memory here (the pages can be reclaimed and faulted in again).
    """
    from tpde_hf.codec import SUFFIXES

    for name in SUFFIXES:
        p = holder._parameters.get(name)
        if p is not None and p.device.type == "cpu":
            holder._parameters[name] = nn.Parameter(p.data.clone(memory_format=torch.contiguous_format),
                                                    requires_grad=False)


def _computes_as_linear(module: nn.Module, conv1d: type) -> bool:
    """Whether ``module`` is an ``nn.Linear`` / ``Conv1D``, or a subclass that computes exactly as one (it keeps
    their ``forward``), e.g. ``nn.MultiheadAttention``'s ``out_proj`` (``NonDynamicallyQuantizableLinear``).

    Such a module becomes a :class:`~tpde_hf.nn.TpdeLinear`, whose ``weight`` model code can read; a subclass
    with its own ``forward`` keeps its class, and a forward hook rebuilds its weight.
    """
    return any(isinstance(module, base) and type(module).forward is base.forward for base in (nn.Linear, conv1d))


def _mark_initialized(*modules: nn.Module) -> None:
    """Keep transformers' weight init (run after loading) away from modules whose weights are tpde parts.

    ``_init_weights`` of a layer may touch its children's ``weight`` (GPT-2's ``c_proj``) or its fused
    parameters (MoE experts), which a tpde layer does not have as tensors.
    """
    for m in modules:
        m._is_hf_initialized = True


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Set ``root.<path> = module``, creating empty containers for missing intermediate names."""
    parts = path.split(".")
    node = root
    for p in parts[:-1]:
        child = node._modules.get(p)
        if child is None:
            child = nn.Module()
            node._modules[p] = child
        node = child
    node._modules[parts[-1]] = module


def _wrap_save_pretrained(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` also write ``tpde_manifest.json`` (checksums of the original tensors) and
    the per-tensor checksums of :mod:`tpde_hf.integrity` into the saved shards."""
    if "save_pretrained" in model.__dict__:
        return
    original = model.save_pretrained

    @functools.wraps(original)
    def save_pretrained(save_directory: str | os.PathLike, *args: Any, **kwargs: Any):
        from tpde_hf.loading import write_manifest

        if kwargs.get("push_to_hub"):
            from transformers.utils import logging

            logging.get_logger(__name__).warning(
                "tpde: push_to_hub uploads before tpde_manifest.json is written; save locally, then upload the folder"
            )
        result = original(save_directory, *args, **kwargs)
        if getattr(model, "hf_quantizer", None) is not None:
            write_manifest(os.fspath(save_directory))
            from tpde_hf.integrity import add_repo_checksums

            add_repo_checksums(save_directory)  # the shards transformers wrote carry no tpde checksums
        return result

    model.__dict__["save_pretrained"] = save_pretrained


def register() -> None:
    """Register ``TpdeConfig`` and ``TpdeHfQuantizer`` with transformers under ``quant_method="tpde"``.

    Idempotent. Also lets a ``TpdeConfig`` passed to ``from_pretrained`` carry runtime options
    (``mode``, ``verify``) over the stored config. Example::

        from tpde_hf.quantizer import register
        register()
    """
    from transformers.quantizers import auto

    if auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not TpdeConfig:
        auto.AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        auto.register_quantization_config(QUANT_METHOD)(TpdeConfig)
    if auto.AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not TpdeHfQuantizer:
        auto.AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        auto.register_quantizer(QUANT_METHOD)(TpdeHfQuantizer)
    if TpdeConfig not in auto.LOADING_ATTRIBUTES_CONFIG_TYPES:
        auto.LOADING_ATTRIBUTES_CONFIG_TYPES = (*auto.LOADING_ATTRIBUTES_CONFIG_TYPES, TpdeConfig)
    from tpde_hf.load_messages import install

    install(auto)  # merge a passed TpdeConfig without transformers' "will be overwritten" warning
    from tpde_hf import load_guard

    load_guard.install()  # a tpde checkpoint read without this quantizer (damaged config.json) raises


def is_registered() -> bool:
    """Whether transformers currently resolves ``quant_method="tpde"`` to this quantizer."""
    import sys

    auto = sys.modules.get("transformers.quantizers.auto")
    return auto is not None and auto.AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is TpdeHfQuantizer


register()
