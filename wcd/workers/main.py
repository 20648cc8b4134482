"""A warm worker process: imports torch and vLLM once, then serves protocol
commands from its parent over an inherited socket, forever.

    python -m wcd.workers.main --fd N [--device cpu|cuda] [--index I] [--tp N]

With --tp N > 1 the worker leads a tensor-parallel group (workers/group.py):
it starts N-1 warm followers before reporting Ready, and exits if one dies,
so the daemon restarts the whole group.

Threads: a reader answers Ping at once (even while an engine builds, so a
slow build is never taken for a hang) and queues every other command; the main
thread owns the engine and steps it while requests are in flight. The worker
exits when its parent goes away (socket EOF, or PR_SET_PDEATHSIG), on Shutdown,
and on SIGTERM.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time

from wcd.workers import protocol as p
from wcd.workers.process import die_with_parent

log = logging.getLogger("wcd.worker")


class Terminated(BaseException):
    """SIGTERM: unwind whatever runs, release the engine, exit."""


class Channel:
    """The socket to the parent: framed sends under a lock (two threads send)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._lock = threading.Lock()

    def send(self, event: p.Event) -> None:
        data = p.encode(event)
        with self._lock:
            self.sock.sendall(data)

    def recv(self) -> p.Command | None:
        header = self._recv_exactly(p.HEADER_SIZE)
        if header is None:
            return None
        body = self._recv_exactly(p.frame_length(header))
        return None if body is None else p.decode_command(body)

    def _recv_exactly(self, n: int) -> bytes | None:
        chunks, remaining = [], n
        while remaining:
            chunk = self.sock.recv(min(remaining, 1 << 20))
            if not chunk:
                return None
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)


