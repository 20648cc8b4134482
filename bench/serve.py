"""Serving benchmark: wcd's OpenAI endpoint against vLLM's own API server.

    .venv/bin/python bench/serve.py [--clients N] [--requests N] [--max-tokens N]
                                    [--alternating N] [--quick]

In one run on one machine, with the same model (small-a) and engine args:
(a) vLLM's `vllm.entrypoints.openai.api_server`, then wcd: N concurrent
    streaming clients; throughput (tokens/s, requests/s), TTFT and inter-token
    latency p50/p99;
(b) wcd's daemon itself: launch to READY=1, `wcctl ps` round trip, `wcctl swap`
    end to end against the worker's own swap time;
(c) the latency a client sees when its request makes wcd swap models, and
    failures across alternating-model requests.

Writes the "## Serve (bench/serve.py)" section of BENCHMARKS.md; --quick
writes under .cache/bench-quick/ instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import http.client
import json
import os
import platform
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import yaml

from common import (CACHE, ENGINE_ARGS, MODELS, ROOT, command_line, first_completion,
                    free_port, machine, pct, shown, sse_chunks, tail, vllm_server, write_section)

SECTION = "## Serve (bench/serve.py)"
PROMPTS = ["hello world", "the quick brown fox", "tell me a story about llamas",
           "what is the capital of france", "one two three four five"]


# ---- load ---------------------------------------------------------------------------


@dataclass
class Sample:
    ttft_s: float
    gaps_s: list[float]
    tokens: int
    total_s: float


@dataclass
class Load:
    samples: list[Sample] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    def tokens_per_s(self) -> float:
        return sum(s.tokens for s in self.samples) / self.wall_s

    def requests_per_s(self) -> float:
        return len(self.samples) / self.wall_s

    def ttft(self, q: float) -> float:
        return pct([s.ttft_s for s in self.samples], q)

    def itl(self, q: float) -> float:
        return pct([g for s in self.samples for g in s.gaps_s], q)

    @classmethod
    def merged(cls, rounds: list[Load]) -> Load:
        return cls([s for r in rounds for s in r.samples], [f for r in rounds for f in r.failures],
                   sum(r.wall_s for r in rounds))


async def stream_completion(session: aiohttp.ClientSession, url: str, model: str,
                            prompt: str, max_tokens: int) -> Sample:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    arrivals, tokens = [], 0
    async with session.post(url + "/v1/completions", json=body) as response:
        async for chunk in sse_chunks(response):
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                arrivals.append(time.perf_counter())
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    if not arrivals:
        raise RuntimeError("no tokens")
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return Sample(arrivals[0] - started, gaps, tokens, time.perf_counter() - started)


async def run_load(url: str, models: list[str], clients: int, requests: int,
                   max_tokens: int) -> Load:
    """`clients` concurrent clients share `requests` streamed completions;
    request i asks for models[i % len(models)]."""
    load = Load()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)

    async def client(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            try:
                load.samples.append(await stream_completion(
                    session, url, models[i % len(models)], PROMPTS[i % len(PROMPTS)],
                    max_tokens))
            except (aiohttp.ClientError, asyncio.TimeoutError, RuntimeError) as exc:
                load.failures.append(f"{models[i % len(models)]}: {exc}")

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        load.wall_s = time.perf_counter() - started
    return load


# ---- wcd ------------------------------------------------------------------------------


class NotifyListener:
    """Our own NOTIFY_SOCKET: the time READY=1 arrives."""

    def __init__(self, path: Path):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)

    async def ready_at(self) -> float:
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(self.sock, 65536)
            if b"READY=1" in data.split(b"\n"):
                return time.perf_counter()


@dataclass
class Wcd:
    process: asyncio.subprocess.Process
    url: str
    socket: str
    ready_s: float
    log: Path

    def wcctl(self, *args: str) -> tuple[float, subprocess.CompletedProcess]:
        started = time.perf_counter()
        done = subprocess.run([str(ROOT / ".venv" / "bin" / "wcctl"), "--socket", self.socket,
                               *args], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"wcctl {' '.join(args)}: {done.stderr.strip()}")
        return time.perf_counter() - started, done


@contextlib.asynccontextmanager
async def wcd_daemon(directory: Path):
    directory.mkdir(parents=True, exist_ok=True)
    port = int(os.environ.get("WCD_BENCH_PORT", "0")) or free_port()
    config = {
        "control": {"socket": str(directory / "control.sock")},
        "http": {"host": "127.0.0.1", "port": port},
        "workers": [{"device": "cpu"}],
        "model_roots": [str(MODELS)],
        "defaults": ENGINE_ARGS,
        "models": {name: {"path": str(MODELS / name)} for name in ("small-a", "small-b",
                                                                  "wide-a")},
        "preload": ["small-a"],
        "log_level": "warning",
        # The benchmark stops the daemon's process group while the baseline runs;
        # a health ping in flight across that pause must not count as a hang.
        "policy": {"queue_wait": "300s", "health_timeout": "600s",
                   "host_cache_bytes": 256 << 20},
    }
    (directory / "wcd.yaml").write_text(yaml.safe_dump(config))
    notify = NotifyListener(directory / "notify.sock")
    log = directory / "wcd.log"
    env = {**os.environ, "NOTIFY_SOCKET": str(notify.path), "VLLM_LOGGING_LEVEL": "WARNING"}
    with log.open("wb") as out:
        started = time.perf_counter()
        process = await asyncio.create_subprocess_exec(
            str(ROOT / ".venv" / "bin" / "wcd"), "--config", str(directory / "wcd.yaml"),
            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    try:
        ready_s = await asyncio.wait_for(notify.ready_at(), 60) - started
        url = f"http://127.0.0.1:{port}"
        await first_completion(url, "small-a", log, lambda: process.returncode)
        yield Wcd(process, url, config["control"]["socket"], ready_s, log)
    finally:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 60)
        except asyncio.TimeoutError:
            process.kill()
            await process.wait()
        notify.sock.close()


def control_round_trip_s(path: str) -> float:
    """GET /v1/workers over the control socket, in process: the daemon's share
    of `wcctl ps`, without the interpreter start."""
    class UnixConnection(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.connect(path)

    started = time.perf_counter()
    connection = UnixConnection("localhost")
    connection.request("GET", "/v1/workers")
    connection.getresponse().read()
    connection.close()
    return time.perf_counter() - started


@dataclass
class DaemonFigures:
    ready_s: float
    ps_wcctl_s: list[float]
    ps_socket_s: list[float]
    swap_wall_s: list[float]
    swap_worker_s: list[float]


def daemon_figures(wcd: Wcd, swaps: int) -> DaemonFigures:
    ps_wcctl = [wcd.wcctl("ps")[0] for _ in range(20)]
    ps_socket = [control_round_trip_s(wcd.socket) for _ in range(50)]
    walls, workers = [], []
    for i in range(swaps):
        wall, done = wcd.wcctl("swap", ("small-b", "small-a")[i % 2], "--json")
        walls.append(wall)
        workers.append(json.loads(done.stdout)["total_s"])
    return DaemonFigures(wcd.ready_s, ps_wcctl, ps_socket, walls, workers)


async def swap_latency(wcd: Wcd, target: str, rounds: int) -> list[float]:
    """TTFT of a request that names a model no worker serves (small-a serving
    before each): the swap it triggers, as its client sees it."""
    times = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        for _ in range(rounds):
            await asyncio.to_thread(wcd.wcctl, "swap", "small-a")
            sample = await stream_completion(session, wcd.url, target, PROMPTS[0], 4)
            times.append(sample.ttft_s)
    return times


# ---- report ---------------------------------------------------------------------------


@dataclass
class Results:
    vllm_cold_s: float
    vllm: Load
    wcd: Load
    daemon: DaemonFigures
    same_shape_ttft_s: list[float]
    rebuild_ttft_s: list[float]
    steady_ttft_s: float
    alternating: Load
    args: argparse.Namespace


def load_table(results: Results) -> list[str]:
    rows = ["| server | requests | failed | tokens/s | requests/s | TTFT p50 | TTFT p99 "
            "| ITL p50 | ITL p99 |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
            "| ---: |"]
    for name, load in (("vLLM api_server", results.vllm), ("wcd", results.wcd)):
        rows.append(f"| {name} | {len(load.samples) + len(load.failures)} | "
                    f"{len(load.failures)} | {load.tokens_per_s():.1f} | "
                    f"{load.requests_per_s():.2f} | {load.ttft(50) * 1000:.1f} ms | "
                    f"{load.ttft(99) * 1000:.1f} ms | {load.itl(50) * 1000:.1f} ms | "
                    f"{load.itl(99) * 1000:.1f} ms |")
    return rows


def goals(r: Results) -> list[tuple[str, str, str, bool]]:
    ratio = r.wcd.tokens_per_s() / r.vllm.tokens_per_s()
    ttft_gap = (r.wcd.ttft(50) - r.vllm.ttft(50)) * 1000
    d = r.daemon
    overhead = pct([w - s for w, s in zip(d.swap_wall_s, d.swap_worker_s)], 50) * 1000
    failed = len(r.alternating.failures)
    total = failed + len(r.alternating.samples)
    return [
        ("throughput vs vLLM api_server", "≥ 95%", f"{ratio:.1%}", ratio >= 0.95),
        ("TTFT p50 vs vLLM api_server", "within 5 ms", f"{ttft_gap:+.1f} ms",
         ttft_gap <= 5),
        (f"failed of {total} alternating-model requests", "0", str(failed), failed == 0),
        ("daemon launch to READY=1", "≤ 0.5 s", f"{d.ready_s:.3f} s", d.ready_s <= 0.5),
        ("`wcctl ps` round trip (p50, whole process)", "≤ 50 ms",
         f"{pct(d.ps_wcctl_s, 50) * 1000:.1f} ms (socket alone "
         f"{pct(d.ps_socket_s, 50) * 1000:.1f} ms)", pct(d.ps_wcctl_s, 50) <= 0.05),
        ("`wcctl swap` end to end − the worker's swap (p50)", "≤ 60 ms",
         f"{overhead:.1f} ms", overhead <= 60),
    ]


def section(r: Results) -> str:
    a = r.args
    d = r.daemon
    now = datetime.datetime.now(datetime.timezone.utc)
    return "\n".join([
        SECTION, "",
        f"Measured {now:%Y-%m-%d %H:%M} UTC on {machine()}; Python "
        f"{platform.python_version()}. Command: `{command_line()}` (`make bench`).", "",
        f"Model small-a, engine args `{json.dumps(ENGINE_ARGS)}` for both servers. "
        f"{a.clients} concurrent streaming clients, {a.rounds} rounds of {a.requests} "
        f"completions of {a.max_tokens} tokens (greedy, `ignore_eos`) per server, the "
        "servers taking turns round by round (both up, the idle one stopped with "
        "SIGSTOP, as vLLM is for everything else), so drift "
        "in the shared machine's speed lands on both: vLLM's own "
        "`python -m vllm.entrypoints.openai.api_server` (EngineCore in its own process, "
        f"as shipped; cold start to first completion {r.vllm_cold_s:.1f} s) and wcd "
        "(one CPU worker).", "",
        *load_table(r), "",
        "### Requests that make wcd swap", "",
        f"TTFT of a 4-token request for a model no worker serves, small-a serving before "
        f"each ({len(r.same_shape_ttft_s)} rounds; steady-state TTFT p50 "
        f"{r.steady_ttft_s * 1000:.1f} ms): small-b (same shape) p50 "
        f"{pct(r.same_shape_ttft_s, 50) * 1000:.1f} ms, wide-a (rebuild) p50 "
        f"{pct(r.rebuild_ttft_s, 50) * 1000:.1f} ms.", "",
        f"{len(r.alternating.samples) + len(r.alternating.failures)} requests alternating "
        f"small-a and small-b from {a.clients} clients: {len(r.alternating.failures)} "
        f"failed, {r.alternating.requests_per_s():.2f} requests/s, TTFT p99 "
        f"{r.alternating.ttft(99) * 1000:.0f} ms.", "",
        "### The daemon", "",
        f"Launch to READY=1: {d.ready_s:.3f} s (the control socket listens; workers warm "
        f"after). `wcctl ps`: p50 {pct(d.ps_wcctl_s, 50) * 1000:.1f} ms as a process "
        f"(interpreter start included), {pct(d.ps_socket_s, 50) * 1000:.2f} ms for the "
        f"request over the socket. `wcctl swap` small-a ↔ small-b ({len(d.swap_wall_s)} "
        f"swaps): p50 {pct(d.swap_wall_s, 50) * 1000:.1f} ms end to end, the worker's "
        f"own swap p50 {pct(d.swap_worker_s, 50) * 1000:.1f} ms.", "",
        "### Goals", "",
        "| goal | target | measured | |", "| --- | --- | --- | --- |",
        *[f"| {what} | {target} | {got} | {'met' if met else '**missed**'} |"
          for what, target, got, met in goals(r)], "",
    ])


# ---- main -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=64,
                        help="completions per server and round (default 64)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="load rounds per server, taken in turn (default 3)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--alternating", type=int, default=200,
                        help="alternating-model requests (default 200)")
    parser.add_argument("--swap-rounds", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="smoke run; writes under "
                        ".cache/bench-quick/")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.alternating, args.swap_rounds, args.rounds = 16, 20, 2, 1
    out = CACHE / "bench-quick" if args.quick else ROOT
    args.benchmarks = out / "BENCHMARKS.md"
    return args


def only_running(groups: dict[str, int], running: str) -> None:
    """SIGCONT one server's process group and SIGSTOP the others', so an idle
    server's background threads take nothing from the measured one."""
    for name, group in groups.items():
        os.killpg(group, signal.SIGCONT if name == running else signal.SIGSTOP)


