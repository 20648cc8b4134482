"""The scheduler under random interleavings (issue 14, item 4): hypothesis
plays random sequences of requests, cancellations, timeouts, swaps, unloads,
worker deaths, failed swaps, reloads and sleeps against the real Scheduler
over the fake workers of test_scheduler_unit.py, then stops it, on one event
loop per example, in milliseconds. Only the scheduler's public API is used
(start, stop, lease, operate, reload, views), so the harness serves a
rewritten scheduler unchanged.

Invariants, checked after every step, at the steps that let the scheduler
settle, and at the end:

- every lease asked for ends granted (and then released), refused with a
  WcdError, or cancelled by its client; none is left waiting after stop();
- the leases the scheduler counts on a worker (`active`) are the leases held
  on it, and the requests it counts waiting (`waiting()`) the leases not
  granted yet: none leaks, before stop() or after;
- at most one swap, unload or suspension runs in a worker at a time;
- a live worker a lease is granted on serves the lease's model (resident,
  not suspended), with no operation under way bringing it in or out (unless
  an operation forced on it since the lease was asked for took the model
  away), and a model the scheduler shows serving on a worker is served there;
- no operation takes a model out of a worker while leases are held on that
  model unless forced, and one is forced only by an operator or a drain that
  timed out;
- a model reaches only a worker that serves its tensor-parallel size;
- every operate() returns its "done" event or raises a WcdError;
- views() and model_views() answer at any moment; the scheduler logs no
  exception (a handler or a task that raised);
- after stop() every worker it started has exited;
- the models a worker holds (residents; suspended ones with their weights
  only) never take more than its memory budget;
- a busy resident is suspended only on a worker that is not a
  tensor-parallel group.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from unittest import mock

import msgspec
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_scheduler_unit import FakeWorker, Fleet, Running, eventually, make_settings

from wcd.daemon import errors, scheduler
from wcd.daemon.config import ModelSettings, Settings
from wcd.daemon.scheduler import Scheduler
from wcd.daemon.worker_process import WorkerError, WorkerGone, WorkerOptions
from wcd.workers import protocol as p

MODEL_SIZES = {"a": 1, "b": 1, "w": 2}  # model -> tensor-parallel size
WEIGHT_BYTES, KV_BYTES = 30, 30  # each model's; a suspended one keeps its weights
FLEETS = {
    "one": ({"device": "cpu"},),
    "two": ({"device": "cpu"}, {"device": "cpu"}),
    # a TP=2 group that also takes TP=1 models, beside a plain worker
    "group": ({"device": "cpu", "tensor_parallel_size": 2,
               "serves_tensor_parallel_sizes": [1, 2]}, {"device": "cpu"}),
}
PRELOADS = {"one": ((), ("a",)), "two": ((), ("a",), ("a", "b")), "group": ((), ("w", "a"))}
# Fast enough for milliseconds per example; health pings never come.
FIXED_POLICY = {"health_interval": 10, "restart_backoff_min": 0.002,
                "restart_backoff_max": 0.01}
LONG_S = 5.0  # longer than an example runs
SETTLE_S = 0.3  # how long a transient difference may last before it is a failure
END_S = 0.3  # how long the leases and operations may take to end once released
EXAMPLE_S = 30.0  # an example that runs longer hangs


# ---- the fake worker, instrumented ----------------------------------------------------


class TrackedWorker(FakeWorker):
    """A FakeWorker that counts its operations in flight, stamps the moments
    an operation was forced on it, fails a swap when told to, and fails an
    operation under way when its process exits."""

    fleet: TrackedFleet

    def __init__(self, fleet: TrackedFleet, options: WorkerOptions, pid: int):
        super().__init__(fleet, options, pid)
        self.ops_in_flight = 0
        self.affected: set[str] = set()  # models the operation under way brings in or out
        self.forced: list[int] = []  # the fleet clock at each forced operation

    @property
    def alive(self) -> bool:
        return not self.process.exited.is_set()

    def die(self, code: int) -> None:
        if self.alive:
            self.process.exit(code)

    async def swap(self, model: p.ModelSpec, *, replace=(), drain_timeout_s: float,
                   force: bool, on_phase=None) -> p.OpDone:
        size = int(model.engine_args.get("tensor_parallel_size", 1))
        if size not in self.fleet.serves[self.options.setup.index]:
            self.fleet.broken.append(f"{model.name} (TP={size}) sent to worker "
                                     f"{self.options.setup.index}, which serves "
                                     f"{self.fleet.serves[self.options.setup.index]}")
        return await self._operation(force, {model.name, *replace}, set(replace), self._swap(
            model, list(self.models), replace, drain_timeout_s, force, on_phase))

    async def _swap(self, model, previous, replace, drain_timeout_s, force,
                    on_phase) -> p.OpDone:
        await asyncio.sleep(self.fleet.swap_s)
        if self.fleet.failures:
            # Residents it did not touch stay; those it replaced are brought
            # back, or not.
            keeps_previous = self.fleet.failures.pop(0)
            self.models = previous if keeps_previous else \
                [m for m in previous if m not in replace]
            raise WorkerError(p.ErrorInfo(p.OUT_OF_MEMORY, f"{model.name} does not fit"),
                              residents=self.residents())
        return await super().swap(model, replace=replace, drain_timeout_s=drain_timeout_s,
                                  force=force, on_phase=on_phase)

    async def unload(self, models, *, drain_timeout_s: float, force: bool,
                     on_phase=None) -> p.OpDone:
        return await self._operation(force, set(models), set(models), super().unload(
            models, drain_timeout_s=drain_timeout_s, force=force, on_phase=on_phase))

    async def suspend(self, model: str, *, on_phase=None) -> p.OpDone:
        if int(self.options.setup.tensor_parallel_size) > 1:
            self.fleet.broken.append(f"{model} suspended in a tensor-parallel group")
        return await self._operation(False, {model}, set(), super().suspend(model))

    async def _operation(self, force: bool, affected: set[str], leaving: set[str],
                         work) -> p.OpDone:
        self.ops_in_flight += 1
        self.affected = affected
        if self.ops_in_flight > 1:
            self.fleet.broken.append(f"worker pid {self.pid}: {self.ops_in_flight} "
                                     "operations at once")
        if force:
            self.forced.append(next(self.fleet.clock))
        held = self.fleet.held_on(self, leaving)
        if held and not force:
            self.fleet.broken.append(f"worker pid {self.pid}: an operation began with {held} "
                                     "leases held, not forced")
        if held and force and not self.fleet.may_force():
            self.fleet.broken.append(f"worker pid {self.pid}: an operation was forced on {held} "
                                     "leases held, by no operator and no drain timeout")
        working = asyncio.ensure_future(work)
        exited = asyncio.ensure_future(self.process.exited.wait())
        try:
            await asyncio.wait({working, exited}, return_when=asyncio.FIRST_COMPLETED)
            if not self.alive:
                raise WorkerGone(p.ErrorInfo(p.GONE, "the worker exited"))
            return working.result()
        finally:
            working.cancel()
            exited.cancel()
            self.ops_in_flight -= 1
            self.affected = set()

    async def stop(self) -> int:
        self.die(0)
        return 0

    async def kill(self) -> int:
        self.die(-9)
        return -9


class TrackedFleet(Fleet):
    def __init__(self, settings: Settings, swap_s: float, start_s: float):
        super().__init__()
        self.clock = itertools.count(1)  # orders leases asked for and operations forced
        self.serves = [w.serves for w in settings.workers]
        self.swap_s = swap_s
        self.start_s = start_s
        self.failures: list[bool] = []  # swaps to fail: whether each keeps the model it had
        self.footprints = {name: WEIGHT_BYTES + KV_BYTES for name in MODEL_SIZES}
        self.broken: list[str] = []  # invariants the workers saw broken
        # Told by the harness: the leases held on a worker, and whether an
        # operator forced an operation or a drain may have timed out.
        self.held_on: Callable[[TrackedWorker, set[str]], int] = lambda worker, models: 0
        self.may_force: Callable[[], bool] = lambda: True

    async def __call__(self, options: WorkerOptions) -> TrackedWorker:
        await asyncio.sleep(self.start_s)
        worker = TrackedWorker(self, options, pid=1000 + len(self.workers))
        self.workers.append(worker)
        return worker

    def by_pid(self, pid: int | None) -> TrackedWorker | None:
        return next((w for w in self.workers if w.pid == pid), None)


def serves(worker: TrackedWorker, model: str) -> bool:
    """The worker serves `model` with no operation under way bringing it in or out."""
    return model in worker.models and model not in worker.suspended and \
        model not in worker.affected


# ---- what hypothesis draws -----------------------------------------------------------


# Weights (by repetition) keep most examples busy: most requests for models
# every fleet serves, on-demand loading mostly on, refusals for a full queue
# now and then.
models = st.sampled_from(["a", "a", "b", "b", "w"])
policies = st.fixed_dictionaries({
    "queue_wait": st.sampled_from([0.02, 0.1]),
    # long: no drain times out in an example, so nothing but an operator forces
    "drain_timeout": st.sampled_from([0.01, 0.05, LONG_S]),
    "queue_max": st.sampled_from([64, 64, 64, 1]),
    "on_demand": st.sampled_from([True, True, True, False]),
    "min_resident": st.sampled_from([0, 0, 0.02]),
    "keep_alive": st.sampled_from([0, 0, 0.03]),
    "max_resident": st.sampled_from([1, 1, 2]),
    "preempt_after": st.sampled_from([0, 0.01, LONG_S]),
    # 0: no memory limit; else room for two models, or one and a suspended one
    "worker_memory_bytes": st.sampled_from([0, 0, 2 * (WEIGHT_BYTES + KV_BYTES) + 10,
                                            2 * WEIGHT_BYTES + KV_BYTES + 10]),
})
steps = {
    "lease": st.tuples(st.just("lease"), models),  # held until released or cancelled
    "release": st.tuples(st.just("release"), st.integers(0, 7)),  # the k-th lease held
    # the k-th lease not ended, granted or not
    "cancel": st.tuples(st.just("cancel"), st.integers(0, 7)),
    "operate": st.tuples(st.just("operate"), st.sampled_from(["swap", "load", "unload"]),
                         models, st.none() | st.integers(0, 1),
                         st.booleans()),  # kind, model, worker, force
    "kill": st.tuples(st.just("kill"), st.integers(0, 1)),  # a worker's process exits
    # the next swap fails, the worker keeping the model it had or not
    "fail_next_swap": st.tuples(st.just("fail_next_swap"), st.booleans()),
    "reload": st.tuples(st.just("reload"), policies),
    "sleep": st.tuples(st.just("sleep"), st.sampled_from([0, 0, 0.001, 0.005, 0.02])),
    # Wait until the leases counted are the leases held. Only on this step:
    # waiting after every sleep would close the windows races need.
    "settle": st.tuples(st.just("settle")),
}
actions = st.sampled_from(
    ["lease"] * 4 + ["sleep"] * 4 + ["release"] * 2 + ["cancel"] * 2 + ["operate"] * 2
    + ["kill", "fail_next_swap", "reload", "settle"]).flatmap(steps.__getitem__)


@dataclass(frozen=True)
class Scenario:
    fleet: str
    preload: tuple[str, ...]
    policy: dict
    swap_s: float  # how long a swap takes in the worker
    start_s: float  # how long a worker takes to start
    actions: list[tuple]
    abrupt_stop: bool  # stop with leases and operations in flight, or drain first


@st.composite
def scenarios(draw) -> Scenario:
    fleet = draw(st.sampled_from(sorted(FLEETS)))
    return Scenario(fleet, draw(st.sampled_from(PRELOADS[fleet])), draw(policies),
                    draw(st.sampled_from([0, 0.002])), draw(st.sampled_from([0, 0.002])),
                    draw(st.integers(1, 40).flatmap(lambda n: st.lists(actions, min_size=n,
                                                                       max_size=n))),
                    draw(st.booleans()))


# ---- the harness ---------------------------------------------------------------------


@dataclass(eq=False)
class LeaseRun:
    model: str
    asked_at: int  # the fleet clock when asked
    release: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None
    held_on: TrackedWorker | None = None  # while inside the lease
    slot: int | None = None
    granted: bool = False
    cancelled: bool = False


class LoggedExceptions(logging.Handler):
    """Records the scheduler's logs of an exception it did not expect."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.exc_info or message.startswith("scheduler: handling"):
            self.messages.append(message)


