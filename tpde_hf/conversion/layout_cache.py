"""Model layouts kept on disk, so that the next conversion of the same architecture skips its build.

Finding the linear-like weights means importing transformers' modeling code and building the
model on the meta device: about 2 s of one core on a small machine, the longest single step when
converting a small model. The result is a pure function of the ``config.json`` bytes, the
checkpoint's tensor names, the custom code next to it (``*.py``, for ``trust_remote_code``) and
the transformers version, so it is kept under a key hashed from exactly those: fine-tunes of one
base model, a second group size or a re-run all find it. A key is never reused across transformers
or tpde-hf versions, nor across changes of the code that builds layouts.

Where: ``TPDE_LAYOUT_CACHE`` (a folder; ``off`` disables the cache), else
``$HF_HOME/tpde_hf/layouts``. A damaged or unreadable entry is ignored and rebuilt.

Example::

    layout, hit = cached_layout(folder, trust_remote_code=False, build=load_layout, keys=["model.norm.weight", ...])
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from tpde_hf.conversion import model_layout
from tpde_hf.conversion.model_layout import ModelLayout
from tpde_hf.errors import TpdeFormatError

logger = logging.getLogger("tpde_hf.conversion")

_ENTRY_VERSION = 2  # 2: roles of the checkpoint's keys


def cache_dir() -> Path | None:
    """The cache folder, or None when ``TPDE_LAYOUT_CACHE=off``."""
    env = os.environ.get("TPDE_LAYOUT_CACHE", "").strip()
    if env.lower() in ("off", "0", "false", "no"):
        return None
    if env:
        return Path(env).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "tpde_hf" / "layouts"


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "none"


def layout_key(folder: Path, trust_remote_code: bool, keys: Iterable[str] | None = None) -> str:
    """Hash of everything the layout depends on (read from files only: no transformers import).

    ``keys``: the checkpoint's tensor names (default: those of ``folder``'s safetensors files)."""
    h = hashlib.sha256()
    for part in (f"entry={_ENTRY_VERSION}", f"transformers={_version('transformers')}",
                 f"tpde-hf={_version('tpde-hf')}", f"trust_remote_code={bool(trust_remote_code)}"):
        h.update(part.encode() + b"\0")
    here = Path(model_layout.__file__)
    for built_by in (here, here.parents[1] / "loading" / "plan.py"):  # how layouts are built (KeyMap: loading/plan.py)
        h.update(built_by.read_bytes())
    h.update((folder / "config.json").read_bytes())
    names = sorted(keys) if keys is not None else sorted(model_layout._checkpoint_keys(folder))
    h.update(b"\0keys\0" + "\n".join(names).encode())
    for code in sorted(folder.glob("*.py")):  # custom modeling code
        h.update(b"\0" + code.name.encode() + b"\0" + code.read_bytes())
    return h.hexdigest()


def _to_json(layout: ModelLayout) -> str:
    return json.dumps({"entry": _ENTRY_VERSION, **layout.to_dict()})


def _from_json(text: str) -> ModelLayout:
    d = json.loads(text)
    if d.get("entry") != _ENTRY_VERSION or not isinstance(d.get("linear"), list) or "roles" not in d:
        raise ValueError("not a layout entry of this version")
    return ModelLayout.from_dict(d)


def cached_layout(folder: Path, *, trust_remote_code: bool, build: Callable[..., ModelLayout],
                  keys: Iterable[str] | None = None) -> tuple[ModelLayout, bool]:
    """``(layout, hit)``: the stored layout of ``folder``'s config and ``keys``, else ``build(folder, ...)``, stored."""
    keys = list(keys) if keys is not None else None
    root = cache_dir()
    if root is None:
        return build(folder, keys=keys, trust_remote_code=trust_remote_code), False
    try:
        entry = root / f"{layout_key(folder, trust_remote_code, keys)}.json"
    except (OSError, TpdeFormatError):  # no readable config.json or checkpoint: let the build report it
        return build(folder, keys=keys, trust_remote_code=trust_remote_code), False
    try:
        return _from_json(entry.read_text()), True
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.debug("ignoring the damaged layout cache entry %s (%s)", entry, exc)
    layout = build(folder, keys=keys, trust_remote_code=trust_remote_code)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f"{entry.name}.{os.getpid()}.tmp")
        tmp.write_text(_to_json(layout))
        os.replace(tmp, entry)  # readers see a whole entry or none
    except OSError as exc:
        logger.debug("cannot store the layout in %s (%s)", root, exc)
    return layout, False
