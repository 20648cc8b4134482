"""The scheduler as a pure state machine: `handle(state, event) -> effects`.

Every change to worker and model state is an event (a request wanting a
model, a lease ending, an operator's operation, an operation's result, a
worker starting, dying or reporting its health, a timer, a config reload,
stop); `handle` applies it to the `State` it is given and returns the
effects for the asyncio shell (wcd/daemon/scheduler.py) to perform: grant or
refuse a waiting request, start a worker, run an operation in a worker,
answer an operator, set a timer. Nothing here awaits, reads a clock or
touches a process, so the whole machine is tested in milliseconds
(tests/test_scheduler_core.py, tests/test_scheduler_interleavings.py).

A model's life on a worker follows TRANSITIONS; a worker runs one operation
at a time (`Worker.op`), with at most one operator's operation queued behind
it. Decisions of where and what to evict are policy.py's.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from wcd.daemon import errors, policy
from wcd.daemon.catalog import ModelEntry
from wcd.daemon.config import Settings, WorkerSettings
from wcd.daemon.policy import (DRAINING, LEAVING, LOADING, READY, RESTARTING, SERVING,
                               STARTING, SUSPENDED, SUSPENDING, ResidentView,
                               WorkerView)
from wcd.workers import protocol as p

log = logging.getLogger(__name__)
RECENT_SWAPS = 20  # a status page's worth of history; older swaps are in the log

# (state, trigger) -> next state of a model on a worker. A trigger missing
# here for a state is a bug in this module (IllegalTransition).
TRANSITIONS: dict[tuple[str | None, str], str | None] = {
    (None, "load"): LOADING,  # a swap bringing it in began in the worker
    (SUSPENDED, "resume"): LOADING,
    (SERVING, "drain"): DRAINING,  # an operation taking it out waits for its leases
    (DRAINING, "keep"): SERVING,  # that operation was dropped
    (DRAINING, "leave"): LEAVING,  # the operation began in the worker
    (SUSPENDED, "leave"): LEAVING,  # suspended residents need no drain
    (SERVING, "suspend"): SUSPENDING,
    # What the worker reports at an operation's end is the truth, from any state.
    **{(state, "reported"): SERVING for state in
       (None, LOADING, SERVING, DRAINING, LEAVING, SUSPENDING, SUSPENDED)},
    **{(state, "reported_suspended"): SUSPENDED for state in
       (None, LOADING, SERVING, DRAINING, LEAVING, SUSPENDING, SUSPENDED)},
    **{(state, "gone"): None for state in
       (LOADING, SERVING, DRAINING, LEAVING, SUSPENDING, SUSPENDED)},
}


class IllegalTransition(RuntimeError):
    pass


# ---- state -------------------------------------------------------------------------------


@dataclass
class Resident:
    entry: ModelEntry
    state: str
    active: int = 0  # leases held on it
    running: int = 0  # its requests in the engine, at the last health report
    bytes: int = 0  # footprint, as the worker last reported it
    kv_usage: float = 0.0  # fraction of its KV cache in use, likewise
    cache_config: dict[str, str] = field(default_factory=dict)  # its engine's, likewise
    fingerprint: str | None = None  # vLLM's system_fingerprint of its engine, likewise
    rank: int = 0  # in a tensor-parallel group, the rank whose device runs it, likewise
    loaded_at: float = 0.0  # when it last began serving (loaded or resumed)
    last_used: float = 0.0
    generation: int = 0  # leases of an earlier generation count no more
    suspended_at: float = 0.0

    @property
    def name(self) -> str:
        return self.entry.name


@dataclass
class Op:
    """One operation on one worker: "swap" brings `entry` in, `targets`
    leaving first; "unload" takes `targets` out; "suspend" suspends
    targets[0]."""

    serial: int
    kind: str
    entry: ModelEntry | None
    targets: tuple[str, ...]
    force: bool = False
    ticket: int | None = None  # the operator's operation it answers
    # An operator's swap decides what leaves when it begins, not when asked:
    # "replace" (every other resident) or "load" (room as policy makes it,
    # for a model whose footprint, never measured, is `estimate`).
    mode: str = ""
    estimate: int = 0
    on_demand: bool = False  # asked for by requests: dropped when none waits any more
    running: bool = False  # sent to the worker (else its targets still drain)
    drain_started: float = 0.0


@dataclass
class Worker:
    index: int
    settings: WorkerSettings
    phase: str = STARTING
    incarnation: int = 0
    residents: dict[str, Resident] = field(default_factory=dict)  # in the order they came
    op: Op | None = None
    queued: Op | None = None  # an operator's operation waiting for `op`
    restore: list[ModelEntry] = field(default_factory=list)  # to bring in once ready
    memory_bytes: int = 0  # what the worker said its residents may use at most
    cached: dict[str, int] = field(default_factory=dict)  # host cache: model -> bytes
    parked: dict[str, int] = field(default_factory=dict)  # parked engines: model -> bytes
    device_bytes: int = 0
    restarts: int = 0
    failures: int = 0  # deaths in a row, for the restart backoff
    up_since: float | None = None
    preloaded: bool = False
    last_swap: dict | None = None


@dataclass
class Waiter:
    entry: ModelEntry
    since: float
    estimate: int  # its footprint before it was ever measured


@dataclass
class LeaseRecord:
    worker: int
    incarnation: int
    model: str
    generation: int


@dataclass
class State:
    settings: Settings
    workers: list[Worker]
    waiters: dict[int, Waiter] = field(default_factory=dict)  # oldest first
    leases: dict[int, LeaseRecord] = field(default_factory=dict)
    footprints: dict[str, int] = field(default_factory=dict)  # measured, serving
    kv_bytes: dict[str, int] = field(default_factory=dict)  # freed by a suspension, measured
    stopping: bool = False
    recent_swaps: deque = field(default_factory=lambda: deque(maxlen=RECENT_SWAPS))
    serials: Any = field(default_factory=lambda: itertools.count(1))
    wake_at: float | None = None  # the "wake" timer set last
    preload: list[ModelEntry | None] = field(default_factory=list)  # per worker, resolved

    @classmethod
    def initial(cls, settings: Settings, preload: list[ModelEntry | None]) -> State:
        return cls(settings, [Worker(i, w) for i, w in enumerate(settings.workers)],
                   preload=preload)


# ---- events ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Acquire:
    waiter: int
    entry: ModelEntry
    estimate: int
    now: float


@dataclass(frozen=True)
class WaiterGone:
    waiter: int
    now: float


@dataclass(frozen=True)
class Release:
    lease: int
    now: float


@dataclass(frozen=True)
class Operate:
    ticket: int
    kind: str  # "swap", "load" or "unload"
    entry: ModelEntry
    worker: int | None
    force: bool
    estimate: int
    now: float


@dataclass(frozen=True)
class OpFinished:
    worker: int
    incarnation: int
    op: int
    done: dict | None  # the "done" event
    error: p.ErrorInfo | None
    residents: list[p.Resident] | None  # what the worker serves now; None: it died
    now: float


@dataclass(frozen=True)
class WorkerStarted:
    worker: int
    incarnation: int
    memory_bytes: int
    now: float


@dataclass(frozen=True)
class WorkerDied:
    worker: int
    incarnation: int
    code: int | None
    now: float


@dataclass(frozen=True)
class Health:
    worker: int
    incarnation: int
    pong: p.Pong
    now: float


@dataclass(frozen=True)
class Timer:
    """A drain's deadline (key ("drain", worker, incarnation, op)) or a
    moment to look at the waiting requests again (key ("wake",))."""

    key: tuple
    now: float


@dataclass(frozen=True)
class Tick:
    now: float


@dataclass(frozen=True)
class Reload:
    settings: Settings
    preload: list[ModelEntry | None]
    now: float


@dataclass(frozen=True)
class Stop:
    now: float


Event = (Acquire | WaiterGone | Release | Operate | OpFinished | WorkerStarted | WorkerDied
         | Health | Timer | Tick | Reload | Stop)


# ---- effects ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Grant:
    waiter: int
    lease: int
    worker: int
    incarnation: int
    fingerprint: str | None = None  # of the resident granted, for its answers


@dataclass(frozen=True)
class Refuse:
    waiter: int
    error: errors.WcdError


@dataclass(frozen=True)
class Accepted:
    ticket: int
    model: str | None
    worker: int


@dataclass(frozen=True)
class Answer:
    ticket: int
    event: dict


@dataclass(frozen=True)
class Fail:
    ticket: int
    error: errors.WcdError
    serving: str | None = None


@dataclass(frozen=True)
class StartWorker:
    worker: int
    incarnation: int
    delay: float


@dataclass(frozen=True)
class DiscardWorker:
    """A worker process started for an incarnation since replaced, or at stop."""

    worker: int
    incarnation: int


@dataclass(frozen=True)
class RunOp:
    worker: int
    incarnation: int
    op: Op
    drained_s: float


@dataclass(frozen=True)
class SetTimer:
    key: tuple
    at: float


@dataclass(frozen=True)
class Recorded:
    """For metrics: an operation done ("done") or failed ("failed"), a
    suspension ("suspended"), a restart ("restart")."""

    what: str
    model: str | None
    worker: int
    event: dict | None = None


Effect = (Grant | Refuse | Accepted | Answer | Fail | StartWorker | DiscardWorker | RunOp
          | SetTimer | Recorded)


# ---- the machine -----------------------------------------------------------------------


def handle(state: State, event: Event) -> list[Effect]:
    """Apply `event` to `state`; return what the shell must do."""
    out: list[Effect] = []
    _HANDLERS[type(event)](state, event, out)
    _schedule(state, event.now, out)
    return out


def _move(resident: Resident | None, trigger: str) -> str | None:
    current = resident.state if resident is not None else None
    try:
        nxt = TRANSITIONS[(current, trigger)]
    except KeyError:
        raise IllegalTransition(f"{resident.name if resident else 'a model'}: "
                                f"{trigger!r} in state {current}") from None
    if resident is not None and nxt is not None:
        resident.state = nxt
    return nxt


def _on_acquire(state: State, ev: Acquire, out: list[Effect]) -> None:
    if state.stopping:
        out.append(Refuse(ev.waiter, _stopping()))
        return
    queued = sum(w.entry.name == ev.entry.name for w in state.waiters.values())
    if queued >= state.settings.policy.queue_max:
        out.append(Refuse(ev.waiter, errors.Unavailable(
            f"{queued} requests already wait for {ev.entry.name!r}", retry_after_s=5)))
        return
    state.waiters[ev.waiter] = Waiter(ev.entry, ev.now, ev.estimate)


def _on_waiter_gone(state: State, ev: WaiterGone, out: list[Effect]) -> None:
    state.waiters.pop(ev.waiter, None)
    _drop_unwanted_ops(state, out)


def _on_release(state: State, ev: Release, out: list[Effect]) -> None:
    lease = state.leases.pop(ev.lease, None)
    if lease is None:
        return
    worker = state.workers[lease.worker]
    resident = worker.residents.get(lease.model)
    if worker.incarnation != lease.incarnation or resident is None or \
            resident.generation != lease.generation:
        return  # a lease on a worker or a model since gone
    resident.active -= 1
    resident.last_used = ev.now
    if worker.op is not None and not worker.op.running and _drained(worker, worker.op):
        _run(state, worker, ev.now, out)


def _on_operate(state: State, ev: Operate, out: list[Effect]) -> None:
    if state.stopping:
        out.append(Fail(ev.ticket, _stopping()))
        return
    name = ev.entry.name
    if ev.kind == "unload":
        holder = next((w for w in state.workers if name in w.residents
                       and (ev.worker is None or w.index == ev.worker)), None)
        if holder is None:
            out.append(Answer(ev.ticket, _noop(None, None)))
            return
        op = Op(next(state.serials), "unload", None, (name,), ev.force, ev.ticket)
        _submit(state, holder, op, ev.now, out)
        return
    worker = _worker_for(state, ev)
    if worker is None:
        out.append(Fail(ev.ticket, errors.Conflict(
            "every worker already has an operation waiting; try again shortly")))
        return
    mode = "replace" if ev.kind == "swap" else "load"
    op = Op(next(state.serials), "swap", ev.entry, (), ev.force, ev.ticket, mode=mode,
            estimate=ev.estimate)
    _submit(state, worker, op, ev.now, out)


def _worker_for(state: State, ev: Operate) -> Worker | None:
    """An operator's swap or load: the named worker, else one serving the
    model, else the best free one, else a busy one with no operation queued."""
    size = ev.entry.tensor_parallel_size
    if ev.worker is not None:
        worker = state.workers[ev.worker]
        return worker if worker.queued is None else None
    holder = next((w for w in state.workers if ev.entry.name in w.residents), None)
    if holder is not None:
        return holder if holder.queued is None else None
    views = [_view(state, w, ev.now) for w in state.workers]
    if ev.kind == "load":
        room = policy.place(views, ev.entry.name, size, _need(state, ev.entry, ev.estimate),
                            now=ev.now, waited_since=ev.now, quantum_s=0.0,
                            min_resident_s=None)
        chosen = room.worker if room is not None else None
    else:
        view = policy.choose_worker([v for v in views if v.available], ev.entry.name, size)
        chosen = view.index if view is not None else None
    if chosen is not None:
        return state.workers[chosen]
    return next((w for w in state.workers if w.queued is None and size in w.settings.serves),
                None)


def _submit(state: State, worker: Worker, op: Op, now: float, out: list[Effect]) -> None:
    """An operator's operation: at once where the worker is free, else next."""
    if worker.phase == READY and worker.op is None:
        _begin(state, worker, op, now, out)
    elif worker.queued is None:
        # The worker is starting (the operation replaces its preload or
        # restore) or busy with another operation: this one runs next.
        worker.queued = op
    else:
        out.append(Fail(op.ticket, errors.Conflict(
            f"worker {worker.index} is busy with another operation waiting; try again "
            "shortly")))


