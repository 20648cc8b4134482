"""wcd on a Ray cluster (wcd.serve): Serve's multiplexed routing against the
same replicas behind plain round-robin, and one replica against one daemon.

    .venv/bin/python bench/cluster.py [--requests 160] [--clients 8]

Four models (small-a, small-b, wide-a and small-c, which this generates
under .cache/), each replica one wcd daemon with one CPU worker holding two
residents (policy.max_resident: 2). The same seeded stream of requests (a
random model each, streamed, greedy, `ignore_eos`) goes to:

1. the Serve application with two replicas (Ray on this machine): requests
   routed by model (`multiplexed_model_id`);
2. two daemons started as a replica starts its own (replica_daemon), the
   client taking them in turn, as a generic round-robin load balancer does;
3. the Serve application with one replica and a single wcd daemon (as in
   2), each under a two-model load that fits its residents: what Serve's
   path costs a replica.

Swaps are model loads into a worker during the measured requests (warm-up
excluded): the replicas' X-WCD-Replica-Loads headers for Serve,
wcd_swaps_total for the daemons. Writes BENCHMARKS.md's "Cluster" section.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (CACHE, ENGINE_ARGS, MODELS, ROOT, command_line, free_port,  # noqa: E402
                    machine, metric_series, pct, sse_chunks, write_section)

SECTION = "## Cluster (bench/cluster.py)"
GPU_SECTION = "## Cluster on CUDA (bench/cluster.py --device cuda:0)"
EXTRA_MODELS = CACHE / "cluster-models"
ALL_MODELS = ("small-a", "small-b", "wide-a", "small-c")
PAIR = ("small-a", "small-b")
PROMPTS = ["hello world", "the quick brown fox", "tell me a story about llamas",
           "what is the capital of france"]


@dataclass
class Run:
    """One load's requests: their TTFTs and tokens, failures, loads, wall time."""

    ttft_s: list[float] = field(default_factory=list)
    tokens: int = 0
    failures: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    swaps: int = 0
    replicas: dict[str, int] = field(default_factory=dict)  # replica -> loads seen

    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    def requests(self) -> int:
        return len(self.ttft_s) + len(self.failures)


def config(directory: Path, device: str) -> Path:
    path = directory / "wcd.yaml"
    # Every replica's engine shares the one GPU: none may ask for most of it.
    shared_gpu = {} if device == "cpu" else {"gpu_memory_utilization": 0.2}
    path.write_text(yaml.safe_dump({
        "log_level": "warning",
        "workers": [{"device": device}],
        "model_roots": [str(MODELS), str(EXTRA_MODELS)],
        "defaults": {**ENGINE_ARGS, **shared_gpu},
        "models": {name: {"path": str(_path_of(name))} for name in ALL_MODELS},
        "policy": {"max_resident": 2, "host_cache_bytes": 256 << 20, "min_resident": 0,
                   "queue_wait": "300s"},
    }))
    return path


def _path_of(model: str) -> Path:
    return (EXTRA_MODELS if model == "small-c" else MODELS) / model


def ensure_models() -> None:
    if not (EXTRA_MODELS / "small-c" / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "wcd.workers.demo_models", str(EXTRA_MODELS),
                        "--names", "small-c"], check=True, cwd=ROOT)


def request_stream(count: int, models: tuple[str, ...], seed: int = 0) -> list[tuple[str, str]]:
    """(model, prompt) per request: a random model each, the same for every mode."""
    chooser = random.Random(seed)
    return [(chooser.choice(models), PROMPTS[i % len(PROMPTS)]) for i in range(count)]


