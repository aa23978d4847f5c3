"""Crash-safe file writes: a reader sees the old file or the whole new one, never a torn one.

Example::

    with atomic_file(Path("repo/model.safetensors")) as out:
        out.write(header)
        out.write(payload)   # an exception here leaves the old file and no temporary behind
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Write ``<path>.tmp``, sync it, and rename it to ``path`` only if the block completes."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
