"""Mixed load: two models of different shapes busy at once on one worker (issue 14).

    .venv/bin/python bench/mixed.py [--seconds N] [--config FILE] [--label TEXT] [--out FILE]

In one run on one daemon (the shipped etc/wcd.yaml, one CPU worker, unless
--config names another; its port and control socket are replaced by free ones):
(1) the long model (small-a) alone: 2 clients stream 200-token completions
    back to back (greedy, ignore_eos) for N s: output tokens/s;
(2) the short model (wide-a, another shape) alone: a streamed 8-token chat
    request arrives every 1.5 s for N s, whether or not the last one is done:
    TTFT p50/p99 (request sent to the first chunk that carries text);
(3) both at once for N s: both figures, the swaps the daemon did
    (wcd_swaps_total) and the errors.
Each alone phase follows untimed warm-up requests (vLLM compiles for the batch
sizes it meets first). What else ran on the box is recorded for each phase:
the CPU it took besides this script, the daemon and its worker, and the
1-minute load average.

The daemon and its worker import wcd from the tree this file lies in (cwd and
PYTHONPATH), so a checkout of an older commit with this file copied in
measures that commit with this checkout's venv.

Prints the "## Mixed load (bench/mixed.py)[: LABEL]" section; --out FILE puts
it into FILE in place of the section of the same title (e.g. BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import math
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil
import yaml

from common import (CACHE, ROOT, command_line, first_completion, free_port, machine,
                    metric_series, pct, shown, sse_chunks, stop_group, tail, write_section)

SECTION = "## Mixed load (bench/mixed.py)"
LONG, SHORT = "small-a", "wide-a"
LONG_CLIENTS, LONG_TOKENS = 2, 200
SHORT_EVERY_S, SHORT_TOKENS = 1.5, 8
WARMUP_REQUESTS = 3
REQUEST_TIMEOUT_S = 300.0


# ---- requests -----------------------------------------------------------------------------


@dataclass
class Requests:
    """What one model's clients got in a phase."""
    ttft_s: list[float] = field(default_factory=list)
    tokens: int = 0
    done: int = 0
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else float("nan")

    def ttft(self, q: float) -> float:
        return pct(self.ttft_s, q) if self.ttft_s else float("nan")


def long_request(model: str = LONG) -> tuple[str, dict]:
    return "/v1/completions", {
        "model": model, "prompt": "tell me a story about llamas", "max_tokens": LONG_TOKENS,
        "min_tokens": LONG_TOKENS, "ignore_eos": True, "temperature": 0}


def short_request(model: str = SHORT) -> tuple[str, dict]:
    return "/v1/chat/completions", {
        "model": model, "messages": [{"role": "user", "content": "what is the capital of france"}],
        "max_tokens": SHORT_TOKENS, "ignore_eos": True, "temperature": 0}


def chunk_text(chunk: dict) -> str:
    """The text a completions or chat chunk carries (chat's first chunk
    announces the role with empty content)."""
    if not chunk.get("choices"):
        return ""
    choice = chunk["choices"][0]
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


async def stream(session: aiohttp.ClientSession, url: str, request: tuple[str, dict],
                 into: Requests) -> None:
    """One streamed request; its TTFT and tokens, or its error, go `into`."""
    path, body = request
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first, tokens = None, 0
    try:
        async with session.post(url + path, json=body) as response:
            async for chunk in sse_chunks(response):
                if first is None and chunk_text(chunk):
                    first = time.perf_counter()
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        if first is None:
            raise RuntimeError("no text streamed")
    except (aiohttp.ClientError, asyncio.TimeoutError, RuntimeError) as exc:
        into.errors.append(f"{body['model']}: {type(exc).__name__}: {exc}"[:240])
        return
    into.ttft_s.append(first - started)
    into.tokens += tokens
    into.done += 1


