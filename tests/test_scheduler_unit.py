"""Unit tests of the scheduler's logic: the real Scheduler class driven
against a fake worker. No worker process is started: `Fleet` is the
scheduler's `start_worker`, and its FakeWorkers answer swap, unload, ping and
stop as the protocol would, record every swap that reached them, and exit when
a test says so. What is asserted is what a caller sees: leases granted or
refused (with the error an HTTP client would get), the worker views, and the
swaps the worker was asked for.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import time

import pytest

from wcd.daemon import errors, scheduler
from wcd.daemon.config import parse_settings
from wcd.daemon.scheduler import Scheduler
from wcd.daemon.worker_process import WorkerOptions
from wcd.workers import protocol as p

MODELS = ("a", "b")


@pytest.fixture(autouse=True)
def scheduler_handled_every_message(caplog):
    """A message whose handler raised is only logged by the scheduler: fail on it."""
    yield
    assert not [r.getMessage() for r in caplog.records
                if r.getMessage().startswith("scheduler: handling")]


def run_async(test):
    """Run an async test on a fresh loop, bounded in time."""
    @functools.wraps(test)
    def sync(*args, **kwargs):
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), 5))
    return sync


class FakeProcess:
    def __init__(self) -> None:
        self.exited = asyncio.Event()
        self.code: int | None = None

    async def wait(self) -> int | None:
        await self.exited.wait()
        return self.code

    def exit(self, code: int) -> None:
        self.code = code
        self.exited.set()


class FakeWorker:
    """Keeps resident models as a worker would: in the order they came in,
    suspended or not."""

    def __init__(self, fleet: Fleet, options: WorkerOptions, pid: int):
        self.fleet = fleet
        self.options = options
        self.pid = pid
        self.process = FakeProcess()
        self.ready = p.Ready(pid, "cpu", p.PROTOCOL_VERSION, "fake", "fake", 0.0,
                             memory_bytes=fleet.memory_bytes)
        self.models: list[str] = []
        self.suspended: set[str] = set()
        self._ops = itertools.count(1)

    @property
    def model(self) -> str | None:
        """The model that came in last (one-model tests)."""
        return self.models[-1] if self.models else None

    def residents(self) -> list[p.Resident]:
        return [p.Resident(name, self.fleet.footprint(name, name in self.suspended), 0,
                           name in self.suspended) for name in self.models]

    async def swap(self, model: p.ModelSpec, *, replace=(), drain_timeout_s: float,
                   force: bool, on_phase=None) -> p.OpDone:
        self.fleet.swaps.append(model.name)
        await self.fleet.swap_gate.wait()
        self.models = [m for m in self.models if m not in replace]
        path = "resume" if model.name in self.suspended else "rebuild"
        self.suspended.discard(model.name)
        if model.name not in self.models:
            self.models.append(model.name)
        return p.OpDone(next(self._ops), model.name, path, {"build": 0.0}, 0.0,
                        self.residents(), "disk")

    async def unload(self, models, *, drain_timeout_s: float, force: bool,
                     on_phase=None) -> p.OpDone:
        self.models = [m for m in self.models if m not in models]
        self.suspended -= set(models)
        return p.OpDone(next(self._ops), None, "unload", {}, 0.0, self.residents())

    async def suspend(self, model: str, *, on_phase=None) -> p.OpDone:
        self.fleet.suspensions.append(model)
        self.suspended.add(model)
        return p.OpDone(next(self._ops), model, "suspend", {}, 0.0, self.residents())

    async def ping(self, timeout_s: float) -> p.Pong:
        return p.Pong(0, self.residents(), None)

    async def stop(self) -> int:
        self.process.exit(0)
        return 0

    async def kill(self) -> int:
        self.process.exit(-9)
        return -9


class Fleet:
    """The scheduler's `start_worker`: every worker it started, when, and every
    swap that reached one."""

    def __init__(self) -> None:
        self.workers: list[FakeWorker] = []
        self.started_at: list[float] = []
        self.swaps: list[str] = []
        self.suspensions: list[str] = []
        self.memory_bytes = 0  # what workers say residents may use; 0: no limit
        self.footprints: dict[str, int] = {}  # a model's bytes; its KV cache is half
        self.swap_gate = asyncio.Event()  # cleared: swaps hang in the worker
        self.swap_gate.set()
        self.start_gate = asyncio.Event()  # cleared: workers take their time to start
        self.start_gate.set()

    def footprint(self, model: str, suspended: bool) -> int:
        size = self.footprints.get(model, 0)
        return size // 2 if suspended else size

    async def __call__(self, options: WorkerOptions) -> FakeWorker:
        await self.start_gate.wait()
        worker = FakeWorker(self, options, pid=1000 + len(self.workers))
        self.workers.append(worker)
        self.started_at.append(time.monotonic())
        return worker


def make_settings(tmp_path, preload=("a",), workers=({"device": "cpu"},), model_tp=1,
                  **policy):
    root = tmp_path / "models"
    for name in MODELS:
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "config.json").write_text("{}")
    # One model per worker unless a test says otherwise: most tests here are
    # about draining and swapping.
    policy = {"min_resident": 0, "queue_wait": 2, "drain_timeout": 10,
              "health_interval": 10, "max_resident": 1, **policy}
    return parse_settings({"workers": list(workers), "model_roots": [str(root)],
                           "models": {n: {"path": str(root / n),
                                          "tensor_parallel_size": model_tp} for n in MODELS},
                           "preload": list(preload), "policy": policy},
                          str(tmp_path / "wcd.yaml"))


async def eventually(check, timeout: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


class Running:
    """A started scheduler over a Fleet, serving its preload; stopped at exit."""

    def __init__(self, tmp_path, preload=("a",), on_change=None, workers=({"device": "cpu"},),
                 on_fatal=None, model_tp=1, **policy):
        self.fleet = Fleet()
        self.scheduler = Scheduler(make_settings(tmp_path, preload, workers, model_tp, **policy),
                                   start_worker=self.fleet, on_change=on_change,
                                   on_fatal=on_fatal)

    def worker(self) -> dict:
        return self.scheduler.views()[0]

    async def __aenter__(self) -> Running:
        await self.scheduler.start()
        if self.scheduler.settings.preload:
            await eventually(lambda: self.worker()["state"] == "serving")
        return self

    async def __aexit__(self, *exc) -> None:
        await self.scheduler.stop()

    async def lease_once(self, model: str) -> str:
        async with self.scheduler.lease(model) as lease:
            return lease.model


@run_async
async def test_on_demand_off_refuses_a_model_not_loaded_and_loads_nothing(tmp_path):
    async with Running(tmp_path, on_demand=False) as running:
        with pytest.raises(errors.ModelNotFound) as refused:
            await running.lease_once("b")
        assert refused.value.status == 404 and refused.value.param == "model"
        assert "policy.on_demand" in str(refused.value)
        assert await running.lease_once("a") == "a"
        assert running.fleet.swaps == ["a"]
        # An operator still loads anything.
        done = await running.scheduler.operate("swap", "b")
        assert done["model"] == "b" and running.fleet.swaps == ["a", "b"]
        assert await running.lease_once("b") == "b"


@run_async
async def test_on_demand_off_waits_for_the_model_a_starting_worker_preloads(tmp_path):
    running = Running(tmp_path, on_demand=False)
    running.fleet.start_gate.clear()
    await running.scheduler.start()
    try:
        lease = asyncio.create_task(running.lease_once("a"))
        await asyncio.sleep(0.02)
        assert running.worker()["state"] == "starting" and not lease.done()
        running.fleet.start_gate.set()
        assert await asyncio.wait_for(lease, 0.5) == "a"
    finally:
        await running.scheduler.stop()


@run_async
async def test_min_resident_keeps_a_fresh_model_from_requests_but_not_from_wcctl(tmp_path):
    async with Running(tmp_path, min_resident=30, queue_wait=0.2) as running:
        started = time.monotonic()
        with pytest.raises(errors.Unavailable) as refused:
            await running.lease_once("b")
        assert 0.19 <= time.monotonic() - started < 0.5
        assert refused.value.status == 503 and refused.value.retry_after_s > 0
        assert running.fleet.swaps == ["a"] and running.worker()["model"] == "a"
        done = await running.scheduler.operate("swap", "b")
        assert done["model"] == "b" and running.fleet.swaps == ["a", "b"]


@run_async
async def test_a_request_kept_by_min_resident_loads_when_the_time_is_up(tmp_path):
    async with Running(tmp_path, min_resident=0.2) as running:
        started = time.monotonic()
        assert await running.lease_once("b") == "b"
        waited = time.monotonic() - started
        # Not before the minimum, and not only at the next 1 s keep-alive tick.
        assert 0.15 <= waited < 0.8
        assert running.fleet.swaps == ["a", "b"]


# A tensor-parallel group runs a TP=2 engine alone and never suspends: a
# request for another TP=2 model drains the busy one, at once with
# preempt_after 0.
GROUP = ({"device": "cpu", "tensor_parallel_size": 2, "serves_tensor_parallel_sizes": [1, 2]},)
TP2 = {"workers": GROUP, "model_tp": 2}


@run_async
async def test_a_group_serves_two_tp1_models_side_by_side_without_a_drain(tmp_path):
    async with Running(tmp_path, workers=GROUP, preempt_after=0) as running:
        async with running.scheduler.lease("a"):  # busy: no TP=1 model needs its rank
            assert await asyncio.wait_for(running.lease_once("b"), 0.5) == "b"
            assert [r["model"] for r in running.worker()["residents"]] == ["a", "b"]
        assert running.fleet.swaps == ["a", "b"]


async def drain_for_b(running: Running) -> None:
    await eventually(lambda: running.worker()["state"] == "draining")
    assert running.fleet.swaps == ["a"]


@run_async
async def test_a_cancelled_request_cancels_the_swap_it_was_waiting_for(tmp_path):
    async with Running(tmp_path, preempt_after=0, **TP2) as running:
        async with running.scheduler.lease("a"):  # a request in flight: b must drain it
            lease_b = asyncio.create_task(running.lease_once("b"))
            await drain_for_b(running)
            lease_a = asyncio.create_task(running.lease_once("a"))
            await asyncio.sleep(0.02)
            assert not lease_a.done()  # the draining worker takes no new request
            lease_b.cancel()
            assert await asyncio.wait_for(lease_a, 0.2) == "a"
            assert running.worker()["state"] == "serving"
        await eventually(lambda: running.worker()["active"] == 0)
        assert await running.lease_once("a") == "a"
        assert running.fleet.swaps == ["a"]


@run_async
async def test_a_request_that_times_out_cancels_the_swap_it_was_waiting_for(tmp_path):
    async with Running(tmp_path, queue_wait=0.1, preempt_after=0, **TP2) as running:
        async with running.scheduler.lease("a"):
            with pytest.raises(errors.Unavailable):
                await running.lease_once("b")
            await eventually(lambda: running.worker()["state"] == "serving", 0.1)
            assert await asyncio.wait_for(running.lease_once("a"), 0.1) == "a"
        assert running.fleet.swaps == ["a"]


@run_async
async def test_the_swap_stays_while_another_request_still_waits_for_it(tmp_path):
    async with Running(tmp_path, preempt_after=0, **TP2) as running:
        async with running.scheduler.lease("a"):
            first = asyncio.create_task(running.lease_once("b"))
            await drain_for_b(running)
            second = asyncio.create_task(running.lease_once("b"))
            await asyncio.sleep(0.02)
            first.cancel()
            await asyncio.sleep(0.02)
            assert running.worker()["state"] == "draining"
        assert await asyncio.wait_for(second, 0.5) == "b"
        assert running.fleet.swaps == ["a", "b"]


@run_async
async def test_a_swap_under_way_in_the_worker_finishes_without_its_request(tmp_path):
    async with Running(tmp_path) as running:
        running.fleet.swap_gate.clear()
        lease_b = asyncio.create_task(running.lease_once("b"))
        await eventually(lambda: running.fleet.swaps == ["a", "b"])
        lease_b.cancel()
        await asyncio.sleep(0.02)
        running.fleet.swap_gate.set()
        await eventually(lambda: running.worker()["state"] == "serving")
        assert running.worker()["model"] == "b"


@run_async
async def test_a_lease_cancelled_as_it_is_granted_is_given_back(tmp_path):
    leases: list[asyncio.Task] = []

    def cancel_on_grant() -> None:
        # The scheduler calls this right after handling a message: when that
        # granted the lease, its future has the result but the request's task
        # has not run yet; the client leaves at that very moment.
        if leases and running.worker()["active"] == 1 and not leases[0].done():
            leases[0].cancel()

    running = Running(tmp_path, on_change=cancel_on_grant)
    async with running:
        leases.append(asyncio.create_task(running.lease_once("a")))
        with pytest.raises(asyncio.CancelledError):
            await leases[0]
        await eventually(lambda: running.worker()["active"] == 0, 0.2)
        assert await running.lease_once("a") == "a"


@run_async
async def test_a_model_idle_past_its_keep_alive_is_unloaded(tmp_path, monkeypatch):
    monkeypatch.setattr(scheduler, "TICK_S", 0.02)
    async with Running(tmp_path, keep_alive=0.05) as running:
        await eventually(lambda: running.worker()["state"] == "idle", 0.5)
        assert running.worker()["model"] is None


async def crash(fleet: Fleet) -> float:
    """Kill the newest worker; the seconds until the scheduler starts another."""
    count = len(fleet.workers)
    died = time.monotonic()
    fleet.workers[-1].process.exit(1)
    await eventually(lambda: len(fleet.workers) > count)
    return fleet.started_at[-1] - died


@run_async
async def test_restart_backoff_is_the_minimum_again_after_a_healthy_period(tmp_path):
    async with Running(tmp_path, preload=(), restart_backoff_min=0.02,
                       restart_backoff_max=1, restart_backoff_reset=0.1) as running:
        await eventually(lambda: running.worker()["state"] == "idle")
        delays = [await crash(running.fleet) for _ in range(4)]  # in a row
        assert delays[0] >= 0.02 and delays[3] >= 0.16 and delays[3] > 3 * delays[0]
        await asyncio.sleep(0.15)  # up longer than restart_backoff_reset
        assert await crash(running.fleet) < 0.08
        assert running.worker()["restarts"] == 5


# ---- failures of the daemon's own never leave a slot stuck ------------------------------


@run_async
async def test_a_swap_that_fails_in_the_daemon_restarts_the_worker_with_its_model(tmp_path):
    """Not a failure the worker reported: an exception in the daemon's own
    call. The operation's caller gets an error at once, and the worker, whose
    state is then unknown, comes back serving what it served."""
    async with Running(tmp_path, restart_backoff_min=0.01) as running:
        first = running.fleet.workers[0]

        async def broken_swap(*args, **kwargs):
            raise RuntimeError("a bug in the daemon")

        first.swap = broken_swap
        with pytest.raises(errors.WorkerFailed):
            await asyncio.wait_for(running.scheduler.operate("swap", "b"), 1)
        assert first.process.code == -9  # killed, not left swapping
        await eventually(lambda: len(running.fleet.workers) == 2
                         and running.worker()["state"] == "serving")
        assert running.worker()["model"] == "a" and running.fleet.swaps[-1] == "a"


@run_async
async def test_a_worker_that_fails_to_start_in_an_unexpected_way_is_started_again(tmp_path):
    running = Running(tmp_path, restart_backoff_min=0.01)
    start = running.fleet.__call__
    calls = []

    async def flaky(options):
        calls.append(options)
        if len(calls) == 1:
            raise ValueError("not one of the errors a start is expected to raise")
        return await start(options)

    running.scheduler._start_worker_process = flaky
    await running.scheduler.start()
    try:
        await eventually(lambda: running.worker()["state"] == "serving")
        assert len(calls) == 2 and running.worker()["model"] == "a"
    finally:
        await running.scheduler.stop()


@run_async
async def test_a_worker_of_another_protocol_version_is_not_started_again(tmp_path, caplog):
    """Its next start would run the same code: the scheduler says so once, to
    `on_fatal` (the daemon stops), instead of restarting it in a loop."""
    mismatch = p.VersionMismatch("worker 0 (pid 7) speaks wcd protocol version 99, not "
                                 f"this side's {p.PROTOCOL_VERSION}")
    fatal, calls = [], []

    async def refused(options):
        calls.append(options)
        raise mismatch

    running = Running(tmp_path, restart_backoff_min=0.01, on_fatal=fatal.append)
    running.scheduler._start_worker_process = refused
    await running.scheduler.start()
    try:
        await eventually(lambda: fatal)
        await asyncio.sleep(0.1)  # many backoffs of 0.01 s
        assert fatal == [mismatch] and len(calls) == 1
        assert calls[0].setup.protocol_version == p.PROTOCOL_VERSION
        assert any(r.levelname == "CRITICAL" and "version 99" in r.getMessage()
                   for r in caplog.records)
    finally:
        await running.scheduler.stop()


@run_async
async def test_health_reports_are_applied_by_the_owner_for_the_current_worker_only(tmp_path):
    async with Running(tmp_path, health_interval=0.01, restart_backoff_min=0.01) as running:
        worker = running.fleet.workers[0]

        async def ping(timeout_s: float) -> p.Pong:
            return p.Pong(0, [p.Resident(worker.model, 5, running=3)], None,
                          parked=[p.CachedModel("b", 7)], device_bytes=11)

        worker.ping = ping
        await eventually(lambda: running.worker()["running"] == 3)
        assert running.worker()["device_bytes"] == 11
        assert running.worker()["residents"][0]["bytes"] == 5
        worker.process.exit(1)
        await eventually(lambda: len(running.fleet.workers) == 2)
        # The dead worker's figures went with it; the new one reports its own.
        await eventually(lambda: running.worker()["running"] == 0
                         and running.worker()["state"] == "serving")
        assert running.worker()["device_bytes"] == 0


@run_async
async def test_a_swap_asked_for_while_workers_start_waits_on_one_of_its_size(tmp_path):
    """A TP=2-only group first, a plain worker second, both still starting:
    the TP=1 model's swap queues on the plain worker, never on the group."""
    running = Running(tmp_path, preload=(), workers=(
        {"device": "cpu", "tensor_parallel_size": 2}, {"device": "cpu"}))
    running.fleet.start_gate.clear()
    await running.scheduler.start()
    try:
        swap = asyncio.create_task(running.scheduler.operate("swap", "a"))
        await asyncio.sleep(0.02)
        running.fleet.start_gate.set()
        done = await asyncio.wait_for(swap, 1)
        assert (done["model"], done["worker"]) == ("a", 1)
    finally:
        await running.scheduler.stop()


