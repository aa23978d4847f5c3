"""Call a cached numba kernel without numba's one-time typing set-up (about 0.3 CPU-s per process).

The first call of any ``@njit(cache=True)`` function in a process makes numba *refresh* its typing and target
contexts: it imports and installs every typing registry it has (numpy, lists, dicts, ...), in Python, holding
the GIL, even when the compiled code is only read back from the on-disk cache. A delta load needs none of
that: its kernels are already compiled. :func:`call` reads the cached machine code for the argument types
straight from the kernel's cache (``dispatcher._cache``, the same index and files numba's dispatcher uses,
with its check that the source has not changed) and calls its entry point; only the runtime that unboxes
arrays (``rtsys``) is initialised.

Anything else, a cache miss (first run, edited source, another CPU), a disabled JIT, or a numba whose
internals differ, falls back to calling the dispatcher itself: the same result, at numba's usual cost.

Example::

    from tpde_hf.reference import kernels as K
    from tpde_hf.reference.fastload import call

    call(K.rans_decode_serial, r_bits, out, ...)   # what K.rans_decode_serial(r_bits, out, ...) does
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

_LOCK = threading.Lock()
#: (dispatcher, argument fingerprints) -> (entry point, the compile result that keeps its code alive)
_ENTRIES: dict[tuple, tuple[Callable, Any]] = {}


def _fingerprint(args: tuple) -> tuple:
    """numba's own type key of each argument (dtype, ndim, layout, read-only, ...): what its dispatcher
    matches compiled code by."""
    from numba._dispatcher import compute_fingerprint

    return tuple(compute_fingerprint(a) for a in args)


def _load(dispatcher: Any, args: tuple) -> tuple[Callable, Any]:
    """The cached entry point for ``args``' types, or ``(dispatcher, None)`` when there is none to read."""
    try:
        from numba import typeof
        from numba.core.compiler_lock import global_compiler_lock
        from numba.core.runtime import rtsys
        from numba.core.typing.typeof import Purpose

        sig = tuple(typeof(a, Purpose.argument) for a in args)
        with global_compiler_lock:  # LLVM's JIT is not thread-safe: numba loads its cache under this lock too
            ctx = dispatcher.targetctx
            rtsys.initialize(ctx)  # the one part of refresh() that running compiled code needs (array unboxing)
            cres = dispatcher._cache._load_overload(sig, ctx)  # None on a miss or a stale index
    except Exception:  # no cache / no JIT / other numba internals: numba's ordinary path
        return dispatcher, None
    if cres is None or cres.objectmode or cres.entry_point is None:
        return dispatcher, None
    return cres.entry_point, cres


def call(dispatcher: Any, *args: Any) -> Any:
    """``dispatcher(*args)``, through its cached compiled code when there is some (see the module docstring)."""
    key = (dispatcher, _fingerprint(args))
    hit = _ENTRIES.get(key)
    if hit is None:
        with _LOCK:
            hit = _ENTRIES.get(key)
            if hit is None:
                hit = _ENTRIES[key] = _load(dispatcher, args)
    return hit[0](*args)


def cached_entry(dispatcher: Any, *args: Any) -> bool:
    """Whether :func:`call` with these arguments runs cached code without numba's set-up (tests, benchmarks)."""
    call(dispatcher, *args)
    return _ENTRIES[(dispatcher, _fingerprint(args))][1] is not None
