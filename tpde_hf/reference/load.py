"""Load-time decode of reference-coded tensors, as transformers weight conversions (every mode).

A tensor ``K`` stored as ``K.tpde_codec.<codec>.blob`` is matched by one :class:`WeightConverter` per reference
codec, whose source pattern is the stored suffix and whose target is ``K`` itself (the model's own key renamings
of ``K`` carry over: they run first). Its op, :class:`ReferenceDecode`, resolves the reference once per load
(:class:`LoadReference`: the recorded commit, through the Hugging Face cache, with ``from_pretrained``'s
``token`` / ``cache_dir`` / ``local_files_only``; offline mode honoured), checks each
reference tensor it uses against the recorded xxh3, and decodes ``K`` bit for bit. A failure is recorded on the
quantizer and raised after loading with its own message (transformers would otherwise report a generic
conversion issue), naming the reference.

Example::

    convs = reference_converters(hf_quantizer)   # prepended by TpdeHfQuantizer.update_weight_conversions
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

import torch
from transformers.core_model_loading import ConversionOps, WeightConverter

from tpde_hf.codec.registry import CODEC_TOKEN, TENSOR_CODECS, CodecContext
from tpde_hf.errors import TpdeFormatError
from tpde_hf.gc_pause import pause as pause_gc
from tpde_hf.reference.resolve import LoadReference, ReferenceError

PART = "blob"


def reference_info(hf_quantizer: Any) -> dict | None:
    """``quantization_config.reference`` of the repo being loaded, or None."""
    info = getattr(hf_quantizer.quantization_config, "reference", None)
    return info if isinstance(info, dict) else None


def has_reference_parts(keys: Any) -> bool:
    """Whether any stored key is a reference-coded part (a repo may hold no standalone tpde weight at all)."""
    from tpde_hf.reference import CODEC_NAMES

    marks = tuple(f".{CODEC_TOKEN}.{c}.{PART}" for c in CODEC_NAMES)
    return any(k.endswith(marks) for k in keys)


def from_pretrained_download_kwargs() -> dict[str, Any]:
    """``token``, ``cache_dir`` and ``local_files_only`` of the ``from_pretrained`` call running on this thread.

    transformers does not hand its download arguments to a quantizer, so they are read from its
    ``download_kwargs`` (the dict it passes to every Hub download of the load); {} outside ``from_pretrained``.
    """
    frame = sys._getframe(1)
    while frame is not None:
        found = frame.f_locals.get("download_kwargs") if frame.f_code.co_name == "from_pretrained" else None
        if isinstance(found, dict):
            return {k: found.get(k) for k in ("token", "cache_dir", "local_files_only")}
        frame = frame.f_back
    return {}


def capture_download_kwargs(hf_quantizer: Any) -> None:
    """Remember the load's download arguments on the quantizer (the reference is fetched with the same token)."""
    if getattr(hf_quantizer, "_tpde_download", None) is None:
        hf_quantizer._tpde_download = from_pretrained_download_kwargs()


def load_reference(hf_quantizer: Any) -> LoadReference:
    ref = getattr(hf_quantizer, "_tpde_reference", None)
    if ref is None:
        capture_download_kwargs(hf_quantizer)
        ref = LoadReference(reference_info(hf_quantizer) or {}, **hf_quantizer._tpde_download)
        hf_quantizer._tpde_reference = ref
    return ref


_PREFETCH_LOCK = threading.Lock()
#: the longest the cyclic collector stays paused for one load (:mod:`tpde_hf.gc_pause`): a load that fails
#: between its prefetch and :func:`close_reference_load` gets it back by itself then
GC_PAUSE_LIMIT_S = 60.0
GC_WATCH_S = 0.05  # how often a paused load checks that its from_pretrained still runs


def load_prefetch(hf_quantizer: Any) -> Any:
    """The load's :class:`~tpde_hf.reference.prefetch.Prefetch` (built on first use), or None without the
    checkpoint file list or with ``TPDE_REFERENCE_WORKERS=0`` (decode on the loading thread). Building it pauses the
    cyclic collector until the load ends (:mod:`tpde_hf.gc_pause`: a full collection inside the decode window cost
    0.26-0.29 s holding the GIL)."""
    with _PREFETCH_LOCK:
        pf = getattr(hf_quantizer, "_tpde_prefetch", None)
        if pf is None:
            from tpde_hf.reference.prefetch import Prefetch

            files = getattr(hf_quantizer, "_tpde_checkpoint_files", None)  # recorded by the quantizer before loading
            off = os.environ.get("TPDE_REFERENCE_WORKERS") == "0"
            pf = _adopt_early(hf_quantizer, files) if files and not off else None
            if pf is None:
                pf = Prefetch(files, load_reference(hf_quantizer)) if files and not off else False
            if pf:
                _pause_gc_for_load(hf_quantizer)
            hf_quantizer._tpde_prefetch = pf
        return pf or None


