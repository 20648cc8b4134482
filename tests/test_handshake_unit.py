"""Unit tests of the handshake between the daemon and a worker: the daemon's
Setup as the worker's first frame, the worker's Ready back, and a protocol
version mismatch refused on either side, loudly. No vLLM: the worker is
either the real wcd.workers.main refusing before it imports torch, or a fake
worker program in its place."""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from wcd.daemon.worker_process import WorkerGone, WorkerOptions, WorkerProcess
from wcd.workers import protocol as p

ROOT = Path(__file__).resolve().parent.parent
OTHER = p.PROTOCOL_VERSION + 1

# Stands in for `python -m wcd.workers.main --fd N`: records the Setup it got,
# then answers as told by FAKE_WORKER: "ready" with FAKE_VERSION, or "exit"
# with that code.
FAKE_WORKER = """\
import os, socket, sys, time
from wcd.workers import protocol as p

sock = socket.socket(fileno=int(sys.argv[sys.argv.index("--fd") + 1]))
stream = sock.makefile("rb")
body = stream.read(p.frame_length(stream.read(p.HEADER_SIZE)))
with open(os.environ["FAKE_SETUP"], "wb") as f:
    f.write(body)
if os.environ["FAKE_WORKER"] == "exit":
    sys.exit(int(os.environ["FAKE_CODE"]))
sock.sendall(p.encode(p.Ready(os.getpid(), "cpu", int(os.environ["FAKE_VERSION"]), "fake",
                              "fake", 0.0)))
time.sleep(600)
"""


def test_a_setup_round_trips_and_one_of_another_version_is_refused_by_number():
    setup = p.Setup(index=3, device="cuda", tensor_parallel_size=2, host_cache_bytes=5,
                    max_parked=1, park_min_free_bytes=7, render_timeout_s=2.5,
                    step_timeout_s=9.0)
    assert p.decode_setup(p.encode(setup)[p.HEADER_SIZE:]) == setup
    assert setup.protocol_version == p.PROTOCOL_VERSION
    # A frame of another version is refused by its version, whatever else
    # its structs hold.
    for body in (p.encode(p.Setup(protocol_version=OTHER))[p.HEADER_SIZE:],
                 msgspec.msgpack.encode({"protocol_version": OTHER, "flags": [1, "x"]})):
        with pytest.raises(p.VersionMismatch) as refused:
            p.decode_setup(body)
        assert str(refused.value) == (
            f"the daemon speaks wcd protocol version {OTHER}, not this side's "
            f"{p.PROTOCOL_VERSION}: the two run different wcd installs")
    with pytest.raises(p.ProtocolError, match="carries no protocol version"):
        p.decode_setup(msgspec.msgpack.encode({"index": 0}))


def test_the_worker_refuses_a_daemon_of_another_version_before_importing_vllm():
    daemon_end, worker_end = socket.socketpair()
    with daemon_end, worker_end:
        daemon_end.sendall(p.encode(p.Setup(protocol_version=OTHER)))
        worker = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "wcd.workers.main",
             "--fd", str(worker_end.fileno())],
            pass_fds=(worker_end.fileno(),), capture_output=True, text=True, timeout=60,
            cwd=ROOT)
    assert worker.returncode == p.EXIT_VERSION_MISMATCH == 76
    assert (f"wcd-worker: refusing the daemon's setup: the daemon speaks wcd protocol "
            f"version {OTHER}, not this side's {p.PROTOCOL_VERSION}") in worker.stderr
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0]
                for line in worker.stderr.splitlines() if line.startswith("import time:")}
    assert "msgspec" in imported and not imported & {"torch", "vllm"}


def fake(tmp_path, setup: p.Setup, **behaviour: str) -> WorkerOptions:
    """Options that start the fake worker in place of wcd.workers.main."""
    program = tmp_path / "fake_worker.py"
    program.write_text(FAKE_WORKER)
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\nexec {sys.executable} {program} \"$@\"\n")
    python.chmod(0o755)
    return WorkerOptions(setup, python=str(python), ready_timeout_s=30, env={
        **os.environ, "PYTHONPATH": str(ROOT), "FAKE_SETUP": str(tmp_path / "setup"),
        **behaviour})


def start(options: WorkerOptions) -> p.Ready:
    async def start_and_kill():
        worker = await WorkerProcess.start(options)
        await worker.kill()
        return worker.ready

    return asyncio.run(start_and_kill())


def setup_received(tmp_path) -> p.Setup:
    return p.decode_setup((tmp_path / "setup").read_bytes())


def test_the_worker_gets_its_setup_as_its_first_frame(tmp_path):
    setup = p.Setup(index=2, host_cache_bytes=1 << 20, max_parked=3, render_timeout_s=1.5)
    ready = start(fake(tmp_path, setup, FAKE_WORKER="ready",
                       FAKE_VERSION=str(p.PROTOCOL_VERSION)))
    assert ready.protocol_version == p.PROTOCOL_VERSION
    assert setup_received(tmp_path) == setup


def test_the_daemon_refuses_a_worker_of_another_version_and_stops_it(tmp_path):
    with pytest.raises(p.VersionMismatch) as refused:
        start(fake(tmp_path, p.Setup(), FAKE_WORKER="ready", FAKE_VERSION=str(OTHER)))
    message = str(refused.value)
    assert message.startswith("worker 0 (pid ") and message.endswith(
        f"speaks wcd protocol version {OTHER}, not this side's {p.PROTOCOL_VERSION}: the two "
        "run different wcd installs")
    pid = int(message.split("pid ")[1].split(")")[0])
    assert not Path(f"/proc/{pid}").exists()  # stopped and reaped
    assert setup_received(tmp_path) == p.Setup()


def test_the_daemon_recognises_a_worker_that_refused_its_version(tmp_path):
    with pytest.raises(p.VersionMismatch) as refused:
        start(fake(tmp_path, p.Setup(), FAKE_WORKER="exit",
                   FAKE_CODE=str(p.EXIT_VERSION_MISMATCH)))
    assert f"refused this daemon's wcd protocol version {p.PROTOCOL_VERSION}" in \
        str(refused.value)


def test_a_worker_that_exits_before_ready_otherwise_is_gone_not_refused(tmp_path):
    with pytest.raises(WorkerGone, match="exited with code 3"):
        start(fake(tmp_path, p.Setup(), FAKE_WORKER="exit", FAKE_CODE="3"))


def test_the_daemon_stops_with_exit_code_76_when_a_worker_is_refused(tmp_path, monkeypatch,
                                                                      caplog):
    """No restart mends a mismatch while this daemon's code is the old one: it
    drains and stops, and its service manager starts the installed wcd."""
    from daemon_harness import free_port
    from wcd.daemon import main as daemon_main
    from wcd.daemon.config import parse_settings

    started = []

    async def refused(options):
        started.append(options)
        raise p.VersionMismatch("worker 0 (pid 1) speaks wcd protocol version 99")

    monkeypatch.setattr(daemon_main, "Scheduler", functools.partial(
        daemon_main.Scheduler, start_worker=refused))
    settings = parse_settings({"control": {"socket": str(tmp_path / "control.sock")},
                               "http": {"host": "127.0.0.1", "port": free_port()}},
                              str(tmp_path / "wcd.yaml"))
    code = asyncio.run(asyncio.wait_for(daemon_main.run(settings, lambda: settings), 10))
    assert code == p.EXIT_VERSION_MISMATCH and len(started) == 1
    assert any(r.levelname == "CRITICAL" and "restart wcd so that it runs the installed "
               "version" in r.getMessage() for r in caplog.records)