def _begin(state: State, worker: Worker, op: Op, now: float, out: list[Effect]) -> None:
    """The operation's targets stop taking requests; it runs once their
    leases end (at once when forced), or at the drain timeout."""
    if op.mode:
        serving = _serving(worker, op.entry.name)
        # A load of a model served here is done; a swap to it asks that the
        # others leave.
        op.targets = () if serving and op.mode == "load" else \
            _operator_targets(state, worker, op, now)
        if serving:
            if not op.targets:
                out.append(Answer(op.ticket, _noop(op.entry.name, worker.index)))
                return
            op.kind, op.entry = "unload", None
    # Decided before the worker restarted or a model left: what is left of it.
    op.targets = tuple(n for n in op.targets if n in worker.residents)
    if op.kind != "swap" and not op.targets:
        if op.ticket is not None:
            out.append(Answer(op.ticket, _noop(None, worker.index)))
        return
    worker.op = op
    op.drain_started = now
    if op.ticket is not None:
        out.append(Accepted(op.ticket, op.entry.name if op.entry else None, worker.index))
    if op.kind != "suspend":
        for name in op.targets:
            if worker.residents[name].state == SERVING:
                _move(worker.residents[name], "drain")
    if op.force or _drained(worker, op):
        _run(state, worker, now, out)
    else:
        out.append(SetTimer(("drain", worker.index, worker.incarnation, op.serial),
                            now + state.settings.policy.drain_timeout_s))


