"""Peak resident memory of this process, resettable (Linux ``/proc``; ``getrusage`` elsewhere).

Why resettable: a conversion run inside a long-lived process (a notebook, a test session) would
otherwise report the peak of whatever ran before it. Writing ``5`` to ``/proc/self/clear_refs``
resets ``VmHWM`` (Linux >= 4.0).

Example::

    base = reset_peak()
    work()
    print(peak_rss() - base, "bytes above the baseline")
"""

from __future__ import annotations

import resource
import sys


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss() -> int:
    """Resident set size now, in bytes."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    return peak_rss()


def peak_rss() -> int:
    """Peak resident set size since start (or since the last :func:`reset_peak`), in bytes."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru if sys.platform == "darwin" else ru * 1024


def reset_peak() -> int:
    """Reset the peak to the current RSS where the OS allows it; return the current RSS in bytes."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return current_rss()
