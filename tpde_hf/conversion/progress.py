"""The "Encoding + verifying" progress bar of a conversion: advanced as each encode task finishes.

Encode tasks start while the conversion is still planning (importing transformers' modeling code),
so on a small model most of them finish before the plan does. A bar drawn only once the plan was
done jumped from 0 to 100% in one refresh and showed the rate of that instant (gigabytes per
second). This bar is opened with the first task, advanced from the task threads as each task
finishes, and shows the average rate since it opened (``smoothing=0``), the same figure as the
"encode+verify" throughput of the conversion report. Work an interrupted run already did (``resume``)
counts as done without entering the rate, as ``tqdm``'s ``initial`` does.

It is huggingface_hub's ``tqdm``, so ``HF_HUB_DISABLE_PROGRESS_BARS=1`` and ``tpde -q`` hide it.

Example::

    progress = EncodeProgress()
    progress.add(3_000_000)        # bytes of the tasks just started
    progress.done(1_000_000)       # one task finished
    progress.close()
"""

from __future__ import annotations

import threading
import time

from huggingface_hub.utils import tqdm as hf_tqdm


class EncodeProgress:
    """A byte-counting bar whose total grows and shrinks as tasks are started and dropped (thread-safe).

    The bar opens at the first :meth:`add`, so its clock starts with the first task.
    """

    def __init__(self, desc: str = "Encoding + verifying"):
        self._lock = threading.Lock()
        self._desc = desc
        self.bar: hf_tqdm | None = None
        self._last_done: float | None = None

    def add(self, nbytes: int, already_done: int = 0) -> None:
        """Count ``nbytes`` more work, of which ``already_done`` was done by an earlier run (not in the rate)."""
        with self._lock:
            if self.bar is None:
                if not nbytes:
                    return  # nothing started yet: the bar (and its clock) opens with the first task
                # smoothing=0: the rate is the bytes done since the bar opened over the time since then.
                self.bar = hf_tqdm(total=nbytes, initial=already_done, unit="B", unit_scale=True, desc=self._desc,
                                   name="tpde_hf", smoothing=0)
                return
            self.bar.total += nbytes
            if already_done and not self.bar.disable:
                self.bar.n += already_done
                self.bar.initial += already_done
                self.bar.last_print_n += already_done
                self.bar.refresh()

    def drop(self, nbytes: int) -> None:
        """Work counted by :meth:`add` that will not be done after all (a task cancelled before it ran)."""
        with self._lock:
            if self.bar is not None:
                self.bar.total -= nbytes

    def done(self, nbytes: int) -> None:
        """A task of ``nbytes`` finished (called from whichever thread saw it finish)."""
        with self._lock:
            if self.bar is not None:
                self.bar.update(nbytes)
                self._last_done = time.time()

    def close(self) -> None:
        with self._lock:
            if self.bar is None:
                return
            if not self.bar.disable and self._last_done is not None and self.bar.n >= self.bar.total:
                # The last line shows the time and rate at which the work was done, not the wait for the
                # plan that may follow it (tqdm redraws with the time since it opened when it closes).
                self.bar.start_t += time.time() - self._last_done
            self.bar.close()