def _operator_targets(state: State, worker: Worker, op: Op, now: float) -> tuple[str, ...]:
    others = tuple(n for n in worker.residents if n != op.entry.name)
    if op.mode == "replace":
        return others
    need = _need(state, op.entry, op.estimate, worker)
    room = policy.make_room(_view(state, worker, now), need, now=now, waited_since=now,
                            quantum_s=0.0, min_resident_s=None, exclude=op.entry.name,
                            ranks=op.entry.tensor_parallel_size)
    return room.evict if room is not None and room.at is None else others


def _drained(worker: Worker, op: Op) -> bool:
    return op.kind == "suspend" or all(worker.residents[n].active == 0 for n in op.targets
                                       if n in worker.residents)


def _run(state: State, worker: Worker, now: float, out: list[Effect]) -> None:
    op = worker.op
    op.running = True
    for name in op.targets:
        resident = worker.residents.get(name)
        if resident is not None:
            _move(resident, "suspend" if op.kind == "suspend" else "leave")
    if op.kind == "swap":
        resident = worker.residents.get(op.entry.name)
        if resident is not None:
            _move(resident, "resume")
        else:
            worker.residents[op.entry.name] = Resident(op.entry, _move(None, "load"),
                                                       generation=next(state.serials))
    out.append(RunOp(worker.index, worker.incarnation, op, now - op.drain_started))