async def interleaved(args: argparse.Namespace, servers: dict[str, tuple[str, int]]
                      ) -> dict[str, Load]:
    """Rounds of the same load on each server in turn (the other stopped), so
    drift in the machine's speed (it is shared) lands on both alike."""
    groups = {name: group for name, (_, group) in servers.items()}
    rounds: dict[str, list[Load]] = {name: [] for name in servers}
    try:
        for i in range(args.rounds + 1):
            for name, (url, _) in servers.items():
                only_running(groups, name)
                load = await run_load(url, ["small-a"], args.clients, args.requests,
                                      args.max_tokens)
                if not i:
                    # Warm-up, as large as a round: vLLM compiles for batch
                    # sizes it meets first (a first round ran at a third of
                    # its later speed).
                    continue
                rounds[name].append(load)
                print(f"  round {i} {name}: {load.tokens_per_s():.1f} tokens/s, "
                      f"TTFT p50 {load.ttft(50) * 1000:.1f} ms", flush=True)
    finally:
        for group in groups.values():
            os.killpg(group, signal.SIGCONT)
    return {name: Load.merged(loads) for name, loads in rounds.items()}


async def bench(args: argparse.Namespace) -> Results:
    print("vLLM api_server: starting")
    async with vllm_server("small-a", CACHE / "bench-serve-vllm.log") as (port, cold_s,
                                                                        vllm_group):
        print(f"  first completion after {cold_s:.1f} s; wcd: starting")
        os.killpg(vllm_group, signal.SIGSTOP)  # stopped whenever it is not measured
        try:
            async with wcd_daemon(CACHE / "bench-serve") as wcd:
                print(f"  READY=1 after {wcd.ready_s:.3f} s; load test")
                loads = await interleaved(args, {
                    "vllm": (f"http://127.0.0.1:{port}", vllm_group),
                    "wcd": (wcd.url, wcd.process.pid)})
                os.killpg(vllm_group, signal.SIGSTOP)
                return await wcd_figures(args, wcd, cold_s, loads)
        finally:
            os.killpg(vllm_group, signal.SIGCONT)


