"""Linux process plumbing shared by a worker and its group's followers."""

from __future__ import annotations

import contextlib
import ctypes
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: signal.Signals) -> None:
    """Have the kernel send `sig` when the parent dies: a process blocked in an
    engine build or a collective never reads its socket's EOF. Not Linux: the
    EOF still ends it when it next reads."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)


def trim_heap() -> None:
    """Return freed heap pages to the OS, so RSS shows what a release freed."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
