"""The control socket against other local users (issue 13, item 14).

Real daemons that must refuse to start, real forked peers whose credentials
the kernel reports, and the real control app served over real sockets. None
of it needs a vLLM worker: every refusal happens before workers start.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import uvloop
import yaml
from aiohttp import web

from conftest import ROOT
from wcd.daemon.config import load_settings
from wcd.daemon.control import create_control_app, peer_groups, peer_of
from wcd.daemon.main import _prepare_socket_path
from wcd.daemon.scheduler import Scheduler
from wcd.daemon.status import DaemonState

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")


def write_config(directory: Path, socket_path: Path, **control) -> Path:
    config = directory / "wcd.yaml"
    config.write_text(yaml.safe_dump({"control": {"socket": str(socket_path), **control},
                                      "http": {"host": "127.0.0.1", "port": 0},
                                      "workers": [{"device": "cpu"}]}))
    return config


def start_daemon(config: Path) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "wcd.daemon.main", "--config", str(config)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    return done, time.monotonic() - started


def assert_refused(done: subprocess.CompletedProcess, seconds: float, directory: Path) -> str:
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    line = lines[0]
    assert line.startswith(f"wcd: refusing the control socket directory {directory}: ")
    assert "not be writable by group or others" in line
    assert not (directory / "control.sock").exists()
    # Refused at the control socket, the first thing the daemon sets up:
    # the interpreter's start-up and imports are all the time it takes.
    assert seconds < 15
    return line


# --- the socket's directory ----------------------------------------------------

@pytest.mark.parametrize("mode", [0o770, 0o777, 0o1777])
def test_daemon_refuses_a_socket_directory_others_may_write(tmp_path, mode):
    directory = tmp_path / "run"
    directory.mkdir()
    directory.chmod(mode)
    done, seconds = start_daemon(write_config(tmp_path, directory / "control.sock"))
    line = assert_refused(done, seconds, directory)
    assert f"owned by uid {os.getuid()}, mode {mode:04o}" in line


@needs_root
def test_daemon_refuses_a_socket_directory_another_uid_created(tmp_path):
    """The /tmp/wcd-UID hijack: another user made the directory first, so it
    could rename the daemon's socket and put its own in its place."""
    directory = tmp_path / f"wcd-{os.getuid()}"
    directory.mkdir(mode=0o700)
    os.chown(directory, NOBODY, NOBODY)
    done, seconds = start_daemon(write_config(tmp_path, directory / "control.sock"))
    line = assert_refused(done, seconds, directory)
    assert f"owned by uid {NOBODY}, mode 0700" in line


@needs_root
def test_daemon_refuses_a_symlink_another_uid_owns(tmp_path):
    """A private directory of ours, reached through someone else's symlink:
    they can swap the link for a directory of theirs once the daemon listens."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    link = tmp_path / "run"
    link.symlink_to(private)
    os.lchown(link, NOBODY, NOBODY)
    done, seconds = start_daemon(write_config(tmp_path, link / "control.sock"))
    assert f"owned by uid {NOBODY}" in assert_refused(done, seconds, link)


def test_a_missing_socket_directory_is_created_private(tmp_path):
    previous = os.umask(0)
    try:
        _prepare_socket_path(tmp_path / "a" / "run" / "control.sock")
    finally:
        os.umask(previous)
    assert oct((tmp_path / "a" / "run").stat().st_mode & 0o777) == oct(0o750)


def test_systemd_runtime_directory_is_accepted(tmp_path):
    """RuntimeDirectory= makes /run/wcd ours with RuntimeDirectoryMode's
    default 0755: readable by all, writable only by us."""
    directory = tmp_path / "wcd"
    directory.mkdir()
    directory.chmod(0o755)
    _prepare_socket_path(directory / "control.sock")


# --- peer credentials --------------------------------------------------------------

def connect_as(address: str, uid: int, groups: list[int], request: bytes = b"") -> tuple[int, int]:
    """Fork a child that takes `uid` and `groups`, connects to `address`,
    sends `request` and copies the answer's first line into a pipe. Returns
    (child pid, read end of the pipe)."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.setgroups(groups)
            os.setgid(uid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(address)
                if request:
                    sock.sendall(request)
                    os.write(write, sock.makefile("rb").readline())
                else:
                    sock.recv(1)  # hold the connection until the parent is done
        finally:
            os._exit(0)
    os.close(write)
    return child, read


def finish(child: int, read: int) -> str:
    with os.fdopen(read, "rb") as pipe:
        line = pipe.read().decode()
    os.waitpid(child, 0)
    return line


@needs_root
@pytest.mark.parametrize("count", [3, 300])  # 300 > the first buffer: ERANGE, then a retry
def test_peer_groups_are_the_connected_process_supplementary_groups(count):
    groups = list(range(5000, 5000 + count))
    address = f"\0wcd-test-{uuid.uuid4().hex}"  # abstract: no file permissions in the way
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(address)
        listener.listen()
        child, read = connect_as(address, NOBODY, groups)
        conn, _ = listener.accept()
        with conn:
            peer = peer_of(conn)
            assert peer_groups(conn.fileno()) == frozenset(groups)
            conn.sendall(b"x")
    finish(child, read)
    assert (peer.pid, peer.uid) == (child, NOBODY)
    assert peer.gids == frozenset(groups) | {NOBODY}


class ControlServer:
    """wcd's control app (a scheduler never started: no workers) served on
    real listening sockets by a uvloop loop in a thread, as the daemon does."""

    def __init__(self, config: Path, *listeners: socket.socket):
        self.scheduler = Scheduler(load_settings(str(config)))
        self.loop = uvloop.new_event_loop()
        app = create_control_app(self.scheduler, DaemonState("ready"))
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        self.loop.run_until_complete(self.runner.setup())
        for listener in listeners:
            self.loop.run_until_complete(web.SockSite(self.runner, listener).start())
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.run_until_complete(self.runner.cleanup())
        self.loop.close()


def get(sock: socket.socket, path: str) -> tuple[int, dict]:
    with sock:
        sock.settimeout(10)
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: wcd\r\n\r\n".encode())
        head, _, body = sock.makefile("rb").read().partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_a_peer_on_a_tcp_socket_is_refused(tmp_path):
    """A TCP socket handed over by socket activation has no peer credentials:
    nobody on it gets the daemon user's rights, even with no allow-lists."""
    listener = socket.create_server(("127.0.0.1", 0))
    server = ControlServer(write_config(tmp_path, tmp_path / "unused.sock"), listener)
    try:
        status, body = get(socket.create_connection(listener.getsockname()), "/v1/models")
    finally:
        server.close()
    assert status == 403
    assert body["error"]["type"] == "permission_error"
    assert body["error"]["message"] == "the control API answers only on a Unix socket"


@needs_root
def test_a_supplementary_group_on_the_allow_list_admits_its_member(tmp_path):
    address = f"\0wcd-test-{uuid.uuid4().hex}"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(address)
    config = write_config(tmp_path, tmp_path / "unused.sock", allow_gids=[4242])
    server = ControlServer(config, listener)
    request = b"GET /v1/models HTTP/1.0\r\nHost: wcd\r\n\r\n"
    try:
        member = finish(*connect_as(address, NOBODY, [100, 4242], request))
        outsider = finish(*connect_as(address, NOBODY, [100], request))
        status, _ = get(_unix(address), "/v1/models")  # root always passes
    finally:
        server.close()
    assert " 200 " in member
    assert " 403 " in outsider
    assert status == 200


def _unix(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(address)
    return sock
