"""The host cache's disk tier: snapshots in files, read back after a restart.

A snapshot in the host cache (weights.py) is one contiguous range of its pool:
the tensors laid end to end, each aligned. Its file is that range as it is,
after a header that says how to lay the tensors over it again, so writing is
one copy out of the pool and reading is one copy into it: large reads that
bypass the page cache (O_DIRECT, where the file system takes it), several in
parallel, straight into the (pinned, on CUDA) buffer. A model snapshotted
before the daemon restarted then comes back without vLLM's loader: a build
with the dummy load format, then the snapshot's copy, as from memory.

    magic (8 bytes) | header length (8, little endian) | header (JSON) | pad to ALIGN
    data: the snapshot's bytes, a multiple of ALIGN

Files are named by the snapshot's key (checkpoint files, engine args, tensor
layout: a changed checkpoint never reads a stale file) and the process's rank
in its group, since each rank keeps its own shard. Written on a thread of
their own, to a temporary name renamed into place, so a file is whole or
absent; the oldest (by last use) go past the budget. A file that does not
read back as written is removed and counts as a miss.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np

log = logging.getLogger(__name__)

ALIGN = 4096  # O_DIRECT's alignment of memory, offsets and lengths
_MAGIC = b"WCDSNAP1"
_SUFFIX = ".wcds"
_READ_CHUNK = 64 << 20
_READERS = 8


@dataclass(frozen=True)
class DiskSettings:
    """Where snapshot files live and how many bytes of them to keep."""

    directory: str
    budget_bytes: int


@dataclass(frozen=True)
class Layout:
    """What a file says of its snapshot: enough to lay tensors over the data."""

    key: str
    name: str
    format: str
    nbytes: int
    tensors: list[tuple[str, str, list[int], int]]  # name, dtype, shape, offset in data


class SnapshotFiles:
    """One process's view of the directory. Writes go to a thread; reads
    happen on the caller's (the worker's main thread)."""

    def __init__(self, settings: DiskSettings, rank: int = 0):
        self.settings = settings
        self.rank = rank
        os.makedirs(settings.directory, mode=0o700, exist_ok=True)
        self._pending: queue.Queue = queue.Queue()
        self._writer = threading.Thread(target=self._write_forever, name="wcd-snapshot-writer",
                                        daemon=True)
        self._writer.start()

    def path(self, key: str) -> str:
        digest = hashlib.sha256(key.encode()).hexdigest()[:40]
        return os.path.join(self.settings.directory, f"{digest}.rank{self.rank}{_SUFFIX}")

    def __contains__(self, key: str) -> bool:
        return os.path.isfile(self.path(key))

    # ---- writing ---------------------------------------------------------------------

    def write_later(self, layout: Layout, data: np.ndarray, done: Callable[[], None]) -> None:
        """Write `data` (a view of the pool's range) under `layout`'s key;
        `done()` once the range may be reused."""
        self._pending.put((layout, data, done))

    def flush(self) -> None:
        """Wait for every write queued so far."""
        self._pending.join()

    def _write_forever(self) -> None:
        while True:
            layout, data, done = self._pending.get()
            try:
                started = time.perf_counter()
                self._write(layout, data)
                log.info("snapshot of %s written to disk (%.1f MB) in %.2f s", layout.name,
                         layout.nbytes / 1e6, time.perf_counter() - started)
                self._keep_budget(keep=self.path(layout.key))
            except OSError:
                log.exception("could not write the snapshot of %s to disk", layout.name)
            finally:
                del data
                done()
                self._pending.task_done()

    def _write(self, layout: Layout, data: np.ndarray) -> None:
        final = self.path(layout.key)
        temporary = f"{final}.{os.getpid()}.tmp"
        header = json.dumps(asdict(layout)).encode()
        head = _MAGIC + len(header).to_bytes(8, "little") + header
        head += b"\0" * (-len(head) % ALIGN)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, memoryview(head))
            _write_all(fd, memoryview(data))
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(temporary)
            raise
        os.close(fd)
        os.rename(temporary, final)

    def _keep_budget(self, keep: str) -> None:
        files = []
        for entry in os.scandir(self.settings.directory):
            if entry.name.endswith(_SUFFIX):
                stat = entry.stat()
                files.append((stat.st_mtime, stat.st_size, entry.path))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.settings.budget_bytes:
                break
            if path != keep:
                os.unlink(path)
                total -= size
                log.info("disk cache: removed %s past the budget", os.path.basename(path))

    # ---- reading ---------------------------------------------------------------------

    def layout(self, key: str) -> Layout | None:
        """The file's layout if it is whole and holds `key`; a file that is
        not goes."""
        path = self.path(key)
        try:
            with open(path, "rb") as file:
                head = file.read(16)
                if len(head) < 16 or head[:8] != _MAGIC:
                    raise ValueError("not a snapshot file")
                layout = Layout(**json.loads(file.read(int.from_bytes(head[8:], "little"))))
            if layout.key != key or os.path.getsize(path) != _data_offset(path) + layout.nbytes:
                raise ValueError("truncated, or another snapshot's")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            log.warning("disk cache: %s unreadable (%s); removed", os.path.basename(path), exc)
            _remove(path)
            return None
        return layout

    def read_into(self, layout: Layout, data: np.ndarray) -> float:
        """The file's data into `data` (ALIGN-aligned, layout.nbytes long);
        returns the seconds it took."""
        path = self.path(layout.key)
        started = time.perf_counter()
        try:
            _read_file(path, data, layout.nbytes, direct=True)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: O_DIRECT refused this read
                raise
            _read_file(path, data, layout.nbytes, direct=False)
        os.utime(path)  # last use, for the budget
        return time.perf_counter() - started


def _data_offset(path: str) -> int:
    with open(path, "rb") as file:
        head = file.read(16)
    length = 16 + int.from_bytes(head[8:16], "little")
    return length + (-length % ALIGN)


def _read_file(path: str, data: np.ndarray, nbytes: int, direct: bool) -> None:
    """Chunks read in parallel (preadv releases the GIL), bypassing the page
    cache where `direct` and the file system allows (tmpfs does not)."""
    base = _data_offset(path)
    flags = os.O_RDONLY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | (getattr(os, "O_DIRECT", 0) if direct else 0))
    except OSError:
        fd = os.open(path, flags)
    try:
        with ThreadPoolExecutor(_READERS) as readers:
            list(readers.map(lambda at: _read_exactly(
                fd, memoryview(data[at:at + _READ_CHUNK]), base + at),
                range(0, nbytes, _READ_CHUNK)))
    finally:
        os.close(fd)


def _read_exactly(fd: int, view: memoryview, offset: int) -> None:
    while view:
        count = os.preadv(fd, [view], offset)
        if count <= 0:
            raise OSError(f"snapshot file ended {len(view)} bytes early")
        view, offset = view[count:], offset + count


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view):]


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
