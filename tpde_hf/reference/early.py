"""Start a delta repo's decode when ``from_pretrained`` reads its ``config.json``, not when the quantizer starts.

In a fresh process, ``from_pretrained`` spends about a second after reading ``config.json`` importing the
model's modules (transformers' configuration, modeling and generation code, torch's compiler stack) before it
builds the quantizer; that is Python on one core. A delta repo's decode
(:class:`tpde_hf.reference.prefetch.Prefetch`) needs no GIL while it decodes, so started at ``config.json`` it
runs on the other core during those imports, instead of after them.

:func:`install` wraps transformers' ``PretrainedConfig.get_config_dict`` (at once if
``transformers.configuration_utils`` is imported, else right after it is, through an import hook). The wrapper
only looks at the config it returns: for a tpde delta repo (``quantization_config.reference``) read inside a
model's ``from_pretrained``, whose weight files are already on disk (a local folder or the Hugging Face cache:
this never downloads), it starts a prefetch and keeps it here. The quantizer's own start
(:func:`tpde_hf.reference.load.load_prefetch`) then :func:`adopt` s it when it names the same files, reference
and download arguments; otherwise the early one is cancelled and a new one is built, as without this module.
Any error here only turns the early start off. ``TPDE_REFERENCE_WORKERS=0`` turns it off too.

The tensors are prepared (:data:`INLINE`) on the loading thread when it reads ``config.json``, then decoded on
one thread while the loading thread imports. A load that fails before its quantizer (so never adopts the early
prefetch) does not leave the decoded tensors held: a small ``tpde-ref-early-watch`` thread closes the prefetch
within :data:`WATCH_S` of that ``from_pretrained`` leaving the stack.

It is opt-in (``TPDE_REFERENCE_EARLY=1`` makes ``import tpde_hf`` call :func:`install`, or call it yourself):
it wraps a transformers function that is not a hook and looks for ``from_pretrained`` on the stack. Measured on
the SmolLM2 pair (2026-12-07, shared 2-core VM): x1.20-1.25 of the dense fine-tune's load against x1.30-1.37
without it (10:14-10:40 UTC); later runs with a faster kernel about even with the default path (x1.15-1.28
against x1.10-1.26, 17:53-19:00 UTC). Why the gain is small: the preparation needs the GIL for ~0.1-0.15 CPU-s
while the loading thread imports, and the early path makes CPython's cyclic GC run one more full pass
(generation 2) inside the load in most runs (7 against 6 per process; ~0.2-0.3 s each at that heap size).

Example::

    from tpde_hf.reference.early import install
    install()   # before from_pretrained
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any

TARGET = "transformers.configuration_utils"
_FLAG = "_tpde_early_reference"
_LOCK = threading.Lock()
_EARLY: dict[tuple, Any] = {}  # key -> Prefetch (at most one: a new start cancels the others)
WATCH_S = 0.1  # how often an early prefetch not yet adopted checks that its from_pretrained still runs
#: prepare the tensors on the loading thread at ``config.json``, in one go (~0.1 CPU-s), rather than on a thread
#: that takes the GIL from the loading thread in 5 ms turns while it imports (measured 19:00 UTC: 3.61 / 3.60 s
#: against 3.85 / 3.64 s threaded, noisy machine); the decode itself needs no GIL and runs on one thread
INLINE = True


def _key(files: list[str], info: dict, download: dict) -> tuple:
    from huggingface_hub import constants

    offline = bool(download.get("local_files_only")) or bool(constants.HF_HUB_OFFLINE)
    return (tuple(os.path.realpath(f) for f in files), json.dumps(info, sort_keys=True, default=str),
            repr(download.get("token")), str(download.get("cache_dir")), offline)


def loading_frame() -> Any:
    """The outermost frame of a model class's ``from_pretrained`` (auto or concrete) on this thread's stack, or
    None (a config read outside a model load)."""
    frame, found = sys._getframe(2), None
    while frame is not None:
        code = frame.f_code
        if code.co_name == "from_pretrained" and code.co_filename.endswith(("auto_factory.py", "modeling_utils.py")):
            found = frame
        frame = frame.f_back
    return found


def on_stack(thread: int, frame_id: int, code: Any) -> bool:
    """Whether the frame ``frame_id`` (running ``code``) is still on thread ``thread``'s stack."""
    frame = sys._current_frames().get(thread)
    while frame is not None:
        if id(frame) == frame_id and frame.f_code is code:
            return True
        frame = frame.f_back
    return False


def _watch(key: tuple, pf: Any, thread: int, frame_id: int, code: Any) -> None:
    """Close the early prefetch ``pf`` once the ``from_pretrained`` that started it has returned or raised without
    adopting it (a load that failed before its quantizer): its decoded tensors are not held until the next load."""
    while True:
        time.sleep(WATCH_S)
        with _LOCK:
            if _EARLY.get(key) is not pf:
                return  # adopted, or cancelled by another start
            if on_stack(thread, frame_id, code):
                continue
            del _EARLY[key]
        pf.close()
        return