# ---- several models resident on one worker ------------------------------------------------


def residents(running: Running) -> dict[str, str]:
    return {r["model"]: r["state"] for r in running.worker()["residents"]}


@run_async
async def test_a_second_model_comes_in_beside_a_busy_one_without_draining_it(tmp_path):
    async with Running(tmp_path, max_resident=2) as running:
        async with running.scheduler.lease("a"):  # in flight throughout
            assert await asyncio.wait_for(running.lease_once("b"), 0.5) == "b"
            assert residents(running) == {"a": "serving", "b": "serving"}
        assert running.fleet.swaps == ["a", "b"]
        assert running.fleet.workers[0].models == ["a", "b"]
        assert running.fleet.suspensions == []


@run_async
async def test_a_busy_resident_is_suspended_after_the_quantum_then_resumed(tmp_path):
    async with Running(tmp_path, max_resident=1, preempt_after=0.1) as running:
        async with running.scheduler.lease("a") as lease_a:
            started = time.monotonic()
            async with running.scheduler.lease("b") as lease_b:
                # b waited the quantum, then a was suspended, not drained: its
                # lease (its request in flight) is still held.
                assert time.monotonic() - started >= 0.1
                assert running.fleet.suspensions == ["a"]
                assert residents(running) == {"a": "suspended", "b": "serving"}
                assert lease_b.slot == lease_a.slot == 0
            # b idle: a, whose request is in flight, comes back at once, and
            # b leaves (one model at a time here).
            await eventually(lambda: residents(running) == {"a": "serving"})
        assert running.fleet.swaps == ["a", "b", "a"]
        assert running.fleet.workers[0].models == ["a"]
        await eventually(lambda: running.worker()["active"] == 0)


@run_async
async def test_every_resident_comes_back_after_a_worker_death(tmp_path):
    async with Running(tmp_path, max_resident=2, restart_backoff_min=0.01) as running:
        assert await running.lease_once("b") == "b"
        running.fleet.workers[0].process.exit(1)
        await eventually(lambda: len(running.fleet.workers) == 2
                         and residents(running) == {"a": "serving", "b": "serving"})
        assert running.fleet.workers[1].models == ["a", "b"]
        assert running.worker()["restarts"] == 1


@run_async
async def test_a_load_of_a_model_already_served_changes_nothing(tmp_path):
    async with Running(tmp_path, max_resident=2) as running:
        assert await running.lease_once("b") == "b"  # a and b resident: the worker is full
        done = await running.scheduler.operate("load", "a")
        assert (done["path"], done["worker"]) == ("noop", 0)
        assert residents(running) == {"a": "serving", "b": "serving"}
        assert running.fleet.workers[0].models == ["a", "b"]