def _on_timer(state: State, ev: Timer, out: list[Effect]) -> None:
    if ev.key[0] == "wake":
        state.wake_at = None
        return
    _, index, incarnation, serial = ev.key
    worker = state.workers[index]
    op = worker.op
    if worker.incarnation != incarnation or op is None or op.serial != serial or op.running:
        return
    active = sum(worker.residents[n].active for n in op.targets if n in worker.residents)
    log.warning("worker %d: drain timed out with %d requests in flight; aborting them",
                index, active)
    op.force = True
    _run(state, worker, ev.now, out)


def _on_op_finished(state: State, ev: OpFinished, out: list[Effect]) -> None:
    worker = state.workers[ev.worker]
    op = worker.op
    if worker.incarnation != ev.incarnation or op is None or op.serial != ev.op:
        return  # about a worker since replaced: its death answered the operation
    worker.op = None
    if ev.residents is None:
        # The worker died under it: WorkerDied restarts it and brings back
        # what served before. Until then nothing more is sent to it.
        worker.phase = RESTARTING
        if op.ticket is not None:
            out.append(Fail(op.ticket, errors.WorkerFailed(
                f"worker {ev.worker} died during the {op.kind}")))
        out.append(Recorded("failed", op.entry.name if op.entry else None, worker.index))
        return
    _reconcile(state, worker, ev.residents, ev.now)
    name = op.entry.name if op.entry else (op.targets[0] if op.targets else None)
    if ev.error is None:
        if op.kind == "suspend":
            out.append(Recorded("suspended", name, worker.index))
        else:
            worker.last_swap = {k: ev.done[k] for k in ("model", "path", "phases", "total_s")}
            state.recent_swaps.append({"time": ev.done.get("time"), "worker": worker.index,
                                       **{k: ev.done.get(k) for k in (
                                           "model", "path", "weights", "phases", "total_s")}})
            out.append(Recorded("done", ev.done["model"], worker.index, ev.done))
        if op.ticket is not None:
            out.append(Answer(op.ticket, {k: v for k, v in ev.done.items() if k != "time"}))
        return
    failure = errors.from_worker(ev.error)
    out.append(Recorded("failed", name, worker.index))
    log.warning("worker %d: %s of %s failed: %s (serving %s)", worker.index, op.kind, name,
                ev.error.message, ", ".join(worker.residents) or "nothing")
    if op.ticket is not None:
        out.append(Fail(op.ticket, failure, serving=_last(worker)))
    if op.kind == "swap" and op.entry.name not in worker.residents:
        for waiter_id, waiter in list(state.waiters.items()):
            if waiter.entry.name == op.entry.name:
                del state.waiters[waiter_id]
                out.append(Refuse(waiter_id, failure))


