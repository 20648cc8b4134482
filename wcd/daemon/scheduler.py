"""Which model lives on which worker: the asyncio shell around the pure state
machine in scheduler_core.py.

One task (the owner) reads an inbox of events, hands each to
`scheduler_core.handle` with the one `State`, and performs the effects it
returns: it answers waiting requests and operators, starts and stops worker
processes, runs operations in workers, sets timers. Everything that waits
(a worker starting, an operation in a worker, health pings, timers, the
keep-alive clock) runs in tasks the shell owns; they report back as events,
so no decision is taken on a stale read. Views for status pages and metrics
read the state (wcd/daemon/views.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from wcd.daemon import errors, policy, views
from wcd.daemon import scheduler_core as core
from wcd.daemon.catalog import Catalog, ModelEntry
from wcd.daemon.config import Settings
from wcd.daemon.metrics import Metrics
from wcd.daemon.worker_process import WorkerError, WorkerGone, WorkerOptions, WorkerProcess
from wcd.proc_stats import phases_line
from wcd.workers import protocol as p

log = logging.getLogger(__name__)

Progress = Callable[[dict], None]
StartWorker = Callable[[WorkerOptions], Awaitable[WorkerProcess]]
TICK_S = 1.0  # how often keep-alives are looked at


@dataclass
class Lease:
    """A request's hold on a worker serving its model."""

    model: str
    worker: WorkerProcess
    slot: int
    fingerprint: str | None = None  # vLLM's system_fingerprint of the engine serving it


@dataclass
class _Ticket:
    future: asyncio.Future
    progress: Progress | None