class Worker:
    def __init__(self, channel: Channel, device: str, host_cache_bytes: int = 0, group=None,
                 parking=None, watchdog=None):
        from wcd.workers.engine import EngineHost, Parking
        from wcd.workers.weights import HostCache

        self.channel = channel
        self.device = device
        self.group = group
        self.host = EngineHost(HostCache(host_cache_bytes, pinned=device == "cuda"), group,
                               parking or Parking(), watchdog.bounded if watchdog else None)
        # What the reader thread reports in pongs: replaced whole by the main
        # thread, never mutated, so the reader never sees it half-changed (the
        # engine host's own state changes mid-swap).
        self.serving: str | None = None
        self.cached: list[p.CachedModel] = []
        self.parked: list[p.CachedModel] = []
        self.commands: queue.Queue[p.Command] = queue.Queue()
        self.deferred: collections.deque[p.Command] = collections.deque()
        self.inflight: set[str] = set()
        self.busy: str | None = None

    # ---- reader thread -----------------------------------------------------------

    def read_forever(self) -> None:
        try:
            while (command := self.channel.recv()) is not None:
                if isinstance(command, p.Ping):
                    self._pong(command.seq)
                else:
                    self.commands.put(command)
        except (OSError, p.ProtocolError) as exc:
            log.error("connection to the daemon broke: %s", exc)
        except Exception:
            # A reader that stopped would leave a worker alive but deaf.
            log.exception("the reader thread failed; exiting so that the daemon restarts "
                          "this worker")
            os._exit(1)
        # The parent is gone: nobody is left to serve or to report to.
        os._exit(0)

    def _pong(self, seq: int) -> None:
        # Only what the main thread publishes whole; len() of a set is atomic
        # under the GIL: no lock with the main thread.
        self.channel.send(p.Pong(seq, self.serving, self.busy, len(self.inflight),
                                 self.cached, self._device_bytes(), self.parked))

    # ---- main thread ---------------------------------------------------------------

    def serve_forever(self) -> None:
        while True:
            if self.deferred:
                command = self.deferred.popleft()
            elif self.host.has_unfinished():
                try:
                    command = self.commands.get_nowait()
                except queue.Empty:
                    self._step()
                    continue
            else:
                command = self.commands.get()
            if isinstance(command, p.Shutdown):
                return
            self.handle(command)

    def handle(self, command: p.Command) -> None:
        if isinstance(command, p.Generate):
            self._generate(command)
        elif isinstance(command, p.Abort):
            self._abort([command.request_id], reason=None)
        elif isinstance(command, p.Swap):
            self._swap(command)
        elif isinstance(command, p.Unload):
            self._unload(command)
        elif isinstance(command, p.GetStats):
            self.channel.send(self._stats(command.op_id))

    def _generate(self, command: p.Generate) -> None:
        from wcd.workers.engine import ModelError

        try:
            self.host.add(command)
        except ModelError as exc:
            self.channel.send(p.RequestFailed(command.request_id, exc.info()))
            return
        self.inflight.add(command.request_id)

    def _step(self) -> None:
        outputs = self.host.step()
        for output in outputs:
            if output.finished:
                self.inflight.discard(output.request_id)
        if outputs:
            self._send_outputs(outputs)

    def _send_outputs(self, outputs: list[p.Output]) -> None:
        """One frame per step; past the frame limit one per Output, and a
        single Output over it fails its request rather than the channel."""
        try:
            self.channel.send(p.Outputs(outputs))
            return
        except p.FrameTooLarge:
            pass
        for output in outputs:
            try:
                self.channel.send(p.Outputs([output]))
            except p.FrameTooLarge as exc:
                self._abort([output.request_id], reason=str(exc))

    def _abort(self, request_ids: list[str], reason: str | None) -> None:
        ids = [rid for rid in request_ids if rid in self.inflight]
        self.host.abort(ids)
        for rid in ids:
            self.inflight.discard(rid)
            if reason is not None:
                self.channel.send(p.RequestFailed(rid, p.ErrorInfo(p.ABORTED, reason)))

    def _drain(self, timeout_s: float, force: bool) -> None:
        """Finish in-flight requests (or abort them when forced or late).
        Aborts keep working meanwhile; other commands wait for the swap."""
        deadline = time.monotonic() + (0.0 if force else timeout_s)
        while self.host.has_unfinished() and time.monotonic() < deadline:
            while True:
                try:
                    command = self.commands.get_nowait()
                except queue.Empty:
                    break
                if isinstance(command, p.Abort):
                    self._abort([command.request_id], reason=None)
                else:
                    self.deferred.append(command)
            self._step()
        if self.inflight:
            self._abort(sorted(self.inflight), reason="the model was swapped out before "
                        "this request finished" + (" (forced)" if force else " (drain timeout)"))

    def _swap(self, command: p.Swap) -> None:
        from wcd.workers.engine import ModelError, SwapFailed

        clock = self._clock(command.op_id)
        self.busy = "swap"
        started = self.host.model
        try:
            path = ("noop" if self._already_serving(command.model) else
                    self.host.swap(command.model, clock,
                                   lambda: self._drain(command.drain_timeout_s, command.force)))
        except ModelError as exc:
            self._failed(command.op_id, exc.info(), clock)
        except SwapFailed as exc:
            self._failed(command.op_id, exc.error.info(), clock)
        else:
            weights = None if path == "noop" else self.host.weights_source
            self.parked = self.host.parked_contents()
            self.serving = self.host.model
            self.channel.send(p.OpDone(command.op_id, self.host.model, path,
                                       clock.phases, clock.total(), weights))
            log.info("swap %s -> %s: %s from %s in %.3f s %s", started, self.host.model, path,
                     weights, clock.total(), _phases(clock.phases))
            self._snapshot()
            if path == "rebuild":
                self.host.collect_after_build()
        finally:
            self.serving = self.host.model
            self.busy = None

    def _snapshot(self) -> None:
        """After the swap is reported, so its caller does not wait for it."""
        started = time.perf_counter()
        if self.host.snapshot_served():
            log.info("host cache: snapshot of %s in %.3f s", self.host.model,
                     time.perf_counter() - started)
        self.cached = self.host.cache.contents()

    def _already_serving(self, spec: p.ModelSpec) -> bool:
        served = self.host.served
        return (served is not None and served.plan.spec == spec
                and served.plan.checkpoint.weights_key == _weights_key(spec))

    def _unload(self, command: p.Unload) -> None:
        clock = self._clock(command.op_id)
        self.busy = "unload"
        try:
            previous = self.host.model
            self.host.unload(clock, lambda: self._drain(command.drain_timeout_s, command.force))
            self.serving = None
            self.channel.send(p.OpDone(command.op_id, None, "unload", clock.phases,
                                       clock.total()))
            log.info("unload %s in %.3f s %s", previous, clock.total(), _phases(clock.phases))
        finally:
            self.serving = self.host.model
            self.busy = None

    def _clock(self, op_id: int):
        from wcd.workers.engine import PhaseClock

        return PhaseClock(lambda name, s: self.channel.send(p.Phase(op_id, name, s)))

    def _failed(self, op_id: int, error: p.ErrorInfo, clock) -> None:
        self.serving = self.host.model
        self.parked = self.host.parked_contents()
        self.channel.send(p.OpFailed(op_id, error, self.host.model, clock.phases))
        log.warning("swap failed: %s: %s (serving %s)", error.kind, error.message,
                    self.host.model)

    def _device_bytes(self) -> int:
        # The caching allocator's counters: a cheap read, safe from any thread.
        import torch

        return torch.cuda.memory_allocated() if self.device == "cuda" else 0

    def _stats(self, op_id: int) -> p.Stats:
        return p.Stats(op_id, os.getpid(), rss_bytes(), self.host.model,
                       self.host.unfinished_count(), self._device_bytes())

    def shutdown(self) -> None:
        self._abort(sorted(self.inflight), reason="the worker is shutting down")
        self.host.release_all()
        if self.group is not None:
            self.group.close()


