"""What the benchmarks share: vLLM's own API server as the baseline, the
machine description, percentiles, /metrics series, and BENCHMARKS.md sections."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"
MODELS = ROOT / "models"
# The demo engine args (etc/wcd.yaml's defaults), for wcd and the baseline alike.
ENGINE_ARGS = {"dtype": "bfloat16", "max_model_len": 512, "max_num_batched_tokens": 512,
               "kv_cache_memory_bytes": 67108864, "seed": 0}
SERVER_TIMEOUT_S = 600.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def vllm_server_command(model: str, port: str, path: Path | None = None,
                        engine_args: dict = ENGINE_ARGS) -> list[str]:
    """vLLM's own OpenAI server for a model (a demo model unless `path` says
    where), with wcd's engine args."""
    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(path or f"models/{model}"), "--served-model-name", model,
            "--port", port]
    for key, value in engine_args.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


@contextlib.asynccontextmanager
async def vllm_server(model: str, log_path: Path, path: Path | None = None,
                      engine_args: dict = ENGINE_ARGS):
    """A fresh vLLM API server as shipped (EngineCore in its own process);
    yields (port, seconds from launch to its first completion, its process group)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        started = time.perf_counter()
        server = await asyncio.create_subprocess_exec(
            *vllm_server_command(model, str(port), path, engine_args), cwd=ROOT, env=env,
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        await first_completion(f"http://127.0.0.1:{port}", model, log_path,
                               lambda: server.returncode,
                               pooling=engine_args.get("runner") == "pooling")
        yield port, time.perf_counter() - started, server.pid
    finally:
        await stop_group(server)


async def first_completion(url: str, model: str, log_path: Path, exited,
                           pooling: bool = False) -> None:
    """Polls until `url` answers a completion (an embedding, for a pooling
    model); `exited()` is the server's exit code, or None while it runs."""
    path, body = ("/v1/embeddings", {"model": model, "input": "hello world"}) if pooling else \
        ("/v1/completions", {"model": model, "prompt": "hello world", "max_tokens": 8,
                             "temperature": 0})
    deadline = time.monotonic() + SERVER_TIMEOUT_S
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        while time.monotonic() < deadline:
            if exited() is not None:
                raise RuntimeError(f"the server exited with {exited()} before its first "
                                   f"completion:\n{tail(log_path)}")
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with session.post(url + path, json=body) as response:
                    if response.status == 200:
                        return
                    if response.status < 500 and response.status != 404:
                        raise RuntimeError(f"the server answered {response.status}: "
                                           f"{await response.text()}")
            await asyncio.sleep(0.05)
    raise RuntimeError(f"no completion within {SERVER_TIMEOUT_S:.0f} s:\n{tail(log_path)}")


async def stop_group(server: asyncio.subprocess.Process) -> None:
    """SIGTERM, SIGKILL after 30 s; then SIGKILL to whatever the server left in
    its process group (vLLM's EngineCore), so nothing outlives the measurement."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(server.wait(), 30)
    except asyncio.TimeoutError:
        print("  the server did not stop within 30 s of SIGTERM; killing it")
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGKILL)
    await server.wait()


def tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def metric_series(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Each series of the metric `name` in a Prometheus text page: its labels and value."""
    series = []
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")):
            head, value = line.rsplit(" ", 1)
            series.append((dict(re.findall(r'(\w+)="([^"]*)"', head)), float(value)))
    return series


def machine() -> str:
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f
                    if line.startswith("model name")), platform.processor() or "unknown CPU")
    with open("/proc/meminfo") as f:
        mem_kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    return f"{cpu}, {os.cpu_count()} cores, {mem_kib / 2**20:.1f} GiB RAM"


def shown(path: str) -> str:
    """A path as a reader at the repository root would type it."""
    resolved = Path(path).absolute()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else path


def command_line() -> str:
    return shlex.join([shown(sys.executable), shown(sys.argv[0]), *sys.argv[1:]])


def write_section(benchmarks: Path, title: str, new: str) -> None:
    """`new` (starting with `title`) in place of the old section of that title
    in BENCHMARKS.md; every other section stays."""
    text = benchmarks.read_text() if benchmarks.exists() else ""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == title), None)
    if start is None:
        head = text.rstrip("\n") + "\n\n" if text.strip() else "# Benchmarks\n\n"
        updated = head + new
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
                   len(lines))
        rest = "".join(lines[end:])
        updated = "".join(lines[:start]) + new + ("\n" + rest if rest else "")
    benchmarks.parent.mkdir(parents=True, exist_ok=True)
    benchmarks.write_text(updated)


async def sse_chunks(response: aiohttp.ClientResponse) -> AsyncIterator[dict]:
    """The JSON chunks of an OpenAI stream; a status other than 200 or an
    error chunk raises RuntimeError."""
    if response.status != 200:
        raise RuntimeError(f"{response.status}: {(await response.text())[:200]}")
    async for line in response.content:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if "error" in chunk:
            raise RuntimeError(chunk["error"].get("message", chunk["error"]))
        yield chunk
