"""Hostile load: the attacks of issue 13 replayed over HTTP, against wcd before
and after its hardening, in one run on one machine.

    .venv/bin/python bench/hostile.py [--before-tree REV_OR_PATH] [--after-tree PATH]
                                      [--only NAME ...] [--quick]

Each tree's daemon runs from that tree (cwd and PYTHONPATH) with this
checkout's .venv python and models/, one CPU worker serving small-a, and a
config of the keys both trees understand (the shipped defaults otherwise, no
API keys). --before-tree is a git revision (exported with `git archive` under
.cache/) or a directory; the default is 1eb6ee6, the code before issue 13's
work. Each daemon starts with a soft open-file limit of 1024, as from a login
shell: the old daemon keeps it, the new one raises its own.

Every attack is bounded (client timeouts <= 60 s, fixed counts, loopback only).
While it runs, and until the daemon serves again afterwards (bounded), a
bystander loops 2-token small-a completions on fresh connections and /health
is probed every 0.2 s; the daemon's and the worker's RSS are sampled. Before
the attacks, the same bystander and probe on a quiet daemon give the baseline.
A daemon that died or stopped answering is started again for the next attack.

Writes the "## Hostile load (bench/hostile.py)" section of BENCHMARKS.md
(--quick: shorter attacks, written under .cache/bench-quick/).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import resource
import socket
import statistics
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import aiohttp
import yaml

from common import CACHE, ENGINE_ARGS, MODELS, ROOT, command_line, free_port, machine, pct, \
    shown, write_section

SECTION = "## Hostile load (bench/hostile.py)"
BEFORE_REV = "1eb6ee6"
PYTHON = ROOT / ".venv" / "bin" / "python"
MB = 1_000_000
MIB = 1 << 20
DAEMON_SOFT_NOFILE = 1024
CLIENT_TIMEOUT_S = 60.0
HEALTH_TIMEOUT_S = 10.0
NESTED_LOOPS = "{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}{% endfor %}"


@dataclass(frozen=True)
class Budget:
    """How long the time-bounded attacks run, and how long a daemon gets to
    serve again after one."""
    recover_s: float
    alternate_s: float
    idle_hold_s: float
    quiet_s: float

    @classmethod
    def of(cls, quick: bool) -> Budget:
        # The idle hold stays 20 s: it must outlast the new header timeout (10 s).
        return cls(90, 8, 20, 3) if quick else cls(150, 20, 20, 8)


# ---- one daemon -------------------------------------------------------------------------


def materialized(tree: str) -> Path:
    """A directory holding the code: `tree` itself, or the revision it names
    exported under .cache/ (without touching this checkout's worktrees)."""
    if Path(tree).is_dir():
        return Path(tree).resolve()
    commit = subprocess.run(["git", "rev-parse", "--short", f"{tree}^{{commit}}"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.strip()
    directory = CACHE / f"hostile-tree-{commit}"
    if not (directory / "wcd").is_dir():
        directory.mkdir(parents=True, exist_ok=True)
        archive = subprocess.Popen(["git", "archive", commit], cwd=ROOT, stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "-C", str(directory)], stdin=archive.stdout, check=True)
        if archive.wait():
            raise RuntimeError(f"git archive {commit} failed")
    return directory


def config(directory: Path, port: int) -> dict:
    """Only keys the old daemon knows too (it refuses the others). small-b has
    no alias: clients name it by its directory, which attack 4 spells 100 ways."""
    return {
        "control": {"socket": str(directory / "control.sock")},
        "http": {"host": "127.0.0.1", "port": port, "api_keys": []},
        "workers": [{"device": "cpu"}],
        "model_roots": [str(MODELS)],
        "defaults": ENGINE_ARGS,
        "models": {name: {"path": str(MODELS / name)} for name in ("small-a", "wide-a")},
        "preload": ["small-a"],
        "log_level": "info",
        "policy": {"host_cache_bytes": 256 << 20},
    }


def limited_open_files() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(DAEMON_SOFT_NOFILE, hard), hard))


