"""Placement and eviction decisions as pure functions of a snapshot of the
workers, so they are unit-tested without processes (tests/test_policy.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

# Worker slot states, as the scheduler keeps them.
STARTING, IDLE, SERVING, DRAINING, SWAPPING, RESTARTING = (
    "starting", "idle", "serving", "draining", "swapping", "restarting")


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
    loaded_at: float = 0.0  # when the served model's swap finished
    waiting: int = 0  # requests queued for the served model
    incoming: str | None = None  # the model a draining slot will swap to


def serving_slot(slots: Sequence[SlotView], model: str) -> SlotView | None:
    """The slot that serves `model` or is bringing it in (swapping to it, or
    draining its current model to swap to it)."""
    return next((s for s in slots if s.state != RESTARTING and (
        s.incoming == model if s.state == DRAINING else s.model == model)), None)


def choose_slot(slots: Sequence[SlotView], model: str, tensor_parallel_size: int = 1, *,
                now: float = 0.0, min_resident_s: float | None = None) -> SlotView | None:
    """Where to bring `model` in: among workers that serve its tensor-parallel
    size, one that has it parked, else an empty one, else the least recently
    used one, preferring those with no request in flight or waiting. Among
    equals the smallest worker, so a group stays free for the models that need
    all of it. None: all busy.

    `min_resident_s` is given for a load that a request asks for (an
    operator's may evict anything): then no model is evicted that came in less
    than `min_resident_s` before `now`, so one client alternating models cannot
    take a worker from under the others' feet faster than that; the request
    waits instead (None)."""
    candidates = [s for s in slots if s.state in (IDLE, SERVING)
                  and tensor_parallel_size in s.serves]
    if min_resident_s is not None:
        candidates = [s for s in candidates if not too_new(s, now, min_resident_s)]
    parked = [s for s in candidates if model in s.parked]
    if parked:
        return min(parked, key=in_use)
    empty = [s for s in candidates if s.model is None]
    if empty:
        return min(empty, key=lambda s: s.tensor_parallel_size)
    if not candidates:
        return None
    return min(candidates, key=lambda s: (in_use(s), s.tensor_parallel_size, s.last_used))


def in_use(slot: SlotView) -> bool:
    return slot.active > 0 or slot.waiting > 0


def too_new(slot: SlotView, now: float, min_resident_s: float) -> bool:
    """Whether the slot's model has not yet stayed its minimum time."""
    return slot.model is not None and now - slot.loaded_at < min_resident_s


def next_evictable_at(slots: Sequence[SlotView], now: float,
                      min_resident_s: float) -> float | None:
    """The earliest time a model now kept by its minimum residence may be
    evicted by a request: when to look again at the requests that wait for a
    slot. None: no model is kept that way."""
    times = [s.loaded_at + min_resident_s for s in slots
             if s.state == SERVING and too_new(s, now, min_resident_s)]
    return min(times, default=None)


def expired(slots: Sequence[SlotView], now: float,
            keep_alive_of: Callable[[str], float]) -> list[SlotView]:
    """Serving slots idle for longer than their model's keep-alive (0: forever)."""
    return [s for s in slots
            if s.state == SERVING and s.model is not None and s.active == 0
            and keep_alive_of(s.model) > 0 and now - s.last_used > keep_alive_of(s.model)]


def failures_in_a_row(previous: int, up_s: float | None, reset_after_s: float) -> int:
    """Count a worker's death: a worker that stayed up (ready) for
    `reset_after_s` was healthy, so its death starts a new run of failures;
    one that died sooner, or never became ready (`up_s` None), extends the run."""
    if up_s is not None and up_s >= reset_after_s:
        return 1
    return previous + 1


def restart_delay(failures: int, minimum: float, maximum: float) -> float:
    """Exponential backoff between restarts of a worker failing `failures`
    times in a row."""
    return min(maximum, minimum * (2 ** max(0, failures - 1)))
