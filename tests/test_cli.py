"""Unit tests of wcctl against a FAKE control server.

`fake_daemon` is an aiohttp app on a temporary Unix socket that answers the
control API with canned documents; it is not wcd. Each canned document is laid
over one the daemon's own code made (its status document and views over a
real Scheduler driving fake workers, its error types), so a field the daemon
renames or drops fails here. wcctl runs as a subprocess (`python -m wcd.cli`),
as a user would run it. The end-to-end tests against the real daemon live
elsewhere.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import pty
import re
import select
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from aiohttp import web

from conftest import ROOT
from test_scheduler_unit import Running
from wcd.daemon import errors
from wcd.daemon.status import DaemonState, status_document


def real_documents() -> dict:
    """What the daemon itself writes: its status document and the final
    event of a swap, from a real Scheduler over fake workers (models a, b)."""
    async def read(directory: Path) -> tuple[dict, list[dict]]:
        events: list[dict] = []
        async with Running(directory) as running:
            await running.scheduler.operate("swap", "b", progress=events.append)
            return status_document(running.scheduler, DaemonState("ready")), events

    with tempfile.TemporaryDirectory(prefix="wcd-cli-") as tmp:
        status, events = asyncio.run(read(Path(tmp)))
    (worker,) = status["workers"]
    return {"status": status, "worker": worker, "resident": worker["residents"][0],
            "last_swap": worker["last_swap"], "model": status["models"][0],
            "queue": status["queue"], "accepted": events[0], "done": events[-1]}


REAL = real_documents()


def shaped(kind: str, canned: dict) -> dict:
    """`canned` laid over the daemon's own `kind` of document: a field the
    daemon no longer writes fails here; one it added comes along."""
    real = REAL[kind]
    assert set(canned) <= set(real), f"the daemon's {kind} has no {set(canned) - set(real)}"
    return {**real, **canned}


PHASES = {"resolve": 0.0012, "drain": 0.0, "release": 0.0004, "fetch": 0.0018,
          "build": 0.0294, "warm": 0.0, "ready": 0.0003}
WORKERS = [
    shaped("worker", {
        "index": 0, "device": "cuda:0", "pid": 4242, "state": "serving", "model": "small-a",
        "residents": [shaped("resident", {"model": "small-a", "state": "serving",
                                          "bytes": 1 << 30, "active": 1, "running": 1,
                                          "waiting": 0}),
                      shaped("resident", {"model": "wide-a", "state": "suspended",
                                          "bytes": 1 << 29, "active": 2, "running": 2,
                                          "waiting": 0})],
        "resident_bytes": 3 << 29, "memory_budget_bytes": 8 << 30,
        "restarts": 0, "rss_bytes": 3 << 29,
        "last_swap": shaped("last_swap", {"model": "small-a", "path": "rebuild",
                                          "phases": PHASES, "total_s": 3.5})}),
    shaped("worker", {
        "index": 1, "device": "cuda:1", "pid": None, "state": "starting", "model": None,
        "residents": [], "resident_bytes": 0, "memory_budget_bytes": 0,
        "restarts": 1, "rss_bytes": None, "last_swap": None}),
]
MODELS = [
    shaped("model", {"name": "small-a", "path": "/srv/models/small-a", "state": "serving",
                     "worker": 0, "bytes": 250 << 20, "where": "serving", "active": 1,
                     "waiting": 3}),
    shaped("model", {"name": "small-b", "path": "/srv/models/small-b", "state": "available",
                     "worker": None, "bytes": 250 << 20, "where": "host", "active": 0,
                     "waiting": 0}),
]
STATUS = shaped("status", {"version": "0.1.0", "pid": 4000, "uptime_s": 3725.0,
                           "state": "ready", "workers": WORKERS, "models": MODELS,
                           "queue": shaped("queue", {"waiting": 2}), "recent_swaps": []})
DONE = shaped("done", {"event": "done", "model": "small-b", "worker": 0, "path": "same_shape",
                       "weights": "host_cache", "phases": PHASES, "total_s": 0.034})
FAILED = {"event": "error", "serving": "small-a",
          "error": errors.InsufficientMemory("out of device memory").body()["error"]}

# A name an API client chose: ESC and BEL set the terminal's title, a newline
# forges a line, a C1 CSI clears the screen.
HOSTILE = "evil\x1b]0;pwned\x07\nWATCHDOG_USEC=1\x9b2J"
HOSTILE_SHOWN = "evil\\x1b]0;pwned\\x07\\nWATCHDOG_USEC=1\\x9b2J"
CONTROL_CHARACTER = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f]")  # all but line ends




class FakeDaemon:
    """Canned control API. Operation behaviour is picked by the model name."""

    def __init__(self, socket_path: str):
        self.socket = socket_path
        self.requests: list[tuple[str, dict | None]] = []
        self.gate = threading.Event()  # the "gated" model's swap waits for it
        # What each query answers; a test may replace one.
        self.documents = {"/v1/status": STATUS, "/v1/workers": {"workers": WORKERS},
                          "/v1/models": {"models": MODELS}}
        app = web.Application()
        for path in self.documents:
            app.router.add_get(path, self.document)
        app.router.add_post("/v1/{op}", self.operation)
        self.app = app

    async def document(self, request: web.Request) -> web.Response:
        self.requests.append((request.path, None))
        return web.json_response(self.documents[request.path])

    async def operation(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append((request.path, body))
        model = body["model"]
        refusals = {
            "nope": errors.ModelNotFound("unknown model 'nope'", param="model"),
            "bad": errors.BadRequest("worker 9 does not exist", param="worker"),
            "crash": errors.WcdError("scheduler failed"),
            "hostile": errors.BadRequest(f"no model {HOSTILE}", param="model"),
        }
        if model in refusals:
            refusal = refusals[model]
            return web.json_response(refusal.body(), status=refusal.status)
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)

        async def send(event: dict) -> None:
            await response.write(json.dumps(event).encode() + b"\n")

        await send(shaped("accepted", {"event": "accepted", "model": model, "worker": 0}))
        await send({"event": "phase", "phase": "resolve", "seconds": PHASES["resolve"]})
        if model == "gated":
            await asyncio.get_running_loop().run_in_executor(None, self.gate.wait, 20)
        if model == "hang":
            await asyncio.sleep(3)
        if model in ("cut", "hang"):
            return response  # the stream ends without a final event
        await send({"event": "phase", "phase": "drain", "seconds": PHASES["drain"]})
        await send(FAILED if model == "fails" else {**DONE, "model": model})
        await response.write_eof()
        return response


@pytest.fixture
def fake_daemon():
    """A FAKE control server (not wcd) on a short temporary Unix socket path."""
    with tempfile.TemporaryDirectory(prefix="wcd-cli-") as tmp:
        daemon = FakeDaemon(os.path.join(tmp, "control.sock"))
        loop = asyncio.new_event_loop()
        runner = web.AppRunner(daemon.app, shutdown_timeout=0.1)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.UnixSite(runner, daemon.socket).start())
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        yield daemon
        daemon.gate.set()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.run_until_complete(runner.cleanup())
        loop.close()


def cli_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WCD_SOCKET", "XDG_RUNTIME_DIR")}
    return {**env, **extra}


def wcctl(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wcd.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, env=env or cli_env(), timeout=30)


def one_error_line(done: subprocess.CompletedProcess) -> str:
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("wcctl: "), done.stderr
    assert "Traceback" not in done.stderr
    return lines[0]


# --- queries -------------------------------------------------------------------

def test_ps_prints_worker_table(fake_daemon):
    done = wcctl("--socket", fake_daemon.socket, "ps")
    assert done.returncode == 0, done.stderr
    header, first, second = done.stdout.splitlines()
    assert header.split() == ["WORKER", "DEVICE", "PID", "STATE", "MODELS", "MEMORY", "RSS",
                              "LAST", "SWAP"]
    assert first.split()[:10] == ["0", "cuda:0", "4242", "serving", "small-a,", "wide-a",
                                  "(suspended)", "1.5", "GiB/8.0", "GiB"]
    assert "small-a (rebuild) 3.500 s" in first
    assert second.split() == ["1", "cuda:1", "-", "starting", "-", "0", "B", "-", "-"]
    # Columns line up: every row's STATE starts where the header's does.
    column = header.index("STATE")
    assert first[column:].startswith("serving") and second[column:].startswith("starting")


def test_models_prints_model_table(fake_daemon):
    done = wcctl("models", "--socket", fake_daemon.socket)  # options after the command too
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()
    assert header.split() == ["MODEL", "STATE", "WHERE", "WORKER", "SIZE", "RUNNING",
                              "WAITING", "PATH"]
    assert rows[0].split() == ["small-a", "serving", "serving", "0", "250.0", "MiB", "1", "3",
                               "/srv/models/small-a"]
    assert rows[1].split() == ["small-b", "available", "host", "-", "250.0", "MiB", "0", "0",
                               "/srv/models/small-b"]


def test_status_prints_summary(fake_daemon):
    done = wcctl("status", env=cli_env(WCD_SOCKET=fake_daemon.socket))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "wcd 0.1.0 (pid 4000): ready, up 1 h 02 m",
        "workers: 2 (1 serving, 1 starting)",
        "models: 2 (1 serving, 1 in host memory)",
        "serving: small-a on worker 0",
        "queue: 2 waiting",
    ]


@pytest.mark.parametrize("command, doc", [("ps", {"workers": WORKERS}),
                                          ("models", {"models": MODELS}),
                                          ("status", STATUS)])
def test_queries_json_print_the_document_only(fake_daemon, command, doc):
    done = wcctl(command, "--json", "--socket", fake_daemon.socket)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == doc
    assert done.stderr == ""


# --- operations ----------------------------------------------------------------

def test_swap_streams_and_prints_one_summary_line(fake_daemon):
    done = wcctl("swap", "small-b", "--worker", "1", "--force", "--socket", fake_daemon.socket)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ("worker 0 now serves small-b (same_shape, from host memory) in 0.034 s:"
                           " resolve 1.2 ms, drain 0.0 ms, release 0.4 ms, fetch 1.8 ms,"
                           " build 29.4 ms, warm 0.0 ms, ready 0.3 ms\n")
    assert done.stderr == ""  # no progress line when stderr is not a terminal
    assert fake_daemon.requests == [("/v1/swap", {"model": "small-b", "worker": 1,
                                                  "force": True})]


@pytest.mark.parametrize("args, body", [
    (["load", "m"], {"model": "m"}),
    (["unload", "m"], {"model": "m", "force": False}),
    (["prefetch", "m"], {"model": "m"}),
    (["swap", "m"], {"model": "m", "worker": None, "force": False}),
])
def test_operation_request_bodies(fake_daemon, args, body):
    done = wcctl(*args, "--socket", fake_daemon.socket)
    assert done.returncode == 0, done.stderr
    assert fake_daemon.requests == [(f"/v1/{args[0]}", body)]


def test_swap_json_prints_the_final_event_only(fake_daemon):
    done = wcctl("swap", "small-b", "--json", "--socket", fake_daemon.socket)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == DONE


def test_swap_error_event_exits_1_with_one_line(fake_daemon):
    done = wcctl("swap", "fails", "--socket", fake_daemon.socket)
    assert done.returncode == 1
    assert done.stdout == ""
    assert one_error_line(done) == ("wcctl: swap fails failed: out of device memory "
                                    "[out_of_memory]; now serving small-a")


def test_swap_error_event_json_is_the_final_event(fake_daemon):
    done = wcctl("swap", "fails", "--json", "--socket", fake_daemon.socket)
    assert done.returncode == 1
    assert json.loads(done.stdout) == FAILED
    one_error_line(done)


def test_stream_without_final_event_fails(fake_daemon):
    done = wcctl("load", "cut", "--socket", fake_daemon.socket)
    assert done.returncode == 1
    assert "without a result" in one_error_line(done)


def test_timeout_bounds_the_whole_operation(fake_daemon):
    started = time.monotonic()
    done = wcctl("swap", "hang", "--timeout", "0.5", "--socket", fake_daemon.socket)
    assert done.returncode == 1
    assert one_error_line(done) == "wcctl: no result from the daemon within 0.5 s"
    assert time.monotonic() - started < 2.5


def test_progress_line_is_rewritten_live_on_a_terminal(fake_daemon):
    """The daemon holds the swap open until wcctl has shown the first phase,
    so this passes only if events are read and drawn as they arrive."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "wcd.cli", "swap", "gated", "--socket",
                             fake_daemon.socket], stdout=subprocess.PIPE, stderr=slave,
                            cwd=ROOT, env=cli_env(), text=True)
    os.close(slave)
    try:
        seen = read_until(master, b"resolve 1.2 ms", timeout_s=15)
        fake_daemon.gate.set()
        out, _ = proc.communicate(timeout=15)
        seen += drain(master)
    finally:
        proc.kill()
        os.close(master)
    assert proc.returncode == 0
    assert seen.startswith(b"\r\x1b[Kswap gated on worker 0: accepted")
    assert b"\r\x1b[Kswap gated on worker 0: resolve 1.2 ms, drain 0.0 ms" in seen
    assert seen.endswith(b"\r\x1b[K")  # the line is cleared before the summary
    assert out.startswith("worker 0 now serves gated (same_shape, from host memory) in 0.034")


