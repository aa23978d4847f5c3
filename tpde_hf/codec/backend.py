"""Which CPU implementation of the codec runs: the compiled one (numba) or the numpy reference.

Both produce identical bytes and identical weights (the tests check it); the compiled one is
several times faster. ``auto`` (the default) uses the compiled one when numba imports.

Choose with the environment variable ``TPDE_CODEC_BACKEND`` (``auto``, ``compiled``, ``numpy``) or,
for a block of code, :func:`use_backend`. Example::

    with use_backend("numpy"):
        w = decode_tensor(enc)  # the vectorized numpy reference decoder
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

BACKENDS = ("auto", "compiled", "numpy")
_forced: str | None = None
_this_thread = threading.local()


@lru_cache(maxsize=1)
def compiled_available() -> bool:
    try:
        import numba  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure (missing, broken llvmlite) means "not available"
        return False
    return True


def _requested() -> str:
    choice = _forced or os.environ.get("TPDE_CODEC_BACKEND", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"TPDE_CODEC_BACKEND={choice!r}; expected one of {BACKENDS}")
    return choice


def active_backend() -> str:
    """``"compiled"`` or ``"numpy"``: what encode/decode will use now."""
    choice = _requested()
    if choice == "compiled" and not compiled_available():
        raise RuntimeError("the compiled codec needs numba (pip install numba)")
    if choice == "auto":
        return "compiled" if compiled_available() else "numpy"
    return choice


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run a block with the codec backend forced to ``name`` (``auto``, ``compiled`` or ``numpy``)."""
    global _forced
    if name not in BACKENDS:
        raise ValueError(f"unknown codec backend {name!r}; expected one of {BACKENDS}")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def limit_codec_threads(threads: int | None) -> None:
    """Cap the codec threads of calls made from the *calling* thread (``None`` lifts the cap).

    For callers that already run one codec call per core on threads of their own (the conversion's
    task threads): a second level of threads would only contend for the same cores.
    """
    _this_thread.limit = None if threads is None else max(1, int(threads))


def thread_limit() -> int | None:
    """The calling thread's cap from :func:`limit_codec_threads`, or None."""
    return getattr(_this_thread, "limit", None)
