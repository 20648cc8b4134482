"""Placement, room-making and eviction decisions as pure functions of a
snapshot of the workers, so they are unit-tested without processes
(tests/test_policy.py). The scheduler's state machine asks; it alone acts.

A worker holds several resident models. A model comes in where its
footprint (weights plus KV cache, measured at its first load, estimated
before) fits beside the residents under the worker's memory budget and its
most resident models. Room is made from idle residents first (least recently
used first, never one younger than its minimum residence when a request
asks); busy residents are never evicted by requests: once a waiting model has
waited a quantum, a busy resident that has served at least a quantum is
suspended instead (its requests paused and resumed later, no work lost).
Idle residents are evicted, never suspended.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

# A model's life on a worker.
LOADING, SERVING, DRAINING, LEAVING, SUSPENDING, SUSPENDED = (
    "loading", "serving", "draining", "leaving", "suspending", "suspended")
# A worker's life.
STARTING, READY, RESTARTING = "starting", "ready", "restarting"
# Estimates for a model never loaded, before its footprint is measured.
CPU_DEFAULT_KV_BYTES = 4 << 30  # vLLM's CPU default KV cache space (VLLM_CPU_KVCACHE_SPACE)
GPU_DEFAULT_UTILIZATION = 0.9  # vLLM's gpu_memory_utilization default


@dataclass(frozen=True)
class ResidentView:
    name: str
    state: str
    active: int  # leases held
    waiting: int  # requests queued for it
    bytes: int  # its footprint now (weights only while suspended, usually)
    loaded_at: float  # when it last began serving (loaded or resumed)
    last_used: float
    kv_bytes: int = 0  # what suspending it would free
    ranks: int = 1  # its tensor-parallel size: the ranks of a group it takes

    @property
    def busy(self) -> bool:
        return self.active > 0 or self.waiting > 0


@dataclass(frozen=True)
class WorkerView:
    index: int
    available: bool  # ready, with no operation under way or queued
    serves: tuple[int, ...]  # tensor-parallel sizes of the models it may serve
    tensor_parallel_size: int = 1
    residents: tuple[ResidentView, ...] = ()
    parked: tuple[str, ...] = ()
    budget_bytes: int = 0  # 0: no memory limit known
    max_resident: int = 1  # a tensor-parallel group: its ranks
    can_suspend: bool = True  # a tensor-parallel group drains rather than suspends

    def stepped(self) -> list[ResidentView]:
        """Residents that take part in stepping (not suspended)."""
        return [r for r in self.residents if r.state not in (SUSPENDED, SUSPENDING)]

    def used_bytes(self) -> int:
        return sum(r.bytes for r in self.residents)


@dataclass(frozen=True)
class Room:
    """How to bring a model in on `worker`: `evict` (idle residents, or busy
    ones drained where nothing else works) leave in the same operation; or
    first `suspend` one resident and decide again. `at`: nothing to do yet,
    look again then."""

    worker: int
    evict: tuple[str, ...] = ()
    suspend: str | None = None
    at: float | None = None


def footprint_estimate(disk_bytes: int, engine_args: dict, device: str,
                       memory_bytes: int) -> int:
    """A model's footprint before its first load: its weights plus the KV
    cache its engine args ask for (vLLM's default where they do not)."""
    kv = engine_args.get("kv_cache_memory_bytes")
    if isinstance(kv, int) and kv > 0:
        return disk_bytes + kv
    if device == "cuda":
        share = engine_args.get("gpu_memory_utilization", GPU_DEFAULT_UTILIZATION)
        return max(disk_bytes, int(share * memory_bytes))
    return disk_bytes + CPU_DEFAULT_KV_BYTES


def fits(worker: WorkerView, need: int, leaving: Sequence[ResidentView] = (),
         ranks: int = 1) -> bool:
    gone = {r.name for r in leaving}
    stepped = [r for r in worker.stepped() if r.name not in gone]
    if worker.tensor_parallel_size > 1:
        return _fits_a_group(worker, need, stepped, ranks)
    if len(stepped) >= worker.max_resident:
        return False
    used = worker.used_bytes() - sum(r.bytes for r in leaving)
    return worker.budget_bytes <= 0 or used + need <= worker.budget_bytes


def _fits_a_group(worker: WorkerView, need: int, stepped: list[ResidentView],
                  ranks: int) -> bool:
    """A group runs one engine per rank, each on its rank's device (the
    budget is one device's): TP=1 models side by side, one per rank, or one
    engine of a larger size alone, in a world formed at that size."""
    if (ranks > 1 or any(r.ranks > 1 for r in stepped)) and stepped:
        return False
    return sum(r.ranks for r in stepped) + ranks <= worker.max_resident and (
        worker.budget_bytes <= 0 or need <= worker.budget_bytes)


def make_room(worker: WorkerView, need: int, *, now: float, waited_since: float,
              quantum_s: float, min_resident_s: float | None,
              exclude: str | None = None, ranks: int = 1) -> Room | None:
    """How `worker` takes a model needing `need` bytes that has waited since
    `waited_since`; None: it cannot now, nor at a time known in advance.

    `min_resident_s` None: an operator asks, and may evict any idle resident
    and drain busy ones (least recently used first). `exclude`: the model
    itself (a suspended resident resuming is not its own victim). `ranks`:
    the model's tensor-parallel size."""
    if fits(worker, need, ranks=ranks):
        return Room(worker.index)
    # Suspended residents nobody waits for go first: no work is lost.
    idle = sorted((r for r in worker.residents if r.state in (SERVING, SUSPENDED)
                   and r.name != exclude and not r.busy),
                  key=lambda r: (r.state != SUSPENDED, r.last_used))
    serving = sorted((r for r in worker.residents if r.state == SERVING and r.name != exclude),
                     key=lambda r: r.last_used)
    evictable = [r for r in idle if min_resident_s is None
                 or not too_new(r, now, min_resident_s)]
    victims = _until_it_fits(worker, need, ranks, evictable)
    if victims is not None:
        return Room(worker.index, evict=victims)
    if min_resident_s is None:
        # An operator's load drains busy residents too, as a swap does.
        victims = _until_it_fits(worker, need, ranks,
                                 [*evictable, *(r for r in serving if r.busy)])
        return Room(worker.index, evict=victims) if victims is not None else None
    if not worker.can_suspend:
        return _drain_in_a_group(worker, need, now, waited_since, quantum_s, serving, ranks)
    return _suspend_for(worker, need, now, waited_since, quantum_s, min_resident_s, serving)


def _suspend_for(worker: WorkerView, need: int, now: float, waited_since: float,
                 quantum_s: float, min_resident_s: float,
                 serving: list[ResidentView]) -> Room | None:
    """Room by suspending a busy resident, one at a time (the one serving
    longest first), once the model waited a quantum and the victim served
    one; else the time something changes: a quantum ends, or an idle
    resident comes of age and may be evicted. Idle residents are never
    suspended: suspended models keep their weights, and only work in flight
    is worth keeping that way."""
    times = [r.loaded_at + min_resident_s for r in serving if not r.busy]
    busy = sorted((r for r in serving if r.busy), key=lambda r: r.loaded_at)
    if busy and _suspension_helps(worker, need, busy):
        victim = busy[0]
        at = max(waited_since, victim.loaded_at) + quantum_s
        if at <= now:
            return Room(worker.index, suspend=victim.name)
        times.append(at)
    return Room(worker.index, at=min(times)) if times else None


def _suspension_helps(worker: WorkerView, need: int,
                      candidates: Sequence[ResidentView]) -> bool:
    """Whether suspending every candidate would make room: fewer engines
    stepped, and their KV caches freed."""
    stepped = len(worker.stepped()) - len(candidates)
    used = worker.used_bytes() - sum(r.kv_bytes for r in candidates)
    return stepped < worker.max_resident and (worker.budget_bytes <= 0
                                              or used + need <= worker.budget_bytes)


def _drain_in_a_group(worker: WorkerView, need: int, now: float, waited_since: float,
                      quantum_s: float, serving: list[ResidentView],
                      ranks: int) -> Room | None:
    """A tensor-parallel group never suspends: after a quantum busy
    residents drain (their requests finish, bounded by the drain timeout),
    the least recently used first, as many as the model needs ranks."""
    victims = _until_it_fits(worker, need, ranks, serving)
    if victims is None:
        return None
    at = waited_since + quantum_s
    if at > now:
        return Room(worker.index, at=at)
    return Room(worker.index, evict=victims)


def _until_it_fits(worker: WorkerView, need: int, ranks: int,
                   candidates: Sequence[ResidentView]) -> tuple[str, ...] | None:
    """The first of `candidates`, in order, whose leaving makes room; None
    when even all of them leaving does not."""
    for count in range(1, len(candidates) + 1):
        if fits(worker, need, candidates[:count], ranks):
            return tuple(r.name for r in candidates[:count])
    return None


def place(workers: Sequence[WorkerView], model: str, tensor_parallel_size: int, need: int, *,
          now: float, waited_since: float, quantum_s: float,
          min_resident_s: float | None) -> Room | None:
    """Where to bring `model` in, among available workers that serve its
    tensor-parallel size: one that has it parked, else one where it fits as
    is, else one where idle residents make room, else one where a suspension
    will. Among equals the smallest worker, so a group stays free for the
    models that need all of it. A Room with `at` only: look again then."""
    rooms = []
    for worker in workers:
        if not worker.available or tensor_parallel_size not in worker.serves:
            continue
        room = make_room(worker, need, now=now, waited_since=waited_since,
                         quantum_s=quantum_s, min_resident_s=min_resident_s,
                         ranks=tensor_parallel_size)
        if room is not None:
            rooms.append((worker, room))
    if not rooms:
        return None

    def rank(item: tuple[WorkerView, Room]) -> tuple:
        worker, room = item
        waits = room.at is not None
        costs = (room.suspend is not None, len(room.evict),
                 sum(r.busy for r in worker.residents if r.name in room.evict))
        return (waits, model not in worker.parked, costs, worker.tensor_parallel_size,
                min((r.last_used for r in worker.residents), default=0.0))

    return min(rooms, key=rank)[1]


def choose_worker(workers: Sequence[WorkerView], model: str, tensor_parallel_size: int
                  ) -> WorkerView | None:
    """The worker an operator's swap replaces the residents of: one that has
    `model` parked, else an empty one, else the least recently used, idle
    first; among equals the smallest."""
    candidates = [w for w in workers if tensor_parallel_size in w.serves]
    if not candidates:
        return None

    def rank(worker: WorkerView) -> tuple:
        return (model not in worker.parked, bool(worker.residents),
                any(r.busy for r in worker.residents), worker.tensor_parallel_size,
                max((r.last_used for r in worker.residents), default=0.0))

    return min(candidates, key=rank)


def too_new(resident: ResidentView, now: float, min_resident_s: float) -> bool:
    """Whether a resident has not yet stayed its minimum time."""
    return now - resident.loaded_at < min_resident_s


def expired(worker: WorkerView, now: float,
            keep_alive_of: Callable[[str], float]) -> list[ResidentView]:
    """Residents idle for longer than their keep-alive (0: forever)."""
    return [r for r in worker.residents
            if r.state in (SERVING, SUSPENDED) and not r.busy
            and keep_alive_of(r.name) > 0 and now - r.last_used > keep_alive_of(r.name)]


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