async def long_load(url: str, seconds: float, model: str = LONG) -> Requests:
    """LONG_CLIENTS clients, each starting completions of `model` back to back
    until `seconds` are over; the wall runs until the last one ends."""
    into = Requests()
    started = time.perf_counter()

    async def client(session: aiohttp.ClientSession) -> None:
        while time.perf_counter() - started < seconds:
            await stream(session, url, long_request(model), into)

    async with session_for() as session:
        await asyncio.gather(*(client(session) for _ in range(LONG_CLIENTS)))
    into.wall_s = time.perf_counter() - started
    return into


async def short_load(url: str, seconds: float, model: str = SHORT) -> Requests:
    """A short request for `model` every SHORT_EVERY_S for `seconds` (open
    loop: arrivals do not wait for answers)."""
    into = Requests()
    started = time.perf_counter()
    async with session_for() as session:
        requests = []
        for k in range(math.ceil(seconds / SHORT_EVERY_S)):
            await asyncio.sleep(max(0.0, started + k * SHORT_EVERY_S - time.perf_counter()))
            requests.append(asyncio.create_task(stream(session, url, short_request(model),
                                                       into)))
        await asyncio.gather(*requests)
    into.wall_s = time.perf_counter() - started
    return into


def session_for() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S))


async def warm_up(url: str, request: tuple[str, dict], clients: int) -> None:
    """Untimed requests, `clients` at a time; any error ends the benchmark."""
    into = Requests()
    async with session_for() as session:
        for _ in range(WARMUP_REQUESTS):
            await asyncio.gather(*(stream(session, url, request, into) for _ in range(clients)))
    if into.errors:
        raise RuntimeError(f"warm-up failed: {into.errors[0]}")


# ---- the daemon ---------------------------------------------------------------------------


def run_config(source: Path, directory: Path, port: int) -> dict:
    """`source` with a free port, its own control socket and absolute paths
    (the copy lives elsewhere): relative model roots and model paths resolve
    as wcd resolves them, against the source's directory, a model path
    otherwise against the first model root."""
    config = yaml.safe_load(source.read_text()) or {}
    base = source.resolve().parent
    roots = [str(base / root) for root in config.get("model_roots") or []]
    for name in (LONG, SHORT):
        if name not in (config.get("models") or {}):
            raise SystemExit(f"{shown(str(source))} has no model {name!r}")
    for entry in config["models"].values():
        path = entry.get("path") if isinstance(entry, dict) else None
        if path and not Path(path).is_absolute():
            entry["path"] = str(base / path if (base / path).exists() or not roots
                                else Path(roots[0]) / path)
    config["model_roots"] = roots
    config["control"] = {**(config.get("control") or {}),
                         "socket": str(directory / "control.sock")}
    config["http"] = {**(config.get("http") or {}), "host": "127.0.0.1", "port": port}
    return config


