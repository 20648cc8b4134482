"""One Ray Serve replica's wcd daemon: the shared wcd.yaml, with the replica's
own worker, control socket and port, run as the replica's child process.

No Ray here: the replica (wcd/serve/deployments.py) starts the daemon with
`ReplicaDaemon`, and the child runs `main` below. The child reads the shared
file itself, so its relative paths (model_roots, model paths) resolve against
that file's directory, as for `wcd --config`, and it stops with its replica
(PR_SET_PDEATHSIG): a replica Ray kills leaves no daemon behind holding a GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import aiohttp
import uvloop

from wcd.daemon import systemd
from wcd.daemon.config import ConfigError, load_settings
from wcd.daemon.main import run
from wcd.workers.process import die_with_parent

log = logging.getLogger("wcd.serve")

# A worker comes up with torch, vLLM and its device context in this long.
READY_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 60.0


class ReplicaDaemonFailed(RuntimeError):
    """The replica's daemon exited, or never became ready."""


def overrides(device: str, tensor_parallel_size: int, workdir: Path, port: int) -> dict:
    """What a replica's daemon changes in the shared file: one worker (the
    replica's GPUs, which Ray numbers from cuda:0 for it, or the CPU), its
    own control socket and loopback port, and no preloads: Serve's
    multiplexing decides which models each replica loads."""
    return {
        "workers": [{"device": device, "tensor_parallel_size": tensor_parallel_size,
                     "serves_tensor_parallel_sizes": [tensor_parallel_size]}],
        "control": {"socket": str(workdir / "control.sock")},
        "http": {"host": "127.0.0.1", "port": port, "api_keys": []},
        "preload": [],
    }


class ReplicaDaemon:
    """The daemon process of one replica, from start to a bounded stop."""

    def __init__(self, config: str, device: str, tensor_parallel_size: int = 1):
        self.config = os.path.abspath(config)
        self.workdir = Path(tempfile.mkdtemp(prefix="wcd-replica-"))
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.changes = overrides(device, tensor_parallel_size, self.workdir, self.port)
        self.process: asyncio.subprocess.Process | None = None
        self._control: aiohttp.ClientSession | None = None
        # For its OpenAI API; no timeout of its own: the daemon bounds requests.
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        log_file = open(self.workdir / "daemon.log", "ab")  # noqa: SIM115 - the child's
        with log_file:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "wcd.serve.replica_daemon", "--config", self.config,
                "--overrides", json.dumps(self.changes), "--parent", str(os.getpid()),
                stdout=log_file, stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        self._control = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=self.changes["control"]["socket"]))
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None),
                                             auto_decompress=False)
        await self._ready()

    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def _ready(self) -> None:
        """Until every worker is up (READY_TIMEOUT_S at most)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.returncode is not None:
                raise ReplicaDaemonFailed(f"the replica's daemon exited "
                                          f"({self.process.returncode}): {self.log_tail()}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with self._control.get("http://wcd/v1/status") as answer:
                    status = await answer.json()
                if status["state"] == "ready" and all(
                        w["state"] not in ("starting", "restarting") for w in status["workers"]):
                    return
            await asyncio.sleep(0.5)
        raise ReplicaDaemonFailed(f"the replica's daemon was not ready in {READY_TIMEOUT_S:.0f} "
                                  f"s: {self.log_tail()}")

    async def operate(self, kind: str, model: str) -> dict:
        """wcctl's load or unload of `model`; its final event."""
        async with self._control.post(f"http://wcd/v1/{kind}", json={"model": model}) as answer:
            final = {}
            async for line in answer.content:
                final = json.loads(line)
        if final.get("event") != "done":
            raise ReplicaDaemonFailed(f"{kind} {model}: {final.get('error') or final}")
        return final

    async def stop(self) -> None:
        """SIGTERM (the daemon drains and stops its workers), then SIGKILL."""
        for session in (self._control, self.session):
            if session is not None:
                await session.close()
        if self.process is None or self.process.returncode is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT_S)
        except asyncio.TimeoutError:
            log.warning("replica daemon %d ignored SIGTERM for %.0f s: killed",
                        self.process.pid, STOP_TIMEOUT_S)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            await self.process.wait()

    def log_tail(self, size: int = 4000) -> str:
        try:
            return (self.workdir / "daemon.log").read_text(errors="replace")[-size:]
        except OSError:
            return ""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _die_with(parent: int) -> None:
    """SIGTERM when the replica's process ends, however it ends; an exit now
    if it is gone already (it died before the signal was armed)."""
    die_with_parent(signal.SIGTERM)
    if os.getppid() != parent:
        raise SystemExit("wcd replica daemon: the replica is gone")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wcd.serve.replica_daemon")
    parser.add_argument("--config", required=True)
    parser.add_argument("--overrides", required=True, help="JSON, laid over the file")
    parser.add_argument("--parent", type=int, required=True)
    args = parser.parse_args(argv)
    _die_with(args.parent)
    # A reload (SIGHUP) reads the shared file again, with this replica's changes.
    load = partial(load_settings, args.config, json.loads(args.overrides))
    try:
        settings = load()
    except ConfigError as exc:
        print(f"wcd: {exc}", file=sys.stderr)
        return 2
    systemd.setup_logging(settings.log_level)
    return uvloop.run(run(settings, load))


if __name__ == "__main__":
    raise SystemExit(main())
