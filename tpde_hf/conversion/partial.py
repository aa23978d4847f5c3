"""The hidden ``.<out>.tpde-partial`` folder of an unfinished conversion: made, resumed, kept or removed.

A conversion works inside this sibling folder and renames the finished repo into place, so an
interrupted run never leaves a folder that looks complete. After a failure the folder is kept only
where ``resume=True`` (``tpde convert --resume``) can use it:

* bad input (:class:`ConversionError`, :class:`~tpde_hf.errors.TpdeFormatError`: a truncated or
  malformed source, an already quantized model, ...) removes the folder this run made: a rerun
  would fail the same way, so there is nothing to continue;
* anything else (Ctrl-C, a kill, a full disk, an error raised by an ``on_tensor`` hook) keeps it
  when it holds finished work (a journaled encode task, or staged ``.bin`` / GGUF / cast weights), and
  names it on the exception (:func:`kept_partial`); a folder with nothing to resume is removed;
* the folder of an earlier run that this run did not take over (``resume`` refused, or the error
  came before the folder was touched) is left as it was.

Example::

    @keeps_partial_only_if_resumable
    def convert(source, output_dir, **options): ...

    try:
        convert("model", "out")
    except KeyboardInterrupt as exc:
        print(kept_partial(exc))   # .../.out.tpde-partial, or None when nothing was worth keeping
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from tpde_hf.conversion.errors import ConversionError
from tpde_hf.conversion.sources import is_staged
from tpde_hf.errors import TpdeFormatError

logger = logging.getLogger("tpde_hf.conversion")

STATE_NAME = "state.json"
JOURNAL_NAME = "journal.jsonl"
_KEPT_ATTR = "tpde_partial_kept"
_F = TypeVar("_F", bound=Callable[..., Any])


def partial_dir(output_dir: str | os.PathLike) -> Path:
    """Where an unfinished conversion of ``output_dir`` lives: a hidden sibling folder."""
    out = Path(output_dir).expanduser().absolute()
    return out.parent / f".{out.name}.tpde-partial"


def prepare_partial(partial: Path, state: dict, resume: bool) -> None:
    """Take over ``partial`` for a run described by ``state`` (source fingerprint and options).

    ``resume``: continue the folder of an interrupted run with the same state (refused otherwise);
    without it, an earlier folder is discarded with a warning and a new one is made.
    """
    state_file = partial / STATE_NAME
    if partial.exists():
        old = None
        try:
            old = json.loads(state_file.read_text())
        except (OSError, ValueError):
            pass
        if resume:
            if old is None:
                raise ConversionError(f"{partial}: unfinished conversion without a readable {STATE_NAME}; "
                                      "delete this folder to start over")
            diff = [k for k in ("source", "options") if old.get(k) != state[k]]
            if diff:
                detail = {k: {"before": old.get(k), "now": state[k]} for k in diff}
                raise ConversionError(
                    f"{partial}: cannot resume, the {' and '.join(diff)} changed since the interrupted run: "
                    f"{json.dumps(detail)}. Rerun with the same source and options, or without resume to start over."
                )
            logger.info("resuming the conversion in %s", partial)
            return
        logger.warning("discarding an unfinished conversion in %s (pass resume=True / --resume to continue it)",
                       partial)
        shutil.rmtree(partial)
    elif resume:
        logger.info("nothing to resume in %s; starting a new conversion", partial)
    partial.mkdir(parents=True)
    state_file.write_text(json.dumps(state, indent=1))


def kept_partial(exc: BaseException) -> Path | None:
    """The partial folder a failed conversion kept for ``resume``, or None (removed, or never made)."""
    return getattr(exc, _KEPT_ATTR, None)


def keeps_partial_only_if_resumable(convert: _F) -> _F:
    """Wrap ``convert(source, output_dir, **options)`` so a failure settles its partial folder (module docstring)."""

    @functools.wraps(convert)
    def wrapper(source: Any, output_dir: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        partial = partial_dir(output_dir)
        before = _stamp(partial / STATE_NAME)
        try:
            return convert(source, output_dir, *args, **kwargs)
        except BaseException as exc:
            _settle(partial, _stamp(partial / STATE_NAME) != before, exc)
            raise

    return wrapper  # type: ignore[return-value]


def _settle(partial: Path, ours: bool, exc: BaseException) -> None:
    if not partial.is_dir():
        return
    if isinstance(exc, (ConversionError, TpdeFormatError)):
        if ours:  # bad input: a rerun fails the same way, so nothing here is worth keeping
            shutil.rmtree(partial, ignore_errors=True)
        return
    if _resumable(partial):
        setattr(exc, _KEPT_ATTR, partial)
        if hasattr(exc, "add_note"):  # Python 3.11+: shown under the traceback of an API call
            exc.add_note(f"tpde: the finished part of the conversion is kept in {partial}; "
                         "rerun with resume=True (tpde convert --resume) to continue it")
    elif ours:
        shutil.rmtree(partial, ignore_errors=True)


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """Identity of a file's current version (None if absent): a new state file means a new run's folder."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_ctime_ns


def _resumable(partial: Path) -> bool:
    """Whether ``partial`` holds finished work: a journaled encode task, or a finished staging."""
    if is_staged(partial / "staging"):
        return True
    try:
        lines = (partial / JOURNAL_NAME).read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        try:
            if isinstance(json.loads(line), dict):
                return True
        except ValueError:
            continue  # a torn last line
    return False
