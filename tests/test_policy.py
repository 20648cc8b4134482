"""Unit tests of the pure placement and room-making decisions (policy.py)."""

from wcd.daemon.policy import (SERVING, SUSPENDED, ResidentView, Room, WorkerView,
                               choose_worker, expired, failures_in_a_row, footprint_estimate,
                               make_room, place, restart_delay)

GIB = 1 << 30


def resident(name, *, active=0, waiting=0, bytes=10, loaded_at=0.0, last_used=0.0,
             state=SERVING, kv_bytes=5, ranks=1) -> ResidentView:
    return ResidentView(name, state, active, waiting, bytes, loaded_at, last_used, kv_bytes,
                        ranks)


def worker(index=0, *residents, budget=0, max_resident=4, serves=(1,), tp=1, parked=(),
           available=True) -> WorkerView:
    return WorkerView(index, available, serves, tp, tuple(residents), tuple(parked), budget,
                      max_resident, can_suspend=tp == 1)


def room(w, need=10, *, now=100.0, since=100.0, quantum=2.0, min_resident=5.0, **kw):
    return make_room(w, need, now=now, waited_since=since, quantum_s=quantum,
                     min_resident_s=min_resident, **kw)


def test_a_model_that_fits_beside_the_residents_needs_no_room():
    assert room(worker(0, resident("a", active=3), budget=100)) == Room(0)


def test_the_most_resident_models_bound_a_worker_even_with_memory_free():
    w = worker(0, resident("a", last_used=50), resident("b", last_used=10), max_resident=2)
    assert room(w) == Room(0, evict=("b",))  # the least recently used idle one


def test_memory_short_evicts_idle_residents_least_recently_used_first():
    w = worker(0, resident("a", last_used=1), resident("b", last_used=2),
               resident("c", last_used=3), budget=34)
    assert room(w, need=15) == Room(0, evict=("a", "b"))


def test_idle_suspended_residents_are_evicted_before_serving_ones():
    w = worker(0, resident("a", last_used=1), resident("s", last_used=50, state=SUSPENDED),
               max_resident=2, budget=25)
    assert room(w, need=10) == Room(0, evict=("s",))


def test_a_request_waits_for_a_fresh_model_to_come_of_age():
    w = worker(0, resident("a", loaded_at=98.0), max_resident=1)
    assert room(w, now=100.0) == Room(0, at=103.0)
    assert room(w, now=104.0) == Room(0, evict=("a",))
    assert room(w, now=100.0, min_resident=None) == Room(0, evict=("a",))  # an operator


def test_busy_residents_are_suspended_after_a_quantum_never_evicted_by_requests():
    w = worker(0, resident("a", active=1, loaded_at=10.0), resident("b", active=1,
                                                                    loaded_at=50.0),
               max_resident=2)
    assert room(w, now=100.0, since=99.0) == Room(0, at=101.0)
    # The one serving longest goes first.
    assert room(w, now=101.0, since=99.0) == Room(0, suspend="a")


def test_a_resident_serves_at_least_a_quantum_before_it_is_suspended():
    w = worker(0, resident("a", active=1, loaded_at=99.5), max_resident=1)
    assert room(w, now=100.0, since=90.0) == Room(0, at=101.5)


def test_no_suspension_where_it_would_not_make_room():
    # Suspending a frees its KV cache (5 bytes): not enough for 30 more.
    w = worker(0, resident("a", active=1, bytes=10, kv_bytes=5), budget=20)
    assert room(w, need=30, now=200.0, since=0.0) is None


def test_an_operator_drains_busy_residents_when_idle_ones_are_not_enough():
    w = worker(0, resident("a", active=1, last_used=5), resident("b", last_used=9),
               max_resident=2, budget=100)
    assert room(w, need=95, min_resident=None) == Room(0, evict=("b", "a"))


def test_a_group_drains_its_busy_resident_after_a_quantum_instead_of_suspending():
    group = worker(0, resident("a", active=2, ranks=2), max_resident=2, tp=2, serves=(1, 2))
    assert room(group, now=100.0, since=99.0) == Room(0, at=101.0)
    assert room(group, now=101.0, since=99.0) == Room(0, evict=("a",))


def test_a_group_runs_one_tp1_model_per_rank_side_by_side():
    group = worker(0, resident("a", last_used=1), max_resident=2, tp=2, serves=(1, 2),
                   budget=15)
    assert room(group, need=12) == Room(0)  # the other rank's device: its own budget
    full = worker(0, resident("a", last_used=1), resident("b", last_used=2), max_resident=2,
                  tp=2, serves=(1, 2))
    assert room(full) == Room(0, evict=("a",))
    assert room(group, need=16) is None  # more than one device holds


