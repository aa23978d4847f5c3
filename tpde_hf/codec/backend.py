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
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

BACKENDS = ("auto", "compiled", "numpy")
_forced: str | None = None


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
