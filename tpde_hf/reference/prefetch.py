"""Decode a delta repo's reference-coded tensors on background threads, ahead of transformers asking for them.

transformers converts one tensor at a time on its loading thread, which runs Python throughout. Here a
``tpde-ref`` thread reads every ``K.tpde_codec.<ref codec>.blob`` of the checkpoint files (numpy views of the
memory-mapped safetensors: no torch call, so it keeps the GIL instead of winning it back from the loading thread
after each call) and prepares every ``ref-ord`` tensor (:func:`tpde_hf.reference.codec.prepare_ord`), then
decodes them all as one job list (:class:`tpde_hf.reference.batch.BatchDecode`: compiled calls over batches of
chunks, no GIL, no Python per tensor) on ``workers`` threads; the first tensor goes to them alone, so the decode
starts while the rest is prepared. The few other reference-coded tensors (``ref-same``, ``ref-sparse``) are
decoded by the same thread, one call each, against checked reference tensors.

A ``ref-ord`` tensor is prepared against its reference tensor *unchecked*
(:meth:`~tpde_hf.reference.resolve.LoadReference.unchecked`): the rebuilt tensor's own xxh3 covers every reference
byte it was rebuilt from, so a wrong reference cannot give a wrong weight; only when a decode fails is the reference
tensor checked, and a changed one reported as such (:class:`~tpde_hf.reference.resolve.ReferenceError`).

A decode is found again by its blob header's ``(reference index, xxh3 of the result)``, so it needs no key
renaming; what it returns is checked like any decode (the xxh3 of the rebuilt tensor), and an error met on a
decode thread is raised on the loading thread, for the tensor that asked for it. Anything the prefetch cannot
do (an unreadable file) leaves the tensor to the loading thread, which reports the problem clearly. After the load,
:meth:`Prefetch.close` drops whatever was not taken (:func:`tpde_hf.reference.load.close_reference_load`).

Example::

    pf = Prefetch(["model.safetensors"], load_ref, workers=2)
    out = pf.take(blob_header)        # the decoded tensor, or None when it was not prefetched
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from tpde_hf.codec.registry import CODEC_TOKEN, TENSOR_CODECS, CodecContext
from tpde_hf.errors import TpdeFormatError

PART = "blob"
GROUP = 16  # tensors prepared before they are handed to the decode threads


def default_workers() -> int:
    """Decode threads: ``TPDE_REFERENCE_WORKERS``, else numba's thread count (the cores), at least 1."""
    env = os.environ.get("TPDE_REFERENCE_WORKERS")
    if env and env.isdigit():
        return max(1, int(env))
    from numba import config

    return max(1, int(config.NUMBA_NUM_THREADS))


def natural_key(name: str) -> tuple:
    """Sort key of a state-dict name, numbers by value (the order transformers loads tensors in, near enough;
    ``transformers.core_model_loading.dot_natural_key`` is not imported: a load may start before that module).
    Example: ``sorted(["l.10.w", "l.9.w"], key=natural_key)``."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))


def decode_blob(key: str, codec: str, blob: torch.Tensor, ref: Any, serial: bool = False) -> torch.Tensor:
    """Decode one reference-coded ``blob`` of tensor ``key`` against the load's reference ``ref``."""
    from tpde_hf.reference import codec as C

    h, _, _ = C.read_header(blob, codec, key)
    reference = ref.tensor(int(np.int64(h[3])), key)
    return TENSOR_CODECS.get(codec, key).decode({PART: blob}, CodecContext(key, reference, {"serial": serial}))


