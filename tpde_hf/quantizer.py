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

The hooks stay on the class; what they run lives in one module per job: :mod:`tpde_hf.loading.env` (devices
and mode), :mod:`tpde_hf.loading.module_swap` (layers in and out), :mod:`tpde_hf.loading.converters` (the ``dequantize``
converters) and :mod:`tpde_hf.loading.after_load` (the loaded layers). The reference-repo hooks are the
``tpde_hf.reference.load`` calls in ``__init__`` and ``_process_model_before_weight_loading``.

Example::

    import tpde_hf  # registers the quantizer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained("some/tpde-repo")                     # auto mode
    model = AutoModelForCausalLM.from_pretrained("some/tpde-repo", quantization_config=tpde_hf.TpdeConfig(mode="base"))
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.quantizers.base import HfQuantizer

from tpde_hf.config import TpdeConfig
from tpde_hf.errors import TpdeFormatError
from tpde_hf.format import QUANT_METHOD
from tpde_hf.loading.env import check_environment


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
        check_environment(self.quantization_config, device_map)  # also resolves mode=None to the device default

    def update_dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        if dtype is None:
            src = self.quantization_config.source_dtype
            dtype = getattr(torch, src) if isinstance(src, str) and hasattr(torch, src) else torch.bfloat16
        self._dtype = dtype
        return dtype

    # ------------------------------------------------------------------ before loading: replace modules
    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files: list[str] | None = None,
                                             **kwargs: Any) -> nn.Module:
        from tpde_hf.loading.messages import watch_load
        from tpde_hf.loading.ops import read_checkpoint_index

        watch_load(self, model)  # a recorded error hides transformers' load report of this load

        files = [str(f) for f in (checkpoint_files or [])]
        self._tpde_checkpoint_files = files  # the shards of this load (the reference decode pool reads its blobs ahead)
        if not files:
            raise TpdeFormatError("config.json", "tpde repo without safetensors weights (model.safetensors missing)")
        from tpde_hf.reference.load import start_reference_prefetch

        start_reference_prefetch(self)  # a delta repo: its decode runs from here on, beside transformers' set-up
        index = read_checkpoint_index(files)
        from tpde_hf.integrity import check_checkpoint
        from tpde_hf.loading.ops import DELTA_SUFFIXES, build_load_plan

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
        from tpde_hf.loading.module_swap import replace_modules

        replace_modules(model, plan, mode, self._dtype, self._holders)
        for prefix, holder in self._holders.items():  # storage-laid: its delta parts are rebuilt at load
            holder.__dict__["_tpde_storage"] = plan.weights[prefix].storage
        if mode in ("base", "lossless-offload"):
            ignore = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])
            ignore.add(r"\.(delta|lanes|tables)$")
            ignore.add(r"\.tpde_storage\.[a-z0-9-]+\.(?!meta$|base_)\w+$")  # storage parts beside the base
            model._keys_to_ignore_on_load_unexpected = ignore
        return model

    # ------------------------------------------------------------------ weight conversions (dequantize mode)
    def get_weight_conversions(self) -> list:
        if not self.quantization_config.dequantize:
            return []
        from tpde_hf.loading.converters import catch_all_converters

        return catch_all_converters(self)

    def update_weight_conversions(self, weight_conversions: list, model: nn.Module) -> list:
        from tpde_hf.reference.load import reference_converters, reference_info

        # tensors coded against a reference model: decoded in every mode, matched before any other converter
        refs = reference_converters(self) if reference_info(self) is not None else []
        if refs:
            weight_conversions = refs + list(weight_conversions)
        from tpde_hf.loading.storage_ops import storage_converters, storage_dequantize_suffixes

        stored = storage_converters(self, self._plan, self.quantization_config.mode)  # weights laid out by a storage
        if not self.quantization_config.dequantize:
            return stored + list(weight_conversions)
        from tpde_hf.loading.converters import dequantize_converters

        stacks = self._plan.stacks if self._plan is not None else []
        first = dequantize_converters(self, weight_conversions, storage_dequantize_suffixes(self._plan), stacks,
                                      self._original_converters)
        return first + stored + self.get_weight_conversions()

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
        weight as "MISSING ... newly initialized"): see :mod:`tpde_hf.loading.messages`.
        """
        self._errors.append(exc)

    # ------------------------------------------------------------------ after loading
    def remove_quantization_config(self, model: nn.Module) -> None:
        """transformers (5.2x) drops the quantization config of a dequantized model, and with it the
        weight conversions it loaded through; without them ``save_pretrained`` would not write the
        checkpoint's original key layout (e.g. per-expert MoE weights). Keep them:
        :func:`~tpde_hf.loading.converters.restore_converters` then takes the tpde ops out."""
        conversions = getattr(model, "_weight_conversions", None)
        super().remove_quantization_config(model)
        if conversions is not None:
            model._weight_conversions = conversions

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        from tpde_hf.loading.messages import end_watch

        end_watch(self)
        if self._errors:
            from tpde_hf.loading.storage_prefetch import close

            close(self)  # the failed load's decode workers stop and drop what they decoded
            raise self._errors[0]
        from tpde_hf.reference.load import strip_converters

        strip_converters(model)  # a loaded model saves its reference-coded tensors dense
        from tpde_hf.loading.storage_ops import strip_storage_converters

        strip_storage_converters(model)  # the model holds the resident layout whatever the repo's storage
        cfg = self.quantization_config
        if cfg.dequantize:
            from tpde_hf.loading.converters import restore_converters

            restore_converters(model, self._original_converters)
            return model
        from tpde_hf.loading.after_load import own_cpu_parts, pack_for_gpu, verify_holders, wrap_save_pretrained
        from tpde_hf.nn.linear import validate_holder

        for holder in self._holders.values():
            own_cpu_parts(holder)
            validate_holder(holder)
        if cfg.verify and cfg.mode == "lossless":
            verify_holders(self._holders)
        if cfg.mode == "lossless-offload":
            from tpde_hf.nn.offload import setup_offload

            setup_offload(self._holders, self._plan.weights, verify=cfg.verify)
        for holder in self._holders.values():
            holder.__dict__["_tpde_fused_gemv"] = bool(cfg.fused_gemv)
        if cfg.mode == "lossless":
            pack_for_gpu(self._holders)  # on CUDA with the kernels: the packed form, file-form delta to the host
        cfg.storage = None  # a loaded model holds, and saves, the resident layout (whatever the repo's storage)
        wrap_save_pretrained(model)
        return model

    # ------------------------------------------------------------------ dequantize / serialization
    def _dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        from tpde_hf.loading.module_swap import dense_model

        return dense_model(model, self._holders, self.quantization_config.mode, dtype)

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
    from tpde_hf.loading.messages import install

    install(auto)  # merge a passed TpdeConfig without transformers' "will be overwritten" warning
    from tpde_hf.loading import guard as load_guard

    load_guard.install()  # a tpde checkpoint read without this quantizer (damaged config.json) raises


def is_registered() -> bool:
    """Whether transformers currently resolves ``quant_method="tpde"`` to this quantizer."""
    import sys

    auto = sys.modules.get("transformers.quantizers.auto")
    return auto is not None and auto.AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is TpdeHfQuantizer


register()
