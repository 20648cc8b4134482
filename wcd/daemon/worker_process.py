"""The daemon's handle on one worker process: spawn (exec, or fork from a
forkserver where one is configured and agrees), handshake (its Setup
out, its Ready back, of this protocol version or refused), typed requests
over the socketpair, and stop (SIGTERM, then SIGKILL).

No torch, no vLLM here: the worker imports those. A worker that dies fails
every pending operation and request with WorkerGone, never leaves one hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from wcd.daemon.forked_process import ForkedProcess, ForkUnavailable, fork_worker
from wcd.workers import protocol as p

log = logging.getLogger(__name__)


class WorkerError(Exception):
    """A worker reported a failure as data."""

    def __init__(self, error: p.ErrorInfo, residents: list[p.Resident] | None = None,
                 phases: dict[str, float] | None = None):
        super().__init__(error.message)
        self.error = error
        self.residents = residents  # what the worker serves after the failure; None: unknown
        self.phases = phases or {}


class WorkerGone(WorkerError):
    """The worker process exited or its socket broke."""


@dataclass(frozen=True)
class WorkerOptions:
    """`setup`: what the worker is, sent as its first frame; the rest is how
    the daemon starts and stops it."""

    setup: p.Setup = p.Setup()
    cuda_devices: tuple[int, ...] = ()  # physical GPU indices, for CUDA_VISIBLE_DEVICES
    ready_timeout_s: float = 300.0
    stop_timeout_s: float = 20.0
    python: str = sys.executable
    env: dict[str, str] | None = None
    forkserver: str | None = None  # its socket: fork the worker there, else exec it


class WorkerProcess:
    """Start with `await WorkerProcess.start(options)`; then swap, generate, stop."""

    def __init__(self, options: WorkerOptions):
        self.options = options
        self.process: asyncio.subprocess.Process | None = None
        self.ready: p.Ready | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self._op_ids = itertools.count(1)
        self._ping_seq = itertools.count(1)
        self._ops: dict[int, asyncio.Queue] = {}
        self._pings: dict[int, asyncio.Future] = {}
        self._requests: dict[str, asyncio.Queue] = {}
        self._ready: asyncio.Future | None = None
        self._gone: p.ErrorInfo | None = None
        # Where the engine stats of each step go (the daemon's vllm:* series).
        self.on_engine_stats: Callable[[list[p.EngineStats]], None] = lambda stats: None

    @property
    def index(self) -> int:
        return self.options.setup.index

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def alive(self) -> bool:
        return self._gone is None and self.process is not None and self.process.returncode is None

    @classmethod
    async def start(cls, options: WorkerOptions) -> WorkerProcess:
        worker = cls(options)
        await worker._spawn()
        return worker

    async def _spawn(self) -> None:
        env = self._environment()
        parent_sock = None
        if self.options.forkserver:
            parent_sock = await self._fork(env)
        if parent_sock is None:
            parent_sock, child_sock = socket.socketpair()
            try:
                self.process = await asyncio.create_subprocess_exec(
                    self.options.python, "-m", "wcd.workers.main",
                    "--fd", str(child_sock.fileno()),
                    pass_fds=(child_sock.fileno(),), env=env, start_new_session=False)
            finally:
                child_sock.close()
        reader, self._writer = await asyncio.open_unix_connection(sock=parent_sock)
        setup = self.options.setup
        self._writer.write(p.encode(setup))
        self._ready = asyncio.get_running_loop().create_future()
        self._reader_task = asyncio.create_task(self._read_events(reader),
                                                name=f"worker-{self.index}-events")
        try:
            self.ready = await asyncio.wait_for(asyncio.shield(self._ready),
                                                self.options.ready_timeout_s)
        except BaseException:
            self._ready.cancel()  # nobody waits for it any more
            await self.kill()
            raise
        log.info("worker %d ready: pid %d (%s), %s, vLLM %s, %.1f s", self.index,
                 self.ready.pid, "forked" if self.forked else "exec", self.ready.device,
                 self.ready.vllm_version, self.ready.startup_s)

    @property
    def forked(self) -> bool:
        """Whether a forkserver started it (else the daemon exec'd it)."""
        return isinstance(self.process, ForkedProcess)

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ if self.options.env is None else self.options.env)
        # The API's keys are the daemon's secret: a worker runs model code.
        env.pop("WCD_API_KEYS", None)
        if self.options.cuda_devices:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, self.options.cuda_devices))
        elif self.options.setup.tensor_parallel_size > 1:
            # The group's ranks share the CPU: each gets its part of the cores.
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1)
                                                      // self.options.setup.tensor_parallel_size)))
        return env

    async def _fork(self, env: dict[str, str]) -> socket.socket | None:
        """The daemon's end of a worker the forkserver forked, or None (logged
        why) for the daemon to exec one on a socketpair of its own: a
        forkserver that answers late may still fork on this one."""
        parent_sock, child_sock = socket.socketpair()
        try:
            self.process = await fork_worker(
                self.options.forkserver, child_sock, env, self.options.python,
                self.options.stop_timeout_s, self.options.ready_timeout_s)
        except ForkUnavailable as exc:
            log.log(logging.INFO if exc.absent else logging.WARNING,
                    "worker %d: starting it by exec: %s", self.index, exc)
            parent_sock.close()
            return None
        finally:
            child_sock.close()
        return parent_sock

    async def _read_events(self, reader: asyncio.StreamReader) -> None:
        name = f"worker {self.index} (pid {self.process.pid})"
        try:
            body = await p.read_frame(reader)
            p.check_version(body, name)
            self._dispatch(p.decode_event(body))
            while True:
                self._dispatch(p.decode_event(await p.read_frame(reader)))
        except p.VersionMismatch as exc:
            self._refuse(exc)
            reason = str(exc)
        except (asyncio.IncompleteReadError, ConnectionError, p.ProtocolError) as exc:
            reason = str(exc) if isinstance(exc, p.ProtocolError) else "connection closed"
        code = await self.process.wait()
        if code == p.EXIT_VERSION_MISMATCH:
            self._refuse(p.VersionMismatch(
                f"{name} refused this daemon's wcd protocol version {p.PROTOCOL_VERSION}: "
                "the two run different wcd installs (see the worker's log)"))
        self._fail_all(p.ErrorInfo(p.GONE, f"{name} exited with code {code}: {reason}"))

    def _refuse(self, mismatch: p.VersionMismatch) -> None:
        """A worker of another protocol version fails its start with the
        mismatch itself: restarting it would start the same code again."""
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(mismatch)

    def _dispatch(self, event: p.Event) -> None:
        if isinstance(event, p.Outputs):
            if event.stats:
                self.on_engine_stats(event.stats)
            for output in event.items:
                queue = self._requests.get(output.request_id)
                if queue is not None:
                    queue.put_nowait(output)
        elif isinstance(event, p.RequestFailed):
            queue = self._requests.get(event.request_id)
            if queue is not None:
                queue.put_nowait(event)
        elif isinstance(event, (p.Phase, p.OpDone, p.OpFailed, p.Stats, p.Tokenized,
                                p.Detokenized, p.Similarities)):
            queue = self._ops.get(event.op_id)
            if queue is not None:
                queue.put_nowait(event)
        elif isinstance(event, p.Pong):
            future = self._pings.pop(event.seq, None)
            if future is not None and not future.done():
                future.set_result(event)
        elif isinstance(event, p.Ready) and self._ready and not self._ready.done():
            self._ready.set_result(event)

    def _fail_all(self, error: p.ErrorInfo) -> None:
        self._gone = error
        log.warning("%s", error.message)
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(WorkerGone(error))
        for queue in [*self._ops.values(), *self._requests.values()]:
            queue.put_nowait(error)
        for future in self._pings.values():
            if not future.done():
                future.set_exception(WorkerGone(error))
        self._pings.clear()

    def _send(self, command: p.Command) -> None:
        if self._gone is not None:
            raise WorkerGone(self._gone)
        self._writer.write(p.encode(command))

    async def _drained(self) -> None:
        """Backpressure: a worker that stops reading its socket holds the
        sender here, rather than its commands piling up in the daemon."""
        try:
            await self._writer.drain()
        except ConnectionError:
            pass  # the reader task reports the worker's end to every waiter

    # ---- operations ------------------------------------------------------------------

    async def swap(self, model: p.ModelSpec, *, replace: list[str] = (),
                   drain_timeout_s: float = 30.0, force: bool = False,
                   on_phase: Callable[[p.Phase], None] | None = None) -> p.OpDone:
        """Make `model` resident, `replace` leaving first (protocol.Swap)."""
        op_id = next(self._op_ids)
        return await self._operation(
            op_id, p.Swap(op_id, model, list(replace), drain_timeout_s, force), on_phase)

    async def unload(self, models: list[str], *, drain_timeout_s: float = 30.0,
                     force: bool = False,
                     on_phase: Callable[[p.Phase], None] | None = None) -> p.OpDone:
        op_id = next(self._op_ids)
        return await self._operation(
            op_id, p.Unload(op_id, list(models), drain_timeout_s, force), on_phase)

    async def suspend(self, model: str, *,
                      on_phase: Callable[[p.Phase], None] | None = None) -> p.OpDone:
        op_id = next(self._op_ids)
        return await self._operation(op_id, p.Suspend(op_id, model), on_phase)

    async def stats(self) -> p.Stats:
        op_id = next(self._op_ids)
        return await self._operation(op_id, p.GetStats(op_id), None)

    async def tokenize(self, model: str, prompt: p.Prompt, **options: Any) -> p.Tokenized:
        """`options`: the other fields of protocol.Tokenize."""
        op_id = next(self._op_ids)
        return await self._operation(op_id, p.Tokenize(op_id, model, prompt, **options), None)

    async def detokenize(self, model: str, token_ids: list[int]) -> p.Detokenized:
        op_id = next(self._op_ids)
        return await self._operation(op_id, p.Detokenize(op_id, model, token_ids), None)

    async def similarity(self, pairs: list[tuple[bytes, bytes]]) -> p.Similarities:
        op_id = next(self._op_ids)
        return await self._operation(op_id, p.Similarity(op_id, pairs), None)

    async def _operation(self, op_id: int, command: p.Command,
                         on_phase: Callable[[p.Phase], None] | None):
        queue: asyncio.Queue = asyncio.Queue()
        self._ops[op_id] = queue
        try:
            self._send(command)
            while True:
                event = await queue.get()
                if isinstance(event, p.Phase):
                    if on_phase is not None:
                        on_phase(event)
                elif isinstance(event, p.OpFailed):
                    raise WorkerError(event.error, event.residents, event.phases)
                elif isinstance(event, p.ErrorInfo):
                    raise WorkerGone(event)
                else:
                    return event
        finally:
            del self._ops[op_id]

    async def generate(self, request: p.Generate | p.Embed
                       ) -> AsyncIterator[p.Output | p.Embedding]:
        """Outputs (Embeddings of an Embed) of one request as the worker streams
        them. Leaving the iteration early (client gone, cancellation) aborts it
        in the worker."""
        queue: asyncio.Queue = asyncio.Queue()
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is already in flight")
        self._requests[request.request_id] = queue
        finished = False
        try:
            self._send(request)
            await self._drained()
            while not finished:
                event = await queue.get()
                if isinstance(event, p.RequestFailed):
                    finished = True
                    raise WorkerError(event.error)
                if isinstance(event, p.ErrorInfo):
                    finished = True
                    raise WorkerGone(event)
                finished = event.finished
                yield event
        finally:
            del self._requests[request.request_id]
            if not finished and self.alive:
                self._send(p.Abort(request.request_id))

    async def ping(self, timeout_s: float) -> p.Pong:
        seq = next(self._ping_seq)
        future = asyncio.get_running_loop().create_future()
        self._pings[seq] = future
        try:
            self._send(p.Ping(seq))
            return await asyncio.wait_for(future, timeout_s)
        finally:
            self._pings.pop(seq, None)

    # ---- stop --------------------------------------------------------------------------

    async def stop(self) -> int:
        """Shutdown command, then SIGTERM, then SIGKILL, each after the stop timeout."""
        if self.process is None or self.process.returncode is not None:
            return await self._reap()
        with contextlib.suppress(WorkerGone, ConnectionError):
            self._send(p.Shutdown())
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                await asyncio.wait_for(self.process.wait(), self.options.stop_timeout_s)
                break
            except asyncio.TimeoutError:
                log.warning("worker %d did not stop; sending %s", self.index, sig.name)
                with contextlib.suppress(ProcessLookupError):
                    self.process.send_signal(sig)
        return await self._reap()

    async def kill(self) -> int:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        return await self._reap()

    async def _reap(self) -> int:
        code = await self.process.wait() if self.process else 0
        if self._reader_task is not None:
            with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
                await asyncio.wait_for(self._reader_task, 5)
        if self._writer is not None:
            self._writer.close()
        return code