async def wcd_figures(args: argparse.Namespace, wcd: Wcd, cold_s: float,
                      loads: dict[str, Load]) -> Results:
    vllm, ours = loads["vllm"], loads["wcd"]
    figures = await asyncio.to_thread(daemon_figures, wcd, args.swap_rounds)
    await swap_latency(wcd, "wide-a", 1)  # compile the wide shape once, untimed
    same = await swap_latency(wcd, "small-b", args.swap_rounds)
    rebuild = await swap_latency(wcd, "wide-a", args.swap_rounds)
    print(f"  swap TTFT p50: same shape {pct(same, 50):.3f} s, rebuild "
          f"{pct(rebuild, 50):.3f} s; alternating requests")
    alternating = await run_load(wcd.url, ["small-a", "small-b"], args.clients,
                                 args.alternating, 8)
    if alternating.failures or ours.failures:
        print("  failures:", *(alternating.failures + ours.failures)[:5], sep="\n    ")
        print(tail(wcd.log))
    return Results(cold_s, vllm, ours, figures, same, rebuild, ours.ttft(50), alternating,
                   args)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = asyncio.run(bench(args))
    text = section(results)
    print("\n" + text)
    write_section(args.benchmarks, SECTION, text)
    print(f"wrote {shown(str(args.benchmarks))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
