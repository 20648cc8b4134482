"""The OpenAI endpoint's connection guard: how long a connection may sit
between requests or take to send a request head, and how many may be open.

- Between requests, a connection is closed at whichever comes first:
  `keepalive_timeout` after its last response (aiohttp's own keep-alive
  timer, also armed at connect), or `header_timeout` after the head it is
  sending began (at connect, or at its first byte on a kept-alive connection)
  without that head being complete (slowloris). Once a head has arrived the
  request is its handler's business: a slow body or a long stream is never
  cut here.
- Past `max_connections`, a new connection takes the place of the oldest one
  waiting for a request head (what a flood is made of; a client must cope
  with a kept-alive connection closed under it anyway, as at keep-alive
  timeout); only when every connection has a request in progress is the new
  one closed at once. So a flood never locks /health or a new client out, and
  never cuts a request in progress.
- Connections the guard closes are logged as counts, once a second at most.

Why subclasses of aiohttp internals: aiohttp has no header timeout and no
connection cap. `web.Server.__call__` builds the asyncio protocol of each
connection, a `RequestHandler`; `AppRunner._make_server` builds the Server.
Read against aiohttp 3.14.5, this relies on `Server.request_handler`,
`request_factory`, `handler_cancellation`, `_loop` and `_kwargs`; on
`RequestHandler.connection_made`/`data_received`/`connection_lost`,
`force_close`, `_manager` (connection_lost does nothing without one),
`_messages` (parsed heads not yet handled), `_request_in_progress`, and
`_force_close`/`_close`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import resource
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from wcd.daemon.config import HttpSettings

log = logging.getLogger("wcd.http")

# File descriptors kept below the open-file limit: the loop may accept a whole
# listen backlog (aiohttp's TCPSite: 128) before the guard sees one of them
# and closes older ones, and at EMFILE nothing is accepted, /health included.
# Plus the daemon's own: control socket, wcctl connections, worker pipes, logs.
RESERVED_FDS = 128 + 128


@dataclass(frozen=True)
class ConnectionLimits:
    keepalive_timeout_s: float
    header_timeout_s: float
    max_connections: int


def raise_open_file_limit() -> int:
    """The soft RLIMIT_NOFILE up to the hard one, returning the soft limit now
    in force. systemd's unit sets both, but elsewhere the soft limit is often
    1024, and at that limit accept() fails and /health stops answering."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s",
                        soft, hard, exc)
        else:
            soft = hard
    return soft


def connection_limits(http: HttpSettings, open_files: int) -> ConnectionLimits:
    """The configured limits, the cap lowered to what the open-file limit
    allows: a cap above it would fail at accept() before the guard saw it."""
    allowed = max(open_files - RESERVED_FDS, 1)
    if http.max_connections > allowed:
        log.warning("http.max_connections %d lowered to %d: the open-file limit is %d "
                    "(LimitNOFILE=, ulimit -n)", http.max_connections, allowed, open_files)
    return ConnectionLimits(keepalive_timeout_s=http.keepalive_timeout_s,
                            header_timeout_s=http.header_timeout_s,
                            max_connections=min(http.max_connections, allowed))


class GuardedAppRunner(web.AppRunner):
    """An AppRunner whose server enforces `limits` on every connection."""

    __slots__ = ("_limits",)

    def __init__(self, app: web.Application, limits: ConnectionLimits, **kwargs: Any):
        super().__init__(app, keepalive_timeout=limits.keepalive_timeout_s, **kwargs)
        self._limits = limits

    async def _make_server(self) -> web.Server:
        # The app's startup and its handler arguments stay aiohttp's; only the
        # Server's class changes, before any connection reached it.
        return _GuardedServer(await super()._make_server(), self._limits)


