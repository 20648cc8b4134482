"""Unit tests of the placement and eviction policy (pure functions, fake slots)."""

from wcd.daemon.policy import (DRAINING, IDLE, RESTARTING, SERVING, STARTING, SWAPPING,
                               SlotView, choose_slot, expired, failures_in_a_row,
                               next_evictable_at, restart_delay, serving_slot)


def slot(index, state=SERVING, model=None, active=0, last_used=0.0, tp=1, parked=(),
         serves=None, loaded_at=0.0, waiting=0, incoming=None):
    return SlotView(index, state, model, active, last_used, tp, parked, serves or (tp,),
                    loaded_at, waiting, incoming)


def test_serving_slot_finds_the_model_where_it_is_or_is_coming():
    slots = [slot(0, model="a"), slot(1, SWAPPING, "b"), slot(2, DRAINING, "c")]
    assert serving_slot(slots, "a").index == 0
    assert serving_slot(slots, "b").index == 1
    assert serving_slot(slots, "c") is None  # draining away from c
    assert serving_slot(slots, "d") is None


def test_serving_slot_finds_a_slot_draining_to_bring_the_model_in():
    slots = [slot(0, model="a"), slot(1, DRAINING, "c", incoming="d")]
    assert serving_slot(slots, "d").index == 1
    assert serving_slot(slots, "c") is None


def test_choose_slot_prefers_an_empty_worker():
    slots = [slot(0, model="a", last_used=1), slot(1, IDLE), slot(2, IDLE)]
    assert choose_slot(slots, "b").index == 1


def test_choose_slot_takes_the_least_recently_used_idle_one():
    slots = [slot(0, model="a", last_used=5), slot(1, model="b", last_used=2),
             slot(2, model="c", last_used=1, active=3)]
    assert choose_slot(slots, "d").index == 1


def test_choose_slot_spares_a_model_with_requests_waiting_for_it():
    slots = [slot(0, model="a", last_used=1, waiting=2), slot(1, model="b", last_used=5)]
    assert choose_slot(slots, "c").index == 1


def test_a_request_does_not_evict_a_model_before_its_minimum_residence():
    slots = [slot(0, model="a", loaded_at=98.0, last_used=1),
             slot(1, model="b", loaded_at=90.0, last_used=9, active=1)]
    request = dict(now=100.0, min_resident_s=5.0)
    # The fresh model is spared even though the other one is in use.
    assert choose_slot(slots, "c", **request).index == 1
    assert choose_slot(slots[:1], "c", **request) is None  # the request waits
    assert choose_slot(slots[:1], "c", now=103.0, min_resident_s=5.0).index == 0
    # An empty worker has nothing to protect; an operator may evict anything.
    assert choose_slot([slot(0, IDLE, loaded_at=99.0)], "c", **request).index == 0
    assert choose_slot(slots[:1], "c").index == 0


def test_a_model_parked_on_a_fresh_worker_waits_like_any_other_eviction():
    slots = [slot(0, model="a", loaded_at=99.0, parked=("c",)), slot(1, model="b")]
    assert choose_slot(slots, "c", now=100.0, min_resident_s=5.0).index == 1


def test_next_evictable_at_is_when_the_first_kept_model_may_go():
    slots = [slot(0, model="a", loaded_at=97.0), slot(1, model="b", loaded_at=99.0),
             slot(2, model="c", loaded_at=90.0), slot(3, IDLE),
             slot(4, SWAPPING, "d", loaded_at=99.5)]
    assert next_evictable_at(slots, 100.0, 5.0) == 102.0
    assert next_evictable_at(slots[2:], 100.0, 5.0) is None
    assert next_evictable_at(slots, 100.0, 0.0) is None


def test_choose_slot_waits_when_every_worker_is_busy():
    slots = [slot(0, SWAPPING, "a"), slot(1, STARTING), slot(2, RESTARTING)]
    assert choose_slot(slots, "b") is None


def test_choose_slot_only_takes_workers_of_the_models_tensor_parallel_size():
    slots = [slot(0, IDLE), slot(1, SERVING, "big", last_used=5.0, tp=2),
             slot(2, SERVING, "other", last_used=1.0, tp=2)]
    assert choose_slot(slots, "huge", tensor_parallel_size=2).index == 2
    assert choose_slot(slots, "small").index == 0
    assert choose_slot(slots, "giant", tensor_parallel_size=4) is None


def test_a_group_that_serves_smaller_models_is_chosen_after_the_workers_that_fit():
    """A TP=2 group configured to serve TP=1 too: it takes a TP=1 model when it
    is empty or the only choice, and is evicted last among equals."""
    group = dict(tp=2, serves=(1, 2))
    assert choose_slot([slot(0, IDLE, **group), slot(1, IDLE)], "small").index == 1
    assert choose_slot([slot(0, IDLE, **group), slot(1, model="a", last_used=1.0)],
                       "small").index == 0
    assert choose_slot([slot(0, model="big", last_used=1.0, **group),
                        slot(1, model="a", last_used=9.0)], "small").index == 1
    assert choose_slot([slot(0, model="big", **group), slot(1, model="a", active=2)],
                       "small").index == 0
    assert choose_slot([slot(0, model="a", **group)], "small").index == 0


def test_choose_slot_goes_where_the_model_is_parked():
    slots = [slot(0, IDLE), slot(1, SERVING, "a", last_used=9.0, parked=("b",))]
    assert choose_slot(slots, "b").index == 1
    assert choose_slot(slots, "c").index == 0


def test_expired_honours_keep_alive_and_activity():
    slots = [slot(0, model="a", last_used=0), slot(1, model="b", last_used=0, active=1),
             slot(2, model="c", last_used=95), slot(3, model="forever", last_used=0)]
    keep = {"a": 60, "b": 60, "c": 60, "forever": 0}
    assert [s.index for s in expired(slots, 100, keep.get)] == [0]


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
