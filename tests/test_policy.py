"""Unit tests of the placement and eviction policy (pure functions, fake slots)."""

from wcd.daemon.policy import (DRAINING, IDLE, RESTARTING, SERVING, STARTING, SWAPPING,
                               SlotView, choose_slot, expired, restart_delay, serving_slot)


def slot(index, state=SERVING, model=None, active=0, last_used=0.0, tp=1, parked=(),
         serves=None):
    return SlotView(index, state, model, active, last_used, tp, parked, serves or (tp,))


def test_serving_slot_finds_the_model_where_it_is_or_is_coming():
    slots = [slot(0, model="a"), slot(1, SWAPPING, "b"), slot(2, DRAINING, "c")]
    assert serving_slot(slots, "a").index == 0
    assert serving_slot(slots, "b").index == 1
    assert serving_slot(slots, "c") is None  # draining away from c
    assert serving_slot(slots, "d") is None


def test_choose_slot_prefers_an_empty_worker():
    slots = [slot(0, model="a", last_used=1), slot(1, IDLE), slot(2, IDLE)]
    assert choose_slot(slots, "b").index == 1


def test_choose_slot_takes_the_least_recently_used_idle_one():
    slots = [slot(0, model="a", last_used=5), slot(1, model="b", last_used=2),
             slot(2, model="c", last_used=1, active=3)]
    assert choose_slot(slots, "d").index == 1


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