class _GuardedServer(web.Server):
    def __init__(self, built: web.Server, limits: ConnectionLimits):
        super().__init__(built.request_handler, request_factory=built.request_factory,
                         handler_cancellation=built.handler_cancellation, loop=built._loop,
                         **built._kwargs)
        self._limits = limits
        self._closed = _ClosedLog(self._loop)
        # Open connections in the order they came: the first one waiting for
        # a head is the one a new connection replaces. Unlike _connections it
        # drops a connection the moment the guard closes it, so a burst of
        # new ones does not replace more than it must.
        self._open: dict[_GuardedHandler, None] = {}

    def __call__(self) -> _GuardedHandler:
        return _GuardedHandler(self, loop=self._loop, **self._kwargs)

    @property
    def header_timeout_s(self) -> float:
        return self._limits.header_timeout_s

    def admit(self, handler: _GuardedHandler) -> bool:
        if len(self._open) >= self._limits.max_connections and not self._make_room():
            self._closed.add(_REFUSED)
            return False
        self._open[handler] = None
        return True

    def forget(self, handler: _GuardedHandler) -> None:
        self._open.pop(handler, None)

    def head_overdue(self, handler: _GuardedHandler) -> None:
        self._shed(handler, _SLOW_HEAD)

    def _make_room(self) -> bool:
        waiting = next((handler for handler in self._open if handler.awaiting_head()), None)
        if waiting is None:
            return False
        self._shed(waiting, _REPLACED)
        return True

    def _shed(self, handler: _GuardedHandler, reason: str) -> None:
        self._open.pop(handler, None)
        self._closed.add(reason)
        handler.force_close()


class _GuardedHandler(RequestHandler):
    __slots__ = ("_head_timer",)

    def __init__(self, manager: _GuardedServer, **kwargs: Any):
        super().__init__(manager, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None

    def awaiting_head(self) -> bool:
        """Between requests: no request in progress and no parsed head queued
        (bytes of a head may have come)."""
        return not (self._request_in_progress or self._messages
                    or self._force_close or self._close)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        manager = self._manager
        assert isinstance(manager, _GuardedServer)
        if not manager.admit(self):
            # Refused before aiohttp saw it: no task, no timer, nothing
            # registered; without a manager, connection_lost has nothing to undo.
            self._manager = None
            transport.abort()
            return
        super().connection_made(transport)
        self._start_head_clock()

    def data_received(self, data: bytes) -> None:
        if not self.awaiting_head():
            self._stop_head_clock()  # body bytes: the handler's business
        elif self._head_timer is None:
            self._start_head_clock()  # the first byte of the next head
        super().data_received(data)
        if self._messages:
            self._stop_head_clock()  # the head is complete

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_head_clock()
        if isinstance(self._manager, _GuardedServer):  # None once refused
            self._manager.forget(self)
        super().connection_lost(exc)

    def _start_head_clock(self) -> None:
        manager = self._manager
        assert isinstance(manager, _GuardedServer)
        self._head_timer = self._loop.call_later(manager.header_timeout_s, self._head_due)

    def _stop_head_clock(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_due(self) -> None:
        self._head_timer = None
        manager = self._manager
        if self.awaiting_head() and isinstance(manager, _GuardedServer):
            manager.head_overdue(self)


_REFUSED = "refused over the connection cap (every connection busy)"
_REPLACED = "waiting for a request, replaced over the connection cap"
_SLOW_HEAD = "slower than header_timeout"
# A cap being hit is worth a warning; a client that connected and never asked
# (a browser's pre-connect, say) is routine.
_WARN_REASONS = {_REFUSED, _REPLACED}


class _ClosedLog:
    """Counts of connections the guard closed, one log line a second at
    most: a flood must not turn into a flood of log lines."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._counts: collections.Counter[str] = collections.Counter()
        self._flush_handle: asyncio.TimerHandle | None = None

    def add(self, reason: str) -> None:
        self._counts[reason] += 1
        if self._flush_handle is None:
            self._flush_handle = self._loop.call_later(1.0, self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        level = logging.WARNING if _WARN_REASONS & self._counts.keys() else logging.INFO
        log.log(level, "closed HTTP connections in the last second: %s",
                ", ".join(f"{count} {reason}" for reason, count in self._counts.items()))
        self._counts.clear()
