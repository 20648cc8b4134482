"""What the daemon and its workers both say of a process and of a swap's
phases, one way. Stdlib only: the daemon and the worker share it."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


@dataclass
class PhaseClock:
    """Times the phases of one swap (or a worker's start) and reports each as it
    ends."""

    report: Callable[[str, float], None]
    phases: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - start
            self.phases[name] = self.phases.get(name, 0.0) + seconds
            self.report(name, seconds)

    def total(self) -> float:
        return time.perf_counter() - self.started


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