@dataclass
class Daemon:
    tree: Path
    directory: Path
    process: asyncio.subprocess.Process | None = None
    url: str = ""
    starts: int = 0

    @property
    def control_socket(self) -> str:
        return str(self.directory / "control.sock")

    @property
    def log(self) -> Path:
        return self.directory / "wcd.log"

    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        port = free_port()
        (self.directory / "wcd.yaml").write_text(yaml.safe_dump(config(self.directory, port)))
        env = {k: v for k, v in os.environ.items()
               if k not in ("WCD_API_KEYS", "WCD_CONFIG", "NOTIFY_SOCKET", "PYTHONPATH")}
        env["PYTHONPATH"] = str(self.tree)
        with self.log.open("ab") as out:
            self.process = await asyncio.create_subprocess_exec(
                str(PYTHON), "-m", "wcd.daemon.main", "--config",
                str(self.directory / "wcd.yaml"), cwd=self.tree, env=env,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=limited_open_files)
        self.url = f"http://127.0.0.1:{port}"
        self.starts += 1
        if not await self.wait_serving(300):
            raise RuntimeError(f"wcd from {self.tree} never served small-a:\n{tail(self.log)}")
        for _ in range(5):  # the first requests after a load are slower
            await self.serves_small_a()

    async def stop(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, 15)
        try:
            await asyncio.wait_for(self.process.wait(), 60)
        except asyncio.TimeoutError:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, 9)
        await self.process.wait()

    async def control(self, method: str, path: str, body: dict | None = None,
                      timeout: float = 10) -> dict | None:
        """The control API's answer (its last line for an operation), or None
        when the daemon does not answer in time."""
        connector = aiohttp.UnixConnector(path=self.control_socket)
        try:
            async with aiohttp.ClientSession(
                    connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as s:
                async with s.request(method, "http://wcd" + path, json=body) as response:
                    lines = (await response.text()).strip().splitlines()
                    return json.loads(lines[-1]) if lines else None
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
            return None

    async def worker(self) -> dict | None:
        answer = await self.control("GET", "/v1/workers")
        return answer["workers"][0] if answer and answer.get("workers") else None

    async def serves_small_a(self) -> bool:
        """A small-a completion answers 200 (the worker serves, whatever model
        it had: the request loads small-a if need be)."""
        try:
            async with aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)) as session:
                async with session.post(self.url + "/v1/completions",
                                        json=bystander_body()) as response:
                    await response.read()
                    return response.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    async def wait_serving(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                return False
            worker = await self.worker()
            if worker and worker["state"] == "serving" and await self.serves_small_a():
                return True
            await asyncio.sleep(0.5)
        return False

    async def metrics(self) -> tuple[float, int]:
        """(swaps, loads and unloads so far; metric series exposed)."""
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
                async with s.get(self.url + "/metrics") as response:
                    text = await response.text()
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return float("nan"), 0
        samples = [line for line in text.splitlines() if line and not line.startswith("#")]
        swaps = sum(float(line.rsplit(" ", 1)[1]) for line in samples
                    if line.startswith("wcd_swaps_total"))
        return swaps, len(samples)


def tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def rss(pid: int | None) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (FileNotFoundError, ProcessLookupError, TypeError):
        return 0


def children(pid: int) -> list[int]:
    found = []
    with contextlib.suppress(FileNotFoundError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(FileNotFoundError):
                found += [int(c) for c in
                          Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return found


# ---- what every attack is measured by -----------------------------------------------------


def bystander_body() -> dict:
    return {"model": "small-a", "prompt": "hello", "max_tokens": 2, "temperature": 0}


@dataclass
class Window:
    """What the bystander, the /health probe and the RSS sampler saw."""
    served_s: list[float] = field(default_factory=list)
    failed: Counter = field(default_factory=Counter)
    health_s: list[float] = field(default_factory=list)
    health_failed: int = 0
    daemon_peak: int = 0
    worker_peak: int = 0


async def bystander(url: str, window: Window) -> None:
    # A fresh connection for each request, as a new client would open: a
    # kept-alive one would not notice a daemon that no longer accepts.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                     timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)) as s:
        while True:
            started = time.perf_counter()
            try:
                async with s.post(url + "/v1/completions", json=bystander_body()) as response:
                    await response.read()
                    if response.status == 200:
                        window.served_s.append(time.perf_counter() - started)
                    else:
                        window.failed[str(response.status)] += 1
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                window.failed[type(exc).__name__] += 1
                await asyncio.sleep(0.2)
            await asyncio.sleep(0.05)


async def health_probe(url: str, window: Window) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                     timeout=aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S)) as s:
        while True:
            started = time.perf_counter()
            try:
                async with s.get(url + "/health") as response:
                    await response.read()
                    ok = response.status == 200
            except (aiohttp.ClientError, asyncio.TimeoutError):
                ok = False
            window.health_s.append(time.perf_counter() - started)
            window.health_failed += not ok
            await asyncio.sleep(0.2)


async def rss_sampler(daemon_pid: int, window: Window) -> None:
    while True:
        window.daemon_peak = max(window.daemon_peak, rss(daemon_pid))
        window.worker_peak = max([window.worker_peak, *map(rss, children(daemon_pid))])
        await asyncio.sleep(0.25)


@dataclass
class Snapshot:
    daemon_rss: int
    worker_pid: int | None
    worker_rss: int
    restarts: int | None
    swaps: float
    series: int


async def snapshot(daemon: Daemon) -> Snapshot:
    worker = await daemon.worker() or {}
    swaps, series = await daemon.metrics()
    return Snapshot(rss(daemon.process.pid), worker.get("pid"), rss(worker.get("pid")),
                    worker.get("restarts"), swaps, series)


@dataclass
class Outcome:
    """What the attacker saw: its statuses and figures of its own."""
    statuses: Counter = field(default_factory=Counter)
    figures: dict[str, str] = field(default_factory=dict)


@dataclass
class Result:
    attack: str
    outcome: Outcome
    wall_s: float
    window: Window
    before: Snapshot
    after: Snapshot | None
    recovered_s: float | None  # None: not serving again within the bound
    daemon_died: bool

    @property
    def worker_restarts(self) -> int | None:
        """None when the daemon did not answer again to say."""
        if self.after is None or self.after.restarts is None:
            return None
        counted = (self.after.restarts or 0) - (self.before.restarts or 0)
        return max(counted, int(self.after.worker_pid != self.before.worker_pid))


Attack = Callable[[Daemon, Budget], Awaitable[Outcome]]


async def measured(name: str, attack: Attack, daemon: Daemon, budget: Budget) -> Result:
    # An attack that was not served again within its bound is not waited for twice.
    if not daemon.alive() or not await daemon.wait_serving(15):
        await restart(daemon)
    await reset(daemon)
    before = await snapshot(daemon)
    window = Window()
    watchers = [asyncio.create_task(bystander(daemon.url, window)),
                asyncio.create_task(health_probe(daemon.url, window)),
                asyncio.create_task(rss_sampler(daemon.process.pid, window))]
    started = time.perf_counter()
    try:
        outcome = await attack(daemon, budget)
        wall_s = time.perf_counter() - started
        ended = time.perf_counter()
        # The bystander goes on until the daemon serves again: what a dead
        # worker costs others comes after the attacker's answer.
        served = len(window.served_s)
        deadline = time.monotonic() + budget.recover_s
        while (len(window.served_s) == served and daemon.alive()
               and time.monotonic() < deadline):
            await asyncio.sleep(0.1)
        recovered_s = (time.perf_counter() - ended if len(window.served_s) > served
                       else None)
    finally:
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
    died = not daemon.alive()
    after = None
    if not died:
        if recovered_s is not None:
            await asyncio.sleep(2)  # what the attack freed is given back
        after = await snapshot(daemon)
    return Result(name, outcome, wall_s, window, before, after, recovered_s, died)


async def restart(daemon: Daemon) -> None:
    print(f"  the daemon {'died' if not daemon.alive() else 'does not serve'}; "
          "starting it again")
    await daemon.stop()
    await daemon.start()


async def reset(daemon: Daemon) -> None:
    """small-a serving, as at start: attacks 4 and 5 leave small-b."""
    worker = await daemon.worker()
    if worker and worker["model"] != "small-a":
        await daemon.control("POST", "/v1/swap", {"model": "small-a"}, timeout=120)


# ---- the attacks --------------------------------------------------------------------------


async def post(url: str, path: str, body: bytes | dict, timeout: float = CLIENT_TIMEOUT_S
               ) -> str:
    """The status the attacker got, or the error that ended its request."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
            async with s.post(url + path, data=data,
                              headers={"Content-Type": "application/json"}) as response:
                await response.read()
                return str(response.status)
    except asyncio.TimeoutError:
        return f"no answer in {timeout:g} s"
    except aiohttp.ClientError as exc:
        return type(exc).__name__


def huge_structured_outputs() -> bytes:
    """29 MiB of floats, 4 bytes each in JSON and 9 in msgpack: a ~68 MB frame."""
    head = b'{"model": "small-a", "prompt": "hi", "max_tokens": 2, ' \
           b'"structured_outputs": {"json": {"enum": ['
    count = (29 * MIB - len(head)) // 4
    return head + b"0.5," * count + b"0.5]}}}"


async def structured_outputs_29mib(daemon: Daemon, budget: Budget) -> Outcome:
    body = huge_structured_outputs()
    return Outcome(Counter([await post(daemon.url, "/v1/completions", body)]),
                   {"body": f"{len(body) / MIB:.1f} MiB"})


async def stop_string_1mb(daemon: Daemon, budget: Budget) -> Outcome:
    body = json.dumps({"model": "small-a", "prompt": ["hello"] * 400, "stop": "x" * 1_000_000,
                       "max_tokens": 1, "temperature": 0}).encode()
    return Outcome(Counter([await post(daemon.url, "/v1/completions", body)]),
                   {"body": f"{len(body) / MIB:.2f} MiB"})


async def token_prompts_600k(daemon: Daemon, budget: Budget) -> Outcome:
    prompts = [[100 + i % 800, 7] for i in range(600_000)]  # ids below the vocab (944)
    body = json.dumps({"model": "small-a", "prompt": prompts, "max_tokens": 1,
                       "temperature": 0}).encode()
    return Outcome(Counter([await post(daemon.url, "/v1/completions", body)]),
                   {"body": f"{len(body) / MIB:.1f} MiB"})


async def n_16384(daemon: Daemon, budget: Budget) -> Outcome:
    body = {"model": "small-a", "prompt": ["hi", "hi"], "n": 16384}
    return Outcome(Counter([await post(daemon.url, "/v1/completions", body)]),
                   {"body": f"{len(json.dumps(body))} B"})


async def nested_loop_template(daemon: Daemon, budget: Budget) -> Outcome:
    body = {"model": "small-a", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2, "chat_template_kwargs": {"chat_template": NESTED_LOOPS}}
    return Outcome(Counter([await post(daemon.url, "/v1/chat/completions", body)]))


def spellings(directory: str, count: int) -> list[str]:
    """`count` names of one directory under the model root: small-b, ./small-b,
    ././small-b, ..., then the absolute path spelled the same ways."""
    half = count // 2
    return ([f"{'./' * k}{directory}" for k in range(half)]
            + [f"{MODELS}/{'./' * k}{directory}" for k in range(count - half)])


async def spellings_100(daemon: Daemon, budget: Budget) -> Outcome:
    swaps_before, series_before = await daemon.metrics()
    outcome = Outcome()
    for name in spellings("small-b", 100):
        body = {"model": name, "prompt": "hi", "max_tokens": 2, "temperature": 0}
        outcome.statuses[await post(daemon.url, "/v1/completions", body)] += 1
    swaps, series = await daemon.metrics()
    names = {s.get("model") for s in (await daemon.control("GET", "/v1/status") or {})
             .get("recent_swaps", [])}
    outcome.figures = {"swaps": f"{swaps - swaps_before:.0f}",
                       "new metric series": str(series - series_before),
                       "names in the last swaps": str(len(names - {None}))}
    return outcome


async def dropped_alternation(daemon: Daemon, budget: Budget) -> Outcome:
    """small-b requests dropped 50 ms after they were sent, back to back, while
    the bystander (the victim) asks for small-a."""
    swaps_before, _ = await daemon.metrics()
    outcome = Outcome()
    body = {"model": "small-b", "prompt": "hi", "max_tokens": 16, "temperature": 0}
    until = time.monotonic() + budget.alternate_s
    while time.monotonic() < until:
        status = await post(daemon.url, "/v1/completions", body, timeout=0.05)
        outcome.statuses["dropped" if status.startswith("no answer") else status] += 1
    await asyncio.sleep(1)  # a swap a dropped request left queued runs now, or never
    swaps, _ = await daemon.metrics()
    outcome.figures = {"swaps": f"{swaps - swaps_before:.0f}"}
    return outcome


async def unread_stream(daemon: Daemon, budget: Budget) -> Outcome:
    """A stream whose client never reads, with a tiny receive buffer: how long
    the worker runs it and how long its lease (which a swap waits for) stays.
    logprobs 20 rather than the review's 5: n=8 x 480 tokens with 5 make
    ~1.5 MB of chunks, which fit in what loopback buffers here (~1.7 MB for
    a 1 KiB SO_RCVBUF), so the daemon's writes would never block."""
    body = json.dumps({"model": "small-a", "prompt": "hello", "n": 8, "logprobs": 20,
                       "max_tokens": 480, "ignore_eos": True, "stream": True}).encode()
    host, port = daemon.url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(sock, (host, int(port)))
        await loop.sock_sendall(sock, b"POST /v1/completions HTTP/1.1\r\nHost: wcd\r\n"
                                      b"Content-Type: application/json\r\n"
                                      b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
        started = time.monotonic()
        # `running` comes with the worker's health pongs (every 5 s by default),
        # `active` (the lease) from the daemon itself.
        seen: set[str] = set()
        ended: dict[str, float] = {}
        while time.monotonic() - started < CLIENT_TIMEOUT_S and len(ended) < 2:
            worker = await daemon.worker() or {}
            for key in ("running", "active"):
                if worker.get(key):
                    seen.add(key)
                elif key in seen and key not in ended:
                    ended[key] = time.monotonic() - started
            await asyncio.sleep(0.25)
    finally:
        sock.close()
    return Outcome(Counter(["never read"]),
                   {"worker running it for": fmt_bound(ended.get("running")),
                    "lease held for": fmt_bound(ended.get("active"))})


def fmt_bound(seconds: float | None) -> str:
    return f"{seconds:.1f} s" if seconds is not None else f"> {CLIENT_TIMEOUT_S:.0f} s"


async def idle_connections(daemon: Daemon, budget: Budget) -> Outcome:
    """1,100 TCP connections that never send a byte, held; how many the daemon
    still keeps open at the end."""
    host, port = daemon.url.removeprefix("http://").split(":")
    loop = asyncio.get_running_loop()

    async def connect() -> socket.socket | None:
        sock = socket.socket()
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (host, int(port))), 5)
            return sock
        except (OSError, asyncio.TimeoutError):
            sock.close()
            return None

    opened = await asyncio.gather(*(connect() for _ in range(1100)))
    held = [s for s in opened if s is not None]
    try:
        await asyncio.sleep(budget.idle_hold_s)
        still_open = sum(map(open_from_peer, held))
        # Connected here is not accepted there: past the listen backlog the
        # kernel completes handshakes the daemon never sees.
        daemon_fds = len(os.listdir(f"/proc/{daemon.process.pid}/fd"))
    finally:
        for sock in held:
            sock.close()
    return Outcome(Counter({"connected": len(held)}),
                   {f"open to the client after {budget.idle_hold_s:g} s": str(still_open),
                    "daemon's open fds then": str(daemon_fds)})


