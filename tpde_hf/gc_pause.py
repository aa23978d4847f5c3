"""Pause Python's cyclic garbage collector while a large decode runs.

A full (generation 2) collection walks every object of the process while holding the GIL: with torch and
transformers imported that is 280,000-420,000 objects and 0.15-0.36 s on the shared 2-core VM, during which no
thread can hand the next tensor to the compiled decoders. A large decode makes many short-lived objects (tensors,
arrays, job records) and so tends to trigger one such pass right in its window (measured: a SmolLM2 delta load
ran 7 full passes against 6 for the dense load, the extra one after the quantizer was built). Nothing a decode
makes needs the cyclic collector: reference counting frees it. Pauses nest (the collector comes back when the
last one ends, and only if it was on when the first began), and a pause with ``limit_s`` ends by itself then,
so a load that fails before its end cannot leave the collector off. ``TPDE_GC_PAUSE=0`` turns pausing off.

Example::

    release = pause(limit_s=60)
    try:
        ...  # the decode
    finally:
        release()
"""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Callable

_lock = threading.Lock()
_holds = 0  # pauses running
_was_enabled = False  # whether the collector was on when the first of them began
_generation = 0  # bumped in a forked child: the parent's pauses (and their timers) do not exist there


def _after_fork_in_child() -> None:
    """A child forked during a pause has none of its ends (the thread that would end it is not copied): it
    starts with no pause and the collector as the first pause found it."""
    global _holds, _generation
    _generation += 1
    if _holds:
        _holds = 0
        if _was_enabled:
            gc.enable()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _noop() -> None:
    return None


def pause(limit_s: float | None = None) -> Callable[[], None]:
    """Pause the cyclic collector; return the function that ends this pause (calling it again does nothing).
    ``limit_s``: the pause also ends by itself after that many seconds."""
    global _holds, _was_enabled
    if os.environ.get("TPDE_GC_PAUSE") == "0":
        return _noop
    with _lock:
        if _holds == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _holds += 1
        generation = _generation
    done = threading.Event()
    timer: threading.Timer | None = None

    def release() -> None:
        global _holds
        with _lock:
            if done.is_set() or generation != _generation:
                return
            done.set()
            _holds -= 1
            if _holds == 0 and _was_enabled:
                gc.enable()
        if timer is not None and timer is not threading.current_thread():
            timer.cancel()

    if limit_s is not None:
        timer = threading.Timer(limit_s, release)
        timer.daemon = True  # it only waits; nothing to finish at exit
        timer.name = "tpde-gc-pause-limit"
        timer.start()
    return release


def paused() -> int:
    """How many pauses are running (for tests and diagnostics)."""
    return _holds
