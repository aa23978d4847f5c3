"""A simulated full disk for tests: writes draw on a byte budget and stop with ``ENOSPC`` once it is spent,
after writing the part that still fits, as a real full disk does.

Example::

    disk = Disk(4096)
    limit_open(monkeypatch, disk, [tpde_hf.files])   # every open(..., "wb") in those modules draws on it
"""

from __future__ import annotations

import errno
from collections.abc import Iterable
from types import ModuleType

import numpy as np
import pytest


class Disk:
    """A byte budget shared by every write of one operation; ``None``: unlimited."""

    def __init__(self, budget: int | None) -> None:
        self.left = budget
        self.written = 0

    def take(self, n: int) -> int:
        """How many of ``n`` bytes fit; raises ENOSPC (after the caller wrote what fits) when not all do."""
        if self.left is None:
            self.written += n
            return n
        fit = min(n, self.left)
        self.left -= fit
        self.written += fit
        return fit


def _full() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device (simulated)")


class _File:
    """A real binary file whose writes draw on ``disk``."""

    def __init__(self, real, disk: Disk) -> None:  # noqa: ANN001 - an open file
        self._f, self._disk = real, disk

    def write(self, data) -> int:  # noqa: ANN001 - bytes-like, or str for a text file
        if isinstance(data, str):
            raw = data.encode()
            fit = self._disk.take(len(raw))
            self._f.write(raw[:fit].decode(errors="ignore"))
        else:
            raw = memoryview(data).cast("B")
            fit = self._disk.take(len(raw))
            self._f.write(raw[:fit])
        if fit < len(raw):
            raise _full()
        return len(data) if isinstance(data, str) else fit

    def __getattr__(self, name: str):  # noqa: ANN204 - flush, fileno, close, ...
        return getattr(self._f, name)

    def __enter__(self) -> _File:
        return self

    def __exit__(self, *exc) -> None:  # noqa: ANN002
        self._f.close()


def budgets(total: int, seed: int, n: int) -> list[int]:
    """``n`` seeded byte budgets below ``total``, with 0, 1 and ``total - 1``."""
    rng = np.random.default_rng(seed)
    return sorted({0, 1, total - 1, *rng.integers(1, total, n).tolist()})


def limit_open(monkeypatch: pytest.MonkeyPatch, disk: Disk, modules: Iterable[ModuleType]) -> None:
    """Files that ``modules`` open for writing draw on ``disk``."""
    real_open = open

    def limited_open(path, mode="r", *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        f = real_open(path, mode, *a, **k)
        return _File(f, disk) if "w" in mode or "a" in mode else f

    for module in modules:
        monkeypatch.setattr(module, "open", limited_open, raising=False)


def limit_pwrite(monkeypatch: pytest.MonkeyPatch, disk: Disk, module: ModuleType, name: str) -> None:
    """``module.name(fd, view, offset)`` (a positional write of an array) draws on ``disk``."""
    real = getattr(module, name)

    def limited(fd: int, view: np.ndarray, offset: int) -> None:
        raw = view.reshape(-1).view(np.uint8)
        fit = disk.take(raw.size)
        real(fd, raw[:fit], offset)
        if fit < raw.size:
            raise _full()

    monkeypatch.setattr(module, name, limited)
