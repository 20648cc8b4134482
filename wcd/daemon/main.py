"""`wcd`: the daemon. One asyncio loop (uvloop), no torch, no vLLM.

    wcd [--config PATH] [--check-config]

Start-up order: config, control socket (READY=1 as soon as it listens, while
workers still warm up), OpenAI endpoint, workers; stopping undoes what
started in reverse, however far start-up got. SIGHUP reloads the config
without dropping warm workers; SIGTERM drains in-flight requests (bounded by
policy.drain_timeout) and stops the workers. A worker of another protocol
version (the installed wcd changed under this daemon) stops the daemon the
same way, with exit code 76, for its service manager to start the installed
one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import uvloop
from aiohttp import web

from wcd.daemon import systemd
from wcd.daemon.config import ConfigError, Settings, find_config, load_settings
from wcd.daemon.control import create_control_app
from wcd.daemon.http_server import (GuardedAppRunner, connection_limits,
                                   raise_open_file_limit)
from wcd.daemon.openai_api import create_openai_app
from wcd.daemon.scheduler import Scheduler
from wcd.daemon.status import DaemonState
from wcd.workers import protocol as p

log = logging.getLogger("wcd")
EXIT_START = 1
EXIT_CONFIG = 2


class StartupError(Exception):
    """The daemon cannot start: one line for the operator."""


class Daemon:
    def __init__(self, settings: Settings, load: Callable[[], Settings]):
        """`load` reads the config again, for a SIGHUP's reload."""
        self.settings = settings
        self._load = load
        self.notifier = systemd.Notifier()
        self.state = DaemonState()
        self.scheduler = Scheduler(settings, on_change=self._changed,
                                   on_fatal=self._version_mismatch)
        self.exit_code = 0
        self._changed_flag = asyncio.Event()
        self._stop = asyncio.Event()
        self._reload_wanted = asyncio.Event()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload_wanted.set)
        async with contextlib.AsyncExitStack() as started:
            control = await self._serve_control(started)
            self.notifier.ready("control socket up; workers warming")
            openai = await self._serve_openai(started)
            started.push_async_callback(self._stop_workers)
            await self.scheduler.start()
            self.state.phase = "ready"
            log.info("wcd ready: control %s, OpenAI API http://%s:%d, %d workers", control,
                     self.settings.http.host, openai, len(self.settings.workers))
            await started.enter_async_context(self._background())
            await self._stop.wait()
        log.info("stopped")
        return self.exit_code

    @contextlib.asynccontextmanager
    async def _background(self):
        tasks = [asyncio.create_task(self._report_status(), name="status"),
                 asyncio.create_task(self._reloader(), name="reload")]
        interval = systemd.watchdog_interval_s()
        if interval:
            tasks.append(asyncio.create_task(self._watchdog(interval), name="watchdog"))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _serve_control(self, started: contextlib.AsyncExitStack) -> str:
        runner = web.AppRunner(create_control_app(self.scheduler, self.state),
                               access_log=None, handle_signals=False)
        await runner.setup()
        started.push_async_callback(runner.cleanup)
        passed = systemd.listen_fds()
        if passed:
            await _listen(web.SockSite(runner, passed[0]), "the socket systemd passed")
            return f"fd {passed[0].fileno()} (socket activation)"
        path = Path(self.settings.control.socket)
        _prepare_socket_path(path)
        await _listen(web.UnixSite(runner, str(path)), str(path))
        # A daemon that stopped leaves no socket: wcctl then says none runs.
        started.callback(path.unlink, missing_ok=True)
        os.chmod(path, 0o660)
        return str(path)

    async def _serve_openai(self, started: contextlib.AsyncExitStack) -> int:
        app = create_openai_app(self.scheduler, self.scheduler.metrics, state=self.state)
        # Fixed for the server's life, like host and port: a reload keeps them.
        limits = connection_limits(self.settings.http, raise_open_file_limit())
        runner = GuardedAppRunner(app, limits, access_log=None, handle_signals=False,
                                  shutdown_timeout=self.settings.policy.drain_timeout_s)
        await runner.setup()
        started.push_async_callback(runner.cleanup)
        http = self.settings.http
        await _listen(web.TCPSite(runner, http.host, http.port, reuse_address=True),
                      f"{http.host}:{http.port}")
        return runner.addresses[0][1]

    def _changed(self) -> None:
        self._changed_flag.set()

    def _version_mismatch(self, mismatch: p.VersionMismatch) -> None:
        """This daemon's code is older or newer than the installed wcd its
        workers run: only a new daemon mends that."""
        log.critical("stopping: %s; restart wcd so that it runs the installed version",
                     mismatch)
        self.exit_code = p.EXIT_VERSION_MISMATCH
        self._stop.set()

    async def _report_status(self) -> None:
        """STATUS= for systemctl status, at most once a second."""
        while True:
            await self._changed_flag.wait()
            self._changed_flag.clear()
            self.notifier.status(self.scheduler.status_line())
            await asyncio.sleep(1.0)

    async def _watchdog(self, interval: float) -> None:
        # Runs on the loop it vouches for: a stuck loop stops the pings.
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    async def _reloader(self) -> None:
        """One reload at a time; SIGHUPs arriving meanwhile make one more."""
        while True:
            await self._reload_wanted.wait()
            self._reload_wanted.clear()
            await self._reload()

    async def _reload(self) -> None:
        self.notifier.reloading()
        self.state.phase = "reloading"
        try:
            settings = await asyncio.to_thread(self._load)
        except ConfigError as exc:
            log.error("reload refused, keeping the running config: %s", exc)
        else:
            self.settings = settings
            self.scheduler.reload(settings)
        self.state.phase = "ready"
        self.notifier.ready(self.scheduler.status_line())

    async def _stop_workers(self) -> None:
        self.state.phase = "stopping"
        self.notifier.stopping()
        log.info("stopping: draining requests, then workers")
        # Requests in flight finish (bounded by drain_timeout); new ones get 503.
        await self.scheduler.stop()


