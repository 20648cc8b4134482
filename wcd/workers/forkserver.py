"""`wcd-forkserver`: a process that has imported what a worker imports
(torch, vLLM, wcd's seams: ~9 s on the CPU box, ~21 s on the H200) and forks
a worker from that state whenever a daemon asks. Run apart from the daemon
(its own systemd unit), it outlives the daemon's restarts, so a restarted
daemon's workers start in about a second and the first token after a restart
waits for the model's load alone.

    wcd-forkserver --socket PATH     (or a socket systemd passes)

The protocol is protocol.py's ForkWorker / SignalWorker in, WorkerForked or
ForkRefused, then WorkerExited out, one connection per worker. A worker is the
forkserver's child: the forkserver reaps it and reports its exit, signals it
on the daemon's behalf, and stops it (SIGTERM, SIGKILL after the daemon's stop
timeout) when the daemon's connection closes, since the worker's parent-death
signal fires for the forkserver, not the daemon.

A fork only reuses the imports when nothing they depend on differs: the
daemon's interpreter and environment must be the ones the forkserver
imported under, the installed wcd, vLLM and torch files the ones it loaded,
CUDA not initialised and no other Python thread running. Otherwise it
refuses with the reason and the daemon execs the worker as without a
forkserver.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import selectors
import signal
import socket
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field

from wcd.proc_stats import PhaseClock, phases_line
from wcd.workers import protocol as p

log = logging.getLogger("wcd.forkserver")

# Variables that name a process's place in its service manager or shell, not
# anything an import reads: the daemon's and the forkserver's differ by nature.
PER_PROCESS_VARIABLES = frozenset({
    "CUDA_VISIBLE_DEVICES",  # read when CUDA initialises, after the fork
    "INVOCATION_ID", "JOURNAL_STREAM", "NOTIFY_SOCKET", "WATCHDOG_PID", "WATCHDOG_USEC",
    "MAINPID", "MANAGERPID", "SYSTEMD_EXEC_PID", "LISTEN_PID", "LISTEN_FDS",
    "LISTEN_FDNAMES", "RUNTIME_DIRECTORY", "STATE_DIRECTORY", "CACHE_DIRECTORY",
    "LOGS_DIRECTORY", "CONFIGURATION_DIRECTORY", "CREDENTIALS_DIRECTORY", "TRIGGER_UNIT",
    "PWD", "OLDPWD", "SHLVL", "_", "COLUMNS", "LINES",
})
_FRAME_READ_TIMEOUT_S = 5.0  # a client that connects and says nothing holds no fork up


def environment_difference(imported_under: dict[str, str], wanted: dict[str, str]) -> list[str]:
    """The variables whose values differ between the environment the imports
    ran under and a daemon's worker environment, besides per-process ones and
    the daemon's own WCD_*."""
    names = set(imported_under) | set(wanted)
    return sorted(name for name in names
                  if name not in PER_PROCESS_VARIABLES and not name.startswith("WCD_")
                  and imported_under.get(name) != wanted.get(name))


def same_interpreter(python: str, other: str) -> bool:
    """The same binary in the same bin directory (a virtualenv's python and
    python3 are one; two virtualenvs' pythons link to one binary, yet each
    imports its own site-packages)."""
    return (os.path.realpath(python) == os.path.realpath(other)
            and os.path.dirname(os.path.abspath(python))
            == os.path.dirname(os.path.abspath(other)))


def loaded_files_fingerprint() -> dict[str, int]:
    """mtime (ns) of each wcd module loaded and of the torch, vLLM and
    transformers packages' __init__: an upgrade or an edit changes one."""
    fingerprint = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if path and (name == "wcd" or name.startswith("wcd.")
                     or name in ("torch", "vllm", "transformers")):
            with contextlib.suppress(OSError):
                fingerprint[path] = os.stat(path).st_mtime_ns
    return fingerprint


@dataclass
class _Child:
    pid: int
    connection: socket.socket
    pidfd: int
    stop_timeout_s: float
    kill_at: float | None = None  # SIGKILL then, once its daemon has gone