def _adopt_early(hf_quantizer: Any, files: list[str]) -> Any:
    """The prefetch :mod:`tpde_hf.reference.early` started for this load at ``config.json``, or None. Its
    reference becomes the load's (one resolution, one check per reference tensor)."""
    from tpde_hf.reference.early import adopt

    capture_download_kwargs(hf_quantizer)
    pf = adopt(files, reference_info(hf_quantizer) or {}, hf_quantizer._tpde_download)
    if pf is not None:
        from tpde_hf.reference.prefetch import default_workers

        pf.use_workers(default_workers())  # the load will wait for it from here: every core decodes
        if getattr(hf_quantizer, "_tpde_reference", None) is None:
            hf_quantizer._tpde_reference = pf.reference
    return pf


def _warm_kernels() -> None:
    """Load the decode kernels' compiled code with empty calls (through :mod:`~tpde_hf.reference.fastload`:
    ~0.03 CPU-s from numba's cache, instead of ~0.3 with numba's typing set-up)."""
    import numpy as np

    from tpde_hf.reference import kernels as K
    from tpde_hf.reference.fastload import call

    i8, e = np.zeros(1, np.int64), np.zeros(0, np.int64)
    call(K.decode_units, 0, 0, e, e, np.zeros((1, K.J_FIELDS), np.int64), i8)  # the load's batch decode: first
    for width, bits in ((16, np.int16), (32, np.int32)):  # bf16 / fp16, and fp32
        call(K.rans_decode_serial, np.zeros(0, bits), np.zeros(0, bits), width, 7, 0xFF, 1, i8,
             np.zeros(1, np.uint8), np.zeros(1, np.int32), i8, np.zeros(1, np.uint16), i8, np.zeros((0, 2), np.int64),
             np.zeros(1, np.uint32), i8, e)
    from tpde_hf.reference.sparse import varints_to_positions

    call(varints_to_positions, np.frombuffer(b"", np.uint8), 0, e)  # read-only bytes, as ref-sparse's decode passes


def warm_up_reference_decode(hf_quantizer: Any) -> None:
    """For a delta repo, load the decode kernels on a background thread now (no-op for other repos).

    Called from the quantizer's constructor: the kernels then load while transformers resolves the checkpoint and
    builds the model, instead of on the decode pool's critical path.
    """
    if reference_info(hf_quantizer) is None or os.environ.get("TPDE_REFERENCE_WORKERS") == "0":
        return
    from tpde_hf.reference.early import started_here

    if started_here():  # its decode threads loaded (or load) the kernels they use since config.json: a warm-up
        return  # would only take the GIL from this thread (~0.015-0.02 CPU-s, 2026-12-07)
    threading.Thread(target=_warm_kernels, name="tpde-ref-warm", daemon=True).start()


def start_reference_prefetch(hf_quantizer: Any) -> None:
    """Start decoding a delta repo's reference-coded tensors now (no-op for other repos).

    Called by the quantizer as soon as it knows the checkpoint files, before it checks them and before
    transformers builds the load plan, so that the decode overlaps that work. Anything wrong here (an unreadable
    file) turns the prefetch off: the loading thread then meets the same problem and reports it clearly.
    """
    if reference_info(hf_quantizer) is None:
        return
    try:
        capture_download_kwargs(hf_quantizer)  # inside from_pretrained: its token goes to the reference download
        load_prefetch(hf_quantizer)
    except Exception:
        hf_quantizer._tpde_prefetch = False


