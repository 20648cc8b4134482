"""The scheduler's state machine alone: events in, effects out, no event
loop, no clock, no process (scheduler_core.handle)."""

from __future__ import annotations

import pytest
from test_scheduler_unit import make_settings

from wcd.daemon import errors
from wcd.daemon import scheduler_core as core
from wcd.daemon.catalog import Catalog
from wcd.workers import protocol as p


@pytest.fixture
def machine(tmp_path):
    settings = make_settings(tmp_path, preload=("a",), max_resident=2, preempt_after=1)
    catalog = Catalog(settings)
    state = core.State.initial(settings, [catalog.resolve("a")])
    return state, catalog


def started(state: core.State, now: float = 0.0) -> list:
    return core.handle(state, core.WorkerStarted(0, 0, 0, now))


def finish(state: core.State, run: core.RunOp, *names, now: float = 0.0,
           suspended=()) -> list:
    residents = [p.Resident(n, 10, 0, n in suspended) for n in names]
    done = {"event": "done", "model": run.op.entry.name if run.op.entry else None,
            "worker": 0, "path": "rebuild", "weights": None, "phases": {}, "total_s": 0.0}
    return core.handle(state, core.OpFinished(0, run.incarnation, run.op.serial, done, None,
                                              residents, now))


def only(effects: list, kind: type):
    found = [e for e in effects if isinstance(e, kind)]
    assert len(found) == 1, effects
    return found[0]


def test_a_worker_starts_with_its_preload_and_grants_once_it_serves(machine):
    state, catalog = machine
    run = only(started(state), core.RunOp)
    assert (run.op.kind, run.op.entry.name, run.op.targets) == ("swap", "a", ())
    # A request while it loads waits; the load's end grants it.
    assert core.handle(state, core.Acquire(1, catalog.resolve("a"), 0, 0.1)) == []
    grant = only(finish(state, run, "a", now=0.2), core.Grant)
    assert grant.waiter == 1 and grant.worker == 0
    assert state.workers[0].residents["a"].active == 1


def test_a_grant_carries_the_fingerprint_its_worker_reported_last(machine):
    """What the answers of a request are stamped with (system_fingerprint)."""
    state, catalog = machine
    run = only(started(state), core.RunOp)
    reported = p.Resident("a", 10, fingerprint="vllm-0.32.0-0123abcd")
    done = {"event": "done", "model": "a", "worker": 0, "path": "rebuild", "weights": None,
            "phases": {}, "total_s": 0.0}
    core.handle(state, core.OpFinished(0, run.incarnation, run.op.serial, done, None,
                                       [reported], 0.1))
    grant = only(core.handle(state, core.Acquire(1, catalog.resolve("a"), 0, 0.2)), core.Grant)
    assert grant.fingerprint == "vllm-0.32.0-0123abcd"
    pong = p.Pong(1, [p.Resident("a", 10, fingerprint="vllm-0.32.0-4567cdef")], None)
    core.handle(state, core.Health(0, run.incarnation, pong, 0.3))
    grant = only(core.handle(state, core.Acquire(2, catalog.resolve("a"), 0, 0.4)), core.Grant)
    assert grant.fingerprint == "vllm-0.32.0-4567cdef"


def test_a_second_model_loads_beside_the_first_and_a_third_evicts_the_idle_one(machine,
                                                                               tmp_path):
    state, catalog = machine
    (tmp_path / "models" / "c").mkdir()
    (tmp_path / "models" / "c" / "config.json").write_text("{}")
    finish(state, only(started(state), core.RunOp), "a")
    lease = only(core.handle(state, core.Acquire(1, catalog.resolve("a"), 0, 1.0)), core.Grant)
    run = only(core.handle(state, core.Acquire(2, catalog.resolve("b"), 0, 1.0)), core.RunOp)
    assert (run.op.entry.name, run.op.targets) == ("b", ())  # beside a, busy
    only(finish(state, run, "a", "b", now=2.0), core.Grant)
    core.handle(state, core.Release(lease.lease, 3.0))  # a idle now, b still leased
    run = only(core.handle(state, core.Acquire(3, catalog.resolve("c"), 0, 4.0)),
               core.RunOp)
    assert (run.op.entry.name, run.op.targets) == ("c", ("a",))


def test_an_illegal_transition_is_refused():
    with pytest.raises(core.IllegalTransition):
        core._move(None, "leave")


def test_a_lease_on_a_model_since_gone_is_not_counted_against_its_successor(machine):
    state, catalog = machine
    finish(state, only(started(state), core.RunOp), "a")
    lease = only(core.handle(state, core.Acquire(1, catalog.resolve("a"), 0, 1.0)), core.Grant)
    core.handle(state, core.WorkerDied(0, 0, 1, 2.0))
    run = only(started_again(state), core.RunOp)
    finish(state, run, "a", now=3.0)
    core.handle(state, core.Release(lease.lease, 4.0))
    assert state.workers[0].residents["a"].active == 0
    assert state.leases == {}


def started_again(state: core.State) -> list:
    return core.handle(state, core.WorkerStarted(0, 1, 0, 2.5))


def test_stop_refuses_waiters_and_operations_not_begun(machine):
    state, catalog = machine
    started(state)  # the preload runs; an operator's swap queues behind it
    assert core.handle(state, core.Operate(7, "swap", catalog.resolve("b"), 0, False, 0,
                                           0.1)) == []
    core.handle(state, core.Acquire(1, catalog.resolve("b"), 0, 0.2))
    effects = core.handle(state, core.Stop(0.3))
    assert {type(e) for e in effects} == {core.Refuse, core.Fail}
    assert all(isinstance(e.error, errors.Unavailable) for e in effects)
