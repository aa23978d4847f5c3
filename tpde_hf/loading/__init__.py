"""Loading a tpde repository through transformers: one module per job.

* :mod:`~tpde_hf.loading.plan`: which stored weight goes where (headers, key mapping, expert stacks);
* :mod:`~tpde_hf.loading.env`: devices and mode checks before a load;
* :mod:`~tpde_hf.loading.module_swap`: tpde layers in (and out, for ``dequantize``);
* :mod:`~tpde_hf.loading.ops`: the conversion ops transformers runs per weight (``dequantize`` mode);
* :mod:`~tpde_hf.loading.converters`: installing and removing those ops on the model's converters;
* :mod:`~tpde_hf.loading.storage_ops` and :mod:`~tpde_hf.loading.storage_prefetch`: weights laid out by a base
  storage (``narrow-rans``), and their decode on worker threads ahead of transformers;
* :mod:`~tpde_hf.loading.after_load`: checks and packing of the loaded layers;
* :mod:`~tpde_hf.loading.messages` and :mod:`~tpde_hf.loading.guard`: clear errors instead of transformers'
  generic ones.

The hooks that call these stay on :class:`tpde_hf.quantizer.TpdeHfQuantizer`. The public names of
:mod:`~tpde_hf.loading.ops` (and the plan names it re-exports) are importable from here, resolved on first use
so that importing one small module of this package does not import the load path's heavy dependencies.

Example::

    from tpde_hf.loading import build_load_plan, read_checkpoint_index
    plan = build_load_plan(model, read_checkpoint_index(["/repo/model.safetensors"]))
"""

from __future__ import annotations

import importlib
from typing import Any

_SUBMODULES = frozenset({"after_load", "converters", "env", "guard", "messages", "module_swap", "ops", "plan",
                         "storage_ops", "storage_prefetch"})


def __getattr__(name: str) -> Any:
    """``tpde_hf.loading.X`` for a name of :mod:`tpde_hf.loading.ops` (imported on first use)."""
    if name.startswith("__"):
        raise AttributeError(name)
    if name in _SUBMODULES:  # ``from tpde_hf.loading import guard``: the module, without importing ops
        return importlib.import_module(f"{__name__}.{name}")
    ops = importlib.import_module("tpde_hf.loading.ops")
    try:
        return getattr(ops, name)
    except AttributeError:
        raise AttributeError(f"module 'tpde_hf.loading' has no attribute {name!r}") from None