def test_a_group_takes_a_larger_model_only_alone_and_drains_for_it():
    two = worker(0, resident("a", last_used=1), resident("b", last_used=2), max_resident=2,
                 tp=2, serves=(1, 2))
    assert room(two, ranks=2) == Room(0, evict=("a", "b"))
    busy = worker(0, resident("a", active=1, last_used=1), resident("b", last_used=2),
                  max_resident=2, tp=2, serves=(1, 2))
    assert room(busy, ranks=2, now=100.0, since=100.0) == Room(0, at=102.0)
    assert room(busy, ranks=2, now=102.0, since=100.0) == Room(0, evict=("a", "b"))
    wide = worker(0, resident("w", ranks=2), max_resident=2, tp=2, serves=(1, 2))
    assert room(wide) == Room(0, evict=("w",))  # a TP=1 model re-partitions the group


def test_a_suspended_model_resuming_is_not_its_own_victim():
    w = worker(0, resident("s", state=SUSPENDED, active=1, last_used=0),
               resident("a", last_used=5), max_resident=1)
    assert room(w, exclude="s") == Room(0, evict=("a",))


def test_place_prefers_a_fit_then_parked_then_the_smallest_worker():
    full = worker(0, resident("a", last_used=1), max_resident=1)
    free = worker(1, resident("b"), max_resident=2)
    group = worker(2, max_resident=2, tp=2, serves=(1, 2))
    args = dict(now=100.0, waited_since=100.0, quantum_s=2.0, min_resident_s=0.0)
    assert place([full, free, group], "c", 1, 10, **args) == Room(1)
    parked = worker(0, resident("a", last_used=1), max_resident=1, parked=("c",))
    assert place([parked, group], "c", 1, 10, **args) == Room(0, evict=("a",))
    assert place([full, group], "c", 1, 10, **args) == Room(2)  # no eviction beats size
    assert place([full, group], "w", 2, 10, **args) == Room(2)


def test_place_skips_busy_workers_and_those_of_another_size():
    busy = worker(0, available=False)
    other = worker(1, serves=(2,), tp=2)
    assert place([busy, other], "c", 1, 10, now=0.0, waited_since=0.0, quantum_s=1.0,
                 min_resident_s=0.0) is None


def test_choose_worker_for_an_operators_swap():
    idle = worker(0, resident("a", last_used=5))
    empty = worker(1)
    parked = worker(2, resident("b"), parked=("c",))
    assert choose_worker([idle, empty, parked], "c", 1).index == 2
    assert choose_worker([idle, empty], "c", 1).index == 1
    busy = worker(1, resident("b", active=1, last_used=1))
    assert choose_worker([idle, busy], "c", 1).index == 0


def test_footprint_estimate_before_the_first_load():
    assert footprint_estimate(100, {"kv_cache_memory_bytes": 50}, "cpu", 0) == 150
    assert footprint_estimate(100, {}, "cpu", 0) == 100 + 4 * GIB
    assert footprint_estimate(GIB, {}, "cuda", 100 * GIB) == 90 * GIB
    assert footprint_estimate(GIB, {"gpu_memory_utilization": 0.3}, "cuda",
                              100 * GIB) == 30 * GIB


def test_expired_honours_keep_alive_and_activity():
    w = worker(0, resident("a", last_used=0), resident("b", last_used=0, active=1),
               resident("c", last_used=95), resident("forever", last_used=0),
               resident("s", last_used=0, state=SUSPENDED))
    keep = {"a": 60, "b": 60, "c": 60, "forever": 0, "s": 60}
    assert [r.name for r in expired(w, 100, keep.get)] == ["a", "s"]


def test_restart_delay_backs_off_exponentially_to_a_cap():
    assert [restart_delay(n, 1, 30) for n in (1, 2, 3, 4, 5, 6, 9)] == [1, 2, 4, 8, 16, 30, 30]


def test_a_worker_that_stayed_up_long_enough_starts_a_new_run_of_failures():
    assert failures_in_a_row(7, up_s=301.0, reset_after_s=300.0) == 1
    assert failures_in_a_row(7, up_s=10.0, reset_after_s=300.0) == 8
    assert failures_in_a_row(7, up_s=None, reset_after_s=300.0) == 8  # never became ready
    assert failures_in_a_row(0, up_s=1.0, reset_after_s=300.0) == 1


def test_backoff_after_a_healthy_period_is_the_minimum_again():
    failures = 0
    for up_s in (None, 1.0, 2.0, 1.0, 0.5, 3.0, 2.0):  # seven quick crashes
        failures = failures_in_a_row(failures, up_s, 300.0)
    assert restart_delay(failures, 1, 60) == 60
    failures = failures_in_a_row(failures, 3600.0, 300.0)
    assert restart_delay(failures, 1, 60) == 1