def _reconcile(state: State, worker: Worker, reported: list[p.Resident], now: float) -> None:
    """What the worker reports at an operation's end is what it serves."""
    names = {r.name for r in reported}
    for name in [n for n in worker.residents if n not in names]:
        _move(worker.residents.pop(name), "gone")
    for report in reported:
        resident = worker.residents.get(report.name)
        if resident is None:
            continue  # not one the daemon asked for: the worker never adds on its own
        was = resident.state
        _move(resident, "reported_suspended" if report.suspended else "reported")
        if resident.state == SERVING and was != SERVING:
            resident.loaded_at = resident.last_used = now
        elif resident.state == SUSPENDED and was != SUSPENDED:
            resident.suspended_at = now
        _measure(state, resident, report)


def _measure(state: State, resident: Resident, report: p.Resident) -> None:
    resident.bytes = report.bytes
    resident.running = report.running
    resident.kv_usage = report.kv_usage
    resident.cache_config = report.cache_config
    resident.fingerprint = report.fingerprint
    resident.rank = report.rank
    if report.bytes <= 0:
        return
    if report.suspended:
        full = state.footprints.get(resident.name)
        if full is not None:
            state.kv_bytes[resident.name] = max(0, full - report.bytes)
    else:
        state.footprints[resident.name] = report.bytes


def _on_worker_started(state: State, ev: WorkerStarted, out: list[Effect]) -> None:
    worker = state.workers[ev.worker]
    if state.stopping or worker.incarnation != ev.incarnation:
        out.append(DiscardWorker(ev.worker, ev.incarnation))
        return
    worker.phase = READY
    worker.memory_bytes = ev.memory_bytes
    worker.up_since = ev.now
    entry = None if worker.preloaded else _preload(state, worker)
    if entry is not None and not worker.restore:
        worker.restore = [entry]
    worker.preloaded = True
    if worker.queued is not None:
        worker.restore = []  # the operator's operation replaces what was to come back
        op, worker.queued = worker.queued, None
        _begin(state, worker, op, ev.now, out)


