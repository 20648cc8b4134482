"""systemd integration: sd_notify, the watchdog, socket activation, the journal.

systemd-python is used where it is installed (the `systemd` extra) for the
journal and socket activation; where it is not, the stdlib does the same
through the documented wire protocols, so wcd runs under systemd either way
and everything here is a no-op outside it. Notifications always use wcd's own
non-blocking sender: libsystemd's sd_notify blocks while the receiver's queue
is full, and the daemon's loop must never wait on the service manager.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import time
from types import ModuleType

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3  # sd-daemon.h: the first fd socket activation passes
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _optional(module: str) -> ModuleType | None:
    """systemd-python's module, or None where it is not installed."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


class Notifier:
    """sd_notify(3) messages to the service manager.

    Sends are best effort and never block: systemd going away or falling
    behind must never stall or take down the daemon, so a failed or dropped
    message is logged once, at debug, and otherwise ignored.
    """

    def __init__(self) -> None:
        self._address = os.environ.get("NOTIFY_SOCKET") or None
        self._failure_logged = False

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def ready(self, status: str) -> None:
        self._notify(f"READY=1\nSTATUS={_one_line(status)}")

    def status(self, text: str) -> None:
        self._notify(f"STATUS={_one_line(text)}")

    def watchdog(self) -> None:
        self._notify("WATCHDOG=1")

    def reloading(self) -> None:
        # systemd (>= 253) pairs RELOADING=1 with a MONOTONIC_USEC stamp to
        # tell this reload from an earlier one; READY=1 ends the reload.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self._notify("STOPPING=1")

    def _notify(self, state: str) -> None:
        if not self.enabled:
            return
        try:
            self._send(state)
        except OSError as e:  # BlockingIOError included: the receiver is full
            if not self._failure_logged:
                log.debug("sd_notify to %s failed: %s", self._address, e)
                self._failure_logged = True

    def _send(self, state: str) -> None:
        address = self._address
        if address.startswith("@"):  # abstract namespace, as sd_notify reads it
            address = "\0" + address[1:]
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                           | socket.SOCK_NONBLOCK) as sock:
            sock.sendto(state.encode(), address)


def _one_line(value: str) -> str:
    """A field value that cannot end its line: sd_notify fields are separated
    by newlines, so a newline in a STATUS built from model names would let the
    name set other fields (WATCHDOG_USEC=, MAINPID=...). Every unprintable
    character is escaped as Python writes it (\\n, \\x1b, \\u2028)."""
    if value.isprintable():
        return value
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in value)


def watchdog_interval_s() -> float | None:
    """How often to send WATCHDOG=1: half the timeout, as sd_watchdog_enabled(3)
    recommends; None when systemd does not watch this process."""
    watched_pid = os.environ.get("WATCHDOG_PID")
    if watched_pid and watched_pid != str(os.getpid()):
        return None
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


def listen_fds() -> list[socket.socket]:
    """The sockets systemd passed by socket activation, as sockets.

    The LISTEN_* variables are removed afterwards, as sd_listen_fds(1) does,
    so worker processes the daemon starts do not think the fds are theirs.
    """
    library = _optional("systemd.daemon")
    fds = library.listen_fds(unset_environment=True) if library else _listen_fds_stdlib()
    # The library unsets them with the C library's unsetenv, which os.environ
    # (a copy taken at start-up) never sees; children are built from it.
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    return [socket.socket(fileno=fd) for fd in fds]


def _listen_fds_stdlib() -> list[int]:
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        count = int(os.environ.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + max(count, 0)))
    for fd in fds:
        os.set_inheritable(fd, False)  # sd_listen_fds sets FD_CLOEXEC too
    return fds


def under_systemd() -> bool:
    return bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))


class OneLineFormatter(logging.Formatter):
    """One line per event, tracebacks included, so a stream read line by line
    (journald's stdout reader, grep) never splits an event."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\n", "\\n")


def setup_logging(level: str) -> None:
    """Structured journal records under systemd where systemd-python is
    installed, else one line per event on stderr."""
    journal = _optional("systemd.journal") if under_systemd() else None
    if journal:
        handler: logging.Handler = journal.JournalHandler(SYSLOG_IDENTIFIER="wcd")
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(OneLineFormatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
