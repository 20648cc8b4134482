"""Running a real wcd daemon for tests: a config in a temp dir, a free port,
our own NOTIFY_SOCKET listener, and wcctl as a subprocess."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import yaml

from conftest import ENGINE_ARGS, ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The suite runs on the CPU; `WCD_TEST_DEVICE=cuda:0` runs a module's daemon on
# a GPU instead (the device machine, for the modules that compare with vLLM).
DEVICE = os.environ.get("WCD_TEST_DEVICE", "cpu")
# Fast supervision for tests; a module may add keys ({**POLICY, ...}).
POLICY = {"health_interval": "250ms", "health_timeout": "5s", "drain_timeout": "20s",
          "restart_backoff_min": "0.5s", "queue_wait": "120s", "host_cache_bytes": 64 << 20,
          "min_resident": 0}


def write_config(directory: Path, model_root: Path, **overrides) -> Path:
    config = {
        "control": {"socket": str(directory / "control.sock")},
        "http": {"host": "127.0.0.1", "port": free_port()},
        "workers": [{"device": DEVICE}],
        "model_roots": [str(model_root)],
        "defaults": dict(ENGINE_ARGS),
        "models": {name: {"path": str(model_root / name)}
                   for name in ("small-a", "small-b", "wide-a")},
        "preload": ["small-a"],
        "policy": dict(POLICY),
    }
    for key, value in overrides.items():
        config[key] = value
    path = directory / "wcd.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class NotifyListener:
    """A NOTIFY_SOCKET of our own: collects the daemon's sd_notify datagrams."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            self.messages.extend(data.decode().splitlines())

    def wait_for(self, prefix: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [m for m in self.messages if m.startswith(prefix)]
            if found:
                return found[-1]
            time.sleep(0.05)
        raise AssertionError(f"no {prefix!r} notification; got {self.messages}")

    def close(self) -> None:
        self.sock.close()


def daemon_environment() -> dict[str, str]:
    """This process's environment less pytest's per-test bookkeeping, which
    a daemon run by a service manager would not carry either."""
    return {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}


class Daemon:
    def __init__(self, config: Path, env: dict | None = None, notify: bool = True,
                 argv_prefix: list[str] | None = None):
        self.config = config
        data = yaml.safe_load(config.read_text())
        self.socket = data["control"]["socket"]
        self.port = data["http"]["port"]
        self.notify = NotifyListener(config.parent / "notify.sock") if notify else None
        env = {**daemon_environment(), **(env or {})}
        if self.notify:
            env["NOTIFY_SOCKET"] = str(self.notify.path)
        self.log = open(config.parent / "wcd.log", "w")
        self.process = subprocess.Popen(
            [*(argv_prefix or []), sys.executable, "-m", "wcd.daemon.main",
             "--config", str(config)],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wcctl(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "wcd.cli", "--socket", self.socket, *args],
                              capture_output=True, text=True, timeout=timeout, cwd=ROOT)

    def json(self, *args: str) -> dict:
        done = self.wcctl(*args, "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def wait_serving(self, model: str, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = self.wcctl("ps", "--json")
            if done.returncode == 0:
                workers = json.loads(done.stdout)["workers"]
                if any(r["model"] == model and r["state"] == "serving"
                       for w in workers for r in w["residents"]):
                    return workers[0]
            assert self.process.poll() is None, self.log_text()
            time.sleep(0.2)
        raise AssertionError(f"{model} never served:\n{self.log_text()}")

    def worker_pids(self) -> list[int]:
        return [int(p) for p in subprocess.run(
            ["pgrep", "-f", "wcd.workers.main", "-P", str(self.process.pid)],
            capture_output=True, text=True).stdout.split()]

    def log_text(self) -> str:
        return (self.config.parent / "wcd.log").read_text()[-6000:]

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.notify:
            self.notify.close()
        self.log.close()
        return self.process.returncode


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def paused(pid: int):
    """The worker stopped, so a stream it serves stays in flight however fast
    this machine generates: a swap asked for meanwhile must wait to drain."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


@contextlib.contextmanager
def started(directory: Path, model_root: Path, env: dict | None = None,
            **overrides) -> Iterator[Daemon]:
    """A daemon just started, not yet serving, stopped on the way out
    whatever happened: what else a test needs can start meanwhile."""
    daemon = Daemon(write_config(directory, model_root, **overrides), env=env)
    try:
        yield daemon
    finally:
        daemon.stop()


@contextlib.contextmanager
def serving(directory: Path, model_root: Path, env: dict | None = None,
            **overrides) -> Iterator[Daemon]:
    """A daemon serving its preload (small-a unless overridden), stopped on
    the way out whatever happened: a module's shared daemon."""
    with started(directory, model_root, env, **overrides) as daemon:
        daemon.wait_serving(preloaded(overrides))
        yield daemon


def preloaded(overrides: dict) -> str:
    """The model a daemon of these config overrides serves first."""
    return overrides.get("preload", ["small-a"])[0]


class SharedDaemon:
    """One daemon for every test that shares it, started at first use and
    again after a test stopped it or killed it: each test gets a live daemon
    serving its preload, whatever ran before it."""

    def __init__(self, directory: Path, model_root: Path, env: dict | None = None,
                 **overrides):
        self.directory, self.model_root, self.env = directory, model_root, env
        self.overrides = overrides
        self.daemon: Daemon | None = None
        self.started = 0

    def get(self) -> Daemon:
        if self.daemon is not None and self.daemon.process.poll() is None:
            return self.daemon
        self.close()
        self.started += 1
        # A directory each: the notify socket's path cannot be bound twice.
        directory = self.directory / f"run-{self.started}"
        directory.mkdir()
        self.daemon = Daemon(write_config(directory, self.model_root, **self.overrides),
                             env=self.env)
        self.daemon.wait_serving(preloaded(self.overrides))
        return self.daemon

    def close(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
            self.daemon = None


def wait_until(check, timeout: float, what: str, interval: float = 0.05):
    """`check()`'s first truthy answer, polled until `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while not (answer := check()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(interval)
    return answer


def openai_client(daemon: Daemon, api_key: str = "none", timeout: float = 300) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.url + "/v1", api_key=api_key, max_retries=0,
                         timeout=timeout)