def _on_worker_died(state: State, ev: WorkerDied, out: list[Effect]) -> None:
    worker = state.workers[ev.worker]
    if state.stopping or worker.incarnation != ev.incarnation:
        return
    settings = state.settings.policy
    up_s = ev.now - worker.up_since if worker.up_since is not None else None
    worker.failures = policy.failures_in_a_row(worker.failures, up_s,
                                               settings.restart_backoff_reset_s)
    delay = policy.restart_delay(worker.failures, settings.restart_backoff_min_s,
                                 settings.restart_backoff_max_s)
    # What served comes back; not a model being loaded: it may be what killed it.
    served = [r.entry for r in worker.residents.values() if r.state != LOADING]
    log.error("worker %d died (exit code %s) serving %s; restarting in %.1f s", ev.worker,
              ev.code, ", ".join(r.name for r in served) or "nothing", delay)
    worker.restore = served or worker.restore
    op, worker.op = worker.op, None
    if op is not None and op.ticket is not None:
        out.append(Fail(op.ticket, errors.WorkerFailed(
            f"worker {ev.worker} died during the {op.kind}")))
    worker.incarnation += 1
    worker.restarts += 1
    worker.phase = RESTARTING
    worker.residents = {}
    worker.cached, worker.parked, worker.device_bytes = {}, {}, 0
    worker.up_since = None
    out.append(Recorded("restart", None, worker.index))
    out.append(StartWorker(worker.index, worker.incarnation, delay))


def _on_health(state: State, ev: Health, out: list[Effect]) -> None:
    worker = state.workers[ev.worker]
    if worker.incarnation != ev.incarnation:
        return
    for report in ev.pong.residents:
        resident = worker.residents.get(report.name)
        if resident is not None and resident.state in (SERVING, SUSPENDED):
            _measure(state, resident, report)
    worker.cached = {c.name: c.bytes for c in ev.pong.cached}
    worker.parked = {c.name: c.bytes for c in ev.pong.parked}
    worker.device_bytes = ev.pong.device_bytes


def _on_tick(state: State, ev: Tick, out: list[Effect]) -> None:
    for worker in state.workers:
        if worker.phase != READY or worker.op is not None:
            continue
        for view in policy.expired(_view(state, worker, ev.now), ev.now,
                                   lambda name: _keep_alive(state, worker, name)):
            log.info("worker %d: %s idle past its keep-alive; unloading", worker.index,
                     view.name)
            _begin(state, worker, Op(next(state.serials), "unload", None, (view.name,)),
                   ev.now, out)
            break


def _keep_alive(state: State, worker: Worker, name: str) -> float:
    entry = worker.residents[name].entry
    return entry.keep_alive_s if entry.keep_alive_s is not None \
        else state.settings.policy.keep_alive_s


def _on_reload(state: State, ev: Reload, out: list[Effect]) -> None:
    state.settings = ev.settings
    state.preload = ev.preload


def _on_stop(state: State, ev: Stop, out: list[Effect]) -> None:
    state.stopping = True
    failure = _stopping()
    for waiter_id in list(state.waiters):
        out.append(Refuse(waiter_id, failure))
    state.waiters.clear()
    for worker in state.workers:
        # Operations not yet begun in the worker are refused; the requests
        # in flight finish (the shell waits for them, bounded).
        if worker.queued is not None and worker.queued.ticket is not None:
            out.append(Fail(worker.queued.ticket, failure))
        worker.queued = None
        worker.restore = []
        if worker.op is not None and not worker.op.running:
            _drop(worker, out, failure)


_HANDLERS = {
    Acquire: _on_acquire, WaiterGone: _on_waiter_gone, Release: _on_release,
    Operate: _on_operate, OpFinished: _on_op_finished, WorkerStarted: _on_worker_started,
    WorkerDied: _on_worker_died, Health: _on_health, Timer: _on_timer, Tick: _on_tick,
    Reload: _on_reload, Stop: _on_stop,
}


# ---- scheduling, after every event ---------------------------------------------------------