async def run_load(urls: list[str], requests: list[tuple[str, str]], clients: int,
                   max_tokens: int) -> Run:
    """`clients` concurrent clients take the requests in order; request i goes
    to urls[i % len(urls)] (one URL: Serve's ingress; several: round-robin)."""
    run = Run()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(requests)):
        queue.put_nowait(i)

    async def client(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            model, prompt = requests[i]
            try:
                await _one(session, urls[i % len(urls)], model, prompt, max_tokens, run)
            except (aiohttp.ClientError, asyncio.TimeoutError, RuntimeError) as exc:
                run.failures.append(f"{model}: {exc}")

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        run.wall_s = time.perf_counter() - started
    return run


async def _one(session: aiohttp.ClientSession, url: str, model: str, prompt: str,
               max_tokens: int, run: Run) -> None:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first, tokens = None, 0
    async with session.post(url + "/v1/completions", json=body) as response:
        replica = response.headers.get("X-WCD-Replica")
        if replica is not None:
            loads = int(response.headers["X-WCD-Replica-Loads"])
            run.replicas[replica] = max(run.replicas.get(replica, 0), loads)
        async for chunk in sse_chunks(response):
            if first is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                first = time.perf_counter() - started
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    if first is None:
        raise RuntimeError("no tokens")
    run.ttft_s.append(first)
    run.tokens += tokens


async def measured(urls: list[str], requests: list[tuple[str, str]], args,
                   swaps: Callable[[Run], Awaitable[int]]) -> Run:
    """A warm-up pass (every model once per URL), then the measured load, whose
    swaps are what `swaps` counted after it less what it counted before."""
    warm = [(model, PROMPTS[0]) for model in sorted({m for m, _ in requests})
            for _ in urls]
    warmed = await run_load(urls, warm, 1, 4)
    if warmed.failures:
        raise RuntimeError(f"warm-up failed: {warmed.failures[:3]}")
    before = await swaps(warmed)
    run = await run_load(urls, requests, args.clients, args.max_tokens)
    run.swaps = await swaps(run) - before
    return run


# ---- Serve ------------------------------------------------------------------------------


class ServeApp:
    """wcd.serve on a local Ray instance; `deploy` (re)deploys it."""

    def __init__(self, config_path: Path, device: str):
        import ray
        from ray import serve

        self.ray, self.serve, self.config = ray, serve, str(config_path)
        # On a GPU the replicas share it: a fraction each.
        self.gpus = 0 if device == "cpu" else 1
        ray.init(num_cpus=4, num_gpus=self.gpus, include_dashboard=False, log_to_driver=False)
        self.port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        self.url = f"http://127.0.0.1:{self.port}"

    def deploy(self, replicas: int) -> None:
        from wcd.serve.deployments import ACTOR_OPTIONS, ModelReplica, OpenAIIngress

        models = ModelReplica.options(num_replicas=replicas, ray_actor_options={
            **ACTOR_OPTIONS, "num_cpus": 1, "num_gpus": self.gpus / replicas})
        self.serve.run(OpenAIIngress.bind(models.bind(self.config), self.config),
                       route_prefix="/")

    def close(self) -> None:
        self.serve.shutdown()
        self.ray.shutdown()


async def serve_run(app: ServeApp, replicas: int, requests, args) -> Run:
    await asyncio.to_thread(app.deploy, replicas)
    seen: dict[str, int] = {}

    async def loads(run: Run) -> int:
        """The replicas' loads so far, as their latest answers said."""
        seen.update(run.replicas)
        return sum(seen.values())

    return await measured([app.url], requests, args, loads)


# ---- daemons ----------------------------------------------------------------------------


async def daemons_run(config_path: Path, count: int, requests, args) -> Run:
    from wcd.serve.replica_daemon import ReplicaDaemon

    daemons = [ReplicaDaemon(str(config_path), args.device) for _ in range(count)]
    try:
        await asyncio.gather(*(d.start() for d in daemons))
        urls = [d.url for d in daemons]

        async def loads(_: Run) -> int:
            return await _swaps(urls)

        return await measured(urls, requests, args, loads)
    finally:
        await asyncio.gather(*(d.stop() for d in daemons))


async def _swaps(urls: list[str]) -> int:
    """The daemons' successful swaps (wcd_swaps_total), summed."""
    total = 0
    async with aiohttp.ClientSession() as session:
        for url in urls:
            async with session.get(url + "/metrics") as page:
                total += sum(value for labels, value in
                             metric_series(await page.text(), "wcd_swaps_total")
                             if labels.get("outcome") == "ok")
    return int(total)


# ---- report ------------------------------------------------------------------------------


def _row(name: str, run: Run) -> str:
    per_100 = 100 * run.swaps / max(1, run.requests())
    return (f"| {name} | {run.requests()} | {len(run.failures)} | {run.swaps} "
            f"({per_100:.1f}/100) | {pct(run.ttft_s, 50) * 1000:.0f} | "
            f"{pct(run.ttft_s, 99) * 1000:.0f} | {run.tokens_per_s():.1f} |")


def section(args, runs: dict[str, Run]) -> str:
    now = datetime.datetime.now(datetime.timezone.utc)
    multiplexed, round_robin = runs["multiplexed"], runs["round-robin"]
    one_replica, one_daemon = runs["one replica"], runs["one daemon"]
    share = one_replica.tokens_per_s() / one_daemon.tokens_per_s()
    goals = [
        ("failed requests, steady state (all runs)", "0",
         str(sum(len(r.failures) for r in runs.values())),
         all(not r.failures for r in runs.values())),
        ("swaps per 100 requests, multiplexed, 4 models on 2 replicas", "≤ 5",
         f"{100 * multiplexed.swaps / multiplexed.requests():.1f}",
         100 * multiplexed.swaps / multiplexed.requests() <= 5),
        ("throughput of a replica through Serve / a wcd daemon alone", "≥ 90%",
         f"{100 * share:.0f}%", share >= 0.9),
    ]
    return "\n".join([
        SECTION, "",
        f"Measured {now:%Y-%m-%d %H:%M} UTC on {machine()}; Python "
        f"{platform.python_version()}, Ray {_ray_version()}. Command: `{command_line()}`.", "",
        f"Each replica: one wcd daemon, one worker ({args.device}), two residents "
        f"(`policy.max_resident: 2`), engine args `{json.dumps(ENGINE_ARGS)}`. "
        f"{args.clients} concurrent streaming clients, completions of {args.max_tokens} "
        f"tokens (greedy, `ignore_eos`), each request's model drawn at random (seeded, the "
        "same stream for every run) after a warm-up that loads every model once. "
        f"Every process shares this machine's {_shared(args.device)}: the replicas compete "
        "for them.", "",
        "| run | requests | failed | swaps | TTFT p50 ms | TTFT p99 ms | tok/s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        _row(f"Serve, multiplexed routing, 2 replicas, {len(ALL_MODELS)} models",
             multiplexed),
        _row(f"same replicas' daemons, round-robin, {len(ALL_MODELS)} models", round_robin),
        _row(f"Serve, 1 replica, {len(PAIR)} models", one_replica),
        _row(f"one wcd daemon alone, {len(PAIR)} models", one_daemon), "",
        "### Goals", "",
        "| goal | target | measured | |", "| --- | --- | --- | --- |",
        *[f"| {what} | {target} | {got} | {'met' if met else '**missed**'} |"
          for what, target, got, met in goals], "",
    ])