def open_from_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


ATTACKS: dict[str, tuple[str, Attack]] = {
    "so-29mib": ("1. 29 MiB of floats in structured_outputs", structured_outputs_29mib),
    "stop-1mb": ("2a. 400 prompts, a 1 MB stop string", stop_string_1mb),
    "prompts-600k": ("2b. 600k token-id prompts", token_prompts_600k),
    "n-16384": ("2c. 2 prompts, n=16384", n_16384),
    "template": ("3. an 83-character nested-loop chat template", nested_loop_template),
    "spellings": ("4. 100 spellings of one model directory", spellings_100),
    "dropped": ("5. small-b requests dropped after 50 ms, victim on small-a",
                dropped_alternation),
    "unread-stream": ("6. a stream never read", unread_stream),
    "idle-conns": ("7. 1,100 idle TCP connections", idle_connections),
}


# ---- a tree's run -----------------------------------------------------------------------


@dataclass
class TreeRun:
    label: str
    given: str  # the tree as the command named it
    tree: Path
    quiet: Window
    results: list[Result]
    daemon_starts: int


async def quiet_window(daemon: Daemon, seconds: float) -> Window:
    window = Window()
    watchers = [asyncio.create_task(bystander(daemon.url, window)),
                asyncio.create_task(health_probe(daemon.url, window))]
    await asyncio.sleep(seconds)
    for task in watchers:
        task.cancel()
    await asyncio.gather(*watchers, return_exceptions=True)
    return window