def _schedule(state: State, now: float, out: list[Effect]) -> None:
    """Grant what can be granted; then give every model wanted and not
    served a way in; then refuse what never will be."""
    _grant(state, now, out)
    if state.stopping:
        return
    for worker in state.workers:
        if worker.phase == READY and worker.op is None:
            if worker.queued is not None:
                op, worker.queued = worker.queued, None
                _begin(state, worker, op, now, out)
            elif worker.restore:
                entry = worker.restore.pop(0)
                if entry.name not in worker.residents:
                    _begin(state, worker, Op(next(state.serials), "swap", entry, ()), now, out)
    wake = [at for at in (_bring_in(state, model, now, out) for model in _wanted(state, now))
            if at is not None]
    _refuse_unloadable(state, out)
    if wake and (state.wake_at is None or min(wake) < state.wake_at or state.wake_at <= now):
        state.wake_at = min(wake)
        out.append(SetTimer(("wake",), state.wake_at))


def _grant(state: State, now: float, out: list[Effect]) -> None:
    for waiter_id, waiter in list(state.waiters.items()):
        holders = [w for w in state.workers if _serving(w, waiter.entry.name)]
        if not holders:
            continue
        worker = min(holders, key=lambda w: w.residents[waiter.entry.name].active)
        resident = worker.residents[waiter.entry.name]
        resident.active += 1
        resident.last_used = now
        lease_id = next(state.serials)
        state.leases[lease_id] = LeaseRecord(worker.index, worker.incarnation,
                                             resident.name, resident.generation)
        del state.waiters[waiter_id]
        out.append(Grant(waiter_id, lease_id, worker.index, worker.incarnation,
                         resident.fingerprint))


@dataclass(frozen=True)
class _Wanted:
    entry: ModelEntry
    since: float
    estimate: int
    suspended_on: int | None  # the worker where it waits suspended


def _wanted(state: State, now: float) -> list[_Wanted]:
    """Models requests wait for and nobody brings in, oldest first; and
    suspended residents with requests, since their suspension."""
    coming = _brought_in(state) | {name for w in state.workers
                                   for name, r in w.residents.items()
                                   if r.state in (SERVING, LOADING, SUSPENDING)}
    wanted: dict[str, _Wanted] = {}
    for worker in state.workers:
        for resident in worker.residents.values():
            if resident.state == SUSPENDED and resident.name not in coming and (
                    resident.active or _waiting_for(state, resident.name)):
                wanted[resident.name] = _Wanted(resident.entry, resident.suspended_at, 0,
                                                worker.index)
    for waiter in state.waiters.values():
        name = waiter.entry.name
        if name not in coming and name not in wanted:
            wanted[name] = _Wanted(waiter.entry, waiter.since, waiter.estimate, None)
    return sorted(wanted.values(), key=lambda w: w.since)


def _bring_in(state: State, wanted: _Wanted, now: float, out: list[Effect]) -> float | None:
    """Start the operation that brings `wanted` in, or the suspension that
    makes room for it; returns when to look again if it must wait."""
    settings = state.settings.policy
    if wanted.suspended_on is None and not settings.on_demand:
        return None
    need = _need(state, wanted.entry, wanted.estimate, state.workers[wanted.suspended_on]
                 if wanted.suspended_on is not None else None)
    kwargs = dict(now=now, waited_since=wanted.since, quantum_s=settings.preempt_after_s,
                  min_resident_s=settings.min_resident_s)
    if wanted.suspended_on is not None:
        worker = state.workers[wanted.suspended_on]
        if worker.phase != READY or worker.op is not None:
            return None
        room = policy.make_room(_view(state, worker, now), need, exclude=wanted.entry.name,
                                ranks=wanted.entry.tensor_parallel_size, **kwargs)
    else:
        views = [_view(state, w, now) for w in state.workers]
        room = policy.place(views, wanted.entry.name, wanted.entry.tensor_parallel_size,
                            need, **kwargs)
    if room is None:
        return None
    if room.at is not None:
        return room.at
    worker = state.workers[room.worker]
    if room.suspend is not None:
        op = Op(next(state.serials), "suspend", None, (room.suspend,), on_demand=True)
        log.info("worker %d: suspending %s to make room for %s", worker.index, room.suspend,
                 wanted.entry.name)
    else:
        op = Op(next(state.serials), "swap", wanted.entry, room.evict, on_demand=True)
    _begin(state, worker, op, now, out)
    return None


def _need(state: State, entry: ModelEntry, estimate: int, worker: Worker | None = None) -> int:
    """The bytes a model needs to come in: its measured footprint (less what
    it still holds, suspended), else the estimate."""
    full = state.footprints.get(entry.name, estimate)
    held = worker.residents[entry.name].bytes if worker and entry.name in worker.residents else 0
    return max(0, full - held)