def settings_for(directory, fleet: str, preload: tuple[str, ...], policy: dict) -> Settings:
    """make_settings' models a and b, and w, a TP=2 model (which it does not
    know: the preload is set once w is there). Each has WEIGHT_BYTES of
    weights and asks a KV cache of KV_BYTES, so the scheduler's estimate of
    its footprint is what the fake worker then reports."""
    settings = make_settings(directory, (), FLEETS[fleet], **FIXED_POLICY, **policy)
    models = {}
    for name, size in MODEL_SIZES.items():
        path = directory / "models" / name
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text("{}")
        (path / "model.safetensors").write_bytes(b"w" * WEIGHT_BYTES)
        models[name] = ModelSettings(name, str(path), None, {
            "tensor_parallel_size": size, "kv_cache_memory_bytes": KV_BYTES})
    return msgspec.structs.replace(settings, models=models, preload=preload)


class Interleaving:
    def __init__(self, directory, scenario: Scenario):
        self.directory = directory
        self.scenario = scenario
        settings = settings_for(directory, scenario.fleet, scenario.preload, scenario.policy)
        self.fleet = TrackedFleet(settings, scenario.swap_s, scenario.start_s)
        self.scheduler = Scheduler(settings, start_worker=self.fleet)
        self.fleet.held_on = lambda worker, models: sum(
            r.held_on is worker and r.model in models for r in self.leases)
        self.fleet.may_force = lambda: self.operator_forced or \
            min(self.policies("drain_timeout")) < LONG_S
        self.operator_forced = False
        self.leases: list[LeaseRun] = []
        self.operations: list[tuple[tuple, asyncio.Task]] = []
        self.broken: list[str] = []

    async def play(self) -> None:
        await self.scheduler.start()
        try:
            for action in self.scenario.actions:
                await getattr(self, "do_" + action[0])(*action[1:])
                self.check_now()
        finally:
            try:
                await self.finish()
            finally:
                self.forget_outcomes()

    def forget_outcomes(self) -> None:
        """An example that failed leaves tasks whose failures nobody read:
        asyncio would log each one."""
        for task in self.leases_and_operations():
            if task.done() and not task.cancelled():
                task.exception()

    # ---- actions ----

    async def do_lease(self, model: str) -> None:
        run = LeaseRun(model, next(self.fleet.clock))
        run.task = asyncio.create_task(self._hold(run))
        self.leases.append(run)

    async def _hold(self, run: LeaseRun) -> None:
        async with self.scheduler.lease(run.model) as lease:
            run.granted = True
            self._check_grant(run, lease)
            run.held_on, run.slot = lease.worker, lease.slot
            try:
                await run.release.wait()
            finally:
                run.held_on = None

    async def do_release(self, k: int) -> None:
        held = [r for r in self.leases if r.held_on is not None and not r.release.is_set()]
        if held:
            held[k % len(held)].release.set()

    async def do_cancel(self, k: int) -> None:
        going = [r for r in self.leases if not r.task.done() and not r.cancelled]
        if going:
            run = going[k % len(going)]
            run.cancelled = True
            run.task.cancel()

    async def do_operate(self, kind: str, model: str, worker: int | None, force: bool) -> None:
        if worker is not None:
            worker %= len(FLEETS[self.scenario.fleet])
        self.operator_forced |= force
        call = self.scheduler.operate(kind, model, worker=worker, force=force)
        self.operations.append(((kind, model, worker, force), asyncio.create_task(call)))

    async def do_kill(self, index: int) -> None:
        views = self.scheduler.views()
        worker = self.fleet.by_pid(views[index % len(views)]["pid"])
        if worker is not None:
            worker.die(1)

    async def do_fail_next_swap(self, keeps_previous: bool) -> None:
        self.fleet.failures.append(keeps_previous)

    async def do_reload(self, policy: dict) -> None:
        self.scheduler.reload(settings_for(self.directory, self.scenario.fleet,
                                           self.scenario.preload, policy))

    async def do_sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def do_settle(self) -> None:
        await self.settle()

    # ---- the end ----

    async def finish(self) -> None:
        """Release every lease (and grant later ones only to release them),
        then stop: at once, or after every lease and operation has ended."""
        for run in self.leases:
            run.release.set()
        if not self.scenario.abrupt_stop:
            await self.ended(self.leases_and_operations(), "before stop()")
            await self.settle()
            assert sum(v["active"] for v in self.scheduler.views()) == 0, \
                f"leases leaked: {self.scheduler.views()}"
            assert self.scheduler.waiting() == 0
        await asyncio.wait_for(self.scheduler.stop(), END_S + self.policy("drain_timeout"))
        await self.ended(self.leases_and_operations(), "after stop()")
        self.check_now()
        self.check_outcomes()
        assert sum(v["active"] for v in self.scheduler.views()) == 0, \
            f"leases left counted after stop(): {self.scheduler.views()}"
        running = [w.pid for w in self.fleet.workers if w.alive]
        assert not running, f"workers left running after stop(): {running}"

    def policy(self, key: str) -> float:
        """The largest value `key` takes in the example."""
        return max(self.policies(key))

    def policies(self, key: str) -> list[float]:
        return [self.scenario.policy[key],
                *(a[1][key] for a in self.scenario.actions if a[0] == "reload")]

    def leases_and_operations(self) -> dict[asyncio.Task, str]:
        tasks = {r.task: f"lease {r.model}" for r in self.leases}
        tasks.update({task: f"operate{args}" for args, task in self.operations})
        return tasks

    async def ended(self, tasks: dict[asyncio.Task, str], when: str) -> None:
        wait_s = END_S + self.policy("queue_wait") + self.policy("drain_timeout")
        if tasks:
            await asyncio.wait(tasks, timeout=wait_s)
        hung = [name for task, name in tasks.items() if not task.done()]
        assert not hung, f"never answered {when} (in {wait_s:g} s): {hung}"

    # ---- invariants ----

    def _check_grant(self, run: LeaseRun, lease: scheduler.Lease) -> None:
        worker = lease.worker
        if lease.model != run.model:
            self.broken.append(f"a lease for {run.model} came as one for {lease.model}")
        # A worker's death races the grant (the scheduler hears of it a few
        # loop turns later) and a request sent to a dead worker fails as such:
        # only a live worker must serve the model, unless an operation forced
        # on it since the lease was asked for took the model away.
        if not worker.alive or serves(worker, run.model):
            return
        if not any(at > run.asked_at for at in worker.forced):
            self.broken.append(f"lease for {run.model} granted on worker pid {worker.pid} "
                               f"serving {worker.models} (suspended {worker.suspended}) with "
                               f"an operation on {worker.affected} under way")

    def check_now(self) -> None:
        assert not self.fleet.broken, self.fleet.broken
        assert not self.broken, self.broken
        self.scheduler.model_views()  # status pages read it at any moment: it must not raise
        for view in self.scheduler.views():
            worker = self.fleet.by_pid(view["pid"])
            if worker is None or not worker.alive:
                continue
            held = sum(r.bytes for r in worker.residents())
            # A reload may lower the budget below what is already resident.
            budgets = self.policies("worker_memory_bytes")
            budget = 0 if 0 in budgets else max(budgets)
            assert not budget or held <= budget, \
                f"worker {view['index']} holds {held} bytes over its budget of {budget}: " \
                f"{worker.models} (suspended {worker.suspended})"
            for resident in view["residents"]:
                if resident["state"] == "serving":
                    assert serves(worker, resident["model"]), \
                        f"worker {view['index']} shown serving {resident['model']}, but " \
                        f"its worker serves {worker.models} (suspended " \
                        f"{worker.suspended}) with an operation on {worker.affected}"

    def held_on(self, view: dict) -> int:
        return sum(r.held_on is not None and r.held_on.alive and r.slot == view["index"]
                   and r.held_on.pid == view["pid"] for r in self.leases)


    def waiting(self) -> int:
        return sum(not r.granted and not r.task.done() for r in self.leases)

    async def settle(self) -> None:
        """The scheduler's count of leases on each worker meets the leases held
        there, and its count of requests waiting the leases not granted yet,
        once the messages in flight are handled."""
        def counts() -> tuple:
            return ([(v["index"], v["active"], self.held_on(v)) for v in self.scheduler.views()],
                    (self.scheduler.waiting(), self.waiting()))

        def met() -> bool:
            workers, waiting = counts()
            return all(active == held for _, active, held in workers) and \
                waiting[0] == waiting[1]

        try:
            await eventually(met, SETTLE_S)
        except AssertionError:
            raise AssertionError("[(worker, active, leases held)], (waiting, leases waiting): "
                                 f"{counts()}") from None

    def check_outcomes(self) -> None:
        for run in self.leases:
            if run.task.cancelled():
                assert run.cancelled, f"lease {run.model} cancelled by no client"
                continue
            failure = run.task.exception()
            assert failure is None or isinstance(failure, errors.WcdError), \
                f"lease {run.model} ended with {failure!r}"
            assert failure is not None or run.granted
            event(f"lease {type(failure).__name__ if failure else 'granted'}")
        for args, task in self.operations:
            assert not task.cancelled(), f"operate{args} cancelled"
            failure = task.exception()
            assert failure is None or isinstance(failure, errors.WcdError), \
                f"operate{args} ended with {failure!r}"
            assert failure is not None or task.result()["event"] == "done"
            event(f"operate {type(failure).__name__ if failure else 'done'}")