async def run_tree(label: str, given: str, tree: Path, names: list[str],
                   budget: Budget) -> TreeRun:
    daemon = Daemon(tree, CACHE / "bench-hostile" / label)
    if daemon.log.exists():
        daemon.log.unlink()
    print(f"{label}: wcd from {shown(str(tree))}")
    await daemon.start()
    results = []
    try:
        quiet = await quiet_window(daemon, budget.quiet_s)
        print(f"  quiet: bystander p50 {p50(quiet):.3f} s")
        for name in names:
            title, attack = ATTACKS[name]
            print(f"  {title} ...", flush=True)
            result = await measured(title, attack, daemon, budget)
            print("   ", " | ".join(row_cells(result)), flush=True)
            results.append(result)
    finally:
        await daemon.stop()
    return TreeRun(label, given, tree, quiet, results, daemon.starts)


# ---- the report ---------------------------------------------------------------------------


def p50(window: Window) -> float:
    return statistics.median(window.served_s) if window.served_s else float("nan")


def bystander_cell(window: Window) -> str:
    failed = sum(window.failed.values())
    if not window.served_s:
        return f"none served ({failed} failed)"
    text = f"{p50(window):.2f} / {pct(window.served_s, 99):.2f} / {max(window.served_s):.2f}"
    return text + (f" ({failed} failed)" if failed else "")