def daemon_env() -> dict[str, str]:
    """This tree's wcd first on the path, for the daemon and the worker it spawns."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("WCD_API_KEYS", "WCD_CONFIG", "NOTIFY_SOCKET")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def wcd_imported_from() -> str:
    """Where the daemon's python finds wcd, with the daemon's cwd and path."""
    done = subprocess.run([sys.executable, "-c", "import wcd; print(wcd.__file__)"],
                          cwd=ROOT, env=daemon_env(), capture_output=True, text=True,
                          check=True)
    return str(Path(done.stdout.strip()).parent)


def tree_revision() -> str:
    done = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT,
                          capture_output=True, text=True)
    return done.stdout.strip() or "not a git checkout"


def swap_counts(metrics: str) -> Counter:
    """wcd_swaps_total on a /metrics page, by path where they succeeded, else by outcome."""
    counts: Counter = Counter()
    for labels, value in metric_series(metrics, "wcd_swaps_total"):
        key = labels.get("path") if labels.get("outcome") == "ok" else labels.get("outcome")
        counts[key or "?"] += value
    return counts


@dataclass
class Daemon:
    # Only its pid is read here (bench/gpu.py passes the Popen of its own daemon).
    process: asyncio.subprocess.Process | subprocess.Popen
    url: str
    log: Path

    async def swaps(self) -> Counter:
        """wcd_swaps_total so far, by path and outcome."""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            async with session.get(self.url + "/metrics") as response:
                return swap_counts(await response.text())

    def cpu_s(self) -> float:
        """CPU seconds of the daemon, its worker and theirs, and of this script."""
        processes = [psutil.Process(), psutil.Process(self.process.pid)]
        processes += processes[1].children(recursive=True)
        total = 0.0
        for process in processes:
            try:
                times = process.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system + times.children_user + times.children_system
        return total


async def start_daemon(config_path: Path, directory: Path) -> Daemon:
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    (directory / "wcd.yaml").write_text(yaml.safe_dump(run_config(config_path, directory,
                                                                   port)))
    log = directory / "wcd.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "wcd.daemon.main", "--config", str(directory / "wcd.yaml"),
            cwd=ROOT, env=daemon_env(), stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True)
    daemon = Daemon(process, f"http://127.0.0.1:{port}", log)
    try:
        await first_completion(daemon.url, LONG, log, lambda: process.returncode)
    except BaseException:
        await stop_group(process)
        raise
    return daemon


# ---- phases -------------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    long: Requests | None
    short: Requests | None
    swaps: Counter
    other_cores: float  # CPU others took, in cores busy on average
    load_avg: tuple[float, float]  # 1-minute load average at its start and end


def busy_s() -> float:
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


async def phase(name: str, daemon: Daemon, seconds: float, long: str | None,
                short: str | None) -> Phase:
    """`seconds` of the long load on model `long` and the short one on `short`
    (None: not that load)."""
    swaps, busy, ours, load = await daemon.swaps(), busy_s(), daemon.cpu_s(), os.getloadavg()[0]
    started = time.perf_counter()
    loads = await asyncio.gather(long_load(daemon.url, seconds, long) if long else none(),
                                 short_load(daemon.url, seconds, short) if short else none())
    wall = time.perf_counter() - started
    others = (busy_s() - busy) - (daemon.cpu_s() - ours)
    result = Phase(name, *loads, await daemon.swaps() - swaps, max(0.0, others) / wall,
                   (load, os.getloadavg()[0]))
    print(f"  {name}: {row(result)}", flush=True)
    return result


async def none() -> None:
    return None


async def phases(daemon: Daemon, seconds: float, long: str = LONG,
                 short: str = SHORT) -> list[Phase]:
    """The long load alone, the short load alone, both at once: `seconds` each."""
    await warm_up(daemon.url, long_request(long), LONG_CLIENTS)
    alone_long = await phase(f"{long} alone", daemon, seconds, long, None)
    await warm_up(daemon.url, short_request(short), 1)
    alone_short = await phase(f"{short} alone", daemon, seconds, None, short)
    mixed = await phase("both at once", daemon, seconds, long, short)
    if mixed.long.errors or mixed.short.errors:
        print(tail(daemon.log))
    return [alone_long, alone_short, mixed]


async def bench(args: argparse.Namespace) -> list[Phase]:
    daemon = await start_daemon(args.config, CACHE / "bench-mixed")
    try:
        return await phases(daemon, args.seconds)
    finally:
        await stop_group(daemon.process)


# ---- report -------------------------------------------------------------------------------


def swaps_cell(swaps: Counter) -> str:
    total = sum(swaps.values())
    if not total:
        return "0"
    return f"{total:.0f} ({', '.join(f'{k} {v:.0f}' for k, v in sorted(swaps.items()) if v)})"


def row(p: Phase) -> str:
    short = (f"{p.short.ttft(50):.3f} s / {p.short.ttft(99):.3f} s | {p.short.done} "
             f"({len(p.short.errors)})" if p.short else "— | —")
    long = (f"{p.long.tokens_per_s():.0f} | {p.long.done} ({len(p.long.errors)})"
            if p.long else "— | —")
    return (f"{short} | {long} | {swaps_cell(p.swaps)} | {p.other_cores:.2f} | "
            f"{p.load_avg[0]:.2f} → {p.load_avg[1]:.2f}")


def table(phases: list[Phase]) -> list[str]:
    return ["| phase | short TTFT p50 / p99 | short answered (failed) | long tokens/s | "
            "long answered (failed) | swaps | other CPU (cores) | load avg (1 min) |",
            "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
            *[f"| {p.name} | {row(p)} |" for p in phases]]


def summary(alone_long: Phase, alone_short: Phase, mixed: Phase, long: str = LONG,
            short: str = SHORT) -> str:
    ratio = mixed.long.tokens_per_s() / alone_long.long.tokens_per_s()
    slower = mixed.short.ttft(50) / alone_short.short.ttft(50)
    return (f"Both at once against each alone: {short} TTFT p50 {mixed.short.ttft(50):.3f} s "
            f"against {alone_short.short.ttft(50):.3f} s (×{slower:.0f}), p99 "
            f"{mixed.short.ttft(99):.3f} s against {alone_short.short.ttft(99):.3f} s; "
            f"{long} {mixed.long.tokens_per_s():.0f} tokens/s against "
            f"{alone_long.long.tokens_per_s():.0f} ({ratio:.0%}).")


def errors(phases: list[Phase]) -> list[str]:
    found = [(p.name, e) for p in phases for r in (p.long, p.short) if r for e in r.errors]
    if not found:
        return ["No request failed."]
    shown_errors = Counter(f"{name}: {error}" for name, error in found)
    return [f"{len(found)} requests failed:", "",
            *[f"- {error}" + (f" (×{n})" if n > 1 else "") for error, n in
              shown_errors.most_common(10)]]


def section(args: argparse.Namespace, phases: list[Phase], imported_from: str) -> str:
    now = datetime.datetime.now(datetime.timezone.utc)
    title = SECTION + (f": {args.label}" if args.label else "")
    return "\n".join([
        title, "",
        f"Measured {now:%Y-%m-%d %H:%M} UTC on {machine()}; Python "
        f"{platform.python_version()}. Command: `{command_line()}`.", "",
        f"wcd from `{imported_from}` (tree at {tree_revision()}), config "
        f"`{shown(str(args.config))}` with a free port and its own control socket. "
        f"{LONG} (the long model): {LONG_CLIENTS} clients streaming {LONG_TOKENS}-token "
        "completions back to back (greedy, `ignore_eos`, `min_tokens`), output tokens over "
        f"the wall until the last ends. {SHORT} (the short model, another shape): a "
        f"streamed {SHORT_TOKENS}-token chat request every {SHORT_EVERY_S:g} s whether or "
        "not the last was answered; TTFT is the request sent to the first chunk with text. "
        f"Each phase {args.seconds:g} s on one daemon, in this order; the alone phases "
        "follow untimed warm-up requests. Swaps: wcd_swaps_total during the phase, by "
        "path. Other CPU: cores busy on average with anything but this script, the daemon "
        "and its worker (the box is shared).", "",
        *table(phases), "",
        summary(*phases), "",
        *errors(phases), "",
    ])


# ---- main ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="length of each phase (default %(default)g)")
    parser.add_argument("--config", type=Path, default=ROOT / "etc" / "wcd.yaml",
                        help="the wcd.yaml to run with (default: etc/wcd.yaml)")
    parser.add_argument("--label", default="", help="text for the section header")
    parser.add_argument("--out", type=Path,
                        help="put the section into this file (e.g. BENCHMARKS.md)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    imported_from = wcd_imported_from()
    print(f"wcd from {imported_from}: starting with {shown(str(args.config))}", flush=True)
    phases = asyncio.run(bench(args))
    text = section(args, phases, imported_from)
    print("\n" + text)
    if args.out:
        write_section(args.out, text.splitlines()[0], text)
        print(f"wrote {shown(str(args.out))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
