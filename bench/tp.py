"""Tensor-parallel group benchmark on CPU: vLLM's own TP=2 API server, cold,
against swaps in one wcd worker group of two processes.

    .venv/bin/python bench/tp.py [--rounds N]

(a) cold: launch of `vllm.entrypoints.openai.api_server --tensor-parallel-size 2`
    to its first completion;
(b) warm, in one WorkerProcess with tensor_parallel_size 2 (a leader and one
    follower): same-shape swaps at TP=2 (small-a <-> small-b), rebuilds at TP=2
    (small-a <-> wide-a), and re-partitions (small-a at TP=2 <-> small-a at TP=1,
    the group's world destroyed and formed again), N of each, p50/p90; both
    PIDs checked unchanged at the end.

Writes the "## TP groups on CPU (bench/tp.py)" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import time
import uuid
from unittest import mock

from common import (CACHE, ENGINE_ARGS, MODELS, ROOT, command_line, machine, pct,
                    vllm_server, write_section)
from wcd.daemon.worker_process import WorkerOptions, WorkerProcess
from wcd.workers import protocol as p

SECTION = "## TP groups on CPU (bench/tp.py)"
# vLLM's automatic OpenMP binding wants a NUMA node per rank; one core each.
SERVER_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
SERIES = {  # label: (models swapped to in turn, each with its TP size)
    "same shape, TP=2": [("small-b", 2), ("small-a", 2)],
    "rebuild, TP=2": [("wide-a", 2), ("small-a", 2)],
    "re-partition, TP=2 <-> TP=1": [("small-a", 1), ("small-a", 2)],
}


async def cold_start_s() -> float:
    with mock.patch.dict(os.environ, SERVER_ENV):  # the server inherits os.environ
        async with vllm_server("small-a", CACHE / "bench-tp-cold.log", MODELS / "small-a",
                               {**ENGINE_ARGS, "tensor_parallel_size": 2}) as (_, seconds, _):
            return seconds


async def swap(worker: WorkerProcess, name: str, tp: int) -> tuple[str, float]:
    """Swap, then prove the model serves (outside the timing)."""
    args = {**ENGINE_ARGS, "tensor_parallel_size": tp}
    started = time.perf_counter()
    done = await worker.swap(p.ModelSpec(name, str(MODELS / name), args))
    seconds = time.perf_counter() - started
    request = p.Generate(uuid.uuid4().hex, name, [p.Prompt(prompt="hello world")],
                         {"temperature": 0, "max_tokens": 4})
    if not [t async for out in worker.generate(request) for t in out.token_ids]:
        raise RuntimeError(f"{name} at TP={tp} generated nothing after its swap")
    return done.path, seconds


async def warm(rounds: int) -> dict:
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"}
    worker = await WorkerProcess.start(WorkerOptions(p.Setup(tensor_parallel_size=2), env=env))
    pids = [worker.pid, *worker.ready.group_pids]
    result = {"startup_s": worker.ready.startup_s, "series": {}}
    try:
        await swap(worker, "small-a", 2)
        for targets in SERIES.values():  # each shape and size compiled once, untimed
            for name, tp in targets:
                await swap(worker, name, tp)
        for label, targets in SERIES.items():
            timed = []
            for i in range(rounds):
                name, tp = targets[i % len(targets)]
                path, seconds = await swap(worker, name, tp)
                timed.append(seconds)
                print(f"  {label} {i + 1}/{rounds} -> {name} TP={tp}: {path} {seconds:.3f} s")
            result["series"][label] = {"path": path, "seconds": timed}
        # One WorkerProcess throughout: its ranks are the ones it started.
        result["pids_kept"] = all(_alive(pid) for pid in pids)
    finally:
        await worker.stop()
    return result


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def section(cold_s: float, warm_result: dict, rounds: int) -> str:
    rows = [f"| {label} | {s['path']} | {pct(s['seconds'], 50):.3f} | "
            f"{pct(s['seconds'], 90):.3f} | {cold_s / pct(s['seconds'], 50):.0f}× |"
            for label, s in warm_result["series"].items()]
    return "\n".join([
        SECTION, "",
        f"Machine: {machine()}. Date: {datetime.date.today().isoformat()}. "
        f"Command: `{command_line()}`.", "",
        f"Baseline, in the same run: vLLM's own API server with "
        f"`--tensor-parallel-size 2` (its multiprocess executor, a fresh process per "
        f"rank) took {cold_s:.1f} s from launch to its first completion.", "",
        f"wcd: one worker with `tensor_parallel_size: 2` (a leader and one warm "
        f"follower; ready in {warm_result['startup_s']:.1f} s), {rounds} timed swaps "
        f"a row after an untimed round, each proven by a generation outside the timing. "
        f"Both PIDs unchanged at the end: "
        f"{'yes' if warm_result['pids_kept'] else '**no**'}.", "",
        "| swaps | path | p50 (s) | p90 (s) | cold / p50 |",
        "| --- | --- | ---: | ---: | ---: |", *rows, "",
        "A re-partition destroys the group's gloo world (TP=2 -> TP=1: the leader "
        "serves alone with a one-rank world of its own) or forms a new one on a fresh "
        "port (TP=1 -> TP=2), and rebuilds the engine from the compile cache; no "
        "process starts.", "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="timed swaps a row (default 10)")
    args = parser.parse_args(argv)
    CACHE.mkdir(exist_ok=True)
    print("cold: vLLM API server, TP=2, log in .cache/bench-tp-cold.log")
    cold_s = asyncio.run(cold_start_s())
    print(f"  first completion after {cold_s:.1f} s")
    warm_result = asyncio.run(warm(args.rounds))
    text = section(cold_s, warm_result, args.rounds)
    print("\n" + text)
    write_section(ROOT / "BENCHMARKS.md", SECTION, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
