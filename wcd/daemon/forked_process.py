"""A worker forked by a forkserver (wcd/workers/forkserver.py), as the daemon
holds it: the subset of asyncio.subprocess.Process that WorkerProcess uses
(pid, returncode, wait, send_signal, kill), over one connection to the
forkserver, which is the worker's parent."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys

from wcd.workers import protocol as p

# The forkserver went without saying how the worker ended: its parent-death
# signal (SIGTERM) ended it.
EXIT_UNKNOWN = -signal.SIGTERM


class ForkUnavailable(Exception):
    """No forked worker: the forkserver is absent, refused or broke; the
    message says which, for the log line before the daemon execs instead.
    `absent`: nothing listens there (none installed: not a fault)."""

    def __init__(self, message: str, absent: bool = False):
        super().__init__(message)
        self.absent = absent


class ForkedProcess:
    def __init__(self, pid: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.pid = pid
        self.returncode: int | None = None
        self._writer = writer
        self._exited = asyncio.get_running_loop().create_future()
        self._watch = asyncio.create_task(self._wait_for_exit(reader),
                                          name=f"forked-worker-{pid}")

    async def _wait_for_exit(self, reader: asyncio.StreamReader) -> None:
        code = EXIT_UNKNOWN
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError, p.ProtocolError):
            while True:
                reply = p.decode_forkserver_reply(await p.read_frame(reader))
                if isinstance(reply, p.WorkerExited):
                    code = reply.code
                    break
        self.returncode = code
        self._writer.close()
        self._exited.set_result(code)

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ConnectionError):
                self._writer.write(p.encode(p.SignalWorker(int(sig))))

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


async def fork_worker(path: str, worker_sock: socket.socket, env: dict[str, str],
                      python: str, stop_timeout_s: float, timeout_s: float) -> ForkedProcess:
    """Ask the forkserver at `path` for a worker on `worker_sock`, logging to
    this process's stderr; a forkserver still importing answers once done,
    within `timeout_s`. Raises ForkUnavailable."""
    try:
        return await asyncio.wait_for(
            _fork_worker(path, worker_sock, env, python, stop_timeout_s), timeout_s)
    except asyncio.TimeoutError:
        raise ForkUnavailable(f"the forkserver at {path} did not answer in {timeout_s:.0f} s"
                              ) from None


async def _fork_worker(path: str, worker_sock: socket.socket, env: dict[str, str],
                       python: str, stop_timeout_s: float) -> ForkedProcess:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, path)
        request = p.encode(p.ForkWorker(python, env, stop_timeout_s))
        # Small enough for an empty socket buffer: sendmsg takes it whole.
        sent = socket.send_fds(sock, [request], [worker_sock.fileno(), sys.stderr.fileno()])
        if sent != len(request):
            raise ForkUnavailable(f"the forkserver at {path} took {sent} of {len(request)} bytes")
        reader, writer = await asyncio.open_unix_connection(sock=sock)
    except OSError as exc:
        sock.close()
        raise ForkUnavailable(f"no forkserver at {path}: {exc.strerror or exc}",
                              absent=isinstance(exc, (FileNotFoundError, ConnectionRefusedError))
                              ) from exc
    except BaseException:
        sock.close()
        raise
    try:
        reply = p.decode_forkserver_reply(await p.read_frame(reader))
        if isinstance(reply, p.WorkerForked):
            return ForkedProcess(reply.pid, reader, writer)
        reason = reply.reason if isinstance(reply, p.ForkRefused) else repr(reply)
        raise ForkUnavailable(f"the forkserver at {path} refused: {reason}")
    except (asyncio.IncompleteReadError, ConnectionError, p.ProtocolError) as exc:
        writer.close()
        raise ForkUnavailable(f"the forkserver at {path} broke off: {exc}") from exc
    except BaseException:  # refused, or cancelled: a worker forked later finds nobody
        writer.close()
        raise