def _brought_in(state: State) -> set[str]:
    """Models an operation under way or queued, or a restart, brings in."""
    return ({op.entry.name for w in state.workers for op in (w.op, w.queued)
             if op is not None and op.entry is not None}
            | {e.name for w in state.workers for e in w.restore})


def _refuse_unloadable(state: State, out: list[Effect]) -> None:
    """With on-demand loading off, a request for a model nobody serves or
    brings in gets 404, not a wait."""
    if state.settings.policy.on_demand:
        return
    coming = _brought_in(state) | {name for w in state.workers for name in w.residents}
    coming |= {e.name for w in state.workers if w.phase != READY and not w.preloaded
               for e in [_preload(state, w)] if e is not None}
    for waiter_id, waiter in list(state.waiters.items()):
        if waiter.entry.name not in coming:
            del state.waiters[waiter_id]
            out.append(Refuse(waiter_id, errors.ModelNotFound(
                f"model {waiter.entry.name!r} is not loaded and on-demand loading is off "
                "(policy.on_demand)", param="model")))


def _preload(state: State, worker: Worker) -> ModelEntry | None:
    return state.preload[worker.index] if worker.index < len(state.preload) else None


def _drop_unwanted_ops(state: State, out: list[Effect]) -> None:
    """An on-demand swap not begun in its worker that no request waits for
    any more is dropped: the residents it drained serve again. (One under
    way in the worker finishes: stopping it midway would cost more than it
    saves.)"""
    wanted = {w.entry.name for w in state.waiters.values()}
    for worker in state.workers:
        op = worker.op
        if op is None or op.running or not op.on_demand or op.kind != "swap" or \
                op.entry.name in wanted:
            continue
        log.info("worker %d: nobody waits for %s any more; keeping %s", worker.index,
                 op.entry.name, ", ".join(op.targets) or "what it serves")
        _drop(worker, out, None)


def _drop(worker: Worker, out: list[Effect], failure: errors.WcdError | None) -> None:
    op, worker.op = worker.op, None
    for name in op.targets:
        resident = worker.residents.get(name)
        if resident is not None and resident.state == DRAINING:
            _move(resident, "keep")
    if failure is not None and op.ticket is not None:
        out.append(Fail(op.ticket, failure))


# ---- reading the state -------------------------------------------------------------------


def _serving(worker: Worker, name: str) -> bool:
    resident = worker.residents.get(name)
    return worker.phase == READY and resident is not None and resident.state == SERVING


def _waiting_for(state: State, name: str) -> int:
    return sum(w.entry.name == name for w in state.waiters.values())


def _last(worker: Worker) -> str | None:
    return next(reversed(worker.residents), None)


def budget(state: State, worker: Worker) -> int:
    configured = state.settings.policy.worker_memory_bytes
    if configured:
        return configured
    return int(worker.memory_bytes * policy.GPU_DEFAULT_UTILIZATION)


def max_resident(state: State, worker: Worker) -> int:
    # A tensor-parallel group runs one engine per rank (policy.fits).
    size = worker.settings.tensor_parallel_size
    return size if size > 1 else state.settings.policy.max_resident


def _view(state: State, worker: Worker, now: float) -> WorkerView:
    residents = tuple(
        ResidentView(r.name, r.state, r.active, _waiting_for(state, r.name), r.bytes,
                     r.loaded_at, r.last_used, state.kv_bytes.get(
                         r.name, int(r.entry.engine_args.get("kv_cache_memory_bytes") or 0)),
                     r.entry.tensor_parallel_size)
        for r in worker.residents.values())
    return WorkerView(worker.index, worker.phase == READY and worker.op is None
                      and worker.queued is None and not worker.restore,
                      worker.settings.serves, worker.settings.tensor_parallel_size, residents,
                      tuple(worker.parked), budget(state, worker), max_resident(state, worker),
                      can_suspend=worker.settings.tensor_parallel_size == 1)


def _noop(model: str | None, worker: int | None) -> dict:
    return {"event": "done", "model": model, "worker": worker, "path": "noop", "phases": {},
            "total_s": 0.0}


def _stopping() -> errors.Unavailable:
    return errors.Unavailable("wcd is stopping", retry_after_s=30)
