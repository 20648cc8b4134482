"""Parked engines, end to end: a real worker with real vLLM on CPU keeps a
swapped-out engine (weights and compiled model, KV cache released) and swaps
back to it without a rebuild; outputs stay vLLM's own."""

from __future__ import annotations

import shutil

import pytest

from test_worker import assert_matches_reference, serving, spec, swap
from wcd.daemon.worker_process import WorkerOptions, WorkerProcess
from wcd.workers import protocol as p

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def worker(loop, demo_models):
    worker = loop.run_until_complete(WorkerProcess.start(WorkerOptions(
        p.Setup(max_parked=1, park_min_free_bytes=1 << 30))))
    yield worker
    loop.run_until_complete(worker.stop())


def parked(loop, worker) -> list[str]:
    return [c.name for c in loop.run_until_complete(worker.ping(5)).parked]


def test_swap_back_to_a_parked_engine_skips_the_rebuild(loop, worker, demo_models, reference):
    swap(loop, worker, spec(demo_models, "small-a"))
    out = swap(loop, worker, spec(demo_models, "wide-a"))
    assert out.path == "rebuild" and parked(loop, worker) == ["small-a"]
    assert_matches_reference(loop, worker, "wide-a", reference)
    back = swap(loop, worker, spec(demo_models, "small-a"))
    assert (back.path, back.weights) == ("unpark", "parked")
    assert serving(loop, worker) == ["small-a"] and parked(loop, worker) == ["wide-a"]
    assert_matches_reference(loop, worker, "small-a", reference)
    again = swap(loop, worker, spec(demo_models, "wide-a"))
    assert again.path == "unpark"
    assert_matches_reference(loop, worker, "wide-a", reference)


def test_parked_engines_beyond_the_limit_are_released(loop, worker, demo_models, reference):
    swap(loop, worker, spec(demo_models, "small-a"))
    swap(loop, worker, spec(demo_models, "wide-a"))
    assert parked(loop, worker) == ["small-a"]
    # small-b has small-a's shape, but wide-a serves: a rebuild, which parks
    # wide-a, and max_parked 1 releases the older small-a.
    out = swap(loop, worker, spec(demo_models, "small-b"))
    assert out.path == "rebuild" and parked(loop, worker) == ["wide-a"]
    back = swap(loop, worker, spec(demo_models, "small-a"))
    assert back.path == "same_shape"
    assert_matches_reference(loop, worker, "small-a", reference)


def test_a_parked_model_changed_on_disk_is_rebuilt(loop, worker, demo_models, tmp_path,
                                                   reference):
    copy = tmp_path / "small-a"
    shutil.copytree(demo_models / "small-a", copy)
    swap(loop, worker, spec(demo_models, "small-a", path=copy))
    swap(loop, worker, spec(demo_models, "wide-a"))
    assert parked(loop, worker) == ["small-a"]
    weights = next(copy.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes())  # rewritten: a new weights key
    back = swap(loop, worker, spec(demo_models, "small-a", path=copy))
    assert back.path == "rebuild"
    assert_matches_reference(loop, worker, "small-a", reference)


def test_no_parking_below_the_free_memory_headroom(loop, demo_models):
    worker = loop.run_until_complete(WorkerProcess.start(WorkerOptions(
        p.Setup(max_parked=2, park_min_free_bytes=1 << 50))))
    try:
        swap(loop, worker, spec(demo_models, "small-a"))
        swap(loop, worker, spec(demo_models, "wide-a"))
        assert parked(loop, worker) == []
        back = swap(loop, worker, spec(demo_models, "small-a"))
        assert back.path == "rebuild"
    finally:
        loop.run_until_complete(worker.stop())
