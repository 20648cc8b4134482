"""Unit tests of the host cache's disk tier (disk_snapshots.py) with plain
tensors: a snapshot read back by another cache (a restart) is equal to the
bit, a damaged file is a miss and goes, the budget removes the oldest files,
and a snapshot's range is not reused while it is being written."""

from __future__ import annotations

import os
import threading

import torch

from wcd.workers.disk_snapshots import DiskSettings, SnapshotFiles
from wcd.workers.weights import CHECKPOINT, KERNEL, HostCache

MB = 1 << 20


def tensors(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {"embed.weight": torch.randn(37, 11, dtype=torch.bfloat16),
            "norm.weight": torch.randn(11),
            "lm_head.bias": torch.arange(5, dtype=torch.int64)}


def cache(directory, budget_bytes: int = 1 << 30, pool: int = 4 * MB) -> HostCache:
    return HostCache(pool, pinned=False, files=SnapshotFiles(
        DiskSettings(str(directory), budget_bytes)))


def test_a_snapshot_read_back_after_a_restart_is_equal_to_the_bit(tmp_path):
    first = cache(tmp_path)
    first.take("key-a", "a", CHECKPOINT, tensors(1))
    first.files.flush()
    again = cache(tmp_path)  # a new process: nothing in memory
    snapshot = again.get("key-a")
    assert (snapshot.name, snapshot.format) == ("a", CHECKPOINT)
    for name, tensor in tensors(1).items():
        assert snapshot.tensors[name].dtype == tensor.dtype
        assert torch.equal(snapshot.tensors[name], tensor), name
    assert again.came_from_disk("key-a") and not again.came_from_disk("key-a")
    assert again.get("key-b") is None


def test_a_damaged_file_is_a_miss_and_goes(tmp_path):
    first = cache(tmp_path)
    first.take("key-a", "a", KERNEL, tensors(1))
    first.files.flush()
    path = first.files.path("key-a")
    with open(path, "r+b") as file:
        file.truncate(os.path.getsize(path) - 4096)
    assert cache(tmp_path).get("key-a") is None
    assert not os.path.exists(path)


def test_the_budget_removes_the_oldest_files(tmp_path):
    probe = cache(tmp_path / "probe")
    probe.take("p", "p", KERNEL, tensors(0))
    probe.files.flush()
    size = os.path.getsize(probe.files.path("p"))
    files = cache(tmp_path / "kept", budget_bytes=2 * size)
    for i, key in enumerate(("a", "b", "c")):
        files.take(key, key, KERNEL, tensors(i))
        files.files.flush()
        os.utime(files.files.path(key), (i, i))  # a before b before c
    assert [k for k in ("a", "b", "c") if k in files.files] == ["b", "c"]


class _HeldFiles(SnapshotFiles):
    """Writes that finish only when the test says."""

    def __init__(self, *args):
        super().__init__(*args)
        self.release = threading.Event()

    def write_later(self, layout, data, done):
        def held():
            self.release.wait()
            done()
        super().write_later(layout, data, held)


def test_a_range_being_written_is_not_reused(tmp_path):
    files = _HeldFiles(DiskSettings(str(tmp_path), 1 << 30))
    one = HostCache(4 * MB, pinned=False).take("p", "p", KERNEL, tensors(0)).nbytes
    held = HostCache(one, pinned=False, files=files)  # room for one snapshot
    held.take("a", "a", KERNEL, tensors(1))
    assert held.take("b", "b", KERNEL, tensors(2)) is None  # a is still being written
    files.release.set()
    files.flush()
    assert held.take("b", "b", KERNEL, tensors(2)) is not None  # a evicted now
    assert [c.name for c in held.contents()] == ["b"]