class Prefetch:
    """Every reference-coded tensor of ``files``, decoded on ``workers`` threads (see the module docstring)."""

    def __init__(self, files: Sequence[str], ref: Any, workers: int | None = None, inline: bool = False):
        self._files = [str(f) for f in files if str(f).endswith(".safetensors")]
        self._ref = ref
        self._workers = workers or default_workers()
        self._where: dict[tuple[int, int], tuple[str, Any]] = {}  # ident -> ("batch", index) / ("single", slot)
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._batch: Any = None
        self._running = 0  # decode threads started
        self._cancelled = False
        # not daemons: the interpreter waits for them at exit (a daemon stopped inside torch's C++ aborts it);
        # they end on their own once the job list is done or cancelled
        if not inline:
            threading.Thread(target=self._run, name="tpde-ref").start()
            return
        # inline: prepare on the calling thread, in one go (the decode threads start after the first tensor and
        # need no GIL); only the few other reference-coded tensors are left to a thread
        slots = self._prepare()
        if slots:
            threading.Thread(target=self._decode_singles, args=(slots,), name="tpde-ref").start()

    @property
    def reference(self) -> Any:
        """The :class:`~tpde_hf.reference.resolve.LoadReference` the decodes use."""
        return self._ref

    def _blobs(self) -> list[tuple[tuple[int, int], str, str, np.ndarray, np.ndarray]]:
        """``(ident, tensor key, codec, blob, header)`` of every readable reference-coded blob, in load order.

        The blobs are numpy views of the memory-mapped files: no torch call, so this thread keeps the GIL it
        holds (a torch call gives it up, and winning it back from the loading thread costs up to 5 ms each).
        """
        from tpde_hf.integrity import MappedShard
        from tpde_hf.reference import CODEC_NAMES
        from tpde_hf.reference import codec as C

        marks = {f".{CODEC_TOKEN}.{c}.{PART}": c for c in CODEC_NAMES}
        found, seen = [], set()
        for f in self._files:
            shard = MappedShard(f)
            for k in shard.keys():
                codec = next((c for m, c in marks.items() if k.endswith(m)), None)
                view = shard.view(k) if codec is not None else None
                blob = view.numpy() if view is not None and view.dtype == torch.uint8 else None
                if blob is None or blob.ndim != 1:
                    continue  # not a blob this thread can read: the loading thread decodes it and reports it
                try:
                    h, _, _ = C.read_header(blob, codec, k)
                except Exception:  # a damaged blob: the loading thread decodes it and reports it
                    continue
                ident = (int(h[3]), int(h[6]))
                if ident not in seen:
                    seen.add(ident)
                    found.append((ident, k.split(f".{CODEC_TOKEN}.")[0], codec, blob, h))
        return sorted(found, key=lambda j: natural_key(j[1]))  # the order of a load

    def _run(self) -> None:
        self._decode_singles(self._prepare())

    def _prepare(self) -> list:
        """Read and prepare every blob, queue the ``ref-ord`` ones on the decode threads (started after the first
        tensor); the other reference-coded tensors' slots, for :meth:`_decode_singles`."""
        from tpde_hf.reference.batch import BatchDecode
        from tpde_hf.reference.codec import prepare_ord

        batch = BatchDecode()
        singles: list[tuple[tuple[int, int], str, str, np.ndarray]] = []
        try:
            group: list[tuple[tuple[int, int], Any]] = []
            blobs = self._blobs()
            for n, (ident, key, codec, blob, h) in enumerate(blobs):
                if self._cancelled:  # the load went another way (or failed): prepare nothing more
                    break
                if codec != "ref-ord":
                    singles.append((ident, key, codec, blob))
                else:
                    try:  # reference unchecked here: a failed decode checks it (take), naming a wrong one
                        group.append((ident, prepare_ord(blob, self._ref.unchecked(int(np.int64(h[3])), key), key)))
                    except TpdeFormatError as exc:  # names the tensor or reference: raised when the load asks
                        self._where[ident] = ("error", self._reference_error(int(np.int64(h[3])), key) or exc)
                    except Exception:  # anything else: the loading thread meets it again and reports it
                        pass
                if len(group) >= (GROUP if self._batch is not None else 1) or (group and n == len(blobs) - 1):
                    for (ident_g, _), index in zip(group, batch.add([j for _, j in group]), strict=True):
                        self._where[ident_g] = ("batch", index)
                    group = []
                    if self._batch is None:  # decode from the first group on, while the rest is prepared
                        self._batch = batch
                        self.use_workers(self._workers)
            batch.close()
            slots = [(key, codec, torch.from_numpy(blob), [threading.Event(), None]) for _, key, codec, blob in singles]
            for (ident, *_), slot in zip(singles, slots, strict=True):
                self._where[ident] = ("single", slot[3])
        except Exception:  # nothing more prefetched: the loading thread decodes (and reports) the rest
            batch.close()
            slots = []
        self._batch = batch
        try:
            self.use_workers(self._workers)  # (none started yet when no ref-ord tensor was found)
        except Exception:  # no thread: nothing is prefetched
            self._where.clear()
            batch.cancel()
        finally:
            self._ready.set()
        if self._cancelled:  # closed while preparing: drop the prepared tensors now, not when this object goes
            self._batch = None
        return slots

    def _decode_singles(self, slots: list) -> None:
        """Decode the few ``ref-same`` / ``ref-sparse`` tensors, one call each (a thread of their own)."""
        for key, codec, blob, slot in slots:
            if not self._cancelled:
                try:
                    slot[1] = decode_blob(key, codec, blob, self._ref, True)
                except TpdeFormatError as exc:
                    slot[1] = exc
                except Exception:  # left to the loading thread (None)
                    pass
            slot[0].set()

    def _reference_error(self, index: int, key: str) -> Exception | None:
        """The error that names a wrong reference tensor ``index`` (its xxh3 differs), or None."""
        try:
            self._ref.tensor(index, key)
        except TpdeFormatError as exc:
            return exc
        except Exception:  # unreadable now: the decode's own error stands
            return None
        return None

    def _more_threads(self, n: int) -> None:
        for _ in range(max(n, 0)):
            threading.Thread(target=self._batch.work, name="tpde-ref").start()

    def use_workers(self, workers: int) -> None:
        """Decode on ``workers`` threads from now on (never fewer than already run). An early prefetch runs one
        thread while the loading thread still imports the model's code, and more once the load waits for it."""
        with self._lock:
            self._workers = max(self._workers, workers)
            more = self._workers - self._running if self._batch is not None else 0
            self._running += max(more, 0)
        self._more_threads(more)

    def take(self, header: np.ndarray) -> torch.Tensor | None:
        """The prefetched decode for a blob with this header (raises what the decode raised), or None."""
        self._ready.wait()
        with self._lock:
            where = self._where.pop((int(header[3]), int(header[6])), None)
        if where is None or self._cancelled:
            return None
        kind, what = where
        if kind == "error":
            raise what
        if kind == "batch":
            batch = self._batch
            if batch is None:  # closed meanwhile
                return None
            try:
                return batch.result(what)
            except TpdeFormatError as exc:  # damaged, or a wrong reference (read unchecked): check it to say which
                raise self._reference_error(int(header[3]), exc.tensor_name or "?") or exc from None
        what[0].wait()
        if isinstance(what[1], Exception):
            raise what[1]
        return what[1]

    def close(self) -> None:
        """After the load: claim nothing more, drop every decode not taken (tensors transformers did not ask
        for) and the job list; the decode threads end on their own. :meth:`take` then returns None."""
        self.cancel()
        if self._ready.is_set():  # _run is done: nothing will add to the job list any more
            self._batch = None

    def cancel(self) -> None:
        """Drop what has not started (the load failed)."""
        self._cancelled = True
        if self._batch is not None:
            self._batch.cancel()
        with self._lock:
            self._where.clear()
