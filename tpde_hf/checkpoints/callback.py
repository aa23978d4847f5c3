"""``TpdeCheckpointCallback``: every checkpoint Trainer writes, stored as an exact delta of its neighbour.

Trainer writes ``checkpoint-N`` as usual; in ``on_save`` the callback hands it to one background thread.

* ``backward=True`` (default): the newest checkpoint stays as Trainer wrote it (the store holds hard links
  of its files), so resuming from it needs nothing; the previous checkpoint is re-coded as an exact
  delta *against the new one* (:func:`tpde_hf.checkpoints.backward.advance`), a keyframe when the run of
  deltas chained through it reaches ``keyframe_every``, so restoring any checkpoint decodes at most
  ``keyframe_every`` entries;
* ``backward=False``: the new checkpoint is packed as a delta against the previous one
  (:func:`tpde_hf.checkpoints.api.pack`, a keyframe every ``keyframe_every``); resuming from it decodes
  its chain back to a keyframe.

Either way the entry is checked (every payload checked at encode time, the bytes on disk, every file's
hash) before ``model.safetensors`` and ``optimizer.pt`` are deleted from the folder (the small files
stay). Then it drops store entries whose folders Trainer's ``save_total_limit`` rotation deleted,
re-coding a surviving delta first when it depended on one of them.

* Memory and disk stay bounded: at most one pack runs; before Trainer writes the next checkpoint
  (``on_step_end`` / ``on_epoch_end`` with ``should_save``) the callback waits for it. That also keeps
  Trainer's rotation from deleting a folder while it is being packed.
* The packing thread runs at the lowest OS priority (``nice`` 19, Linux sets it per thread) and keeps
  its numba loops on itself (numba's shared worker threads would run at training's priority), so
  training threads win the cores and packing uses the idle time. When Trainer must wait for it (the
  next save), the waiting thread takes the rest of the pack's tensors beside it and the packing thread
  returns to normal priority (:class:`~tpde_hf.checkpoints.assist.Assist`): the rest runs on every core.
* A failure in the thread leaves the checkpoint's original files in place and is raised on the
  training thread at the next save or at the end of training.

Cost (measured on a shared 2-core VM, BENCHMARKS.md ``checkpoints``): a pack takes about 1 CPU-second per
274 MB checkpoint (MiniLM with AdamW), whatever the batch, so the step-time cost is that second against the
training time between two saves: +2% (median of four rounds) with 15 s between saves, +14% with 7.5 s. Saving
more often makes smaller deltas (about 3% of raw per halving of the interval); ``keyframe_every`` trades the speed
of restores far back (each entry decoded costs about 0.4 s) for size (a keyframe is about a ZipNN-sized file).

Resuming. With backward deltas the newest checkpoint is plain: ``trainer.train(resume_from_checkpoint=
"out/checkpoint-60")`` just works. For an older (packed) checkpoint, or with forward deltas: Trainer
loads ``model.safetensors`` and ``optimizer.pt`` in ``train()`` *before* the first callback event of the
run (``on_train_begin``), so no callback can put them back in time for
``train(resume_from_checkpoint=path)``. One call does it::

    tpde_hf.checkpoints.restore("out/checkpoint-40")          # files back, byte for byte
    trainer.train(resume_from_checkpoint="out/checkpoint-40")

With ``TrainingArguments(resume_from_checkpoint=path)`` (the example scripts' flag) the callback
restores ``path`` itself when the Trainer is built (``on_init_end``). Once training has begun, the
restored files are deleted again (they are in the store) and the chain continues from there.

``load_best_model_at_end``: Trainer logs the run's final metrics (``on_log`` with ``train_runtime``)
just before ``_load_best_model`` reads ``state.best_model_checkpoint``'s weights file, so the callback
restores that checkpoint's model files there (not ``optimizer.pt``) and deletes them again in
``on_train_end``.

Example::

    trainer = Trainer(model, args, train_dataset=ds, callbacks=[TpdeCheckpointCallback(keyframe_every=8)])
    trainer.train()
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from tpde_hf.checkpoints import api
from tpde_hf.checkpoints import backward as B
from tpde_hf.checkpoints import kernels as K
from tpde_hf.checkpoints.assist import Assist
from tpde_hf.checkpoints.codec import warm_up
from tpde_hf.checkpoints.store import Decoded

logger = logging.getLogger(__name__)


def _lower_priority(nice: int, idle: bool = False) -> None:
    """Raise this thread's nice value (Linux: per thread), so training threads win the cores; ``idle``:
    also the ``SCHED_IDLE`` class (runs only on a core nothing else wants)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        if idle:
            os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError) as exc:  # not Linux/BSD, or not permitted: pack at normal priority
        logger.debug("tpde: cannot lower the packing thread's priority (%s)", exc)