def _shared(device: str) -> str:
    if device != "cpu":
        return "cores and GPU"
    # vLLM's CPU engine keeps every core busy: Serve's processes take theirs.
    return ("cores, which vLLM's CPU engine keeps busy: Ray's own processes (its "
            "controller, proxy and agents) and each request's hops through Serve take "
            "time from it, which the GPU section below does not pay")


def _ray_version() -> str:
    import ray

    return ray.__version__


async def bench(args) -> dict[str, Run]:
    ensure_models()
    directory = Path(tempfile.mkdtemp(prefix="wcd-cluster-"))
    config_path = config(directory, args.device)
    mixed = request_stream(args.requests, ALL_MODELS)
    pair = request_stream(args.requests // 2, PAIR, seed=1)
    runs: dict[str, Run] = {}
    app = ServeApp(config_path, args.device)
    try:
        runs["multiplexed"] = await serve_run(app, 2, mixed, args)
        print(_row("multiplexed", runs["multiplexed"]), flush=True)
        await asyncio.to_thread(app.serve.delete, "default")
        runs["one replica"] = await serve_run(app, 1, pair, args)
        print(_row("one replica", runs["one replica"]), flush=True)
    finally:
        await asyncio.to_thread(app.close)
    runs["round-robin"] = await daemons_run(config_path, 2, mixed, args)
    print(_row("round-robin", runs["round-robin"]), flush=True)
    runs["one daemon"] = await daemons_run(config_path, 1, pair, args)
    print(_row("one daemon", runs["one daemon"]), flush=True)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--device", default="cpu", help='"cpu", or "cuda:0": every replica '
                        "and daemon on that one GPU")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    runs = asyncio.run(bench(args))
    title = SECTION if args.device == "cpu" else GPU_SECTION
    write_section(args.out, title, section(args, runs).replace(SECTION, title, 1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