@dataclass
class Forkserver:
    listener: socket.socket
    imported_under: dict[str, str]
    fingerprint: dict[str, int]
    selector: selectors.BaseSelector = field(default_factory=selectors.DefaultSelector)
    children: dict[int, _Child] = field(default_factory=dict)  # by pid

    def serve_forever(self) -> None:
        self.selector.register(self.listener, selectors.EVENT_READ, self._accept)
        while True:
            for key, _ in self.selector.select(self._next_deadline()):
                try:
                    key.data(key.fileobj)
                except (OSError, p.ProtocolError) as exc:  # one peer's trouble, not the server's
                    log.warning("%s: %s", type(exc).__name__, exc)
            self._kill_overdue()

    # ---- requests ----------------------------------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        connection, _ = listener.accept()
        try:
            request, fds = _read_request(connection)
        except (OSError, p.ProtocolError) as exc:
            log.warning("dropped a request: %s", exc)
            connection.close()
            return
        try:
            refusal = self._refusal(request) or self._fork(request, fds, connection)
            if refusal:
                log.warning("refused a fork: %s", refusal)
                with contextlib.suppress(OSError):  # a daemon gone meanwhile needs no answer
                    _send(connection, p.ForkRefused(refusal))
                connection.close()
                self._exit_if_stale_and_idle()
        finally:
            for fd in fds:
                os.close(fd)

    def _refusal(self, request: p.ForkWorker) -> str:
        if not same_interpreter(request.python, sys.executable):
            return (f"the daemon runs workers with {request.python}, this forkserver is "
                    f"{sys.executable}")
        differing = environment_difference(self.imported_under, request.env)
        if differing:
            return ("the daemon's worker environment differs from the one this forkserver "
                    f"imported under in {', '.join(differing)}")
        if self._stale():
            return ("wcd, vLLM or torch changed on disk since this forkserver imported them; "
                    "restart it (systemctl restart wcd-forkserver)")
        # Python threads only: the BLAS libraries' pools that importing numpy
        # and torch start (two native threads here) stop and restart around a
        # fork in their own pthread_atfork handlers.
        if threading.active_count() != 1:
            return (f"this forkserver runs {threading.active_count()} Python threads: "
                    "a fork could deadlock")
        if _cuda_initialised():
            return "CUDA is initialised in this forkserver: a forked worker could not use it"
        return ""

    def _stale(self) -> bool:
        return loaded_files_fingerprint() != self.fingerprint

    def _exit_if_stale_and_idle(self) -> None:
        """Socket-activated, the next request starts a fresh forkserver, which
        imports the new installation; one with workers keeps them until they go."""
        if not self.children and self._stale():
            log.info("the installed files changed and no worker is left: exiting")
            raise SystemExit(0)

    def _fork(self, request: p.ForkWorker, fds: list[int], connection: socket.socket) -> str:
        """Fork the worker and tell the daemon its pid; else why not."""
        worker_fd, stderr_fd = fds
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as exc:
            return f"fork failed: {exc}"
        if pid == 0:
            self._become_worker(request.env, connection, worker_fd, stderr_fd)
        child = _Child(pid, connection, os.pidfd_open(pid), request.stop_timeout_s)
        self.children[pid] = child
        self.selector.register(child.pidfd, selectors.EVENT_READ, lambda _: self._reap(child))
        self.selector.register(connection, selectors.EVENT_READ,
                               lambda _: self._from_daemon(child))
        _send(connection, p.WorkerForked(pid))
        log.info("forked worker pid %d", pid)
        return ""

    def _become_worker(self, env: dict[str, str], connection: socket.socket, worker_fd: int,
                       stderr_fd: int) -> None:
        """In the child: drop the forkserver's sockets, take the daemon's
        stderr and environment, and run the worker; never returns."""
        code = 1
        try:
            self.selector.close()
            self.listener.close()
            connection.close()
            for other in self.children.values():
                other.connection.close()
                os.close(other.pidfd)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.dup2(stderr_fd, 1)
            os.dup2(stderr_fd, 2)
            os.close(stderr_fd)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.close(null)
            os.environ.clear()
            os.environ.update(env)
            from wcd.workers import main as worker_main

            code = worker_main.main(["--fd", str(worker_fd)])
        except BaseException:  # noqa: BLE001 - a forked child must never return into the server
            logging.getLogger("wcd.worker").exception("forked worker failed")
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)

    # ---- children ----------------------------------------------------------------------

    def _from_daemon(self, child: _Child) -> None:
        try:
            body = p.recv_frame(child.connection)
            request = None if body is None else p.decode_forkserver_request(body)
        except (OSError, p.ProtocolError) as exc:
            log.warning("worker pid %d: its daemon's connection broke: %s", child.pid, exc)
            request = None
        if request is None:  # the daemon went: the worker has nobody to serve
            self.selector.unregister(child.connection)
            log.info("worker pid %d: its daemon went; SIGTERM", child.pid)
            _signal(child, signal.SIGTERM)
            child.kill_at = time.monotonic() + child.stop_timeout_s
            return
        if isinstance(request, p.SignalWorker):
            _signal(child, request.signum)

    def _reap(self, child: _Child) -> None:
        _, status = os.waitpid(child.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        log.info("worker pid %d exited with code %d", child.pid, code)
        self.selector.unregister(child.pidfd)
        os.close(child.pidfd)
        with contextlib.suppress(KeyError):
            self.selector.unregister(child.connection)
        with contextlib.suppress(OSError):
            _send(child.connection, p.WorkerExited(code))
        child.connection.close()
        del self.children[child.pid]

    def _next_deadline(self) -> float | None:
        deadlines = [child.kill_at for child in self.children.values() if child.kill_at]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _kill_overdue(self) -> None:
        now = time.monotonic()
        for child in self.children.values():
            if child.kill_at is not None and child.kill_at <= now:
                log.warning("worker pid %d did not stop; SIGKILL", child.pid)
                _signal(child, signal.SIGKILL)
                child.kill_at = None  # its exit comes by its pidfd


def _signal(child: _Child, signum: int) -> None:
    # The pid is ours until _reap waits for it: never another process's.
    with contextlib.suppress(ProcessLookupError):
        os.kill(child.pid, signum)


def _cuda_initialised() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


def _read_request(connection: socket.socket) -> tuple[p.ForkWorker, list[int]]:
    """The first frame and the two descriptors sent with it."""
    connection.settimeout(_FRAME_READ_TIMEOUT_S)
    data, fds, _, _ = socket.recv_fds(connection, 1 << 16, 2)
    if len(fds) != 2:
        for fd in fds:
            os.close(fd)
        raise p.ProtocolError(f"a fork request carries 2 file descriptors, not {len(fds)}")
    try:
        while len(data) < p.HEADER_SIZE or len(data) < p.HEADER_SIZE + p.frame_length(
                data[:p.HEADER_SIZE]):
            chunk = connection.recv(1 << 16)
            if not chunk:
                raise p.ProtocolError("the connection closed mid-request")
            data += chunk
        body = data[p.HEADER_SIZE:]
        p.check_version(body, "the daemon")
        request = p.decode_forkserver_request(body)
        if not isinstance(request, p.ForkWorker):
            raise p.ProtocolError(f"a connection starts with fork_worker, not {request!r}")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    connection.settimeout(None)
    return request, fds


def _send(connection: socket.socket, reply: p.ForkserverReply) -> None:
    connection.sendall(p.encode(reply))


def _listener(path: str | None) -> socket.socket:
    from wcd.daemon import systemd

    activated = systemd.listen_fds()
    if activated:
        return activated[0]
    if not path:
        raise SystemExit("wcd-forkserver: give --socket PATH or start it by socket activation")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o600)  # forks run as this user: only its own daemon asks
    listener.listen(16)
    return listener


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", help="the Unix socket to listen on (not socket-activated)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="wcd-forkserver %(levelname)s %(name)s: %(message)s")
    # Python 3.12 warns at every fork while any native thread runs; the BLAS
    # pools' threads are the ones here, and _refusal says why they are safe.
    warnings.filterwarnings("ignore", message=r".*is multi-threaded, use of fork\(\) may lead",
                            category=DeprecationWarning)
    # Listening before the imports: a daemon that asks meanwhile waits in the
    # backlog for this forkserver rather than importing everything itself too.
    listener = _listener(args.socket)
    imported_under = dict(os.environ)
    clock = PhaseClock(lambda name, seconds: None)
    from wcd.workers.main import import_worker_modules

    import_worker_modules(clock)
    log.info("ready in %.1f s: %s; pid %d", clock.total(), phases_line(clock.phases),
             os.getpid())
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    server = Forkserver(listener, imported_under, loaded_files_fingerprint())
    try:
        server.serve_forever()
    except (KeyboardInterrupt, SystemExit):
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
