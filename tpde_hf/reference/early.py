"""Start a delta repo's decode when ``from_pretrained`` reads its ``config.json``, not when the quantizer starts.

In a fresh process, ``from_pretrained`` spends one to two seconds after reading ``config.json`` importing the
model's modules (transformers' configuration, modeling and generation code, torch's compiler stack) before it
builds the quantizer; that is Python on one core. A delta repo's decode
(:class:`tpde_hf.reference.prefetch.Prefetch`) needs no GIL while it decodes, so started at ``config.json`` it
runs on the other core during those imports, instead of after them.

:func:`install` wraps transformers' ``PretrainedConfig.get_config_dict`` (at once if
``transformers.configuration_utils`` is imported, else right after it is, through an import hook). The wrapper
only looks at the config it returns, and starts a prefetch only when all of these hold; otherwise the load runs as
without this module:

* the config is a tpde delta repo's (``quantization_config.reference``: dense and standalone tpde repos start
  nothing) and it is read inside a model's ``from_pretrained`` (``AutoConfig.from_pretrained`` starts nothing);
* the load asks for the repo's own safetensors (no ``variant``, ``gguf_file``, ``state_dict``,
  ``use_safetensors=False``, ``force_download``, ``from_tf`` / ``from_flax``), and they are already on disk: a
  local folder, or the Hugging Face cache (a Hub repo not yet downloaded starts nothing: this never downloads);
* the reference resolves on this machine alone (:meth:`~tpde_hf.reference.resolve.LoadReference.resolve_cached`:
  a local folder, or the cached snapshot of its recorded commit with every weight file): this never asks the Hub
  for it, and a reference that needs the network is fetched by the quantizer's start, with the load's token.

The quantizer's own start (:func:`tpde_hf.reference.load.load_prefetch`) then :func:`adopt` s it when it names the
same files, reference and download arguments (``token``, ``cache_dir``, offline mode); otherwise the early one is
cancelled and a new one is built, as without this module. ``dtype`` and ``device_map`` act after the decode (the
cast and the placement are the load's, as without this module). Early prefetches are kept per loading thread: two
loads on two threads each adopt their own. Any error here only turns the early start off.

The tensors are prepared (:data:`INLINE`) on the loading thread when it reads ``config.json``, then decoded on
one thread while the loading thread imports. A load that fails before its quantizer (so never adopts the early
prefetch) does not leave the decoded tensors held: a small ``tpde-ref-early-watch`` thread closes the prefetch
within :data:`WATCH_S` of that ``from_pretrained`` leaving the stack.

It is on by default: ``import tpde_hf`` calls :func:`install` unless ``TPDE_REFERENCE_EARLY=0``;
``TPDE_REFERENCE_WORKERS=0`` turns it off too. Measured on the SmolLM2 pair, same loop, shared 2-core VM
(2026-12-07 21:34-21:37 UTC, load 1.6-2.3, ``reference_smollm2_timing12b.json``): x1.095 of the dense fine-tune's
load against x1.248 with ``TPDE_REFERENCE_EARLY=0`` (median of 7). What stays on the loading thread's path: the
preparation (~0.1 CPU-s holding the GIL), numba's cache load on the decode thread (~0.06-0.09 CPU-s, nearly all of
it holding the GIL), the quantizer's integrity check of the stored blobs and the xxh3 check of each decoded tensor
(~0.02 CPU-s each), and two cores' worth of memory traffic while the decode runs beside the imports.

Example::

    import tpde_hf   # installs it (TPDE_REFERENCE_EARLY=0: does not)
    from tpde_hf.reference.early import install
    install()        # the same, by hand (idempotent); then from_pretrained as usual
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
_EARLY: dict[tuple, Any] = {}  # (thread, key) -> Prefetch (one per loading thread: a new start cancels the older)
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


#: ``from_pretrained`` / ``get_config_dict`` arguments under which the weights the quantizer reads may not be the
#: ``model.safetensors`` files found here, or may be fetched anew: no early start (the quantizer starts the decode)
_SKIP_ARGS = ("variant", "gguf_file", "force_download", "state_dict", "from_tf", "from_flax")


def _other_weights(kwargs: dict, loading: Any) -> bool:
    """Whether the load asks for other weights than the repo's safetensors in the cache (see :data:`_SKIP_ARGS`).
    A concrete class's ``from_pretrained`` keeps ``variant`` / ``use_safetensors`` / ``state_dict`` as its own
    arguments (they do not reach ``get_config_dict``): read from its frame."""
    args = dict(kwargs)
    if loading.f_code.co_filename.endswith("modeling_utils.py"):
        local = loading.f_locals
        args.update({k: local.get(k) for k in (*_SKIP_ARGS, "use_safetensors") if k in local})
    return any(args.get(k) for k in _SKIP_ARGS) or args.get("use_safetensors") is False


def _start(path: Any, config_dict: dict, kwargs: dict) -> None:
    qc = config_dict.get("quantization_config") if isinstance(config_dict, dict) else None
    if not (isinstance(qc, dict) and qc.get("quant_method") == "tpde" and isinstance(qc.get("reference"), dict)):
        return
    loading = loading_frame() if os.environ.get("TPDE_REFERENCE_WORKERS") != "0" else None
    if loading is None or _other_weights(kwargs, loading):
        return
    thread, frame_id, code = threading.get_ident(), id(loading), loading.f_code
    del loading  # the watcher must not keep the load's frame alive
    files = weight_files(str(path), kwargs.get("subfolder") or "", kwargs.get("revision"), kwargs.get("cache_dir"))
    if not files:
        return
    from tpde_hf.reference.prefetch import Prefetch  # neither imports transformers' model code
    from tpde_hf.reference.resolve import LoadReference

    info = qc["reference"]
    download = {k: kwargs.get(k) for k in ("token", "cache_dir", "local_files_only")}
    key = (thread, _key(files, info, download))
    with _LOCK:
        if key in _EARLY:
            return  # the same load read its config twice
        # an earlier start of this thread belonged to a load that went another way; other threads' loads are theirs
        old = _pop_thread(thread)
    for pf in old:
        pf.cancel()
    ref = LoadReference(info, **download)
    if not ref.resolve_cached():
        return  # the reference needs the network: the quantizer's start resolves (and downloads) it, as without this
    # one decode thread (the loading thread imports on the other core); INLINE: prepared here, in one go
    pf = Prefetch(files, ref, workers=1, inline=INLINE)
    with _LOCK:
        _EARLY[key] = pf
    # not a daemon: it ends within WATCH_S of the load (adopted, or its from_pretrained gone)
    threading.Thread(target=_watch, args=(key, pf, thread, frame_id, code), name="tpde-ref-early-watch").start()


def adopt(files: list[str], info: dict, download: dict) -> Any:
    """The early prefetch this thread started for exactly these files, reference and download arguments, or None;
    any other early prefetch of this thread is cancelled (it belonged to a load that went another way)."""
    thread = threading.get_ident()
    try:
        key = (thread, _key(files, info, download))
    except Exception:
        key = None
    with _LOCK:
        pf = _EARLY.pop(key, None) if key is not None else None
        old = _pop_thread(thread)
    for other in old:
        other.cancel()
    return pf


def _pop_thread(thread: int) -> list[Any]:
    """Take out every early prefetch of ``thread`` (called under :data:`_LOCK`; the caller cancels them)."""
    return [_EARLY.pop(k) for k in [k for k in _EARLY if k[0] == thread]]


def started_here() -> bool:
    """Whether an early prefetch of this thread's load waits for its quantizer (:func:`adopt`)."""
    thread = threading.get_ident()
    with _LOCK:
        return any(k[0] == thread for k in _EARLY)


def _wrap(module: Any) -> None:
    """Wrap ``module.PretrainedConfig.get_config_dict`` (idempotent)."""
    cls = getattr(module, "PreTrainedConfig", None) or module.PretrainedConfig
    inner = cls.__dict__["get_config_dict"].__func__
    if getattr(inner, _FLAG, False):
        return

    def get_config_dict(klass: Any, pretrained_model_name_or_path: Any, **kwargs: Any) -> Any:
        out = inner(klass, pretrained_model_name_or_path, **kwargs)  # (inner gets its own copy of kwargs)
        try:
            _start(pretrained_model_name_or_path, out[0], kwargs)
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