def health_cell(window: Window) -> str:
    if not window.health_s:
        return "-"
    text = f"{max(window.health_s):.2f}"
    return text + (f" ({window.health_failed} failed)" if window.health_failed else "")


def mb(value: int) -> str:
    return f"{value / MB:.0f}"


def rss_cells(r: Result) -> list[str]:
    """Daemon's and worker's RSS: before → after (the highest seen)."""
    cells = []
    for kind in ("daemon", "worker"):
        before = getattr(r.before, f"{kind}_rss")
        after = getattr(r.after, f"{kind}_rss") if r.after else None
        highest = max(getattr(r.window, f"{kind}_peak"), before, after or 0)
        cells.append(f"{mb(before)} → {mb(after) if after is not None else '?'} "
                     f"(max {mb(highest)})")
    return cells


def row_cells(r: Result) -> list[str]:
    statuses = ", ".join(f"{s} ×{n}" if n > 1 else s for s, n in r.outcome.statuses.items())
    figures = "; ".join(f"{k}: {v}" for k, v in r.outcome.figures.items())
    if r.daemon_died:
        recovered = "daemon died"
    elif r.recovered_s is None:
        recovered = "not serving after the bound"
    else:
        recovered = f"{r.recovered_s:.1f} s"
    return [statuses, f"{r.wall_s:.1f}", bystander_cell(r.window), health_cell(r.window),
            *rss_cells(r),
            "?" if r.worker_restarts is None else str(r.worker_restarts), recovered, figures]