def read_until(fd: int, needle: bytes, timeout_s: float) -> bytes:
    seen, deadline = b"", time.monotonic() + timeout_s
    while needle not in seen:
        assert time.monotonic() < deadline, f"no {needle!r} on the terminal: {seen!r}"
        if select.select([fd], [], [], 0.1)[0]:
            seen += os.read(fd, 4096)
    return seen


def drain(fd: int) -> bytes:
    data = b""
    while select.select([fd], [], [], 0.2)[0]:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO once the writer has gone
            break
        if not chunk:
            break
        data += chunk
    return data


# --- errors --------------------------------------------------------------------

def test_unknown_model_exits_4(fake_daemon):
    done = wcctl("swap", "nope", "--socket", fake_daemon.socket)
    assert done.returncode == 4
    assert one_error_line(done) == "wcctl: unknown model 'nope'"


def test_rejected_request_exits_2(fake_daemon):
    done = wcctl("swap", "bad", "--worker", "9", "--socket", fake_daemon.socket)
    assert done.returncode == 2
    assert one_error_line(done) == "wcctl: worker 9 does not exist"


def test_server_error_exits_1(fake_daemon):
    done = wcctl("load", "crash", "--socket", fake_daemon.socket)
    assert done.returncode == 1
    assert one_error_line(done) == "wcctl: scheduler failed"


