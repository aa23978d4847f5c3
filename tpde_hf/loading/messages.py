"""What transformers prints around a tpde load: no warning for documented calls, no misleading report.

Two messages of transformers 5.x misled users of tpde repos:

* ``from_pretrained(repo, quantization_config=TpdeConfig(mode=...))``, the documented way to choose a
  runtime mode, made ``AutoHfQuantizer.merge_quantization_configs`` (``transformers/quantizers/auto.py``)
  warn that the passed config "will be overwritten" / "the rest will be ignored". For tpde that merge
  is the design: the runtime fields (``mode``, ``verify``, ...) apply over the stored format fields,
  and a format field that differs from the stored one is refused later
  (:meth:`~tpde_hf.config.TpdeConfig.check_requested_format`). :func:`install` wraps the merge so that
  a ``TpdeConfig`` passed for a tpde repo is merged exactly as transformers does it, without the
  warning; every other quantization method goes through transformers' own merge, warnings included.
* a damaged tensor found while transformers reads the weights is recorded by the quantizer
  (:meth:`~tpde_hf.quantizer.TpdeHfQuantizer.record_error`) and raised after loading, because
  transformers turns an exception raised inside a loading op into a generic "conversion" error. In
  between, ``PreTrainedModel._finalize_model_loading`` logs its "LOAD REPORT" through the
  ``transformers.modeling_utils`` logger (``log_state_dict_report`` in
  ``transformers/utils/loading_report.py``), listing the damaged weight as "MISSING ... newly
  initialized". :class:`LoadReportFilter` drops that report when the tpde load it belongs to holds a
  recorded error, so the first thing the user reads is the tpde error naming the tensor and the file.
  Reports of loads without a recorded error pass untouched.

Example::

    from transformers.quantizers import auto
    from tpde_hf.loading.messages import install
    install(auto)   # what tpde_hf.quantizer.register() does
"""

from __future__ import annotations

import logging
import re
import threading
import weakref
from types import ModuleType
from typing import Any

from tpde_hf.config import TpdeConfig
from tpde_hf.format import QUANT_METHOD

logger = logging.getLogger("tpde_hf")

#: The logger that ``PreTrainedModel._finalize_model_loading`` hands to ``log_state_dict_report``.
REPORT_LOGGER = "transformers.modeling_utils"
_REPORT_MARK = " LOAD REPORT"
_QUIET_FLAG = "_tpde_quiet_merge"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # the report's title is in bold when transformers colours its output
_TRANSFORMERS_RAISES_AFTER = ("CONVERSION:", "MISMATCH:")  # report notes after which log_state_dict_report raises
_watched = threading.local()  # the tpde load running in this thread: (weakref to its quantizer, model class name)


def install(auto: ModuleType) -> None:
    """Wrap transformers' config merge and filter its load report (idempotent).

    ``auto`` is the module ``transformers.quantizers.auto``.
    """
    _install_quiet_merge(auto.AutoHfQuantizer, auto.AutoQuantizationConfig)
    report_logger = logging.getLogger(REPORT_LOGGER)
    if not any(isinstance(f, LoadReportFilter) for f in report_logger.filters):
        report_logger.addFilter(LoadReportFilter())


# ==================================================================== the merge of a passed TpdeConfig
def _is_tpde(stored: Any) -> bool:
    if isinstance(stored, dict):
        return stored.get("quant_method") == QUANT_METHOD
    return isinstance(stored, TpdeConfig)


def merge_tpde_configs(stored: dict | TpdeConfig, passed: TpdeConfig, auto_config: Any) -> TpdeConfig:
    """transformers' merge for a tpde repo, without its warning: the passed runtime fields win.

    ``stored`` is the repo's ``quantization_config`` (a dict from ``config.json``); it is built
    through ``AutoQuantizationConfig.from_dict`` as transformers does.

    Example::

        merged = merge_tpde_configs({"quant_method": "tpde", "format_version": 1}, TpdeConfig(mode="base"),
                                    auto.AutoQuantizationConfig)
        merged.mode   # 'base'
    """
    config = auto_config.from_dict(stored) if isinstance(stored, dict) else stored
    attrs = passed.get_loading_attributes()
    for attr, value in attrs.items():
        setattr(config, attr, value)
    if attrs:
        logger.info("tpde: from_pretrained options %s apply to this load", sorted(attrs))
    return config


def _install_quiet_merge(auto_quantizer: type, auto_config: Any) -> None:
    current = auto_quantizer.__dict__["merge_quantization_configs"]
    original = current.__func__
    if getattr(original, _QUIET_FLAG, False):
        return

    def merge_quantization_configs(cls: type, quantization_config: Any, quantization_config_from_args: Any) -> Any:
        if isinstance(quantization_config_from_args, TpdeConfig) and _is_tpde(quantization_config):
            return merge_tpde_configs(quantization_config, quantization_config_from_args, auto_config)
        return original(cls, quantization_config, quantization_config_from_args)

    merge_quantization_configs.__doc__ = original.__doc__
    setattr(merge_quantization_configs, _QUIET_FLAG, True)
    auto_quantizer.merge_quantization_configs = classmethod(merge_quantization_configs)


# ==================================================================== the load report
def watch_load(quantizer: Any, model: Any) -> None:
    """Mark ``quantizer``'s load of ``model`` as the one running in this thread (before its weights are read)."""
    _watched.load = (weakref.ref(quantizer), type(model).__name__)


def end_watch(quantizer: Any) -> None:
    """The load of ``quantizer`` is past its report (or failed): stop watching it."""
    load = getattr(_watched, "load", None)
    if load is not None and load[0]() is quantizer:
        _watched.load = None


class LoadReportFilter(logging.Filter):
    """Drop transformers' LOAD REPORT of a tpde load whose quantizer recorded an error (the error follows)."""

    def filter(self, record: logging.LogRecord) -> bool:
        load = getattr(_watched, "load", None)
        if load is None:
            return True
        message = record.getMessage()
        if _REPORT_MARK not in message[:300]:
            return True
        _watched.load = None  # one report per load: a later load in this thread is never affected
        quantizer, model_name = load[0](), load[1]
        errors = getattr(quantizer, "_errors", None)
        if not errors or not _ANSI.sub("", message[:300]).startswith(f"{model_name}{_REPORT_MARK}"):
            return True
        # With CONVERSION or MISMATCH entries transformers raises its own error right after the report,
        # pointing at it: then the report stays. Otherwise it goes, and the tpde error is the first word.
        return any(mark in message for mark in _TRANSFORMERS_RAISES_AFTER)
