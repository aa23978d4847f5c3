"""Refuse a load that reads a tpde checkpoint without the tpde quantizer (a damaged ``config.json``).

The checksums of :mod:`tpde_hf.integrity` protect the shards, but they are checked by the tpde
quantizer, and transformers picks the quantizer from ``config.json``. When the config is damaged so
that it no longer names tpde (a flipped bit in the ``"quantization_config"`` key or in
``"quant_method": "tpde"``; 6% of single-bit flips of that object, measured by
``tests/test_integrity.py``), transformers loads the repo as a dense model: every weight stored in
tpde form is "missing", gets a random init, and the load only logs a report.

:func:`install` wraps transformers' ``log_state_dict_report`` (``transformers/utils/loading_report.py``),
which every load calls once its weights are in, so that such a load raises
:class:`~tpde_hf.errors.TpdeFormatError` naming ``config.json`` before any report is printed: its
unexpected keys hold whole sets of tpde parts (``X.qweight`` ... ``X.meta``) while the model's config
is not a :class:`~tpde_hf.config.TpdeConfig`. Loads of other checkpoints are untouched (one pass over
their unexpected keys). Why that function: it is looked up as a module global at call time, so
wrapping it in ``loading_report`` (before ``modeling_utils`` imports it: registration runs while
``modeling_utils`` imports the quantizers, above that line) and in ``modeling_utils`` (when already
imported) covers every import order, where a method of ``PreTrainedModel`` would not yet exist.

Example::

    from tpde_hf.loading.guard import install
    install()   # what tpde_hf.quantizer.register() does
"""

from __future__ import annotations

import functools
from collections.abc import Collection
from typing import Any

from tpde_hf.codec import SUFFIXES
from tpde_hf.errors import TpdeFormatError

_FLAG = "_tpde_plain_load_guard"


def tpde_prefixes(keys: Collection[str]) -> list[str]:
    """Prefixes ``X`` for which ``keys`` hold all seven tpde parts ``X.qweight`` ... ``X.meta``, or a base
    storage's parts (``X.tpde_storage.S.meta`` ...)."""
    from tpde_hf.codec.registry import STORAGE_TOKEN

    keys = set(keys)
    stems = (k[: -len(".meta")] for k in keys if k.endswith(".meta"))
    # a weight laid out by a base storage (X.tpde_storage.S.meta ...) counts as well
    stored = {k.split(f".{STORAGE_TOKEN}.")[0] for k in keys if f".{STORAGE_TOKEN}." in k and k.endswith(".meta")}
    return sorted({p for p in stems if all(f"{p}.{s}" in keys for s in SUFFIXES)} | stored)


def refuse_plain_load(model: Any, unexpected_keys: Collection[str]) -> None:
    """Raise when ``model`` was loaded without the tpde quantizer from a checkpoint holding tpde weights."""
    from tpde_hf.config import TpdeConfig

    config = getattr(model, "config", None)
    if isinstance(getattr(config, "quantization_config", None), TpdeConfig):
        return
    prefixes = tpde_prefixes(unexpected_keys)
    if prefixes:
        raise TpdeFormatError(
            "config.json",
            f"the checkpoint stores {len(prefixes)} weights in tpde form (e.g. {prefixes[0]}.qweight ... .meta), but "
            "config.json has no quantization_config with quant_method 'tpde', so transformers would give them random "
            "values: config.json is damaged or was edited. Download it again (force_download=True) or restore its "
            "quantization_config.",
        )


def install() -> None:
    """Wrap transformers' ``log_state_dict_report`` with :func:`refuse_plain_load` (idempotent)."""
    import sys

    from transformers.utils import loading_report

    current = getattr(loading_report, "log_state_dict_report", None)
    if current is None:
        return  # a transformers without this step: nothing to hook (the load then only logs its report)
    if not getattr(current, _FLAG, False):
        original = current

        @functools.wraps(original)
        def log_state_dict_report(*args: Any, **kwargs: Any) -> Any:
            model = kwargs["model"] if "model" in kwargs else (args[0] if args else None)
            info = kwargs["loading_info"] if "loading_info" in kwargs else (args[3] if len(args) > 3 else None)
            refuse_plain_load(model, getattr(info, "unexpected_keys", None) or ())
            return original(*args, **kwargs)

        setattr(log_state_dict_report, _FLAG, True)
        loading_report.log_state_dict_report = current = log_state_dict_report
    modeling_utils = sys.modules.get("transformers.modeling_utils")
    if modeling_utils is not None and hasattr(modeling_utils, "log_state_dict_report"):
        modeling_utils.log_state_dict_report = current  # already imported under that name