def weight_files(path: str, subfolder: str = "", revision: str | None = None,
                 cache_dir: str | None = None) -> list[str]:
    """The safetensors weight files of a local folder or of a Hub repo already in the cache ([] otherwise)."""
    names = ("model.safetensors.index.json", "model.safetensors")
    if os.path.isdir(path):
        folder = os.path.join(path, subfolder or "")
        found = {n: os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))}
        get = found.get
    else:
        from huggingface_hub import try_to_load_from_cache

        def get(name: str) -> str | None:
            try:  # not a repo id (a missing folder, ...): nothing to start from
                hit = try_to_load_from_cache(path, f"{subfolder}/{name}" if subfolder else name,
                                             cache_dir=cache_dir, revision=revision)
            except Exception:
                return None
            return hit if isinstance(hit, str) else None
    index = get(names[0])
    if index is not None:
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f).get("weight_map", {}).values()))
        files = [os.path.join(os.path.dirname(index), s) for s in shards]
        return files if all(os.path.isfile(f) for f in files) else []
    single = get(names[1])
    return [single] if single is not None else []


def _start(path: Any, config_dict: dict, kwargs: dict) -> None:
    qc = config_dict.get("quantization_config") if isinstance(config_dict, dict) else None
    if not (isinstance(qc, dict) and qc.get("quant_method") == "tpde" and isinstance(qc.get("reference"), dict)):
        return
    loading = loading_frame() if os.environ.get("TPDE_REFERENCE_WORKERS") != "0" else None
    if loading is None:
        return
    files = weight_files(str(path), kwargs.get("subfolder") or "", kwargs.get("revision"), kwargs.get("cache_dir"))
    if not files:
        return
    from tpde_hf.reference.prefetch import Prefetch  # neither imports transformers' model code
    from tpde_hf.reference.resolve import LoadReference

    info = qc["reference"]
    download = {k: kwargs.get(k) for k in ("token", "cache_dir", "local_files_only")}
    key = _key(files, info, download)
    with _LOCK:
        if key in _EARLY:
            return  # the same load read its config twice
        for old in _EARLY.values():
            old.cancel()
        _EARLY.clear()
        ref = LoadReference(info, **download)
        # one decode thread (the loading thread imports on the other core); INLINE: prepared here, in one go
        pf = _EARLY[key] = Prefetch(files, ref, workers=1, inline=INLINE)
    # not a daemon: it ends within WATCH_S of the load (adopted, or its from_pretrained gone)
    threading.Thread(target=_watch, args=(key, pf, threading.get_ident(), id(loading), loading.f_code),
                     name="tpde-ref-early-watch").start()


def adopt(files: list[str], info: dict, download: dict) -> Any:
    """The early prefetch started for exactly these files, reference and download arguments, or None; any
    other early prefetch is cancelled (it belonged to a load that went another way)."""
    try:
        key = _key(files, info, download)
    except Exception:
        key = None
    with _LOCK:
        pf = _EARLY.pop(key, None) if key is not None else None
        for old in _EARLY.values():
            old.cancel()
        _EARLY.clear()
    return pf


def _wrap(module: Any) -> None:
    """Wrap ``module.PretrainedConfig.get_config_dict`` (idempotent)."""
    cls = getattr(module, "PreTrainedConfig", None) or module.PretrainedConfig
    inner = cls.__dict__["get_config_dict"].__func__
    if getattr(inner, _FLAG, False):
        return

    def get_config_dict(klass: Any, pretrained_model_name_or_path: Any, **kwargs: Any) -> Any:
        asked = {k: kwargs.get(k) for k in ("subfolder", "revision", "cache_dir", "token", "local_files_only")}
        out = inner(klass, pretrained_model_name_or_path, **kwargs)
        try:
            _start(pretrained_model_name_or_path, out[0], {**asked, "revision": kwargs.get("revision")})
        except Exception:  # the early start is an optimisation only: the quantizer starts the decode as before
            pass
        return out

    setattr(get_config_dict, _FLAG, True)
    get_config_dict.__doc__ = inner.__doc__
    get_config_dict.__wrapped__ = inner
    cls.get_config_dict = classmethod(get_config_dict)


def _wrap_quietly(module: Any) -> None:
    try:
        _wrap(module)
    except Exception:  # the early start is an optimisation only
        pass


class _Finder:
    """Wraps ``get_config_dict`` right after ``transformers.configuration_utils`` has executed."""

    _tpde_early_reference = True

    @staticmethod
    def find_spec(name: str, path: Any = None, target: Any = None) -> Any:
        if name != TARGET:
            return None
        from tpde_hf._autoregister import spec_then  # imports nothing heavy

        return spec_then(name, path, target, _FLAG, _wrap_quietly)


def install() -> None:
    """Wrap ``get_config_dict`` now if transformers' config module is loaded, else right after it loads."""
    if os.environ.get("TPDE_REFERENCE_EARLY") == "0":
        return
    module = sys.modules.get(TARGET)
    if module is not None:
        _wrap_quietly(module)
        return
    if not any(getattr(f, _FLAG, False) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder)
