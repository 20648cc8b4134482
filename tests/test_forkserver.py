"""The forkserver (issue 18, item 3: a daemon restart's first token): a real
wcd-forkserver that imported vLLM, real daemons forking their workers there
and answering as vLLM does, a daemon restart, a daemon killed, refusals that
fall back to exec. The unit tests at the end need no vLLM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import GREEDY, PROMPTS, ROOT
from daemon_harness import POLICY, alive, daemon_environment, openai_client, serving
from wcd.daemon.forked_process import ForkUnavailable, fork_worker
from wcd.daemon.worker_process import WorkerOptions, WorkerProcess
from wcd.workers import protocol as p
from wcd.workers.forkserver import (environment_difference, loaded_files_fingerprint,
                                   same_interpreter)


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[1])


def wait_until(condition, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


class Forkserver:
    """Socket-activated as wcd-forkserver.socket starts it, where
    systemd-socket-activate is installed (the forkserver is its child then)."""

    def __init__(self, directory: Path):
        self.socket = directory / "forkserver.sock"
        self.log_path = directory / "forkserver.log"
        self._log = open(self.log_path, "w")
        command = [sys.executable, "-m", "wcd.workers.forkserver"]
        activate = shutil.which("systemd-socket-activate")
        # It passes on only the variables named: all of the daemon's here, as a
        # unit's Environment= gives both units theirs.
        passed = [arg for name in daemon_environment() for arg in ("-E", name)]
        command = ([activate, "--listen", str(self.socket), *passed, *command] if activate
                   else [*command, "--socket", str(self.socket)])
        self.process = subprocess.Popen(command, cwd=ROOT, env=daemon_environment(),
                                        stdout=self._log, stderr=subprocess.STDOUT)
        # Activated, it starts at the first daemon's request, as under systemd.
        wait_until(self.socket.exists)

    def log(self) -> str:
        assert self.process.poll() is None, self.log_path.read_text()
        return self.log_path.read_text()

    @property
    def pid(self) -> int:
        """Once it has imported (a worker it forked exists)."""
        return int(re.search(r"wcd.forkserver: ready in .*; pid (\d+)", self.log()).group(1))

    def stop(self) -> None:
        with contextlib.suppress(AttributeError, ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        self.process.terminate()
        self.process.wait(30)
        self._log.close()


@pytest.fixture(scope="module")
def directory():
    # AF_UNIX paths must fit in 108 bytes; pytest's tmp_path may not.
    with tempfile.TemporaryDirectory(prefix="wcd-fs-") as tmp:
        yield Path(tmp)


@pytest.fixture(scope="module")
def forkserver(directory):
    server = Forkserver(directory)
    yield server
    server.stop()


def the_worker(daemon) -> int:
    [worker] = daemon.json("ps")["workers"]
    return worker["pid"]


def full_log(daemon) -> str:
    return (daemon.config.parent / "wcd.log").read_text()


def answer(daemon) -> str:
    return openai_client(daemon).completions.create(model="small-a", prompt=PROMPTS[0],
                                            **GREEDY).choices[0].text


def test_a_restarted_daemon_forks_its_worker_again_and_answers_as_vllm(
        forkserver, demo_models, reference, tmp_path):
    texts, workers = [], []
    for run in ("first", "restarted"):
        (tmp_path / run).mkdir()
        with serving(tmp_path / run, demo_models, forkserver=str(forkserver.socket)) as daemon:
            workers.append(the_worker(daemon))
            assert parent_of(workers[-1]) == forkserver.pid
            assert f"worker 0 ready: pid {workers[-1]} (forked)" in full_log(daemon)
            texts.append(answer(daemon))
        # The daemon stopped its worker; the forkserver stays for the next one.
        wait_until(lambda: f"worker pid {workers[-1]} exited with code 0" in forkserver.log())
        assert not alive(workers[-1])
    assert workers[0] != workers[1]
    assert texts == [reference["small-a"]["prompts"][0]["text"]] * 2


def test_a_killed_daemons_worker_is_stopped_by_the_forkserver(forkserver, demo_models,
                                                              tmp_path):
    """A worker that cannot see its socket close (stopped here; in an engine
    build, in life) is stopped by the forkserver: SIGTERM, then SIGKILL after
    the daemon's stop timeout."""
    with serving(tmp_path, demo_models, forkserver=str(forkserver.socket),
                 policy={**POLICY, "stop_timeout": "1s"}) as daemon:
        worker = the_worker(daemon)
        os.kill(worker, signal.SIGSTOP)
        daemon.process.kill()
        daemon.process.wait()
        wait_until(lambda: f"worker pid {worker} exited with code -9" in forkserver.log())
    assert not alive(worker)
    log = forkserver.log()
    assert f"worker pid {worker}: its daemon went; SIGTERM" in log
    assert f"worker pid {worker} did not stop; SIGKILL" in log


