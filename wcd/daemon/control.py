"""The control API: HTTP/JSON over a Unix socket, for wcctl.

Peers are identified by what the kernel recorded when they connected
(SO_PEERCRED, SO_PEERGROUPS) and checked against the configured allow-lists
(the daemon's own user and root always pass). A peer the kernel cannot vouch
for, on any socket that is not AF_UNIX, is refused. Long operations stream
their progress as NDJSON: an "accepted" line, a "phase" line per finished
phase, then one "done" or "error" line.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import json
import logging
import os
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from wcd.daemon import errors
from wcd.daemon.http_errors import error_middleware, read_json
from wcd.daemon.scheduler import Scheduler
from wcd.daemon.status import DaemonState, status_document

log = logging.getLogger(__name__)
SCHEDULER = web.AppKey("scheduler", Scheduler)
STATE = web.AppKey("state", DaemonState)
_PEERCRED = struct.Struct("3i")
# Python's socket module may lack the constant; 59 on every Linux architecture.
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_GID = struct.Struct("I")  # gid_t
_GROUPS_FIRST_GUESS = 64
_libc = ctypes.CDLL(None, use_errno=True)
_OPERATIONS = ("swap", "load", "unload", "prefetch")


def create_control_app(scheduler: Scheduler, state: DaemonState) -> web.Application:
    """`state` is the daemon's, which it changes as it goes."""
    app = web.Application(middlewares=[error_middleware, _peer_middleware])
    app[SCHEDULER] = scheduler
    app[STATE] = state
    app.router.add_get("/v1/status", _status)
    app.router.add_get("/v1/workers", _workers)
    app.router.add_get("/v1/models", _models)
    for name in _OPERATIONS:
        app.router.add_post(f"/v1/{name}", _operation)
    return app


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gids: frozenset[int]  # primary and supplementary, as they were at connect()


def peer_of(sock) -> Peer:
    """Who is at the other end of a connected AF_UNIX socket.

    Both options read the credentials the kernel captured at connect(), so a
    peer that exits and whose pid is reused cannot lend another process its
    groups (as reading /proc/PID/status at request time could)."""
    pid, uid, gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                     _PEERCRED.size))
    return Peer(pid, uid, frozenset({gid}) | peer_groups(sock.fileno()))


def peer_groups(fd: int) -> frozenset[int]:
    """The peer's supplementary groups (SO_PEERGROUPS, Linux 4.13+).

    Through libc: Python's getsockopt caps the buffer at 1024 bytes (256
    groups) and hides the size the kernel asks for when it answers ERANGE."""
    size = ctypes.c_uint(_GROUPS_FIRST_GUESS * _GID.size)
    while True:
        buffer = ctypes.create_string_buffer(size.value)
        if _libc.getsockopt(fd, socket.SOL_SOCKET, _SO_PEERGROUPS, buffer,
                            ctypes.byref(size)) == 0:
            return frozenset(gid for (gid,) in _GID.iter_unpack(buffer.raw[:size.value]))
        code = ctypes.get_errno()
        if code == errno.ENOPROTOOPT:
            # An older kernel: only the primary group counts, which refuses
            # more peers, never fewer.
            return frozenset()
        if code != errno.ERANGE:  # ERANGE has set `size` to what the groups need
            raise OSError(code, os.strerror(code))


def peer_allowed(uid: int, gids: frozenset[int], allow_uids, allow_gids) -> bool:
    if not allow_uids and not allow_gids:
        return True  # the socket's own mode and group are the gate
    return uid in (0, os.getuid()) or uid in allow_uids or bool(gids & set(allow_gids))


@web.middleware
async def _peer_middleware(request: web.Request, handler):
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None or sock.family != socket.AF_UNIX:
        # A TCP socket passed by socket activation, say: no kernel-vouched
        # peer, so nobody on it may act as the daemon's user would.
        log.warning("control: refused %s %s from %s: not a Unix socket", request.method,
                    request.path, request.remote)
        raise errors.Forbidden("the control API answers only on a Unix socket")
    peer = peer_of(sock)
    control = request.app[SCHEDULER].settings.control
    if not peer_allowed(peer.uid, peer.gids, control.allow_uids, control.allow_gids):
        log.warning("control: refused %s %s from pid %d uid %d groups %s", request.method,
                    request.path, peer.pid, peer.uid, sorted(peer.gids))
        raise errors.Forbidden(f"uid {peer.uid} may not use this wcd (control.allow_uids / "
                               "allow_gids)")
    if request.method == "POST":
        log.info("control: %s from pid %d uid %d", request.path, peer.pid, peer.uid)
    return await handler(request)