class ReferenceDecode(ConversionOps):
    """Decode one reference-coded tensor: input ``{pattern: [blob]}``, output ``{full_layer_name: tensor}``."""

    def __init__(self, hf_quantizer: Any, codec: str):
        self.hf_quantizer = hf_quantizer
        self.codec = codec

    def __deepcopy__(self, memo: dict) -> ReferenceDecode:
        return ReferenceDecode(self.hf_quantizer, self.codec)  # one shared quantizer: errors go to it

    @torch.no_grad()
    def convert(self, input_dict: dict[str, Any], source_patterns: list[str] | None = None,
                target_patterns: list[str] | None = None, full_layer_name: str | None = None,
                model: torch.nn.Module | None = None, **kwargs: Any) -> dict[str, Any]:
        import numpy as np

        from tpde_hf.loading.ops import _target_dtype
        from tpde_hf.reference import codec as C

        key = full_layer_name or "?"
        try:
            values = [v for vs in input_dict.values() for v in (vs if isinstance(vs, list) else [vs])]
            if len(values) != 1:
                raise TpdeFormatError(key, f"{len(values)} {self.codec} blobs load into this parameter, expected 1")
            blob = values[0].detach().to("cpu")
            h, _, _ = C.read_header(blob, self.codec, key)
            ref = load_reference(self.hf_quantizer)
            pf = load_prefetch(self.hf_quantizer)
            out = pf.take(h) if pf is not None else None  # decoded ahead on the pool (same checks)
            if out is None:
                reference = ref.tensor(int(np.int64(h[3])), key)
                out = TENSOR_CODECS.get(self.codec, key).decode({PART: blob}, CodecContext(key, reference))
        except TpdeFormatError as exc:
            pf = getattr(self.hf_quantizer, "_tpde_prefetch", None)
            if pf:
                pf.cancel()
            end_gc_pause(self.hf_quantizer)  # the load fails: nothing more to decode
            self.hf_quantizer.record_error(exc)
            return {}
        dtype = _target_dtype(model, full_layer_name)
        if dtype is not None and out.is_floating_point() and out.dtype != dtype:
            out = out.to(dtype)
        return {key: out}

    @property
    def reverse_op(self) -> ConversionOps:
        from transformers.core_model_loading import _IdentityOp

        return _IdentityOp()


def reference_converters(hf_quantizer: Any) -> list[WeightConverter]:
    """One converter per reference codec: ``K.tpde_codec.<codec>.blob`` -> ``K`` (decoded)."""
    from tpde_hf.reference import CODEC_NAMES

    capture_download_kwargs(hf_quantizer)  # called inside from_pretrained: its token goes to the reference download
    load_prefetch(hf_quantizer)  # start decoding now: it overlaps transformers' own set-up before the first tensor
    return [WeightConverter([rf"\.{CODEC_TOKEN}\.{c}\.{PART}"], "", [ReferenceDecode(hf_quantizer, c)],
                            force_cpu=True) for c in CODEC_NAMES]


def close_reference_load(hf_quantizer: Any) -> None:
    """After a load: close its reference prefetch (drops what was decoded but not taken, and the job list) and
    forget the reference (its memory maps are unmapped once nothing else holds them: a loaded model holds no
    view of them). A later load of the same quantizer resolves the reference again."""
    pf = getattr(hf_quantizer, "_tpde_prefetch", None)
    if pf:
        pf.close()
    if pf is not None:
        hf_quantizer._tpde_prefetch = None
    hf_quantizer._tpde_reference = None
    end_gc_pause(hf_quantizer)


def _pause_gc_for_load(hf_quantizer: Any) -> None:
    """Pause the cyclic collector for the rest of this model load: until :func:`close_reference_load`, a failed
    decode, or the model's ``from_pretrained`` leaving the stack (a load that failed elsewhere; checked every
    :data:`GC_WATCH_S`), at most :data:`GC_PAUSE_LIMIT_S`. Not paused outside a model's ``from_pretrained``."""
    from tpde_hf.reference.early import loading_frame, on_stack

    frame = loading_frame()
    if frame is None:
        return
    hf_quantizer._tpde_resume_gc = pause_gc(GC_PAUSE_LIMIT_S)
    thread, frame_id, code = threading.get_ident(), id(frame), frame.f_code
    del frame  # the watcher must not keep the load's frame alive

    def watch() -> None:
        while getattr(hf_quantizer, "_tpde_resume_gc", None) is not None:
            time.sleep(GC_WATCH_S)
            if not on_stack(thread, frame_id, code):
                end_gc_pause(hf_quantizer)

    threading.Thread(target=watch, name="tpde-gc-pause-watch", daemon=True).start()  # only sleeps and checks


def end_gc_pause(hf_quantizer: Any) -> None:
    """End the collector pause :func:`load_prefetch` began for this load (if any; a second call does nothing)."""
    resume = getattr(hf_quantizer, "_tpde_resume_gc", None)
    if resume is not None:
        hf_quantizer._tpde_resume_gc = None
        resume()


def strip_converters(model: torch.nn.Module) -> None:
    """Drop the reference converters from the model's saved conversions (a loaded model saves dense tensors), and
    close the load's reference prefetch (:func:`close_reference_load`; called once the weights are loaded)."""
    convs = getattr(model, "_weight_conversions", None)
    if convs:
        ops = [op for c in convs for op in getattr(c, "operations", []) if isinstance(op, ReferenceDecode)]
        for q in {id(op.hf_quantizer): op.hf_quantizer for op in ops}.values():
            close_reference_load(q)
        model._weight_conversions = [c for c in convs if not any(isinstance(op, ReferenceDecode)
                                                                 for op in getattr(c, "operations", []))]


__all__ = ["ReferenceDecode", "ReferenceError", "close_reference_load", "has_reference_parts",
           "reference_converters", "strip_converters"]