@pytest.fixture(scope="module")
def directory(tmp_path_factory):
    return tmp_path_factory.mktemp("interleavings")


def play(directory, scenario: Scenario) -> None:
    logged = LoggedExceptions()
    logger = logging.getLogger(scheduler.__name__)
    logger.addHandler(logged)
    try:
        with mock.patch.object(scheduler, "TICK_S", 0.01):  # keep-alives within the example
            asyncio.run(asyncio.wait_for(Interleaving(directory, scenario).play(), EXAMPLE_S))
    finally:
        logger.removeHandler(logged)
    assert not logged.messages, logged.messages


@settings(max_examples=200, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(scenario=scenarios())
def test_random_interleavings_keep_the_invariants(directory, scenario):
    play(directory, scenario)


# ---- bugs found, shrunk ---------------------------------------------------------------


def test_stop_answers_an_operation_under_way_in_a_worker(tmp_path):
    """Found by the random test, shrunk to: one worker, no preload; sleep
    1 ms (the worker is up); operate("swap", "a"); stop() at once."""
    async def scenario() -> None:
        running = Running(tmp_path, preload=())
        await running.scheduler.start()
        await eventually(lambda: running.worker()["state"] == "idle")
        running.fleet.swap_gate.clear()  # the swap stays under way in the worker
        swap = asyncio.create_task(running.scheduler.operate("swap", "a"))
        await eventually(lambda: running.fleet.swaps == ["a"])
        await running.scheduler.stop()
        done, _ = await asyncio.wait({swap}, timeout=0.5)
        assert done, "operate() was never answered"
        with pytest.raises(errors.WcdError):
            swap.result()

    asyncio.run(scenario())
