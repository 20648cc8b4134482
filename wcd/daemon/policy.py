"""Placement and eviction decisions as pure functions of a snapshot of the
workers, so they are unit-tested without processes (tests/test_policy.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

# Worker slot states, as the scheduler keeps them.
STARTING, IDLE, SERVING, DRAINING, SWAPPING, RESTARTING, FAILED = (
    "starting", "idle", "serving", "draining", "swapping", "restarting", "failed")
BUSY_STATES = (STARTING, DRAINING, SWAPPING, RESTARTING, FAILED)


@dataclass(frozen=True)
class SlotView:
    index: int
    state: str
    model: str | None  # served, or being swapped to
    active: int  # requests in flight
    last_used: float
    tensor_parallel_size: int = 1  # of the worker (group)
    parked: tuple[str, ...] = ()  # models parked on the worker's device
    serves: tuple[int, ...] = (1,)  # tensor-parallel sizes of the models it may serve


def serving_slot(slots: Sequence[SlotView], model: str) -> SlotView | None:
    """The slot that serves `model` or is bringing it in."""
    return next((s for s in slots if s.model == model and s.state not in (RESTARTING, FAILED)
                 and s.state != DRAINING), None)


def choose_slot(slots: Sequence[SlotView], model: str,
                tensor_parallel_size: int = 1) -> SlotView | None:
    """Where to bring `model` in: among workers that serve its tensor-parallel
    size, one that has it parked, else an empty one, else the least recently
    used one, preferring those with no request in flight. Among equals the
    smallest worker, so a group stays free for the models that need all of
    it. None: all busy."""
    candidates = [s for s in slots if s.state in (IDLE, SERVING)
                  and tensor_parallel_size in s.serves]
    parked = [s for s in candidates if model in s.parked]
    if parked:
        return min(parked, key=lambda s: s.active > 0)
    empty = [s for s in candidates if s.model is None]
    if empty:
        return min(empty, key=lambda s: s.tensor_parallel_size)
    if not candidates:
        return None
    return min(candidates, key=lambda s: (s.active > 0, s.tensor_parallel_size, s.last_used))


def expired(slots: Sequence[SlotView], now: float,
            keep_alive_of: Callable[[str], float]) -> list[SlotView]:
    """Serving slots idle for longer than their model's keep-alive (0: forever)."""
    return [s for s in slots
            if s.state == SERVING and s.model is not None and s.active == 0
            and keep_alive_of(s.model) > 0 and now - s.last_used > keep_alive_of(s.model)]


def restart_delay(restarts: int, minimum: float, maximum: float) -> float:
    """Exponential backoff between restarts of a crashing worker."""
    return min(maximum, minimum * (2 ** max(0, restarts - 1)))