def optimizer_param_names(model: Any, optimizer: Any) -> list[str] | None:
    """Parameter names in the order of the optimizer's state indices (``state_dict()['state'][i]``)."""
    if model is None or optimizer is None:
        return None
    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for group in getattr(opt, "param_groups", []):
        for p in group["params"]:
            out.append(names.get(id(p), ""))
    return out or None


class TpdeCheckpointCallback(TrainerCallback):
    """Store Trainer's checkpoints as exact temporal deltas (see the module docstring).

    ``keyframe_every``: restoring any checkpoint decodes at most this many entries. ``verify``: True
    (each payload checked at encode time, the entry read back, every file hashed) or ``"full"`` (the
    entry decoded from disk as a restore would). ``background``/``nice``/``sched_idle``: pack on one
    thread at this OS priority (``sched_idle``: also Linux's ``SCHED_IDLE``; measured no better, off).
    ``backward``: the newest checkpoint stays plain, older ones are deltas against the next (default);
    False: each checkpoint a delta against the previous one. ``assist``: when Trainer must wait for a
    pack, the waiting thread takes the rest of its tensors and the packing thread returns to normal
    priority. ``defer``: no coding beside training (only the hold and the read of the new checkpoint, with
    backward deltas); it starts when Trainer reaches the next save (or the end) and runs there on every core.
    """

    def __init__(self, keyframe_every: int = api.DEFAULT_KEYFRAME_EVERY, verify: bool | str = True,
                 background: bool = True, nice: int = 19, backward: bool = True, assist: bool = True,
                 sched_idle: bool = False, defer: bool = False):
        if keyframe_every < 1:
            raise ValueError("keyframe_every must be at least 1")
        self.keyframe_every = keyframe_every
        self.verify = verify
        self.background = background
        self.nice = nice
        self.backward = backward
        self.sched_idle = sched_idle  # the packing thread in SCHED_IDLE as well (Linux)
        self.assist = assist  # the waiting training thread helps finish the pack (False: it only waits)
        self.defer = defer  # code only once Trainer waits for it (at the next save), on every core
        self._go = threading.Event()
        self._done = threading.Event()  # set by the packing thread as it ends (it then wakes the helpers)
        self._assist = Assist()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._cache: Decoded | None = None  # forward: the last packed checkpoint, decoded
        self._cache_keep: Decoded | None = None  # backward: the newest (held) checkpoint, read
        self._restored_best: Path | None = None
        self.results: list[api.PackResult] = []
        self.waits: list[float] = []  # seconds the training thread spent in each wait for a pack in flight

    # ------------------------------------------------------------------ Trainer events
    def on_init_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        resume = getattr(args, "resume_from_checkpoint", None)
        if isinstance(resume, str) and api.is_packed(resume):
            api.restore(resume)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if args.should_save and self.background:
            # once, while the cores are free: the first pack would load the compiled kernels at nice 19,
            # beside training, and most of that would land in the wait at the next save
            warm_up()
        out = Path(args.output_dir)
        if args.should_save and out.is_dir():
            for d in out.glob("checkpoint-*"):
                if d.is_dir() and api.is_packed(d):
                    api.compact(d)

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if control.should_save:
            self._before_save(args, state)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if control.should_save:
            self._before_save(args, state)

    def _before_save(self, args: Any, state: Any) -> None:
        self.wait()
        name = f"checkpoint-{state.global_step}"
        if args.should_save and (Path(args.output_dir) / name).exists():  # a resumed run writes it again
            B.forget(args.output_dir, name)
            if self._cache_keep is not None and self._cache_keep.name == name:
                self._cache_keep = None

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                **kw: Any) -> None:
        if not args.should_save:
            return
        self.wait()
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not ckpt.is_dir() or api.is_packed(ckpt):
            return
        names = optimizer_param_names(model, optimizer)
        if self.background:
            self._go = threading.Event()
            self._done = threading.Event()
            self._thread = threading.Thread(target=self._run, args=(ckpt, names), name="tpde-pack", daemon=False)
            self._thread.start()
        else:
            self._run(ckpt, names)
            self._raise()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
        # Trainer logs the run's final metrics (``train_runtime``) right before ``_load_best_model`` reads
        # the best checkpoint's weights file: put the model files of that checkpoint back now.
        if not logs or "train_runtime" not in logs:
            return
        self.wait()
        best = getattr(state, "best_model_checkpoint", None)
        if getattr(args, "load_best_model_at_end", False) and best and args.should_save and api.is_packed(best):
            removed = api.read_pointer(best)["removed"]  # type: ignore[index]
            api.restore(best, files=[n for n in removed if not n.startswith("optimizer")])
            self._restored_best = Path(best)

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.wait()
        if self._restored_best is not None:  # loaded by Trainer by now: the entry holds the files again
            best, self._restored_best = self._restored_best, None
            if best.is_dir():
                api.compact(best)
            if args.should_save:
                api.collect(best.parent)  # save_total_limit=1 deletes the other folders after loading the best

    # ------------------------------------------------------------------ work
    def wait(self) -> None:
        """Block until the pack in flight (if any) is done, helping it meanwhile; re-raise its error here."""
        if self._thread is not None:
            t = time.perf_counter()
            self._go.set()
            if self.assist and self._thread.is_alive():
                self._assist.help(lambda: not self._done.is_set())
            self._thread.join()
            self.waits.append(time.perf_counter() - t)
            self._thread = None
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"tpde checkpoint packing failed (the checkpoint's files were kept): {err}") from err

    def _run(self, ckpt: Path, names: list[str] | None) -> None:
        try:
            self._assist.owner_tid = threading.get_native_id()
            if self.background and self.defer and not self.backward:
                self._go.wait()  # until Trainer waits for this pack: nothing runs beside training
            elif self.background and self.nice:
                _lower_priority(self.nice, self.sched_idle)
            mtime = os.stat(ckpt)
            runner = self._assist if self.background else None
            with K.serial(self.background):  # numba's shared workers would run at training's priority
                if self.backward:
                    # defer: only the hold and the read of the new checkpoint run beside training; the coding
                    # waits until Trainer waits for it, then runs on every core (the training thread helps)
                    gate = self._go.wait if self.background and self.defer else None
                    done, head = B.advance(ckpt, keyframe_every=self.keyframe_every, param_names=names,
                                           cache=self._cache_keep, verify=self.verify, runner=runner, gate=gate)
                    self._cache_keep = head
                    packed = [api.PackResult(r["name"], r["entry"], r["parent"], r["raw"], r["stored"]) for r in done]
                else:
                    res = api.pack(ckpt, param_names=names, keyframe_every=self.keyframe_every, cache=self._cache,
                                   verify=self.verify, keep_decoded=True, runner=runner)
                    self._cache, res.decoded = res.decoded, None
                    packed = [res]
            os.utime(ckpt, ns=(mtime.st_atime_ns, mtime.st_mtime_ns))  # Trainer's rotation sorts by mtime
            self.results += packed
            api.collect(ckpt.parent)
            for res in packed:
                logger.info("tpde: %s packed %.1f%% of %d bytes (parent %s)", res.name,
                            100 * res.stored_bytes / max(1, res.raw_bytes), res.raw_bytes, res.parent)
        except BaseException as exc:  # noqa: BLE001 - handed to the training thread
            self._cache = self._cache_keep = None
            self._error = exc
        finally:
            self._done.set()
            self._assist.wake()  # a helping training thread returns now, not at its next 50 ms look