def goals(after: TreeRun) -> list[tuple[str, str, str, bool]]:
    results = after.results
    unknown = sum(r.worker_restarts is None for r in results)
    restarts = sum(r.worker_restarts or 0 for r in results)
    deaths = sum(r.daemon_died for r in results)
    health = max((max(r.window.health_s, default=0) for r in results), default=0)
    unserved = [r for r in results if not r.window.served_s or sum(r.window.failed.values())]
    grown = max((max(r.after.daemon_rss - r.before.daemon_rss,
                     r.after.worker_rss - r.before.worker_rss)
                 for r in results if r.after), default=0)
    refused = [r for r in results if any(s.startswith("5") for s in r.outcome.statuses)]
    return [
        ("worker restarts caused by the attacks", "0",
         str(restarts) + (f" (+ {unknown} attacks unknown)" if unknown else ""),
         restarts == 0 and not unknown),
        ("daemon deaths", "0", str(deaths), deaths == 0),
        ("attacks answered with a 5xx", "0", str(len(refused)), not refused),
        ("/health during any attack, max", "≤ 1 s", f"{health:.2f} s", health <= 1),
        ("attacks during which the bystander failed or was never served", "0",
         str(len(unserved)), not unserved),
        ("daemon or worker RSS growth after an attack, max", "≤ 50 MB", f"{grown / MB:+.0f} MB",
         grown <= 50 * MB),
    ]


