"""What the daemon and its workers both say of a process and of a swap's
phases, one way. Stdlib only: the daemon and the worker share it."""

from __future__ import annotations

import os


def phases_line(phases: dict[str, float]) -> str:
    """A swap's phase timings as a log line shows them: name=12.3ms ..."""
    return " ".join(f"{name}={seconds * 1000:.1f}ms" for name, seconds in phases.items())


def rss_bytes(pid: int | str = "self") -> int | None:
    """A process's resident memory; None where it is gone."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None
