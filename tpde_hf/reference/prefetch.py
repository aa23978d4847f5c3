"""Decode a delta repo's reference-coded tensors on a thread pool, ahead of transformers asking for them.

transformers converts one tensor at a time on its loading thread; a ``ref-ord`` tensor decoded there uses the
numba thread pool inside the tensor (one fork/join per tensor, which stalls on a busy machine). Here each worker
decodes *whole tensors* with the single-threaded, GIL-free kernel, so the cores stay busy across tensor
boundaries and transformers' own per-tensor work on its thread overlaps the decoding.

The first :class:`~tpde_hf.reference.load.ReferenceDecode` call of a load builds one :class:`Prefetch` from the
checkpoint files being loaded: it reads every ``K.tpde_codec.<ref codec>.blob`` (memory-mapped safetensors) and
submits its decode. A decode is found again by its blob header's ``(reference index, xxh3 of the result)``,
so it needs no key renaming; what it returns is checked like any decode (the xxh3 of the rebuilt tensor), and
an error inside a worker is raised on the loading thread, for the tensor that asked for it.

Example::

    pf = Prefetch(["model.safetensors"], load_ref, workers=2)
    out = pf.take(blob_header)        # the decoded tensor, or None when it was not prefetched
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from tpde_hf.codec.registry import CODEC_TOKEN, TENSOR_CODECS, CodecContext

PART = "blob"


def default_workers() -> int:
    """Decode threads: ``TPDE_REFERENCE_WORKERS``, else numba's thread count (the cores), at least 1."""
    env = os.environ.get("TPDE_REFERENCE_WORKERS")
    if env and env.isdigit():
        return max(1, int(env))
    from numba import config

    return max(1, int(config.NUMBA_NUM_THREADS))


def decode_blob(key: str, codec: str, blob: torch.Tensor, ref: Any, serial: bool = False) -> torch.Tensor:
    """Decode one reference-coded ``blob`` of tensor ``key`` against the load's reference ``ref``."""
    from tpde_hf.reference import codec as C

    h, _, _ = C.read_header(blob, codec, key)
    reference = ref.tensor(int(np.int64(h[3])), key)
    return TENSOR_CODECS.get(codec, key).decode({PART: blob}, CodecContext(key, reference, {"serial": serial}))


class Prefetch:
    """Every reference-coded tensor of ``files``, decoded on ``workers`` threads (see the module docstring)."""

    def __init__(self, files: Sequence[str], ref: Any, workers: int | None = None):
        from safetensors import safe_open

        from tpde_hf.reference import CODEC_NAMES
        from tpde_hf.reference import codec as C

        self._futures: dict[tuple[int, int], Future] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers or default_workers(), thread_name_prefix="tpde-ref")
        marks = {f".{CODEC_TOKEN}.{c}.{PART}": c for c in CODEC_NAMES}
        jobs = []
        for f in files:
            if not str(f).endswith(".safetensors"):
                continue
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    codec = next((c for m, c in marks.items() if k.endswith(m)), None)
                    if codec is None:
                        continue
                    blob = fh.get_tensor(k)
                    try:
                        h, _, _ = C.read_header(blob, codec, k)
                    except Exception:  # a damaged blob: the loading thread decodes it and reports it
                        continue
                    jobs.append(((int(h[3]), int(h[6])), k.split(f".{CODEC_TOKEN}.")[0], codec, blob))
        from transformers.core_model_loading import dot_natural_key

        for ident, key, codec, blob in sorted(jobs, key=lambda j: dot_natural_key(j[1])):  # the order of a load
            if ident not in self._futures:
                self._futures[ident] = self._pool.submit(decode_blob, key, codec, blob, ref, True)
        self._pool.shutdown(wait=False)  # the submitted work runs; the threads end with it

    def take(self, header: np.ndarray) -> torch.Tensor | None:
        """The prefetched decode for a blob with this header (raises what the decode raised), or None."""
        with self._lock:
            fut = self._futures.pop((int(header[3]), int(header[6])), None)
        return None if fut is None else fut.result()

    def cancel(self) -> None:
        """Drop what has not started (the load failed)."""
        with self._lock:
            for fut in self._futures.values():
                fut.cancel()
            self._futures.clear()