def section(runs: list[TreeRun], budget: Budget) -> str:
    now = datetime.datetime.now(datetime.timezone.utc)
    before, after = runs
    header = ("| attack | code | attacker got | wall (s) | bystander p50 / p99 / max (s) | "
              "/health max (s) | daemon RSS (MB) | worker RSS (MB) | worker restarts | "
              "served again after | more |")
    rows = []
    for b, a in zip(before.results, after.results):
        rows.append(f"| {b.attack} | before | " + " | ".join(row_cells(b)) + " |")
        rows.append("| | after | " + " | ".join(row_cells(a)) + " |")
    return "\n".join([
        SECTION, "",
        f"Measured {now:%Y-%m-%d %H:%M} UTC on {machine()}. Command: `{command_line()}`.", "",
        f"Before: `{shown(before.given)}`, the code before issue 13's work; after: "
        f"`{shown(after.given)}`. Each daemon: one CPU worker serving small-a, the "
        "shipped policy defaults (256 MiB host cache), no API keys, a soft open-file limit of "
        f"{DAEMON_SOFT_NOFILE} at start (as from a login shell). Every attack is one client "
        f"over loopback, its requests cut at {CLIENT_TIMEOUT_S:.0f} s. Meanwhile a bystander "
        "loops 2-token small-a completions on fresh connections and /health is probed every "
        f"0.2 s ({HEALTH_TIMEOUT_S:.0f} s timeout), from the attack's start until the daemon "
        f"serves the bystander again (at most {budget.recover_s:.0f} s after the attack). "
        "RSS: before the attack → 2 s after it was served again, or at the bound (max: the "
        "highest sampled every 0.25 s while it lasted, or either end); a worker that "
        "restarted is a new process after. Quiet daemon, same bystander: p50 "
        f"{p50(before.quiet):.3f} s before, {p50(after.quiet):.3f} s after; daemon starts "
        f"(the first included): {before.daemon_starts} before, {after.daemon_starts} after.",
        "", header, "| " + " | ".join(["---"] * 11) + " |", *rows, "",
        "Goals (the after code):", "",
        "| goal | target | measured | |", "| --- | --- | --- | --- |",
        *[f"| {what} | {target} | {got} | {'met' if ok else '**missed**'} |"
          for what, target, got, ok in goals(after)], "",
    ])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before-tree", default=BEFORE_REV,
                        help="the old code: a git revision or a directory (default %(default)s)")
    parser.add_argument("--after-tree", default=str(ROOT),
                        help="the new code: a directory (default: this checkout)")
    parser.add_argument("--only", nargs="+", choices=list(ATTACKS), default=list(ATTACKS),
                        help="run these attacks only")
    parser.add_argument("--quick", action="store_true",
                        help="shorter time-bound attacks; writes under .cache/bench-quick/")
    return parser.parse_args(argv)


async def bench(args: argparse.Namespace, budget: Budget) -> list[TreeRun]:
    trees = [("before", args.before_tree), ("after", args.after_tree)]
    return [await run_tree(label, given, materialized(given), args.only, budget)
            for label, given in trees]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The idle-connection attack holds 1,100 sockets in this process.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    budget = Budget.of(args.quick)
    runs = asyncio.run(bench(args, budget))
    text = section(runs, budget)
    print("\n" + text)
    benchmarks = (CACHE / "bench-quick" if args.quick else ROOT) / "BENCHMARKS.md"
    write_section(benchmarks, SECTION, text)
    print(f"wrote {shown(str(benchmarks))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