def test_daemon_down_no_socket_exits_3(tmp_path):
    missing = str(tmp_path / "control.sock")
    done = wcctl("ps", "--socket", missing)
    assert done.returncode == 3
    assert one_error_line(done) == f"wcctl: daemon not running: no control socket at {missing}"


def test_daemon_down_stale_socket_exits_3():
    import socket

    with tempfile.TemporaryDirectory(prefix="wcd-cli-") as tmp:
        path = os.path.join(tmp, "control.sock")
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(path)
        stale.close()  # the file stays, nobody listens: a crashed daemon
        done = wcctl("status", "--socket", path)
    assert done.returncode == 3
    assert one_error_line(done) == f"wcctl: daemon not running: connection refused at {path}"


def test_default_lookup_names_every_path_tried(tmp_path):
    if os.path.exists("/run/wcd/control.sock"):
        pytest.skip("a system wcd is running here; its socket would be found")
    done = wcctl("ps", env=cli_env(XDG_RUNTIME_DIR=str(tmp_path)))
    assert done.returncode == 3
    assert one_error_line(done) == (
        "wcctl: daemon not running: no control socket at /run/wcd/control.sock, "
        f"{tmp_path}/wcd/control.sock, /tmp/wcd-{os.getuid()}/control.sock")


@pytest.mark.parametrize("args", [[], ["swap"], ["frobnicate"], ["swap", "m", "--worker", "x"],
                                  ["ps", "--timeout", "-1"]])
