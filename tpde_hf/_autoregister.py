"""Register tpde with transformers whenever ``transformers.quantizers.auto`` is imported.

Without registration, transformers 5.x meets ``quant_method: "tpde"``, only warns
"Unknown quantization type ... we will skip the quantization" and builds the model with
*random* weights. tpde-hf therefore hooks the import of ``transformers.quantizers.auto``:

* ``import tpde_hf`` calls :func:`install`: it registers at once when transformers'
  quantizer registry is already imported, and otherwise puts a tiny finder first on
  ``sys.meta_path`` that registers right after the registry module has executed;
* installing the package (``pip install tpde-hf`` or ``pip install -e .``) also puts
  ``tpde_hf-autoregister.pth`` (:data:`PTH_CONTENT`) into site-packages, so the same finder is in
  place in every interpreter, before any user code runs, even when ``tpde_hf`` is never
  imported. At start-up it only defines a class and prepends it to ``sys.meta_path`` (no file
  access, no import); it imports ``tpde_hf`` only when transformers' registry is imported.

Set ``TPDE_HF_NO_AUTOREGISTER=1`` to turn the ``.pth`` hook off. This module imports nothing
heavy at module level so that the build backend can read :data:`PTH_CONTENT` from it.

Example::

    from tpde_hf._autoregister import install
    install()   # what `import tpde_hf` does
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

TARGET = "transformers.quantizers.auto"
PTH_NAME = "tpde_hf-autoregister.pth"
HOOK_FLAG = "_tpde_hf_hook"

# One line (site.py executes lines that start with "import"). It must stay cheap, must never
# raise (an error in a .pth line is printed at every interpreter start) and must be idempotent
# (site.py may process the same site-packages twice, e.g. through a venv's lib64 -> lib link).
PTH_CONTENT = (
    "import os, sys; exec(\"class _TpdeHfAutoRegister:\\n"
    "    _tpde_hf_hook = True\\n"
    "    @staticmethod\\n"
    "    def find_spec(name, path=None, target=None):\\n"
    "        if name != 'transformers.quantizers.auto':\\n"
    "            return None\\n"
    "        try:\\n"
    "            from tpde_hf._autoregister import find_wrapped_spec\\n"
    "        except Exception:\\n"
    "            return None\\n"
    "        return find_wrapped_spec(name, path, target)\\n"
    "sys.meta_path.insert(0, _TpdeHfAutoRegister)\\n\") "
    "if not os.environ.get('TPDE_HF_NO_AUTOREGISTER') "
    "and not any(getattr(f, '_tpde_hf_hook', False) for f in sys.meta_path) else None\n"
)


def _register_quietly() -> bool:
    """Register tpde; never let a failure break the import of transformers (warn instead)."""
    mod = sys.modules.get("tpde_hf.quantizer")
    if mod is not None and not hasattr(mod, "register"):
        return False  # tpde_hf.quantizer is being imported: it registers itself when it finishes
    try:
        from tpde_hf.quantizer import register

        register()
        return True
    except Exception as exc:  # pragma: no cover - depends on a broken install
        warnings.warn(
            f"tpde-hf could not register its quantizer with transformers ({exc!r}); tpde repos would load with "
            "random weights. `import tpde_hf` explicitly before `from_pretrained` and check the install.",
            RuntimeWarning,
            stacklevel=2,
        )
        return False


class AfterExecLoader:
    """Wraps a module's real loader and calls ``then(module)`` once the module has executed (an import hook)."""

    def __init__(self, inner: Any, then: Any):
        self._inner = inner
        self._then = then

    def create_module(self, spec: Any) -> Any:
        return self._inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._inner.exec_module(module)
        self._then(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def spec_then(name: str, path: Any, target: Any, flag: str, then: Any) -> Any:
    """The spec that the other finders (those without the attribute ``flag``) give ``name``, its loader wrapped
    to call ``then(module)`` after the module executed; None if no finder knows ``name``.

    Example: ``spec_then("transformers.quantizers.auto", None, None, HOOK_FLAG, lambda m: ...)``.
    """
    for finder in list(sys.meta_path):
        if getattr(finder, flag, False):
            continue
        find_spec = getattr(finder, "find_spec", None)
        if find_spec is None:
            continue
        spec = find_spec(name, path, target)
        if spec is not None:
            break
    else:
        return None
    if spec.loader is not None and hasattr(spec.loader, "exec_module"):
        spec.loader = AfterExecLoader(spec.loader, then)
    return spec


def find_wrapped_spec(name: str, path: Any = None, target: Any = None) -> Any:
    """The real spec of ``name`` from the other finders, with a loader that registers tpde afterwards."""
    if name != TARGET:
        return None
    return spec_then(name, path, target, HOOK_FLAG, lambda _module: _register_quietly())


class _TpdeRegisterFinder:
    """The in-process twin of the ``.pth`` finder, installed by ``import tpde_hf``."""

    _tpde_hf_hook = True

    @staticmethod
    def find_spec(name: str, path: Any = None, target: Any = None) -> Any:
        if name != TARGET:
            return None
        return find_wrapped_spec(name, path, target)


def install() -> None:
    """Register now if transformers' registry is loaded, else hook its import (idempotent)."""
    if TARGET in sys.modules:
        _register_quietly()
        return
    if not any(getattr(f, HOOK_FLAG, False) for f in sys.meta_path):
        sys.meta_path.insert(0, _TpdeRegisterFinder)