class Scheduler:
    def __init__(self, settings: Settings, *, on_change: Callable[[], None] | None = None,
                 on_fatal: Callable[[p.VersionMismatch], None] | None = None,
                 worker_env: dict[str, str] | None = None, metrics: Metrics | None = None,
                 start_worker: StartWorker = WorkerProcess.start):
        """`on_fatal`: a worker of another protocol version started, which no
        restart mends while this daemon runs (its own code is the old one)."""
        self.settings = settings
        self.catalog = Catalog(settings)
        self.state = core.State.initial(settings, self._preload(self.catalog, settings))
        self.metrics = metrics or Metrics()
        self.metrics.track(self.waiting, self.resident, self.cached_bytes,
                           lambda: views.waiting_by_model(self.state))
        self._on_change = on_change or (lambda: None)
        self._on_fatal = on_fatal or (lambda mismatch: None)
        self._worker_env = worker_env
        self._start_worker_process = start_worker
        self._inbox: asyncio.Queue = asyncio.Queue()
        self._ids = itertools.count(1)
        self._waiters: dict[int, asyncio.Future] = {}
        self._tickets: dict[int, _Ticket] = {}
        self._processes: dict[int, tuple[int, WorkerProcess]] = {}  # index -> (incarnation, it)
        self._starting: dict[tuple[int, int], WorkerProcess] = {}
        self._timers: dict[tuple, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task] = set()
        self._owner: asyncio.Task | None = None
        self.started = time.time()

    @staticmethod
    def _preload(catalog: Catalog, settings: Settings) -> list[ModelEntry | None]:
        entries = []
        for name in settings.preload:
            try:
                entries.append(catalog.resolve(name))
            except errors.ModelNotFound:
                entries.append(None)
        return entries

    # ---- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        self._owner = asyncio.create_task(self._run(), name="scheduler")
        for worker in self.state.workers:
            self._perform(core.StartWorker(worker.index, worker.incarnation, 0.0))
        self._spawn(self._tick(), "keep-alive")

    async def stop(self) -> None:
        """Drain in-flight requests (bounded), then stop every worker."""
        self._post(core.Stop(time.monotonic()))
        deadline = time.monotonic() + self.settings.policy.drain_timeout_s
        while self._leases_held() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for timer in self._timers.values():
            timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._owner is not None:
            self._owner.cancel()
            await asyncio.gather(self._owner, return_exceptions=True)
        # Operations cut short answer too: nobody is left waiting.
        for ticket in list(self._tickets):
            self._answer(ticket, error=errors.Unavailable("wcd is stopping", retry_after_s=30))
        processes = [w for _, w in self._processes.values()] + list(self._starting.values())
        await asyncio.gather(*(w.stop() for w in processes), return_exceptions=True)

    def _leases_held(self) -> bool:
        return any(views.active(self.state, w) for w in self.state.workers)

    def reload(self, settings: Settings) -> None:
        """New models, roots and policy; running workers stay warm."""
        if settings.workers != self.settings.workers:
            log.warning("reload: a change of workers takes effect at the next restart")
        self.settings = settings
        self.catalog = Catalog(settings)
        self._post(core.Reload(settings, self._preload(self.catalog, settings),
                               time.monotonic()))
        log.info("configuration reloaded: %d models", len(self.catalog.configured()))

    def _spawn(self, coro, name: str) -> asyncio.Task:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    def _post(self, event: core.Event) -> None:
        self._inbox.put_nowait(event)

    # ---- the API other tasks use ----------------------------------------------------------

    def resolve_name(self, name: str) -> str:
        return self.catalog.resolve(name).name

    @contextlib.asynccontextmanager
    async def lease(self, model: str) -> AsyncIterator[Lease]:
        entry = self.catalog.resolve(model)
        self._check_fits(entry, None)
        lease_id, index, worker, fingerprint = await self._wait_for_worker(entry)
        try:
            yield Lease(entry.name, worker, index, fingerprint)
        finally:
            self._post(core.Release(lease_id, time.monotonic()))

    async def _wait_for_worker(self, entry: ModelEntry
                               ) -> tuple[int, int, WorkerProcess, str | None]:
        waiter = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._waiters[waiter] = future
        self._post(core.Acquire(waiter, entry, self._estimate(entry), time.monotonic()))
        wait_s = self.settings.policy.queue_wait_s
        try:
            async with asyncio.timeout(wait_s):
                return await future
        except (asyncio.CancelledError, TimeoutError) as exc:
            self._abandon(waiter, future)
            if isinstance(exc, TimeoutError):
                raise errors.Unavailable(f"model {entry.name!r} was not ready within "
                                         f"{wait_s:g} s", retry_after_s=10) from None
            raise

    def _abandon(self, waiter: int, future: asyncio.Future) -> None:
        """A request stopped waiting: it timed out or its client left. Granted
        at that very moment, its lease is given back; else the owner hears
        that one waiter less wants its model."""
        self._waiters.pop(waiter, None)
        if future.done() and not future.cancelled() and future.exception() is None:
            lease_id, *_ = future.result()
            self._post(core.Release(lease_id, time.monotonic()))
        else:
            self._post(core.WaiterGone(waiter, time.monotonic()))

    def _estimate(self, entry: ModelEntry) -> int:
        """A footprint for a model never measured (reads its file sizes: here,
        not in the state machine)."""
        if entry.name in self.state.footprints:
            return 0
        worker = next((w for w in self.state.workers
                       if entry.tensor_parallel_size in w.settings.serves), None)
        return policy.footprint_estimate(entry.disk_bytes(), entry.engine_args,
                                         worker.settings.kind if worker else "cpu",
                                         worker.memory_bytes if worker else 0)

    def check_operation(self, model: str, worker: int | None) -> ModelEntry:
        """What an operation would refuse at once: an unknown model or worker."""
        entry = self.catalog.resolve(model)
        if worker is not None and not 0 <= worker < len(self.state.workers):
            raise errors.BadRequest(f"there is no worker {worker} (have "
                                    f"{len(self.state.workers)})", param="worker")
        self._check_fits(entry, worker)
        return entry

    def _check_fits(self, entry: ModelEntry, worker: int | None) -> None:
        """A model asks a tensor-parallel size; only workers that serve that size
        take it. (Worker settings are fixed for the daemon's life.)"""
        workers = self.settings.workers if worker is None else [self.settings.workers[worker]]
        sizes = {size for w in workers for size in w.serves}
        if entry.tensor_parallel_size not in sizes:
            where = f"worker {worker} serves" if worker is not None else "workers serve"
            raise errors.ModelUnusable(
                f"model {entry.name!r} asks tensor_parallel_size "
                f"{entry.tensor_parallel_size}; the {where} {sorted(sizes)}")

    async def operate(self, kind: str, model: str, *, worker: int | None = None,
                      force: bool = False, progress: Progress | None = None) -> dict:
        """swap / load / unload; returns the final event ({"event": "done", ...})."""
        entry = self.check_operation(model, worker)
        ticket = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._tickets[ticket] = _Ticket(future, progress)
        self._post(core.Operate(ticket, kind, entry, worker, force, self._estimate(entry),
                                time.monotonic()))
        return await future

    # ---- views (wcd/daemon/views.py) -------------------------------------------------------

    def views(self) -> list[dict]:
        return views.worker_views(self.state, self._process)

    def model_views(self) -> list[dict]:
        return views.model_views(self.state, self.catalog)

    def status_line(self) -> str:
        return views.status_line(self.state)

    def resident(self) -> list[tuple[int, str]]:
        return views.resident(self.state)

    def cached_bytes(self) -> int:
        return views.cached_bytes(self.state)

    def waiting(self) -> int:
        return len(self.state.waiters)

    def recent_swaps(self) -> list[dict]:
        return list(self.state.recent_swaps)

    def vllm_version(self) -> str | None:
        """The vLLM version the first ready worker reported; None: none is up."""
        for index in range(len(self.state.workers)):
            process = self._process(index)
            if process is not None and process.ready is not None:
                return process.ready.vllm_version
        return None

    def _process(self, index: int) -> WorkerProcess | None:
        current = self._processes.get(index)
        if current is None or current[0] != self.state.workers[index].incarnation:
            return None
        return current[1]

    # ---- the owner ----------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            event = await self._inbox.get()
            try:
                effects = core.handle(self.state, event)
            except Exception:
                log.exception("scheduler: handling %s failed", type(event).__name__)
                continue
            if isinstance(event, core.WorkerStarted):
                self._adopt(event, effects)
            for effect in effects:
                try:
                    self._perform(effect)
                except Exception:
                    log.exception("scheduler: performing %s failed", type(effect).__name__)
            self._on_change()

    def _perform(self, effect: core.Effect) -> None:
        match effect:
            case core.Grant(waiter, lease, index, incarnation, fingerprint):
                future = self._waiters.pop(waiter, None)
                worker = self._process(index)
                if future is None or future.done() or worker is None:
                    # Its request left (or its worker did) as it was granted.
                    self._post(core.Release(lease, time.monotonic()))
                    if future is not None and not future.done():
                        future.set_exception(errors.WorkerFailed(f"worker {index} died"))
                else:
                    future.set_result((lease, index, worker, fingerprint))
            case core.Refuse(waiter, error):
                future = self._waiters.pop(waiter, None)
                if future is not None and not future.done():
                    future.set_exception(error)
            case core.Accepted(ticket, model, index):
                self._progress(ticket, {"event": "accepted", "model": model, "worker": index})
            case core.Answer(ticket, event):
                self._answer(ticket, event=event)
            case core.Fail(ticket, error, serving):
                self._answer(ticket, error=error, serving=serving)
            case core.StartWorker(index, incarnation, delay):
                self._spawn(self._start_worker(index, incarnation, delay),
                            f"start-worker-{index}")
            case core.DiscardWorker(index, incarnation):
                worker = self._starting.pop((index, incarnation), None)
                if worker is not None:
                    self._spawn(worker.stop(), "stop-stale-worker")
            case core.RunOp(index, incarnation, op, drained_s):
                self._spawn(self._run_op(index, incarnation, op, drained_s),
                            f"{op.kind}-{index}")
            case core.SetTimer(key, at):
                self._set_timer(key, at)
            case core.Recorded(what, model, index, event):
                self._record(what, model, index, event)

    def _progress(self, ticket: int, event: dict) -> None:
        held = self._tickets.get(ticket)
        if held is not None and held.progress is not None:
            held.progress(event)

    def _answer(self, ticket: int, *, event: dict | None = None,
                error: errors.WcdError | None = None, serving: str | None = None) -> None:
        held = self._tickets.pop(ticket, None)
        if held is None:
            return
        if error is not None:
            if held.progress is not None:
                held.progress({"event": "error", "error": error.body()["error"],
                               "serving": serving})
            if not held.future.done():
                held.future.set_exception(error)
            return
        if held.progress is not None:
            held.progress(event)
        if not held.future.done():
            held.future.set_result(event)

    def _set_timer(self, key: tuple, at: float) -> None:
        old = self._timers.pop(key, None)
        if old is not None:
            old.cancel()
        delay = max(0.0, at - time.monotonic())
        self._timers[key] = asyncio.get_running_loop().call_later(delay, self._fire, key)

    def _fire(self, key: tuple) -> None:
        del self._timers[key]
        self._post(core.Timer(key, time.monotonic()))

    def _record(self, what: str, model: str | None, index: int, event: dict | None) -> None:
        if what == "done":
            self.metrics.swap_done(model, event)
            log.info("worker %d: %s (%s) in %.3f s: %s", index, model, event["path"],
                     event["total_s"], phases_line(event["phases"]))
        elif what == "failed":
            self.metrics.swap_failed(model)
        elif what == "suspended":
            self.metrics.suspensions.labels(model).inc()
        elif what == "restart":
            self.metrics.restarts.labels(str(index)).inc()

    # ---- workers ------------------------------------------------------------------------

    async def _start_worker(self, index: int, incarnation: int, delay: float) -> None:
        await asyncio.sleep(delay)
        settings = self.settings.workers[index]
        policy_ = self.settings.policy
        setup = p.Setup(index=index, device=settings.kind,
                        tensor_parallel_size=settings.tensor_parallel_size,
                        host_cache_bytes=policy_.host_cache_bytes,
                        max_parked=policy_.max_parked,
                        park_min_free_bytes=policy_.park_min_free_bytes,
                        render_timeout_s=policy_.render_timeout_s,
                        step_timeout_s=policy_.step_timeout_s,
                        disk_cache_dir=policy_.disk_cache_dir,
                        disk_cache_bytes=policy_.disk_cache_bytes,
                        first_graph_tokens=policy_.first_graph_tokens)
        options = WorkerOptions(setup, cuda_devices=settings.cuda_indices,
                                ready_timeout_s=policy_.worker_ready_timeout_s,
                                stop_timeout_s=policy_.stop_timeout_s, env=self._worker_env,
                                forkserver=self.settings.forkserver)
        try:
            worker = await self._start_worker_process(options)
        except p.VersionMismatch as exc:
            # Not a death to restart after: the next start runs the same code.
            log.critical("worker %d refused: %s", index, exc)
            self._on_fatal(exc)
            return
        except Exception as exc:  # whatever it was, the worker must not stay starting
            log.error("worker %d failed to start: %s: %s", index, type(exc).__name__, exc)
            self._post(core.WorkerDied(index, incarnation, None, time.monotonic()))
            return
        worker.on_engine_stats = self.metrics.engine_stats
        self._starting[(index, incarnation)] = worker
        memory = worker.ready.memory_bytes if worker.ready is not None else 0
        self._post(core.WorkerStarted(index, incarnation, memory, time.monotonic()))

    def _adopt(self, event: core.WorkerStarted, effects: list[core.Effect]) -> None:
        key = (event.worker, event.incarnation)
        if any(isinstance(e, core.DiscardWorker) for e in effects) or key not in self._starting:
            return
        worker = self._starting.pop(key)
        self._processes[event.worker] = (event.incarnation, worker)
        self._spawn(self._watch(event.worker, event.incarnation, worker),
                    f"watch-worker-{event.worker}")

    async def _watch(self, index: int, incarnation: int, worker: WorkerProcess) -> None:
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
                    self._post(core.Health(index, incarnation, pong, time.monotonic()))
                except asyncio.TimeoutError:
                    log.error("worker %d (pid %s) did not answer a ping in %.0f s; killing it",
                              index, worker.pid, policy_.health_timeout_s)
                    await worker.kill()
                except WorkerGone:
                    break
            code = await exited
        finally:
            exited.cancel()
        self._post(core.WorkerDied(index, incarnation, code, time.monotonic()))

    async def _run_op(self, index: int, incarnation: int, op: core.Op,
                      drained_s: float) -> None:
        worker = self._process(index)

        def on_phase(phase: p.Phase) -> None:
            seconds = phase.seconds + (drained_s if phase.phase == "drain" else 0.0)
            if op.ticket is not None:
                self._progress(op.ticket, {"event": "phase", "phase": phase.phase,
                                           "seconds": seconds})

        def finished(done=None, error=None, residents=None) -> None:
            self._post(core.OpFinished(index, incarnation, op.serial, done, error, residents,
                                       time.monotonic()))

        policy_ = self.settings.policy
        try:
            if worker is None:
                raise WorkerGone(p.ErrorInfo(p.GONE, f"worker {index} is gone"))
            if op.kind == "swap":
                result = await worker.swap(op.entry.spec(), replace=list(op.targets),
                                           drain_timeout_s=policy_.drain_timeout_s,
                                           force=op.force, on_phase=on_phase)
            elif op.kind == "unload":
                result = await worker.unload(list(op.targets),
                                             drain_timeout_s=policy_.drain_timeout_s,
                                             force=op.force, on_phase=on_phase)
            else:
                result = await worker.suspend(op.targets[0], on_phase=on_phase)
        except WorkerError as exc:
            gone = isinstance(exc, WorkerGone)
            finished(error=exc.error, residents=None if gone else exc.residents)
            return
        except Exception as exc:
            # A failure of the daemon's own: what the worker serves now is
            # unknown, so it restarts and brings back what served before.
            log.exception("worker %d: the %s failed in the daemon; restarting the worker",
                          index, op.kind)
            await worker.kill()
            finished(error=p.ErrorInfo(p.INTERNAL, f"{type(exc).__name__}: {exc}"))
            return
        if op.kind == "suspend":
            log.info("worker %d: suspended %s in %.3f s: %s", index, op.targets[0],
                     result.total_s, phases_line(result.phases))
        phases = dict(result.phases)
        phases["drain"] = phases.get("drain", 0.0) + drained_s
        finished(done={"event": "done", "model": result.model, "worker": index,
                       "path": result.path, "weights": result.weights, "phases": phases,
                       "total_s": result.total_s + drained_s, "time": time.time()},
                 residents=list(result.residents))

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            self._post(core.Tick(time.monotonic()))


