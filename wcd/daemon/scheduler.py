"""Which model lives on which worker: the one task that owns worker and model
state.

Everything that changes that state (a request wanting a model, a request
finishing, a swap asked for over the control socket, a worker dying, a
swap finishing, the keep-alive clock) is a message on the owner's inbox, so no
decision is taken on a stale read. Long work (starting a worker, swapping)
runs in tasks the owner starts and owns; they report back through the inbox.

A swap drains first: the slot takes no new requests, and the swap starts once
the in-flight ones have finished (or at once when forced, or after the drain
timeout, the worker then aborting what is left). A swap that requests asked
for (on demand) and that none of them waits for any more is dropped while it
drains, so a client that gives up costs the others nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from wcd.daemon import errors, policy
from wcd.daemon.catalog import Catalog, ModelEntry
from wcd.daemon.config import Settings, WorkerSettings
from wcd.daemon.metrics import Metrics
from wcd.daemon.policy import (DRAINING, IDLE, RESTARTING, SERVING, STARTING, SWAPPING,
                               SlotView)
from wcd.daemon.worker_process import WorkerError, WorkerGone, WorkerOptions, WorkerProcess
from wcd.workers import protocol as p

log = logging.getLogger(__name__)

Progress = Callable[[dict], None]
StartWorker = Callable[[WorkerOptions], Awaitable[WorkerProcess]]
RECENT_SWAPS = 20  # a status page's worth of history; older swaps are in the log
TICK_S = 1.0  # how often keep-alives are looked at


@dataclass
class Lease:
    """A request's hold on a worker serving its model."""

    model: str
    worker: WorkerProcess
    slot: int


@dataclass
class _Waiter:
    entry: ModelEntry
    future: asyncio.Future


@dataclass
class _Operation:
    """A control operation (swap, load, unload) on one slot."""

    kind: str  # "swap" or "unload"
    entry: ModelEntry | None
    force: bool
    progress: Progress | None
    future: asyncio.Future | None
    on_demand: bool = False  # asked for by requests, not by an operator
    drain_started: float = 0.0  # set when its slot starts draining
    drain_timer: asyncio.Task | None = None


@dataclass
class _Slot:
    index: int
    settings: WorkerSettings
    worker: WorkerProcess | None = None
    state: str = STARTING
    model: ModelEntry | None = None  # served, or being brought in
    active: int = 0  # leases the daemon has handed out
    running: int = 0  # requests the worker reported at its last health ping
    cached: dict[str, int] = field(default_factory=dict)  # host cache: model -> bytes
    parked: dict[str, int] = field(default_factory=dict)  # on the device: model -> bytes
    device_bytes: int = 0  # allocated on the worker's GPU, at its last health ping
    last_used: float = 0.0
    loaded_at: float = 0.0  # when the served model's swap finished
    restarts: int = 0  # over the daemon's life
    preloaded: bool = False  # its preload was asked for (once: later starts restore)
    failures: int = 0  # deaths in a row, for the restart backoff
    up_since: float | None = None  # when the worker became ready
    incarnation: int = 0
    pending_op: _Operation | None = None  # waits for the drain
    deferred_op: _Operation | None = None  # waits for the slot: its start or current swap
    waiters: list[_Waiter] = field(default_factory=list)
    last_swap: dict | None = None
    restore: ModelEntry | None = None  # what to bring back after a restart
    swapping_from: ModelEntry | None = None  # what served before the swap under way

    def view(self, waiting: int) -> SlotView:
        incoming = self.pending_op.entry if self.pending_op else None
        return SlotView(self.index, self.state, self.model.name if self.model else None,
                        self.active, self.last_used, self.settings.tensor_parallel_size,
                        tuple(self.parked), self.settings.serves, self.loaded_at, waiting,
                        incoming.name if incoming else None)