async def _listen(site: web.BaseSite, where: str) -> None:
    try:
        await site.start()
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise StartupError(f"cannot listen on {where}: {reason}") from None


def _prepare_socket_path(path: Path) -> None:
    """A private directory (0750) and no stale socket from a crashed run."""
    try:
        path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"cannot create the control socket directory {path.parent}: "
                           f"{exc.strerror or exc}") from None
    _check_socket_directory(path.parent)
    if path.is_socket():
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # nobody listens: left over
        else:
            raise StartupError(f"another daemon listens on {path}")
        finally:
            probe.close()


def _check_socket_directory(directory: Path) -> None:
    """Whoever may write the socket's directory may replace the socket, and
    wcctl would then talk to them: a directory someone else created first
    (/tmp/wcd-UID, say) or opened to group or others is refused. A symlink
    counts too: its owner can put another in its place. 0755 (systemd's
    RuntimeDirectoryMode) is fine; only group and other *write* is a risk."""
    trusted = {0, os.getuid()}  # root may do anything to the daemon anyway
    link, target = directory.lstat(), directory.stat()
    if (link.st_uid in trusted and target.st_uid in trusted
            and not target.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
        return
    owner = link.st_uid if link.st_uid not in trusted else target.st_uid
    raise StartupError(
        f"refusing the control socket directory {directory}: owned by uid {owner}, "
        f"mode {stat.S_IMODE(target.st_mode):04o}; it must belong to this daemon's user "
        f"(uid {os.getuid()}) or root and not be writable by group or others. Remove it "
        "(wcd creates it with mode 0750) or set control.socket to a private directory")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wcd", description="warm worker controller for vLLM")
    parser.add_argument("--config", help="config file (default: $WCD_CONFIG, "
                                         "/etc/wcd/wcd.yaml, built-in defaults)")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the config and exit")
    args = parser.parse_args(argv)
    config_path = find_config(args.config)
    try:
        settings = load_settings(config_path)
    except ConfigError as exc:
        print(f"wcd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check_config:
        print(f"wcd: {config_path or 'built-in defaults'}: ok")
        return 0
    systemd.setup_logging(settings.log_level)
    try:
        return uvloop.run(run(settings, partial(load_settings, config_path)))
    except StartupError as exc:
        print(f"wcd: {exc}", file=sys.stderr)
        return EXIT_START


async def run(settings: Settings, load: Callable[[], Settings]) -> int:
    return await Daemon(settings, load).run()


if __name__ == "__main__":
    raise SystemExit(main())