def _weights_key(spec: p.ModelSpec) -> str | None:
    from wcd.workers.checkpoint import CheckpointError, open_checkpoint

    try:
        return open_checkpoint(spec.path, spec.root).weights_key
    except CheckpointError:
        return None


def _phases(phases: dict[str, float]) -> str:
    return " ".join(f"{name}={seconds * 1000:.1f}ms" for name, seconds in phases.items())


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def _start_group(size: int):
    from wcd.workers.group import WarmGroup

    group = WarmGroup(size)
    threading.Thread(target=_exit_when_a_follower_dies, args=(group,), name="wcd-group-watch",
                     daemon=True).start()
    log.info("tensor-parallel group of %d: followers %s warm in %.1f s", size,
             [peer.pid for peer in group.peers], group.start_s)
    return group


def _exit_when_a_follower_dies(group) -> None:
    """A rank gone mid-collective would block the others forever: the whole
    group goes, and the daemon restarts it."""
    import multiprocessing.connection

    multiprocessing.connection.wait([peer.process.sentinel for peer in group.peers])
    if not group.closing:
        log.error("a follower of the group died; exiting so the group restarts")
        os._exit(1)


def _init_device(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.init()
        torch.cuda.set_device(0)  # the daemon narrows CUDA_VISIBLE_DEVICES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--host-cache-bytes", type=int, default=0)
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel group size")
    parser.add_argument("--max-parked", type=int, default=0)
    parser.add_argument("--park-min-free-bytes", type=int, default=0)
    parser.add_argument("--render-timeout", type=float, default=10.0)
    parser.add_argument("--step-timeout", type=float, default=120.0)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    die_with_parent(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _on_sigterm)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"wcd-worker[{args.index}] %(levelname)s %(name)s: %(message)s")
    channel = Channel(socket.socket(fileno=args.fd))
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

    import torch
    import vllm

    from wcd.workers import vllm_seams

    vllm_seams.apply()
    _init_device(args.device)
    group = _start_group(args.tp) if args.tp > 1 else None
    vllm_seams.freeze_import_heap()
    # Snapshots hold one process's parameters; a group's ranks each hold a shard.
    cache_bytes = args.host_cache_bytes if group is None else 0
    from wcd.workers.engine import Parking
    from wcd.workers.watchdog import Watchdog

    worker = Worker(channel, args.device, cache_bytes, group,
                    Parking(args.max_parked, args.park_min_free_bytes),
                    Watchdog(args.render_timeout, args.step_timeout))
    channel.send(p.Ready(os.getpid(), args.device, p.PROTOCOL_VERSION, vllm.__version__,
                         str(torch.__version__), time.perf_counter() - started,
                         [peer.pid for peer in group.peers] if group else []))
    threading.Thread(target=worker.read_forever, name="wcd-reader", daemon=True).start()
    try:
        worker.serve_forever()
    except Terminated:
        log.info("SIGTERM: stopping")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        worker.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
