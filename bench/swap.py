"""Swap benchmark: a cold vLLM API server against warm swaps in one wcd worker.

    .venv/bin/python bench/swap.py [--swaps N] [--rss-swaps N] [--cold-runs N] [--quick]

(a) cold: launch of `vllm.entrypoints.openai.api_server` to its first completion;
(b) warm: same-shape (small-a <-> small-b) and rebuild (small-a <-> wide-a) swaps
    in one WorkerProcess, p50/p90 per phase and end to end;
(c) the worker's RSS over many swaps through small-a, small-b and wide-a.

Prints the results and writes them as the "## Swap (bench/swap.py)" section of
BENCHMARKS.md (other sections are kept) and as bench/swap-phases.png. A --quick
smoke run writes under .cache/bench-quick/ instead, so it never replaces the
committed figures.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import shlex
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np

from common import (CACHE, ENGINE_ARGS, MODELS, ROOT, command_line, machine, pct, shown,
                    vllm_server, vllm_server_command, write_section)
from wcd.daemon.worker_process import WorkerOptions, WorkerProcess
from wcd.workers import protocol as p

matplotlib.use("Agg")  # headless: CI and servers have no display
import matplotlib.pyplot as plt  # noqa: E402  (must follow the backend choice)

SECTION = "## Swap (bench/swap.py)"
SAME, REBUILD = "same_shape", "rebuild"
SAME_PAIR, REBUILD_PAIR = ("small-b", "small-a"), ("wide-a", "small-a")
RSS_CYCLE = ("small-b", "wide-a", "small-a")
HOST_CACHE = 256 << 20
MB = 1_000_000


@dataclass(frozen=True)
class Goal:
    what: str
    target: str
    measured: str
    met: bool


@dataclass(frozen=True)
class Timed:
    """One swap: the worker's own phase timings and the caller's wall time."""

    target: str
    done: p.OpDone
    wall_s: float


@dataclass
class Results:
    cold_s: list[float]
    ready: p.Ready
    first_load: Timed
    warmup: list[Timed]
    swaps: dict[str, list[Timed]]
    rss: list[int]
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]


# ---- (a) cold start ----------------------------------------------------------------


async def cold_start_s(log_path: Path) -> float:
    """Seconds from launching a fresh vLLM API server to its first completion."""
    async with vllm_server("small-a", log_path) as (_, seconds, _group):
        return seconds


# ---- (b) and (c) warm swaps ----------------------------------------------------------


def spec(name: str) -> p.ModelSpec:
    return p.ModelSpec(name, str(MODELS / name), ENGINE_ARGS)


async def swap_and_serve(worker: WorkerProcess, name: str,
                         expected_path: str | None = None) -> Timed:
    """Swap to `name`, then prove it serves with one greedy 8-token generation
    (outside the timing)."""
    started = time.perf_counter()
    done = await worker.swap(spec(name))
    timed = Timed(name, done, time.perf_counter() - started)
    if expected_path is not None and done.path != expected_path:
        raise RuntimeError(f"swap to {name} took path {done.path!r}, not {expected_path!r}")
    tokens: list[int] = []
    request = p.Generate(uuid.uuid4().hex, name, [p.Prompt(prompt="hello world")],
                         {"temperature": 0, "max_tokens": 8})
    async for output in worker.generate(request):
        tokens += output.token_ids
    if not tokens:
        raise RuntimeError(f"{name} generated nothing after its swap")
    return timed


async def swap_series(worker: WorkerProcess, pair: tuple[str, str], path: str,
                      count: int) -> list[Timed]:
    series = []
    for i in range(count):
        timed = await swap_and_serve(worker, pair[i % 2], path)
        series.append(timed)
        print(f"  {path} {i + 1}/{count} -> {timed.target}: {timed.wall_s * 1000:.1f} ms")
    return series


async def rss_series(worker: WorkerProcess, count: int) -> list[int]:
    rss = []
    for i in range(count):
        timed = await swap_and_serve(worker, RSS_CYCLE[i % len(RSS_CYCLE)])
        rss.append((await worker.stats()).rss_bytes)
        print(f"  rss {i + 1}/{count} -> {timed.target} ({timed.done.path}): "
              f"{rss[-1] / MB:.1f} MB")
    return rss


async def warm(args: argparse.Namespace, cold_s: list[float],
               load_before: tuple[float, float, float]) -> Results:
    # vLLM's INFO lines for every rebuild would bury the progress lines.
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"}
    # With etc/wcd.yaml's host cache: after the first round every swap's
    # weights come from host memory, as they do in service.
    worker = await WorkerProcess.start(WorkerOptions(p.Setup(host_cache_bytes=HOST_CACHE),
                                                     env=env))
    try:
        print(f"worker ready in {worker.ready.startup_s:.1f} s; loading small-a")
        first_load = await swap_and_serve(worker, "small-a", REBUILD)
        print("untimed first round, so that each shape has been compiled once:")
        warmup = [await swap_and_serve(worker, name) for name in ("small-b", "small-a", "wide-a",
                                                         "small-a")]
        for timed in warmup:
            print(f"  -> {timed.target} ({timed.done.path}): {timed.wall_s:.3f} s")
        swaps = {SAME: await swap_series(worker, SAME_PAIR, SAME, args.swaps),
                 REBUILD: await swap_series(worker, REBUILD_PAIR, REBUILD, args.swaps)}
        rss = await rss_series(worker, args.rss_swaps)
    finally:
        await worker.stop()
    return Results(cold_s, worker.ready, first_load, warmup, swaps, rss, load_before,
                   os.getloadavg())


# ---- figures -----------------------------------------------------------------------


def phases_of(series: list[Timed]) -> list[str]:
    seen = {name for timed in series for name in timed.done.phases}
    return [*[ph for ph in p.SWAP_PHASES if ph in seen], *sorted(seen - set(p.SWAP_PHASES))]


def phase_values(series: list[Timed], phase: str) -> list[float]:
    return [timed.done.phases.get(phase, 0.0) for timed in series]


def end_to_end(series: list[Timed]) -> list[float]:
    return [timed.wall_s for timed in series]


def cold_median(results: Results) -> float:
    return float(np.median(results.cold_s))


def speedup(results: Results, path: str) -> float:
    return cold_median(results) / pct(end_to_end(results.swaps[path]), 50)


def rss_figures(rss: list[int]) -> dict[str, float]:
    # The first round (one swap to each model) sets the steady state; growth
    # after it is what would accumulate over a long-lived worker's life.
    after_round = rss[len(RSS_CYCLE) - 1]
    return {"first": rss[0] / MB, "after first round": after_round / MB,
            "last": rss[-1] / MB, "max": max(rss) / MB,
            "growth": (rss[-1] - after_round) / MB}


def goals(results: Results) -> list[Goal]:
    same = pct(end_to_end(results.swaps[SAME]), 50)
    rebuild = pct(end_to_end(results.swaps[REBUILD]), 50)
    growth = rss_figures(results.rss)["growth"]
    in_worker = pct([t.done.total_s for t in results.swaps[SAME]], 50)
    return [
        Goal("same-shape swap from the host cache p50, in the worker", "≤ 0.02 s",
             f"{in_worker:.4f} s", in_worker <= 0.02),
        Goal("same-shape swap p50, end to end", "≤ 0.05 s (≥ 400× cold)",
             f"{same:.4f} s ({speedup(results, SAME):.0f}×)", same <= 0.05),
        Goal("different-shape swap p50, shape compiled once", "≤ 0.5 s (≥ 48× cold)",
             f"{rebuild:.3f} s ({speedup(results, REBUILD):.1f}×)", rebuild <= 0.5),
        Goal(f"worker RSS growth over {len(results.rss)} swaps", "≤ 20 MB",
             f"{growth:+.1f} MB", growth <= 20),
    ]


# ---- report ------------------------------------------------------------------------


def weights_sources(results: Results) -> str:
    sources = Counter(t.done.weights for series in results.swaps.values() for t in series)
    return ", ".join(f"{n} from {source}" for source, n in sources.items())


def phase_table(results: Results) -> list[str]:
    same, rebuild = results.swaps[SAME], results.swaps[REBUILD]
    rows = ["| phase | same_shape p50 | same_shape p90 | rebuild p50 | rebuild p90 |",
            "| --- | ---: | ---: | ---: | ---: |"]

    def row(label: str, a: list[float], b: list[float]) -> str:
        return (f"| {label} | {pct(a, 50) * 1000:.1f} ms | {pct(a, 90) * 1000:.1f} ms | "
                f"{pct(b, 50) * 1000:.1f} ms | {pct(b, 90) * 1000:.1f} ms |")

    for phase in phases_of(same + rebuild):
        rows.append(row(phase, phase_values(same, phase), phase_values(rebuild, phase)))
    rows.append(row("total (worker)", [t.done.total_s for t in same],
                    [t.done.total_s for t in rebuild]))
    rows.append(row("**end to end (caller)**", end_to_end(same), end_to_end(rebuild)))
    return rows


def section(results: Results, plot_link: str) -> str:
    cold = ", ".join(f"{s:.1f} s" for s in results.cold_s)
    swaps = len(results.swaps[SAME])
    warmup = "; ".join(f"→ {t.target} {t.done.path} {t.wall_s:.3f} s" for t in results.warmup)
    rss = rss_figures(results.rss)
    load = " → ".join("/".join(f"{x:.1f}" for x in avg)
                      for avg in (results.load_before, results.load_after))
    lines = [
        SECTION, "",
        f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on "
        f"{machine()}; vLLM {results.ready.vllm_version}, torch "
        f"{results.ready.torch_version}, Python {platform.python_version()}. "
        f"Load average (1/5/15 min) before → after the run: {load} (the machine is "
        "shared; other work on it shows in the p90s).", "",
        f"Command: `{command_line()}` (`make bench`). Engine args for every model: "
        f"`{json.dumps(ENGINE_ARGS)}`.", "",
        "### Cold start (baseline)", "",
        f"`{shlex.join(['python', *vllm_server_command('small-a', 'PORT')[1:]])}` "
        "with vLLM's default multiprocessing, from launch to its first successful "
        f"`POST /v1/completions`: {cold} (median {cold_median(results):.1f} s over "
        f"{len(results.cold_s)} run(s)).", "",
        "### Warm swaps (one wcd worker)", "",
        f"Worker start (import torch and vLLM, init device): {results.ready.startup_s:.1f} s; "
        f"first load of small-a: {results.first_load.wall_s:.2f} s. An untimed first round "
        f"compiled each shape once: {warmup}. Then {swaps} same-shape swaps "
        f"(small-a ↔ small-b) and {swaps} different-shape swaps (small-a ↔ wide-a), "
        "each followed by one greedy 8-token generation, outside the timing, to prove the "
        "model serves. The worker has a 256 MiB host cache (etc/wcd.yaml's), so the timed "
        f"swaps take their weights from host memory ({weights_sources(results)}). "
        "Phases as the worker times them; end to end is the caller's wall "
        "time around `WorkerProcess.swap`.", "",
        *phase_table(results), "",
        f"Speed-up over the cold start (cold median / end-to-end p50): same shape "
        f"{speedup(results, SAME):.0f}×, different shape {speedup(results, REBUILD):.1f}×.", "",
        f"### Worker RSS over {len(results.rss)} swaps (small-b, wide-a, small-a in turn)", "",
        "After the swaps above, in the same worker: "
        + ", ".join(f"{k} {v:.1f} MB" for k, v in rss.items() if k != "growth")
        + f"; growth (last − after first round) {rss['growth']:+.1f} MB.", "",
        "### Goals", "",
        "| goal | target | measured | |", "| --- | --- | --- | --- |",
        *[f"| {g.what} | {g.target} | {g.measured} | {'met' if g.met else '**missed**'} |"
          for g in goals(results)], "",
        f"![per-phase p50 of each swap path]({plot_link})", "",
    ]
    return "\n".join(lines)


def plot(results: Results, path: Path) -> None:
    series = results.swaps[SAME] + results.swaps[REBUILD]
    phases = phases_of(series)
    colors = dict(zip(phases, plt.get_cmap("tab10").colors))
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.5))
    for ax, name in zip(axes, (SAME, REBUILD)):
        bottom = 0.0
        for phase in phases:
            height = pct(phase_values(results.swaps[name], phase), 50) * 1000
            ax.bar(name, height, bottom=bottom, color=colors[phase], label=phase, width=0.5)
            bottom += height
        e2e = pct(end_to_end(results.swaps[name]), 50)
        ax.set_title(f"{name}: {e2e * 1000:.1f} ms end to end p50\n"
                     f"{speedup(results, name):.0f}× faster than a cold start")
        ax.set_ylabel("ms (p50 per phase, stacked)")
    handles, labels = axes[0].get_legend_handles_labels()
    # Top of the stack first, as the bars read.
    axes[1].legend(handles[::-1], labels[::-1], loc="upper left",
                   bbox_to_anchor=(1.02, 1), title="phase")
    fig.suptitle(f"wcd swap phases (cold vLLM start: {cold_median(results):.1f} s)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- main --------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--swaps", type=int, default=20,
                        help="timed swaps per path (default 20)")
    parser.add_argument("--rss-swaps", type=int, default=100,
                        help="swaps of the RSS run (default 100)")
    parser.add_argument("--cold-runs", type=int, default=1,
                        help="cold vLLM starts to time (default 1)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 5 swaps, 20 RSS swaps, 1 cold run; writes under "
                             ".cache/bench-quick/")
    args = parser.parse_args(argv)
    if args.quick:
        args.swaps, args.rss_swaps, args.cold_runs = 5, 20, 1
    out = CACHE / "bench-quick" if args.quick else ROOT
    args.benchmarks = out / "BENCHMARKS.md"
    args.plot = out / "bench" / "swap-phases.png"
    if args.swaps < 1 or args.cold_runs < 1 or args.rss_swaps < len(RSS_CYCLE):
        parser.error(f"need --swaps ≥ 1, --cold-runs ≥ 1 and --rss-swaps ≥ {len(RSS_CYCLE)}")
    return args


async def bench(args: argparse.Namespace) -> Results:
    CACHE.mkdir(exist_ok=True)
    load_before = os.getloadavg()
    cold_s = []
    for run in range(args.cold_runs):
        print(f"cold start {run + 1}/{args.cold_runs}: vLLM API server, log in "
              f".cache/bench-cold.log")
        cold_s.append(await cold_start_s(CACHE / "bench-cold.log"))
        print(f"  first completion after {cold_s[-1]:.2f} s")
    return await warm(args, cold_s, load_before)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = asyncio.run(bench(args))
    plot(results, args.plot)
    text = section(results, os.path.relpath(args.plot, args.benchmarks.parent))
    print("\n" + text)
    write_section(args.benchmarks, SECTION, text)
    print(f"wrote {shown(str(args.benchmarks))} and {shown(str(args.plot))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
