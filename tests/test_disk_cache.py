"""The host cache's disk tier, end to end: a real worker with real vLLM on CPU
writes its snapshots to files; a worker started afterwards (a daemon restart)
brings models back from those files, not vLLM's loader, with vLLM's output."""

from __future__ import annotations

import pytest

from daemon_harness import wait_until
from test_weights import MB, assert_serves_reference, swap
from wcd.daemon.worker_process import WorkerOptions, WorkerProcess
from wcd.workers import protocol as p

pytestmark = pytest.mark.vllm


def snapshot_files(directory) -> list[str]:
    return sorted(path.name for path in directory.glob("*.wcds"))


def wait_for_files(directory, count: int) -> list[str]:
    """Files are written on the worker's writer thread, after the swap."""
    def enough() -> list[str] | None:
        files = snapshot_files(directory)
        return files if len(files) >= count else None

    return wait_until(enough, 60.0, f"{count} snapshot files")


def start(loop, directory) -> WorkerProcess:
    return loop.run_until_complete(WorkerProcess.start(WorkerOptions(p.Setup(
        host_cache_bytes=64 * MB, disk_cache_dir=str(directory), disk_cache_bytes=1 << 30))))


def test_a_restarted_worker_serves_from_the_snapshot_files(loop, demo_models, reference,
                                                           tmp_path):
    directory = tmp_path / "snapshots"
    m = demo_models
    first = start(loop, directory)
    try:
        assert swap(loop, first, m / "small-a", "small-a").weights == "disk"
        assert swap(loop, first, m / "small-b", "small-b").weights == "disk"
        files = wait_for_files(directory, 2)
    finally:
        loop.run_until_complete(first.stop())
    assert all(name.endswith(".rank0.wcds") for name in files)

    again = start(loop, directory)
    try:
        done = swap(loop, again, m / "small-b", "small-b")
        assert (done.path, done.weights) == ("rebuild", "snapshot_file")
        assert_serves_reference(loop, again, "small-b", reference)
        done = swap(loop, again, m / "small-a", "small-a")
        assert (done.path, done.weights) == ("same_shape", "snapshot_file")
        assert_serves_reference(loop, again, "small-a", reference)
        done = swap(loop, again, m / "small-b", "small-b")
        assert (done.path, done.weights) == ("same_shape", "host_cache")
        assert_serves_reference(loop, again, "small-b", reference)
        assert snapshot_files(directory) == files  # read back, not written again
    finally:
        loop.run_until_complete(again.stop())
