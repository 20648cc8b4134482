"""A warm worker process: imports torch and vLLM once, then serves protocol
commands from its parent over an inherited socket, forever.

    python -m wcd.workers.main --fd N

Everything else it is comes as the first frame on that socket (protocol.Setup),
refused, with exit code protocol.EXIT_VERSION_MISMATCH, when its protocol
version is not this worker's. With a tensor_parallel_size N > 1 the worker
leads a tensor-parallel group (workers/group.py): it starts N-1 warm followers
before reporting Ready, and exits if one dies, so the daemon restarts the
whole group.

Threads: a reader answers Ping at once (even while an engine builds, so a
slow build is never taken for a hang) and queues every other command; the main
thread owns every engine and steps the residents with requests in flight, one
step each in turn, taking commands between steps. The worker
exits when its parent goes away (socket EOF, or PR_SET_PDEATHSIG), on Shutdown,
and on SIGTERM.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time

import msgspec

from wcd.proc_stats import PhaseClock, phases_line, rss_bytes
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
        body = p.recv_frame(self.sock)
        return None if body is None else p.decode_command(body)

    def recv_setup(self) -> p.Setup | None:
        body = p.recv_frame(self.sock)
        return None if body is None else p.decode_setup(body)


class Worker:
    def __init__(self, channel: Channel, device: str, cache, group=None, parking=None,
                 watchdog=None):
        """`cache`: its weights.HostCache."""
        from wcd.workers.engine import EngineHost, Parking

        self.channel = channel
        self.device = device
        self.group = group
        self.host = EngineHost(cache, group, parking or Parking(),
                               watchdog.bounded if watchdog else None)
        # What the reader thread reports in pongs: replaced whole by the main
        # thread, never mutated, so the reader never sees it half-changed (the
        # engine host's own state changes mid-swap).
        self.residents: list[p.Resident] = []
        self.cached: list[p.CachedModel] = []
        self.parked: list[p.CachedModel] = []
        self.commands: queue.Queue[p.Command] = queue.Queue()
        self.deferred: collections.deque[p.Command] = collections.deque()
        self.inflight: dict[str, str] = {}  # request id -> its model
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
        # Only what the main thread publishes whole: no lock with the main thread.
        self.channel.send(p.Pong(seq, self._residents(), self.busy, self.cached,
                                 self._device_bytes(), self.parked))

    def _residents(self) -> list[p.Resident]:
        """The published residents with their requests in flight and KV cache
        usage now. Either thread: dict.copy() of str keys runs under the GIL
        in one piece, and the usage is a float the main thread sets."""
        running = collections.Counter(self.inflight.copy().values())
        return [msgspec.structs.replace(r, running=running[r.name],
                                        kv_usage=self.host.kv_usage(r.name))
                for r in self.residents]

    # ---- main thread ---------------------------------------------------------------

    def serve_forever(self) -> None:
        while True:
            command = self._next_command()
            if isinstance(command, p.Shutdown):
                return
            if command is not None:
                self.handle(command)

    def _next_command(self) -> p.Command | None:
        """The next command; while residents have work (else, CUDA graphs left
        to capture), one step (one capture) instead if none waits."""
        if self.deferred:
            return self.deferred.popleft()
        if self.host.has_work():
            background = self._step
        elif self.host.graphs_deferred():
            background = self.host.capture_deferred_graph
        else:
            return self.commands.get()
        try:
            return self.commands.get_nowait()
        except queue.Empty:
            background()
            return None

    def handle(self, command: p.Command) -> None:
        if isinstance(command, (p.Generate, p.Embed)):
            self._generate(command)
        elif isinstance(command, p.Abort):
            self._abort([command.request_id], reason=None)
        elif isinstance(command, p.Swap):
            self._swap(command)
        elif isinstance(command, p.Unload):
            self._unload(command)
        elif isinstance(command, p.Suspend):
            self._suspend(command)
        elif isinstance(command, (p.Tokenize, p.Detokenize)):
            self._tokenize(command)
        elif isinstance(command, p.Similarity):
            self._similarity(command)
        elif isinstance(command, p.GetStats):
            self.channel.send(self._stats(command.op_id))

    def _tokenize(self, command: p.Tokenize | p.Detokenize) -> None:
        from wcd.workers.engine import ModelError

        answer = self.host.tokenize if isinstance(command, p.Tokenize) else self.host.detokenize
        try:
            self.channel.send(answer(command))
        except ModelError as exc:
            self.channel.send(p.OpFailed(command.op_id, exc.info(), self._residents()))

    def _similarity(self, command: p.Similarity) -> None:
        from wcd.workers import pooling

        try:
            answer = pooling.similarities(command)
        except (RuntimeError, ValueError) as exc:  # torch's, for vectors that do not pair
            answer = p.OpFailed(command.op_id, p.ErrorInfo(p.BAD_ARGS, str(exc)),
                                self._residents())
        self.channel.send(answer)

    def _generate(self, command: p.Generate | p.Embed) -> None:
        from wcd.workers.engine import ModelError

        try:
            ready = self.host.add(command)
        except ModelError as exc:
            self.channel.send(p.RequestFailed(command.request_id, exc.info()))
            return
        self.inflight[command.request_id] = command.model
        self._deliver(ready)

    def _step(self) -> None:
        self._deliver(self.host.step())

    def _deliver(self, outputs: list[p.Output | p.Embedding]) -> None:
        for output in outputs:
            if output.finished:
                self.inflight.pop(output.request_id, None)
        stats = self.host.take_stats()
        if outputs or stats:
            self._send_outputs(outputs, stats)

    def _send_outputs(self, outputs: list[p.Output | p.Embedding],
                      stats: list[p.EngineStats]) -> None:
        """One frame per step; past the frame limit one per Output, and a
        single Output over it fails its request rather than the channel."""
        try:
            self.channel.send(p.Outputs(outputs, stats))
            return
        except p.FrameTooLarge:
            pass
        self.channel.send(p.Outputs([], stats))
        for output in outputs:
            try:
                self.channel.send(p.Outputs([output]))
            except p.FrameTooLarge as exc:
                self._abort([output.request_id], reason=str(exc))

    def _abort(self, request_ids: list[str], reason: str | None) -> None:
        ids = [rid for rid in request_ids if rid in self.inflight]
        self.host.abort(ids)
        for rid in ids:
            del self.inflight[rid]
            if reason is not None:
                self.channel.send(p.RequestFailed(rid, p.ErrorInfo(p.ABORTED, reason)))

    def _drain(self, names: list[str], timeout_s: float, force: bool) -> None:
        """Finish the requests of the residents in `names` (or abort them when
        forced or late; a suspended one's at once, as it cannot step), while
        every other resident keeps being stepped and taking requests. Aborts
        work meanwhile; other commands wait for the operation."""
        deadline = time.monotonic() + (0.0 if force else timeout_s)
        while self.host.has_work(names) and time.monotonic() < deadline:
            self._take_commands_while_draining(names)
            self._step()
        leftover = sorted(rid for rid, model in self.inflight.items() if model in names)
        if leftover:
            self._abort(leftover, reason="the model was swapped out before this request "
                        "finished" + (" (forced)" if force else " (drain timeout)"))

    def _take_commands_while_draining(self, leaving: list[str]) -> None:
        while True:
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, p.Abort) and command.request_id in self.inflight:
                self._abort([command.request_id], reason=None)
            elif isinstance(command, (p.Generate, p.Embed, p.Tokenize, p.Detokenize)) and \
                    command.model not in leaving and command.model in self.host.residents:
                self.handle(command)
            elif isinstance(command, p.Similarity):  # no model's: a request's last step
                self.handle(command)
            else:
                # An Abort of a deferred Generate is deferred behind it.
                self.deferred.append(command)

    def _swap(self, command: p.Swap) -> None:
        from wcd.workers.engine import ModelError, SwapFailed

        clock = self._clock(command.op_id)
        self.busy = "swap"
        before = self.host.models
        try:
            path = self.host.swap(command.model, command.replace, clock,
                                  lambda names: self._drain(names, command.drain_timeout_s,
                                                            command.force))
        except ModelError as exc:
            self._failed(command.op_id, "swap", exc.info(), clock)
        except SwapFailed as exc:
            self._failed(command.op_id, "swap", exc.error.info(), clock)
        else:
            name = command.model.name
            weights = None if path in ("noop", "resume") else self.host.weights_source
            self._publish()
            self.channel.send(p.OpDone(command.op_id, name, path, clock.phases, clock.total(),
                                       self._residents(), weights))
            log.info("swap %s -> %s: %s from %s in %.3f s %s", before, self.host.models, path,
                     weights, clock.total(), phases_line(clock.phases))
            self._snapshot(name)
            if path == "rebuild":
                self.host.collect_after_build()
        finally:
            self._publish()
            self.busy = None

    def _snapshot(self, name: str) -> None:
        """After the swap is reported, so its caller does not wait for it."""
        started = time.perf_counter()
        if self.host.snapshot(name):
            log.info("host cache: snapshot of %s in %.3f s", name,
                     time.perf_counter() - started)
        self.cached = self.host.cache.contents()

    def _unload(self, command: p.Unload) -> None:
        clock = self._clock(command.op_id)
        self.busy = "unload"
        try:
            before = self.host.models
            self.host.unload(command.models, clock,
                             lambda names: self._drain(names, command.drain_timeout_s,
                                                       command.force))
            self._publish()
            self.channel.send(p.OpDone(command.op_id, None, "unload", clock.phases,
                                       clock.total(), self._residents()))
            log.info("unload %s: %s -> %s in %.3f s %s", command.models, before,
                     self.host.models, clock.total(), phases_line(clock.phases))
        finally:
            self._publish()
            self.busy = None

    def _suspend(self, command: p.Suspend) -> None:
        from wcd.workers.engine import ModelError

        clock = self._clock(command.op_id)
        self.busy = "suspend"
        try:
            self._deliver(self.host.suspend(command.model, clock))
        except ModelError as exc:
            self._failed(command.op_id, "suspend", exc.info(), clock)
        else:
            self._publish()
            self.channel.send(p.OpDone(command.op_id, command.model, "suspend", clock.phases,
                                       clock.total(), self._residents()))
            log.info("suspend %s: %d requests held, %d bytes of KV blocks kept in %.3f s %s",
                     command.model,
                     sum(1 for model in self.inflight.values() if model == command.model),
                     self.host.residents[command.model].kept_bytes, clock.total(),
                     phases_line(clock.phases))
        finally:
            self._publish()
            self.busy = None

    def _publish(self) -> None:
        self.residents = self.host.report()
        self.parked = self.host.parked_contents()

    def _clock(self, op_id: int):
        return PhaseClock(lambda name, s: self.channel.send(p.Phase(op_id, name, s)))

    def _failed(self, op_id: int, operation: str, error: p.ErrorInfo, clock) -> None:
        self._publish()
        self.channel.send(p.OpFailed(op_id, error, self._residents(), clock.phases))
        log.warning("%s failed: %s: %s (residents %s)", operation, error.kind, error.message,
                    self.host.models)

    def _device_bytes(self) -> int:
        # The caching allocator's counters: a cheap read, safe from any thread.
        import torch

        return torch.cuda.memory_allocated() if self.device == "cuda" else 0

    def _stats(self, op_id: int) -> p.Stats:
        return p.Stats(op_id, os.getpid(), rss_bytes(), self.host.models,
                       self.host.unfinished_count(), self._device_bytes())

    def shutdown(self) -> None:
        self._abort(sorted(self.inflight), reason="the worker is shutting down")
        self.host.release_all()
        if self.group is not None:
            self.group.close()


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def _start_group(setup: p.Setup):
    """Each follower keeps a host cache of the worker's budget for its shard."""
    from wcd.workers.group import WarmGroup

    group = WarmGroup(setup.tensor_parallel_size, host_cache_bytes=setup.host_cache_bytes,
                      pinned=setup.device == "cuda", disk=_disk_settings(setup),
                      first_graph_tokens=setup.first_graph_tokens)
    threading.Thread(target=_exit_when_a_follower_dies, args=(group,), name="wcd-group-watch",
                     daemon=True).start()
    log.info("tensor-parallel group of %d: followers %s warm in %.1f s", group.size,
             [peer.pid for peer in group.peers], group.start_s)
    return group


def _disk_settings(setup: p.Setup):
    if not setup.disk_cache_dir or setup.disk_cache_bytes <= 0:
        return None
    from wcd.workers.disk_snapshots import DiskSettings

    return DiskSettings(setup.disk_cache_dir, setup.disk_cache_bytes)


def _exit_when_a_follower_dies(group) -> None:
    """A rank gone mid-collective would block the others forever: the whole
    group goes, and the daemon restarts it."""
    import multiprocessing.connection

    multiprocessing.connection.wait([peer.process.sentinel for peer in group.peers])
    if not group.closing:
        log.error("a follower of the group died; exiting so the group restarts")
        os._exit(1)


def _memory_bytes(device: str) -> int:
    """What residents may use at most: the device's memory, or on CPU the
    host's available memory now, before any model."""
    import torch

    from wcd.workers import vllm_seams

    return torch.cuda.mem_get_info()[1] if device == "cuda" else \
        vllm_seams.free_device_bytes()


def _seconds_since_exec() -> float:
    with open("/proc/self/stat") as stat:
        start_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
    with open("/proc/uptime") as uptime:
        return float(uptime.read().split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK")


def _init_device(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.init()
        torch.cuda.set_device(0)  # the daemon narrows CUDA_VISIBLE_DEVICES


def import_worker_modules(clock: PhaseClock) -> None:
    """What every worker imports before its setup matters: torch, vLLM, wcd's
    seams into it and its engine host, the heap they leave frozen. Each phase
    is near-free a second time, so a worker forked from a forkserver that ran
    them goes through them again."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    # vLLM's default from torch 2.12 on (vllm/envs.py use_mega_aot_artifact):
    # a build loads the compiled model whole instead of re-splitting its graph
    # and recompiling pieces. On the H200 (vLLM 0.26, torch 2.11) it took a
    # rebuild with CUDA graphs from 3.6 s to 2.0 s, outputs unchanged
    # (BENCHMARKS.md). Followers inherit it.
    os.environ.setdefault("VLLM_USE_MEGA_AOT_ARTIFACT", "1")
    with clock.phase("import"):  # vLLM, torch with it
        importlib.import_module("vllm")
        from wcd.workers import vllm_seams
    with clock.phase("seams"):  # the vLLM modules they reach into imported
        vllm_seams.apply()
    with clock.phase("engine_host"):  # its imports of vLLM's engine and entry points
        importlib.import_module("wcd.workers.engine")
    with clock.phase("freeze"):
        vllm_seams.freeze_import_heap()


def _warm_up(channel: Channel, setup: p.Setup, clock: PhaseClock):
    """Import torch and vLLM, set the device and seams up, and make the
    worker, each phase timed; returns it and its group (None for one process)."""
    import_worker_modules(clock)
    from wcd.workers import vllm_seams
    from wcd.workers.engine import Parking
    from wcd.workers.watchdog import Watchdog
    from wcd.workers.weights import host_cache

    vllm_seams.defer_graph_capture(setup.first_graph_tokens)
    with clock.phase("device"):
        _init_device(setup.device)
        group = _start_group(setup) if setup.tensor_parallel_size > 1 else None
    with clock.phase("worker"):
        cache = host_cache(setup.host_cache_bytes, setup.device == "cuda",
                           _disk_settings(setup))
        cache.allocate_soon()  # beside the first model's build, not after it
        worker = Worker(channel, setup.device, cache, group,
                        Parking(setup.max_parked, setup.park_min_free_bytes),
                        Watchdog(setup.render_timeout_s, setup.step_timeout_s))
    return worker, group


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fd", type=int, required=True, help="the socket to the daemon")
    args = parser.parse_args(argv)

    # From the exec: the worker's start as the daemon waits for it, the
    # interpreter's and this module's imports included.
    clock = PhaseClock(lambda name, seconds: None,
                       started=time.perf_counter() - _seconds_since_exec())
    die_with_parent(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _on_sigterm)
    channel = Channel(socket.socket(fileno=args.fd))
    try:
        setup = channel.recv_setup()
    except p.VersionMismatch as exc:
        print(f"wcd-worker: refusing the daemon's setup: {exc}", file=sys.stderr, flush=True)
        return p.EXIT_VERSION_MISMATCH
    if setup is None:
        return 0  # the daemon went before it said what to be
    # force: a worker forked from a forkserver inherits its handler.
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True,
                        format=f"wcd-worker[{setup.index}] %(levelname)s %(name)s: %(message)s")
    clock.phases["setup"] = clock.total()  # the interpreter, this module, the daemon's setup
    worker, group = _warm_up(channel, setup, clock)
    log.info("started in %.1f s: %s", clock.total(), phases_line(clock.phases))
    import torch
    import vllm

    channel.send(p.Ready(os.getpid(), setup.device, p.PROTOCOL_VERSION, vllm.__version__,
                         str(torch.__version__), clock.total(),
                         [peer.pid for peer in group.peers] if group else [],
                         _memory_bytes(setup.device)))
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