def test_bad_usage_exits_2_with_one_line(args):
    done = wcctl(*args, "--socket", "/nonexistent/control.sock")
    assert done.returncode == 2
    one_error_line(done)


def test_importing_the_cli_pulls_in_no_heavy_modules():
    heavy = ["aiohttp", "msgspec", "torch", "vllm", "asyncio"]
    done = subprocess.run(
        [sys.executable, "-c",
         f"import sys, wcd.cli; print([m for m in {heavy!r} if m in sys.modules])"],
        capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("event, line", [
    ({"path": "noop", "total_s": 0.0001, "phases": {}},
     "worker 0 already serves small-b (noop) in 0.000 s"),
    ({"path": "unload", "total_s": 0.12, "phases": {"drain": 0.1, "release": 0.02}},
     "small-b unloaded from worker 0 in 0.120 s: drain 100.0 ms, release 20.0 ms"),
    ({"path": "prefetch", "worker": None, "total_s": 1.5, "phases": {"fetch": 1.5}},
     "small-b prefetched into host memory in 1.500 s: fetch 1.50 s"),
])
def test_summary_line_per_path(event, line):
    from wcd.cli import done_summary  # stdlib only, safe to import in-process

    assert done_summary({"event": "done", "model": "small-b", "worker": 0, **event}) == line


# --- strings from the daemon reach the terminal escaped ---------------------------

def test_models_table_escapes_control_characters(fake_daemon):
    hostile = {**MODELS[0], "name": HOSTILE, "path": "/srv/\x1b[2J"}
    fake_daemon.documents["/v1/models"] = {"models": [hostile, MODELS[1]]}
    done = wcctl("models", "--socket", fake_daemon.socket)
    assert done.returncode == 0, done.stderr
    assert not CONTROL_CHARACTER.search(done.stdout)
    header, first, second = done.stdout.splitlines()  # the newline forged no line
    assert first.split() == [HOSTILE_SHOWN, "serving", "serving", "0", "250.0", "MiB", "1",
                             "3", "/srv/\\x1b[2J"]
    # Columns are measured as shown, escapes included.
    column = header.index("STATE")
    assert first[column:].startswith("serving") and second[column:].startswith("available")


def test_status_summary_escapes_control_characters(fake_daemon):
    workers = [{**WORKERS[0], "residents": [{**WORKERS[0]["residents"][0], "model": HOSTILE}]}]
    fake_daemon.documents["/v1/status"] = {**STATUS, "workers": workers, "state": "ready\r"}
    done = wcctl("status", "--socket", fake_daemon.socket)
    assert done.returncode == 0, done.stderr
    assert not CONTROL_CHARACTER.search(done.stdout)
    lines = done.stdout.splitlines()
    assert lines[0] == "wcd 0.1.0 (pid 4000): ready\\r, up 1 h 02 m"
    assert lines[3] == f"serving: {HOSTILE_SHOWN} on worker 0"


def test_json_output_keeps_the_daemon_strings_as_they_are(fake_daemon):
    fake_daemon.documents["/v1/models"] = {"models": [{**MODELS[0], "name": HOSTILE}]}
    done = wcctl("models", "--json", "--socket", fake_daemon.socket)
    assert done.returncode == 0, done.stderr
    assert not CONTROL_CHARACTER.search(done.stdout)  # JSON's own escapes
    assert json.loads(done.stdout)["models"][0]["name"] == HOSTILE


def test_error_line_escapes_control_characters(fake_daemon):
    done = wcctl("load", "hostile", "--socket", fake_daemon.socket)
    assert done.returncode == 2
    assert one_error_line(done) == f"wcctl: no model {HOSTILE_SHOWN}"


def test_done_summary_escapes_the_model_the_daemon_names(fake_daemon):
    done = wcctl("load", "red\x1b[31m", "--socket", fake_daemon.socket)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(
        "worker 0 now serves red\\x1b[31m (same_shape, from host memory) in ")


def test_progress_line_escapes_phase_names():
    from wcd.cli import Progress  # stdlib only, safe to import in-process

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    progress = Progress("swap", "m", terminal, enabled=True)
    progress.on_event({"event": "phase", "phase": "build\x1b[2J", "seconds": 0.001})
    assert terminal.getvalue() == "\r\x1b[Kswap m: build\\x1b[2J 1.0 ms"