async def _status(request: web.Request) -> web.Response:
    return web.json_response(status_document(request.app[SCHEDULER], request.app[STATE]))


async def _workers(request: web.Request) -> web.Response:
    scheduler = request.app[SCHEDULER]
    held = [m for m in scheduler.model_views() if m["where"] != "disk"]
    return web.json_response({"workers": scheduler.views(), "models": held})


async def _models(request: web.Request) -> web.Response:
    return web.json_response({"models": request.app[SCHEDULER].model_views()})


async def _operation(request: web.Request) -> web.StreamResponse:
    kind = request.path.rsplit("/", 1)[1]
    body = await read_json(request)
    model, worker, force = _operation_args(body)
    scheduler = request.app[SCHEDULER]
    # An unknown model (404) or worker (400) is refused before any streaming.
    scheduler.check_operation(model, worker)
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    events: asyncio.Queue = asyncio.Queue()
    if kind == "prefetch":
        work = _prefetch(scheduler, model, events.put_nowait)
    else:
        work = scheduler.operate(kind, model, worker=worker, force=force,
                                 progress=events.put_nowait)
    task = asyncio.create_task(work)
    # The task's end wakes the loop too: one that fails before reporting
    # anything still gets its error line.
    task.add_done_callback(lambda _: events.put_nowait(None))
    try:
        while True:
            event = await events.get()
            if event is None:
                event = _final_from(task)
            await response.write(json.dumps(event).encode() + b"\n")
            if event["event"] in ("done", "error"):
                break
    finally:
        if not task.done():
            task.cancel()  # the client went away; the scheduler finishes the op alone
    await response.write_eof()
    return response


def _operation_args(body: dict) -> tuple[str, int | None, bool]:
    model, worker, force = body.get("model"), body.get("worker"), body.get("force", False)
    if not isinstance(model, str) or not model:
        raise errors.BadRequest("'model' must be a non-empty string", param="model")
    if worker is not None and (not isinstance(worker, int) or isinstance(worker, bool)):
        raise errors.BadRequest("'worker' must be an integer", param="worker")
    if not isinstance(force, bool):
        raise errors.BadRequest("'force' must be true or false", param="force")
    unknown = set(body) - {"model", "worker", "force"}
    if unknown:
        raise errors.BadRequest(f"unknown field {sorted(unknown)[0]!r}", param=sorted(unknown)[0])
    return model, worker, force


def _final_from(task: asyncio.Task) -> dict:
    """An operation that ended without a final event (it failed before the
    scheduler took it): its error as the final line."""
    error = task.exception()
    if error is None:
        return task.result()
    if not isinstance(error, errors.WcdError):
        log.error("control operation failed", exc_info=error)
        error = errors.WcdError("internal error; see the daemon's log")
    return {"event": "error", "error": error.body()["error"], "serving": None}


async def _prefetch(scheduler: Scheduler, model: str, progress) -> dict:
    """Bring a model's checkpoint files into host memory (the page cache),
    without touching any worker."""
    entry = scheduler.catalog.resolve(model)
    progress({"event": "accepted", "model": entry.name, "worker": None})
    started = time.perf_counter()
    size = await asyncio.to_thread(_read_files, Path(entry.path))
    seconds = time.perf_counter() - started
    progress({"event": "phase", "phase": "fetch", "seconds": seconds})
    event = {"event": "done", "model": entry.name, "worker": None, "path": "prefetch",
             "phases": {"fetch": seconds}, "total_s": seconds, "bytes": size}
    progress(event)
    return event


def _read_files(directory: Path) -> int:
    total = 0
    for file in sorted(directory.iterdir()):
        if file.is_file():
            with file.open("rb") as f:
                while chunk := f.read(16 << 20):
                    total += len(chunk)
    return total
