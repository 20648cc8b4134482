"""The worker's host weight cache, end to end: a real worker with real vLLM on
CPU, snapshots of vLLM's loaded parameters, compared with vLLM's own offline
output after every swap."""

from __future__ import annotations

import shutil
import time

import pytest

from conftest import ENGINE_ARGS, GREEDY, PROMPTS
from test_worker import serving
from wcd.daemon.worker_process import WorkerOptions, WorkerProcess
from wcd.workers import protocol as p

pytestmark = pytest.mark.vllm
MB = 1 << 20


def spec(path, name: str) -> p.ModelSpec:
    return p.ModelSpec(name, str(path), dict(ENGINE_ARGS))


async def greedy(worker: WorkerProcess, model: str, prompt: str) -> list[int]:
    request = p.Generate(f"w-{time.monotonic_ns()}", model, [p.Prompt(prompt=prompt)],
                         dict(GREEDY))
    return [t for out in [o async for o in worker.generate(request)] for t in out.token_ids]


def cached(loop, worker) -> dict[str, int]:
    return {c.name: c.bytes for c in loop.run_until_complete(worker.ping(10)).cached}


def cached_with(loop, worker, name: str, timeout: float = 30) -> dict[str, int]:
    """The host cache once it holds `name`: the worker snapshots a model after
    it reported the swap done, so a ping right after may come first."""
    deadline = time.monotonic() + timeout
    while name not in (held := cached(loop, worker)):
        assert time.monotonic() < deadline, f"no snapshot of {name}: {held}"
        time.sleep(0.05)
    return held


def swap(loop, worker, path, name: str) -> p.OpDone:
    """Serve `name` in place of whatever the worker serves."""
    done = loop.run_until_complete(worker.swap(spec(path, name), replace=serving(loop, worker)))
    assert done.model == name
    return done


def assert_serves_reference(loop, worker, name: str, reference, as_model: str | None = None):
    expected = reference[as_model or name]["prompts"][0]["token_ids"]
    assert loop.run_until_complete(greedy(worker, name, PROMPTS[0])) == expected, name


@pytest.fixture(scope="module")
def worker(loop, demo_models):
    # Room for a small and a wide snapshot, not for a third model.
    worker = loop.run_until_complete(WorkerProcess.start(WorkerOptions(
        p.Setup(host_cache_bytes=14 * MB))))
    yield worker
    loop.run_until_complete(worker.stop())


def fresh_copy(demo_models, tmp_path, name: str):
    """`name`'s files with new modification times: no snapshot this worker
    took before (the module's tests share it) is one of them."""
    copy = tmp_path / name
    shutil.copytree(demo_models / name, copy, copy_function=shutil.copy)
    return copy


def test_misses_then_hits_on_both_paths_match_vllm(loop, worker, demo_models, reference,
                                                   tmp_path):
    small, wide = (fresh_copy(demo_models, tmp_path, name) for name in ("small-a", "wide-a"))
    if residents := serving(loop, worker):  # a build from nothing, as a fresh worker's
        loop.run_until_complete(worker.unload(residents))
    first = swap(loop, worker, small, "fresh-small")
    assert (first.path, first.weights) == ("rebuild", "disk")
    assert_serves_reference(loop, worker, "fresh-small", reference, as_model="small-a")
    cached_with(loop, worker, "fresh-small")  # snapshot taken after the load

    wide_done = swap(loop, worker, wide, "fresh-wide")
    assert (wide_done.path, wide_done.weights) == ("rebuild", "disk")
    assert_serves_reference(loop, worker, "fresh-wide", reference, as_model="wide-a")

    back = swap(loop, worker, small, "fresh-small")  # dummy build + snapshot copy
    assert (back.path, back.weights) == ("rebuild", "host_cache")
    assert_serves_reference(loop, worker, "fresh-small", reference, as_model="small-a")

    wide_again = swap(loop, worker, wide, "fresh-wide")
    assert (wide_again.path, wide_again.weights) == ("rebuild", "host_cache")
    assert_serves_reference(loop, worker, "fresh-wide", reference, as_model="wide-a")
    assert set(cached(loop, worker)) == {"fresh-small", "fresh-wide"}


def test_same_shape_hit_copies_in_place(loop, worker, demo_models, reference, tmp_path):
    m = demo_models
    swap(loop, worker, m / "small-a", "small-a")
    miss = swap(loop, worker, fresh_copy(m, tmp_path, "small-b"), "small-b")
    assert (miss.path, miss.weights) == ("same_shape", "disk")
    assert_serves_reference(loop, worker, "small-b", reference)
    hit = swap(loop, worker, m / "small-a", "small-a")
    assert (hit.path, hit.weights) == ("same_shape", "host_cache")
    assert_serves_reference(loop, worker, "small-a", reference)
    hit_b = swap(loop, worker, tmp_path / "small-b", "small-b")
    assert (hit_b.path, hit_b.weights) == ("same_shape", "host_cache")
    assert_serves_reference(loop, worker, "small-b", reference)


def test_least_recently_used_is_evicted_under_budget(loop, worker, demo_models, tmp_path):
    for name in ("wide-a", "small-a"):
        swap(loop, worker, demo_models / name, name)
    swap(loop, worker, fresh_copy(demo_models, tmp_path, "small-b"), "fresh-small-b")
    held = cached_with(loop, worker, "fresh-small-b")
    assert sum(held.values()) <= 14 * MB
    # small-b came in last; wide-a was used least recently and made room for it.
    assert "wide-a" not in held


def test_changed_files_are_reloaded_not_served_stale(loop, worker, demo_models, reference,
                                                     tmp_path):
    """A model directory whose weights were replaced after its snapshot was
    taken: its files are loaded again and their outputs served."""
    m = demo_models
    copy = tmp_path / "changing"
    shutil.copytree(m / "small-b", copy)
    swap(loop, worker, copy, "changing")
    assert_serves_reference(loop, worker, "changing", reference, as_model="small-b")
    swap(loop, worker, m / "small-a", "small-a")
    shutil.copy(m / "small-a" / "model.safetensors", copy / "model.safetensors")
    done = swap(loop, worker, copy, "changing")
    assert done.weights == "disk"
    assert_serves_reference(loop, worker, "changing", reference, as_model="small-a")


def test_no_budget_means_no_snapshots(loop, demo_models, reference):
    worker = loop.run_until_complete(WorkerProcess.start(WorkerOptions()))
    try:
        swap(loop, worker, demo_models / "small-a", "small-a")
        done = swap(loop, worker, demo_models / "small-b", "small-b")
        assert done.weights == "disk" and cached(loop, worker) == {}
        assert_serves_reference(loop, worker, "small-b", reference)
    finally:
        loop.run_until_complete(worker.stop())