class Scheduler:
    def __init__(self, settings: Settings, *, on_change: Callable[[], None] | None = None,
                 worker_env: dict[str, str] | None = None, metrics: Metrics | None = None,
                 start_worker: StartWorker = WorkerProcess.start):
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.metrics.track(self.waiting, self.resident, self.cached_bytes)
        self.catalog = Catalog(settings)
        self._on_change = on_change or (lambda: None)
        self._worker_env = worker_env
        self._start_worker_process = start_worker
        self._slots = [_Slot(i, w) for i, w in enumerate(settings.workers)]
        self._pending: deque[_Waiter] = deque()
        self._swaps: deque[dict] = deque(maxlen=RECENT_SWAPS)
        self._inbox: asyncio.Queue = asyncio.Queue()
        self._tasks: set[asyncio.Task] = set()
        self._owner: asyncio.Task | None = None
        self._wake: asyncio.TimerHandle | None = None  # looks at the queue again
        self._wake_at = 0.0
        self._stopping = False
        self.started = time.time()

    # ---- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        self._owner = asyncio.create_task(self._run(), name="scheduler")
        for slot in self._slots:
            self._spawn(self._start_worker(slot, slot.incarnation), f"start-worker-{slot.index}")
        self._spawn(self._tick(), "keep-alive")

    async def stop(self) -> None:
        """Drain in-flight requests (bounded), then stop every worker."""
        self._post("stop")
        deadline = time.monotonic() + self.settings.policy.drain_timeout_s
        while any(s.active for s in self._slots) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._wake is not None:
            self._wake.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        workers = [s.worker for s in self._slots if s.worker is not None]
        await asyncio.gather(*(w.stop() for w in workers), return_exceptions=True)
        if self._owner is not None:
            self._owner.cancel()
            await asyncio.gather(self._owner, return_exceptions=True)

    def reload(self, settings: Settings) -> None:
        """New models, roots and policy; running workers stay warm."""
        if settings.workers != self.settings.workers:
            log.warning("reload: a change of workers takes effect at the next restart")
        self._post("reload", settings)

    def _spawn(self, coro, name: str) -> asyncio.Task:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    def _post(self, kind: str, *args: Any) -> None:
        self._inbox.put_nowait((kind, args))

    # ---- the API other tasks use ----------------------------------------------------------

    def resolve_name(self, name: str) -> str:
        return self.catalog.resolve(name).name

    @contextlib.asynccontextmanager
    async def lease(self, model: str) -> AsyncIterator[Lease]:
        entry = self.catalog.resolve(model)
        self._check_fits(entry, None)
        slot_index, incarnation, worker = await self._wait_for_slot(entry)
        try:
            yield Lease(entry.name, worker, slot_index)
        finally:
            self._post("release", slot_index, incarnation)

    async def _wait_for_slot(self, entry: ModelEntry) -> tuple[int, int, WorkerProcess]:
        future = asyncio.get_running_loop().create_future()
        self._post("acquire", _Waiter(entry, future))
        wait_s = self.settings.policy.queue_wait_s
        try:
            async with asyncio.timeout(wait_s):
                return await future
        except (asyncio.CancelledError, TimeoutError) as exc:
            self._abandon(future)
            if isinstance(exc, TimeoutError):
                raise errors.Unavailable(f"model {entry.name!r} was not ready within "
                                         f"{wait_s:g} s", retry_after_s=10) from None
            raise

    def _abandon(self, future: asyncio.Future) -> None:
        """A request stopped waiting: it timed out or its client left. Granted
        at that very moment, its lease is given back; else the scheduler hears
        now that one waiter less wants its model."""
        if future.done() and not future.cancelled() and future.exception() is None:
            slot_index, incarnation, _ = future.result()
            self._post("release", slot_index, incarnation)
        else:
            self._post("waiter_gone")

    def check_operation(self, model: str, worker: int | None) -> ModelEntry:
        """What an operation would refuse at once: an unknown model or worker."""
        entry = self.catalog.resolve(model)
        if worker is not None and not 0 <= worker < len(self._slots):
            raise errors.BadRequest(f"there is no worker {worker} (have "
                                    f"{len(self._slots)})", param="worker")
        self._check_fits(entry, worker)
        return entry

    def _check_fits(self, entry: ModelEntry, worker: int | None) -> None:
        """A model asks a tensor-parallel size; only workers that serve that size
        take it. (Worker settings are fixed for the daemon's life, so reading
        them here, outside the scheduler task, reads no state that can change.)"""
        sizes = {size for s in self._slots if worker is None or s.index == worker
                 for size in s.settings.serves}
        if entry.tensor_parallel_size not in sizes:
            where = f"worker {worker} serves" if worker is not None else "workers serve"
            raise errors.ModelUnusable(
                f"model {entry.name!r} asks tensor_parallel_size "
                f"{entry.tensor_parallel_size}; the {where} {sorted(sizes)}")

    async def operate(self, kind: str, model: str, *, worker: int | None = None,
                      force: bool = False, progress: Progress | None = None) -> dict:
        """swap / load / unload; returns the final event ({"event": "done", ...})."""
        entry = self.check_operation(model, worker)
        future = asyncio.get_running_loop().create_future()
        self._post("operate", kind, entry, worker, force, progress, future)
        return await future

    def views(self) -> list[dict]:
        return [self._worker_view(s) for s in self._slots]

    def model_views(self) -> list[dict]:
        served = {s.model.name: s for s in self._slots if s.model is not None}
        entries = {e.name: e for e in self.catalog.configured()}
        entries.update({s.model.name: s.model for s in served.values()})
        views = []
        cached = {name: size for s in self._slots for name, size in s.cached.items()}
        parked = {name: (s.index, size) for s in self._slots for name, size in s.parked.items()}
        for name, entry in entries.items():
            slot = served.get(name)
            state = "available"
            if slot is not None:
                state = SERVING if slot.state == SERVING else "loading"
            where = ("serving" if state == SERVING else "device" if name in parked
                     else "host" if name in cached else "disk")
            worker = slot.index if slot else parked[name][0] if name in parked else None
            views.append({"name": name, "path": entry.path, "state": state,
                          "worker": worker,
                          "bytes": (parked[name][1] if where == "device" else cached.get(name))
                          or entry.disk_bytes(),
                          "where": where, "configured": entry.configured})
        return views

    def status_line(self) -> str:
        ready = sum(s.state not in (STARTING, RESTARTING) for s in self._slots)
        serving = ", ".join(s.model.name for s in self._slots
                            if s.model is not None and s.state == SERVING) or "nothing"
        return f"workers {ready}/{len(self._slots)} ready; serving {serving}"

    def resident(self) -> list[tuple[int, str]]:
        """(worker index, model) for every model a worker serves."""
        return [(s.index, s.model.name) for s in self._slots
                if s.model is not None and s.state == SERVING]

    def cached_bytes(self) -> int:
        return sum(sum(s.cached.values()) for s in self._slots)

    def waiting(self) -> int:
        return sum(not w.future.done() for w in self._all_waiters())

    def recent_swaps(self) -> list[dict]:
        """The last RECENT_SWAPS finished swaps and unloads, oldest first."""
        return list(self._swaps)

    def _worker_view(self, slot: _Slot) -> dict:
        ready = slot.worker.ready if slot.worker else None
        return {"index": slot.index, "device": slot.settings.device,
                "tensor_parallel_size": slot.settings.tensor_parallel_size,
                "serves_tensor_parallel_sizes": list(slot.settings.serves),
                "model_tensor_parallel_size": (slot.model.tensor_parallel_size
                                               if slot.model else None),
                "pid": slot.worker.pid if slot.worker else None,
                "group_pids": list(ready.group_pids) if ready else [],
                "state": slot.state, "model": slot.model.name if slot.model else None,
                "active": slot.active, "running": slot.running, "restarts": slot.restarts,
                "rss_bytes": _rss(slot.worker.pid) if slot.worker else None,
                "device_bytes": slot.device_bytes,
                "last_swap": slot.last_swap}

    # ---- the owner ----------------------------------------------------------------------

    async def _run(self) -> None:
        handlers = {
            "acquire": self._on_acquire, "release": self._on_release,
            "operate": self._on_operate, "op_finished": self._on_op_finished,
            "worker_started": self._on_worker_started, "worker_died": self._on_worker_died,
            "drain_timeout": self._on_drain_timeout, "tick": self._on_tick,
            "waiter_gone": self._on_waiter_gone, "wake": lambda: None,
            "health": self._on_health,
            "reload": self._on_reload, "stop": self._on_stop,
        }
        while True:
            kind, args = await self._inbox.get()
            try:
                handlers[kind](*args)
            except Exception:
                log.exception("scheduler: handling %s failed", kind)
            self._schedule_pending()
            self._on_change()

    def _on_acquire(self, waiter: _Waiter) -> None:
        if self._stopping:
            _fail(waiter.future, errors.Unavailable("wcd is stopping", retry_after_s=30))
            return
        queued = sum(w.entry.name == waiter.entry.name and not w.future.done()
                     for w in self._all_waiters())
        if queued >= self.settings.policy.queue_max:
            _fail(waiter.future, errors.Unavailable(
                f"{queued} requests already wait for {waiter.entry.name!r}", retry_after_s=5))
            return
        self._pending.append(waiter)

    def _on_release(self, index: int, incarnation: int) -> None:
        slot = self._slots[index]
        if slot.incarnation != incarnation:
            return  # a lease on a worker that has since been replaced
        slot.active -= 1
        slot.last_used = time.monotonic()
        if slot.state == DRAINING and slot.active == 0:
            self._begin_op(slot)

    def _on_operate(self, kind, entry, worker, force, progress, future) -> None:
        if self._stopping:
            _fail(future, errors.Unavailable("wcd is stopping", retry_after_s=30))
            return
        if kind == "unload":
            slot = next((s for s in self._slots if s.model is not None and entry is not None
                         and s.model.name == entry.name), None)
            if slot is None:
                _done(future, progress, {"event": "done", "model": None, "worker": None,
                                         "path": "noop", "phases": {}, "total_s": 0.0})
                return
        else:
            slot = self._slot_for(entry, worker, kind) or self._busy_slot(entry)
            if slot is None:
                _fail(future, errors.Conflict("every worker already has a swap waiting; "
                                              "try again shortly"))
                return
            if slot.model is not None and slot.model.name == entry.name and \
                    slot.state == SERVING:
                _done(future, progress, {"event": "done", "model": entry.name,
                                         "worker": slot.index, "path": "noop", "phases": {},
                                         "total_s": 0.0})
                return
        op = _Operation("unload" if kind == "unload" else "swap",
                        None if kind == "unload" else entry, force, progress, future)
        if slot.state in (IDLE, SERVING):
            self._drain_then(slot, op)
        elif slot.deferred_op is None:
            # The worker is warming (after start or a crash: the op replaces the
            # preload or restore) or busy with another swap: the op runs next.
            slot.deferred_op = op
        else:
            _fail(future, errors.Conflict(f"worker {slot.index} is {slot.state} with "
                                          "another operation waiting; try again shortly"))

    def _busy_slot(self, entry: ModelEntry) -> _Slot | None:
        """A slot that cannot take an operation now but can queue one, and
        serves the model's tensor-parallel size."""
        return next((s for s in self._slots if s.state in (STARTING, RESTARTING, DRAINING,
                                                            SWAPPING)
                     and entry.tensor_parallel_size in s.settings.serves
                     and s.deferred_op is None), None)

    def _slot_for(self, entry: ModelEntry, worker: int | None, kind: str) -> _Slot | None:
        if worker is not None:
            return self._slots[worker]
        views = self._views()
        current = policy.serving_slot(views, entry.name)
        chosen = current or policy.choose_slot(views, entry.name, entry.tensor_parallel_size)
        return self._slots[chosen.index] if chosen else None

    def _drain_then(self, slot: _Slot, op: _Operation) -> None:
        """Stop routing to the slot; run `op` once its requests are done."""
        if op.progress:
            op.progress({"event": "accepted", "model": op.entry.name if op.entry else None,
                         "worker": slot.index})
        slot.pending_op = op
        op.drain_started = time.perf_counter()
        slot.state = DRAINING
        if slot.active == 0 or op.force:
            self._begin_op(slot)
        else:
            op.drain_timer = self._spawn(self._drain_timer(slot, slot.incarnation, op),
                                         "drain-timer")

    async def _drain_timer(self, slot: _Slot, incarnation: int, op: _Operation) -> None:
        await asyncio.sleep(self.settings.policy.drain_timeout_s)
        self._post("drain_timeout", slot.index, incarnation, op)

    def _on_drain_timeout(self, index: int, incarnation: int, op: _Operation) -> None:
        slot = self._slots[index]
        if slot.incarnation == incarnation and slot.pending_op is op and slot.state == DRAINING:
            log.warning("worker %d: drain timed out with %d requests in flight; aborting them",
                        index, slot.active)
            op.force = True
            self._begin_op(slot)

    def _begin_op(self, slot: _Slot) -> None:
        op, slot.pending_op = slot.pending_op, None
        _stop_drain_timer(op)
        drained = time.perf_counter() - op.drain_started
        slot.state = SWAPPING
        previous = slot.swapping_from = slot.model
        slot.model = op.entry if op.kind == "swap" else previous
        self._spawn(self._run_op(slot, slot.incarnation, slot.worker, op, drained, previous),
                    f"{op.kind}-{slot.index}")

    async def _run_op(self, slot: _Slot, incarnation: int, worker: WorkerProcess,
                      op: _Operation, drained: float, previous: ModelEntry | None) -> None:
        def on_phase(phase: p.Phase) -> None:
            seconds = phase.seconds + (drained if phase.phase == "drain" else 0.0)
            if op.progress:
                op.progress({"event": "phase", "phase": phase.phase, "seconds": seconds})

        policy_ = self.settings.policy
        try:
            if op.kind == "swap":
                result = await worker.swap(op.entry.spec(), drain_timeout_s=policy_.drain_timeout_s,
                                           force=op.force, on_phase=on_phase)
            else:
                result = await worker.unload(drain_timeout_s=policy_.drain_timeout_s,
                                             force=op.force, on_phase=on_phase)
        except WorkerError as exc:
            self._post("op_finished", slot.index, incarnation, op, None, exc, previous)
            return
        except Exception as exc:
            # A failure of the daemon's own: what the worker serves now is
            # unknown, so it restarts and brings back what served before. The
            # op's caller hears at once; the slot is never left swapping.
            log.exception("worker %d: the %s failed in the daemon; restarting the worker",
                          slot.index, op.kind)
            await worker.kill()
            gone = WorkerGone(p.ErrorInfo(p.INTERNAL, f"{type(exc).__name__}: {exc}"))
            self._post("op_finished", slot.index, incarnation, op, None, gone, previous)
            return
        phases = dict(result.phases)
        phases["drain"] = phases.get("drain", 0.0) + drained
        event = {"event": "done", "model": result.model, "worker": slot.index,
                 "path": result.path, "weights": result.weights, "phases": phases,
                 "total_s": result.total_s + drained}
        self._post("op_finished", slot.index, incarnation, op, event, None, previous)

    def _on_op_finished(self, index: int, incarnation: int, op: _Operation, event: dict | None,
                        error: WorkerError | None, previous: ModelEntry | None) -> None:
        slot = self._slots[index]
        if slot.incarnation != incarnation:
            _fail(op.future, errors.WorkerFailed(f"worker {index} died during the {op.kind}"),
                  progress=op.progress)
            return
        if error is None:
            slot.model = op.entry if op.kind == "swap" else None
            slot.last_used = slot.loaded_at = time.monotonic()
            slot.last_swap = {k: event[k] for k in ("model", "path", "phases", "total_s")}
            self._swaps.append({"time": time.time(), "worker": index, **{
                k: event[k] for k in ("model", "path", "weights", "phases", "total_s")}})
            self.metrics.swap_done(event["model"], event)
            log.info("worker %d: %s %s -> %s (%s) in %.3f s: %s", index, op.kind,
                     previous.name if previous else None, event["model"], event["path"],
                     event["total_s"], _phases(event["phases"]))
            _done(op.future, op.progress, event)
        else:
            slot.model = previous if error.serving == (previous and previous.name) else None
            self.metrics.swap_failed(op.entry.name if op.entry else None)
            failure = errors.from_worker(error.error)
            log.warning("worker %d: %s to %s failed: %s (serving %s)", index, op.kind,
                        op.entry.name if op.entry else None, error.error.message,
                        error.serving)
            if isinstance(error, WorkerGone):
                # worker_died restarts it and re-queues what waited.
                _fail(op.future, errors.WorkerFailed(f"worker {index} died during the "
                                                     f"{op.kind}"), progress=op.progress)
                return
            _fail(op.future, failure, progress=op.progress, serving=error.serving)
            self._fail_waiters(slot, lambda w: op.entry and w.entry.name == op.entry.name,
                               failure)
        slot.state = SERVING if slot.model is not None else IDLE
        self._grant(slot)
        self._run_deferred(slot)

    def _run_deferred(self, slot: _Slot) -> None:
        """The operation that waited for the slot's swap to be over."""
        if slot.deferred_op is not None:
            op, slot.deferred_op = slot.deferred_op, None
            self._drain_then(slot, op)

    # ---- requests waiting for a model -------------------------------------------------------

    def _all_waiters(self):
        yield from self._pending
        for slot in self._slots:
            yield from slot.waiters

    def _views(self) -> list[SlotView]:
        waiting: dict[str, int] = {}
        for waiter in self._all_waiters():
            if not waiter.future.done():
                waiting[waiter.entry.name] = waiting.get(waiter.entry.name, 0) + 1
        return [s.view(waiting.get(s.model.name, 0) if s.model else 0) for s in self._slots]

    def _schedule_pending(self) -> None:
        """Give every waiting request a place: a slot serving its model, or a
        slot that will bring it in. Those with neither keep waiting."""
        still = deque()
        unplaced: set[str] = set()  # nothing changes for their model in this pass
        while self._pending:
            waiter = self._pending.popleft()
            if waiter.future.done():
                continue
            try:
                slot = None if waiter.entry.name in unplaced else self._place(waiter.entry)
            except errors.WcdError as exc:
                _fail(waiter.future, exc)
                continue
            if slot is None:
                unplaced.add(waiter.entry.name)
                still.append(waiter)
            else:
                slot.waiters.append(waiter)
                self._grant(slot)
        self._pending = still
        if still:
            self._wake_when_evictable()

    def _place(self, entry: ModelEntry) -> _Slot | None:
        if self._stopping:
            return None
        views = self._views()
        current = policy.serving_slot(views, entry.name)
        if current is not None:
            return self._slots[current.index]
        if not self.settings.policy.on_demand:
            if self._expected(entry.name):
                return None
            raise errors.ModelNotFound(
                f"model {entry.name!r} is not loaded and on-demand loading is off "
                "(policy.on_demand)", param="model")
        chosen = policy.choose_slot(views, entry.name, entry.tensor_parallel_size,
                                    now=time.monotonic(),
                                    min_resident_s=self.settings.policy.min_resident_s)
        if chosen is None:
            return None
        slot = self._slots[chosen.index]
        # The swap starts once the slot's requests in flight are done.
        self._drain_then(slot, _Operation("swap", entry, False, None, None, on_demand=True))
        return slot

    def _expected(self, name: str) -> bool:
        """Whether a worker will serve `name` without a request asking: a swap
        queued for a busy worker, or a model restored or preloaded at start."""
        for slot in self._slots:
            coming = [slot.deferred_op.entry if slot.deferred_op else None, slot.restore]
            if slot.state == STARTING:
                coming.append(self._preload_for(slot))
            if any(entry is not None and entry.name == name for entry in coming):
                return True
        return False

    def _wake_when_evictable(self) -> None:
        """Requests kept waiting by a model's minimum residence are looked at
        again when it ends, not at the next unrelated event."""
        now = time.monotonic()
        at = policy.next_evictable_at(self._views(), now,
                                      self.settings.policy.min_resident_s)
        if at is None or (self._wake is not None and now < self._wake_at <= at):
            return
        if self._wake is not None:
            self._wake.cancel()
        self._wake_at = at
        self._wake = asyncio.get_running_loop().call_later(at - now, self._post, "wake")

    def _on_waiter_gone(self) -> None:
        self._pending = deque(w for w in self._pending if not w.future.done())
        for slot in self._slots:
            slot.waiters = [w for w in slot.waiters if not w.future.done()]
        self._cancel_unwanted_swaps()

    def _cancel_unwanted_swaps(self) -> None:
        """An on-demand swap not begun yet that no request waits for any more is
        dropped: its slot serves its model again. (One under way in the worker
        finishes: stopping it midway would cost more than it saves.)"""
        wanted = {w.entry.name for w in self._all_waiters() if not w.future.done()}
        for slot in self._slots:
            op = slot.pending_op
            if slot.state != DRAINING or op is None or not op.on_demand or \
                    op.entry.name in wanted:
                continue
            log.info("worker %d: nobody waits for %s any more; keeping %s", slot.index,
                     op.entry.name, slot.model.name if slot.model else None)
            _stop_drain_timer(op)
            slot.pending_op = None
            slot.state = SERVING if slot.model is not None else IDLE
            self._grant(slot)
            self._run_deferred(slot)

    def _grant(self, slot: _Slot) -> None:
        if slot.state != SERVING or slot.model is None:
            return
        for waiter in slot.waiters:
            if waiter.future.done():
                continue
            if waiter.entry.name == slot.model.name:
                slot.active += 1
                slot.last_used = time.monotonic()
                waiter.future.set_result((slot.index, slot.incarnation, slot.worker))
            else:
                self._pending.append(waiter)
        slot.waiters = []

    def _fail_waiters(self, slot: _Slot, match, failure: Exception) -> None:
        keep = []
        for waiter in slot.waiters:
            if match(waiter):
                _fail(waiter.future, failure)
            else:
                keep.append(waiter)
        slot.waiters = keep

    # ---- worker life ------------------------------------------------------------------------

    async def _start_worker(self, slot: _Slot, incarnation: int, delay: float = 0.0) -> None:
        await asyncio.sleep(delay)
        settings = slot.settings
        policy_ = self.settings.policy
        options = WorkerOptions(index=slot.index, device=settings.kind,
                                cuda_devices=settings.cuda_indices,
                                tensor_parallel_size=settings.tensor_parallel_size,
                                ready_timeout_s=policy_.worker_ready_timeout_s,
                                host_cache_bytes=policy_.host_cache_bytes,
                                max_parked=policy_.max_parked,
                                park_min_free_bytes=policy_.park_min_free_bytes,
                                stop_timeout_s=policy_.stop_timeout_s,
                                render_timeout_s=policy_.render_timeout_s,
                                step_timeout_s=policy_.step_timeout_s,
                                env=self._worker_env)
        try:
            worker = await self._start_worker_process(options)
        except Exception as exc:  # whatever it was, the slot must not stay starting
            log.error("worker %d failed to start: %s: %s", slot.index, type(exc).__name__, exc)
            self._post("worker_died", slot.index, incarnation, None)
            return
        self._post("worker_started", slot.index, incarnation, worker)

    def _on_worker_started(self, index: int, incarnation: int, worker: WorkerProcess) -> None:
        slot = self._slots[index]
        if self._stopping or slot.incarnation != incarnation:
            self._spawn(worker.stop(), "stop-stale-worker")
            return
        slot.worker = worker
        slot.state = IDLE
        slot.model = None
        slot.active = 0
        slot.up_since = time.monotonic()
        self._spawn(self._watch(slot, incarnation, worker), f"watch-worker-{index}")
        restore = slot.restore or self._preload_for(slot)
        slot.restore = None
        slot.preloaded = True
        op, slot.deferred_op = slot.deferred_op, None
        if op is None and restore is not None:
            op = _Operation("swap", restore, False, None, None)
        if op is not None:
            self._drain_then(slot, op)

    def _preload_for(self, slot: _Slot) -> ModelEntry | None:
        """Preloads go one per worker, in order, at the first start that
        succeeds (a worker that failed to start still gets its preload)."""
        if slot.preloaded or slot.index >= len(self.settings.preload):
            return None
        try:
            return self.catalog.resolve(self.settings.preload[slot.index])
        except errors.ModelNotFound:
            return None

    async def _watch(self, slot: _Slot, incarnation: int, worker: WorkerProcess) -> None:
        """Health: the process's exit, and pings (answered even mid-build)."""
        policy_ = self.settings.policy
        exited = asyncio.create_task(worker.process.wait())
        try:
            while not exited.done():
                await asyncio.wait({exited}, timeout=policy_.health_interval_s)
                if exited.done():
                    break
                try:
                    pong = await worker.ping(policy_.health_timeout_s)
                    # The owner applies it: what is parked where gates placement.
                    self._post("health", slot.index, incarnation, pong)
                except asyncio.TimeoutError:
                    log.error("worker %d (pid %s) did not answer a ping in %.0f s; killing it",
                              slot.index, worker.pid, policy_.health_timeout_s)
                    await worker.kill()
                except WorkerGone:
                    break
            code = await exited
        finally:
            exited.cancel()
        self._post("worker_died", slot.index, incarnation, code)

    def _on_health(self, index: int, incarnation: int, pong: p.Pong) -> None:
        slot = self._slots[index]
        if slot.incarnation != incarnation:
            return  # about a worker that has since been replaced
        slot.running = pong.running
        slot.cached = {c.name: c.bytes for c in pong.cached}
        slot.parked = {c.name: c.bytes for c in pong.parked}
        slot.device_bytes = pong.device_bytes

    def _on_worker_died(self, index: int, incarnation: int, code: int | None) -> None:
        slot = self._slots[index]
        if self._stopping or slot.incarnation != incarnation:
            return
        up_s = time.monotonic() - slot.up_since if slot.up_since is not None else None
        slot.failures = policy.failures_in_a_row(slot.failures, up_s,
                                                 self.settings.policy.restart_backoff_reset_s)
        delay = policy.restart_delay(slot.failures, self.settings.policy.restart_backoff_min_s,
                                     self.settings.policy.restart_backoff_max_s)
        log.error("worker %d died (exit code %s) serving %s; restarting in %.1f s", index, code,
                  slot.model.name if slot.model else None, delay)
        # A worker that died swapping comes back with what served before: the
        # model it was swapping to may be what killed it.
        served = slot.swapping_from if slot.state == SWAPPING else slot.model
        slot.restore = served or slot.restore
        if slot.pending_op is not None:
            _stop_drain_timer(slot.pending_op)
            _fail(slot.pending_op.future, errors.WorkerFailed(f"worker {index} died"))
            slot.pending_op = None
        # Requests that waited on this slot go back to the queue.
        self._pending.extend(w for w in slot.waiters if not w.future.done())
        slot.waiters = []
        slot.incarnation += 1
        slot.restarts += 1
        self.metrics.restarts.labels(str(index)).inc()
        slot.state = RESTARTING
        slot.model = None
        slot.active = slot.running = 0
        slot.cached = {}  # the cache, parked engines and device memory died with the process
        slot.parked = {}
        slot.device_bytes = 0
        slot.worker = None
        slot.up_since = None
        self._spawn(self._start_worker(slot, slot.incarnation, delay), f"restart-worker-{index}")

    # ---- clock, reload, stop ------------------------------------------------------------------

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            self._post("tick")

    def _on_tick(self) -> None:
        now = time.monotonic()
        for view in policy.expired(self._views(), now, self._keep_alive):
            slot = self._slots[view.index]
            log.info("worker %d: %s idle past its keep-alive; unloading", slot.index, view.model)
            self._drain_then(slot, _Operation("unload", None, False, None, None))

    def _keep_alive(self, name: str) -> float:
        slot = next(s for s in self._slots if s.model is not None and s.model.name == name)
        if slot.model.keep_alive_s is not None:
            return slot.model.keep_alive_s
        return self.settings.policy.keep_alive_s

    def _on_reload(self, settings: Settings) -> None:
        self.settings = settings
        self.catalog = Catalog(settings)
        log.info("configuration reloaded: %d models", len(self.catalog.configured()))

    def _on_stop(self) -> None:
        self._stopping = True
        failure = errors.Unavailable("wcd is stopping", retry_after_s=30)
        for waiter in list(self._all_waiters()):
            _fail(waiter.future, failure)
        self._pending.clear()
        for slot in self._slots:
            slot.waiters = []
            # Swaps not yet begun are refused: the requests in flight finish
            # (stop() waits for them), and the slot goes back to serving them.
            for op in (slot.deferred_op, slot.pending_op):
                if op is not None:
                    _fail(op.future, failure, progress=op.progress)
            slot.deferred_op = slot.pending_op = None
            if slot.state == DRAINING:
                slot.state = SERVING if slot.model is not None else IDLE


def _fail(future: asyncio.Future | None, error: Exception, *, progress: Progress | None = None,
          serving: str | None = None) -> None:
    if progress is not None and isinstance(error, errors.WcdError):
        progress({"event": "error", "error": error.body()["error"], "serving": serving})
    if future is not None and not future.done():
        future.set_exception(error)


def _done(future: asyncio.Future | None, progress: Progress | None, event: dict) -> None:
    if progress is not None:
        progress(event)
    if future is not None and not future.done():
        future.set_result(event)


def _stop_drain_timer(op: _Operation) -> None:
    if op.drain_timer is not None:
        op.drain_timer.cancel()


def _phases(phases: dict[str, float]) -> str:
    return " ".join(f"{k}={v * 1000:.1f}ms" for k, v in phases.items())


def _rss(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None
