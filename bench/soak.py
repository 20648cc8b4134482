"""Soak: mixed concurrent requests across three models with swaps every few
seconds, against one wcd daemon; failures, latency and memory over time.

    .venv/bin/python bench/soak.py [--minutes 3] [--clients 6] [--swap-every 2]

Clients stream short completions, each for a model picked at random among
small-a, small-b (same shape) and wide-a (another shape), so most requests
also load their model on demand; meanwhile `wcctl swap` rotates the served
model every --swap-every seconds. The daemon's and the worker's RSS are
sampled every 5 s. Writes the "## Soak (bench/soak.py)" section of
BENCHMARKS.md (--quick: under .cache/bench-quick/).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import random
import statistics
import time
from dataclasses import dataclass, field

import aiohttp

from common import CACHE, ROOT, command_line, machine, pct, shown, write_section
from serve import Wcd, stream_completion, wcd_daemon

SECTION = "## Soak (bench/soak.py)"
MODELS = ("small-a", "small-b", "wide-a")
MB = 1_000_000


@dataclass
class Soak:
    latencies_s: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    swaps: int = 0
    swap_failures: list[str] = field(default_factory=list)
    rss: list[tuple[float, int, int]] = field(default_factory=list)  # (t, daemon, worker)


def rss_of(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * 4096


async def clients(wcd: Wcd, soak: Soak, count: int, until: float) -> None:
    async def client(seed: int) -> None:
        rng = random.Random(seed)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
            while time.monotonic() < until:
                model = rng.choice(MODELS)
                try:
                    sample = await stream_completion(session, wcd.url, model, "hello there", 16)
                    soak.latencies_s.append(sample.total_s)
                except (aiohttp.ClientError, asyncio.TimeoutError, RuntimeError) as exc:
                    soak.failures.append(f"{model}: {exc}")

    await asyncio.gather(*(client(i) for i in range(count)))


async def swapper(wcd: Wcd, soak: Soak, every_s: float, until: float) -> None:
    i = 0
    while time.monotonic() < until:
        await asyncio.sleep(every_s)
        try:
            await asyncio.to_thread(wcd.wcctl, "swap", MODELS[i % len(MODELS)])
            soak.swaps += 1
        except RuntimeError as exc:
            soak.swap_failures.append(str(exc))
        i += 1


async def sampler(wcd: Wcd, soak: Soak, until: float) -> None:
    started = time.monotonic()
    while time.monotonic() < until:
        _, done = await asyncio.to_thread(wcd.wcctl, "ps", "--json")
        worker = json.loads(done.stdout)["workers"][0]
        if worker.get("pid"):
            soak.rss.append((time.monotonic() - started, rss_of(wcd.process.pid),
                             rss_of(worker["pid"])))
        await asyncio.sleep(5)


async def soak_run(args: argparse.Namespace) -> Soak:
    soak = Soak()
    async with wcd_daemon(CACHE / "bench-soak") as wcd:
        print(f"wcd ready; soaking for {args.minutes:g} min")
        until = time.monotonic() + args.minutes * 60
        await asyncio.gather(clients(wcd, soak, args.clients, until),
                             swapper(wcd, soak, args.swap_every, until),
                             sampler(wcd, soak, until))
    return soak


def drift(values: list[int], skip: int) -> float:
    """Median of the last third minus median of the first third after the
    warm-up, in MB: single samples swing with whichever model is loaded
    when they are taken (wide-a's engine is ~80 MB larger than small-a's)."""
    steady = values[skip:] or values
    third = max(1, len(steady) // 3)
    return (statistics.median(steady[-third:]) - statistics.median(steady[:third])) / MB


def section(args: argparse.Namespace, soak: Soak) -> str:
    daemon = [r[1] for r in soak.rss]
    worker = [r[2] for r in soak.rss]
    skip = 6  # the first 30 s: every shape built once, caches filled
    failed = len(soak.failures) + len(soak.swap_failures)
    rows = [
        ("failed requests and swaps", "0", str(failed), failed == 0),
        ("worker RSS drift (median of the last third − of the first, after 30 s)", "≤ 20 MB",
         f"{drift(worker, skip):+.1f} MB", abs(drift(worker, skip)) <= 20),
        ("daemon RSS drift (likewise)", "≤ 20 MB", f"{drift(daemon, skip):+.1f} MB",
         abs(drift(daemon, skip)) <= 20),
    ]
    now = datetime.datetime.now(datetime.timezone.utc)
    return "\n".join([
        SECTION, "",
        f"Measured {now:%Y-%m-%d %H:%M} UTC on {machine()}. Command: `{command_line()}`.", "",
        f"{args.minutes:g} minutes, {args.clients} clients streaming 16-token completions "
        f"for small-a, small-b or wide-a at random (most of them loading their model on "
        f"demand), and `wcctl swap` every {args.swap_every:g} s: "
        f"{len(soak.latencies_s)} requests, {len(soak.failures)} failed; {soak.swaps} "
        f"`wcctl` swaps, {len(soak.swap_failures)} failed. Request latency (swaps included) "
        f"p50 {pct(soak.latencies_s, 50):.3f} s, p99 {pct(soak.latencies_s, 99):.3f} s.", "",
        "RSS every 5 s (MB), daemon / worker: "
        + ", ".join(f"{t:.0f}s {d / MB:.0f}/{w / MB:.0f}" for t, d, w in soak.rss[::3]) + ".",
        "",
        "| goal | target | measured | |", "| --- | --- | --- | --- |",
        *[f"| {what} | {target} | {got} | {'met' if ok else '**missed**'} |"
          for what, target, got, ok in rows], "",
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--swap-every", type=float, default=2.0)
    parser.add_argument("--quick", action="store_true", help="1 minute; writes under "
                        ".cache/bench-quick/")
    args = parser.parse_args()
    if args.quick:
        args.minutes = 1.0
    benchmarks = (CACHE / "bench-quick" if args.quick else ROOT) / "BENCHMARKS.md"
    soak = asyncio.run(soak_run(args))
    for failure in (soak.failures + soak.swap_failures)[:5]:
        print("failure:", failure)
    text = section(args, soak)
    print("\n" + text)
    write_section(benchmarks, SECTION, text)
    print(f"wrote {shown(str(benchmarks))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