def test_another_environment_is_refused_and_the_daemon_execs_its_worker(
        forkserver, demo_models, reference, tmp_path):
    env = {"HF_HUB_DISABLE_TELEMETRY": "1"}  # read when huggingface_hub is imported
    with serving(tmp_path, demo_models, env=env, forkserver=str(forkserver.socket)) as daemon:
        worker = the_worker(daemon)
        assert parent_of(worker) == daemon.process.pid
        log = full_log(daemon)
        assert ("worker 0: starting it by exec: the forkserver at "
                f"{forkserver.socket} refused: the daemon's worker environment differs from "
                "the one this forkserver imported under in HF_HUB_DISABLE_TELEMETRY") in log
        assert f"worker 0 ready: pid {worker} (exec)" in log
        assert answer(daemon) == reference["small-a"]["prompts"][0]["text"]


def fork_and_kill(forkserver: Forkserver) -> tuple[int, int]:
    """A worker forked for this process, killed through the forkserver: its
    pid and the exit code the forkserver reported."""
    async def scenario():
        worker = await WorkerProcess.start(WorkerOptions(
            p.Setup(), forkserver=str(forkserver.socket), env=daemon_environment()))
        assert worker.forked and parent_of(worker.pid) == forkserver.pid
        return worker.pid, await worker.kill()

    return asyncio.run(scenario())


def test_the_forkserver_relays_signals_and_reports_the_exit(forkserver):
    pid, code = fork_and_kill(forkserver)
    assert code == -signal.SIGKILL
    assert f"worker pid {pid} exited with code -9" in forkserver.log()


def test_a_bad_request_leaves_the_forkserver_serving(forkserver):
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(forkserver.socket))
        sock.sendall(b"\x00\x00\x00\x03abc")  # no descriptors, not a frame of ours
        assert sock.recv(1) == b""  # dropped
    assert "dropped a request: a fork request carries 2 file descriptors, not 0" in \
        forkserver.log()
    assert fork_and_kill(forkserver)[1] == -signal.SIGKILL


# ---- unit tests, no vLLM ---------------------------------------------------------------


def test_unit_no_forkserver_listening_is_absence_not_a_fault(tmp_path):
    async def scenario():
        with socket.socket(socket.AF_UNIX) as worker_sock:
            await fork_worker(str(tmp_path / "none.sock"), worker_sock, {}, sys.executable,
                              1.0, 5.0)

    with pytest.raises(ForkUnavailable, match="no forkserver at .*none.sock") as raised:
        asyncio.run(scenario())
    assert raised.value.absent


def test_unit_a_forkserver_that_never_answers_times_out(tmp_path):
    path = tmp_path / "mute.sock"
    with socket.socket(socket.AF_UNIX) as mute:
        mute.bind(str(path))
        mute.listen()

        async def scenario():
            with socket.socket(socket.AF_UNIX) as worker_sock:
                await fork_worker(str(path), worker_sock, {}, sys.executable, 1.0, 0.5)

        with pytest.raises(ForkUnavailable, match="did not answer"):
            asyncio.run(scenario())


@pytest.mark.parametrize("imported_under, wanted, expected", [
    ({"A": "1", "PATH": "/bin"}, {"A": "1", "PATH": "/bin"}, []),
    ({"A": "1"}, {"A": "2"}, ["A"]),
    ({"A": "1"}, {}, ["A"]),
    ({}, {"HF_HOME": "/x"}, ["HF_HOME"]),
    # Per-process variables and the daemon's own settings never count.
    ({"INVOCATION_ID": "a", "WCD_CONFIG": "x"},
     {"INVOCATION_ID": "b", "NOTIFY_SOCKET": "/run/n", "CUDA_VISIBLE_DEVICES": "1",
      "WCD_API_KEYS": "k"}, []),
])
def test_unit_environment_difference(imported_under, wanted, expected):
    assert environment_difference(imported_under, wanted) == expected


def test_unit_an_edited_module_changes_the_fingerprint(tmp_path, monkeypatch):
    module = tmp_path / "wcd_probe_module.py"
    module.write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    monkeypatch.setitem(sys.modules, "wcd.probe", importlib.import_module("wcd_probe_module"))
    before = loaded_files_fingerprint()
    assert str(module) in before
    os.utime(module, ns=(before[str(module)] + 10**9,) * 2)
    assert loaded_files_fingerprint() != before


def test_unit_same_interpreter_is_one_binary_in_one_bin_directory(tmp_path):
    for venv in ("a", "b"):
        (tmp_path / venv).mkdir()
        for name in ("python", "python3"):
            (tmp_path / venv / name).symlink_to(sys.executable)
    a, b = tmp_path / "a", tmp_path / "b"
    assert same_interpreter(str(a / "python"), str(a / "python3"))
    assert not same_interpreter(str(a / "python"), str(b / "python"))  # another venv
    assert not same_interpreter(str(a / "python"), "/bin/sh")
