"""Shared fixtures: demo models, the engine args every test uses, and vLLM's
own offline output for comparison (tests/vllm_reference.py, kept in
tests/reference/ by input)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
# vLLM's own outputs, committed: generating them takes minutes of a fresh clone's CI.
REFERENCE = ROOT / "tests" / "reference"
# Settings of the reference runs that change vLLM's numbers on CPU.
REFERENCE_ENV = ("OMP_NUM_THREADS", "VLLM_CPU_OMP_THREADS_BIND")
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
def embed_model(demo_models) -> Path:
    """embed-a beside the demo models (a checkout whose models predate it
    lacks it)."""
    if not (demo_models / "embed-a" / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "wcd.workers.demo_models", str(demo_models),
                        "--names", "embed-a"], check=True, cwd=ROOT)
    return demo_models / "embed-a"


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
    """vLLM's own outputs for `spec`, from tests/reference/ when that holds
    them for this vLLM, these model files (by content: the demo models are
    the same bytes wherever they are generated) and these thread settings;
    else generated (minutes) and kept there, to be committed."""
    cached = REFERENCE / f"{_reference_key(spec)}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    with tempfile.NamedTemporaryFile("w", suffix=".json") as spec_file:
        json.dump(spec, spec_file)
        spec_file.flush()
        env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
        done = subprocess.run([sys.executable, str(ROOT / "tests" / "vllm_reference.py"),
                               spec_file.name], capture_output=True, text=True, env=env,
                              timeout=900, cwd=ROOT)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("WCD-REFERENCE ")),
                None)
    assert line, f"vLLM reference run failed:\n{done.stderr[-4000:]}"
    REFERENCE.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(json.loads(line.split(" ", 1)[1]), indent=1) + "\n")
    return json.loads(cached.read_text())


def _reference_key(spec: dict) -> str:
    """What the outputs depend on, independent of where the checkout is."""
    portable = {**spec, "models": {
        name: {**model, "path": Path(model["path"]).name} for name, model in
        spec["models"].items()}}
    stamp = [portable, _vllm_versions(),
             {name: _content_digest(Path(model["path"])) for name, model in
              spec["models"].items()},
             {name: os.environ.get(name) for name in REFERENCE_ENV}]
    kernels = _cpu_matmul_kind()
    if kernels is not None:
        stamp.append(kernels)
    return hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:24]


def _cpu_matmul_kind() -> str | None:
    """vLLM's CPU bf16 matmuls take AMX where the CPU has it and AVX-512
    otherwise, and their last bits differ, which turns greedy choices of the
    random-weight models: outputs made on one kind of CPU are kept apart from
    the other's. None for AMX (the committed references' machines, keyed
    before this distinction) and for non-x86 hosts."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = set(next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                      if line.startswith("flags")), []))
    if not flags or "amx_bf16" in flags:
        return None
    return "avx512_bf16" if "avx512_bf16" in flags else "no-bf16-matmul"


def installed_vllm() -> str | None:
    """The version of the vLLM installed here (vllm-cpu or vllm), if any."""
    from importlib import metadata

    for dist in ("vllm-cpu", "vllm"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return None


def _vllm_versions() -> list[str]:
    from importlib import metadata

    versions = []
    for dist in ("vllm-cpu", "vllm"):
        try:
            versions.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    return versions


def _content_digest(directory: Path) -> str:
    """Subdirectories too: a sentence-transformers model keeps its pooling
    config in one (1_Pooling/config.json)."""
    digest = hashlib.sha256()
    for file in sorted(f for f in directory.rglob("*") if f.is_file()):
        name = file.relative_to(directory).as_posix()
        digest.update(name.encode() + b"\0" + hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def loop():
    """One event loop per module, so a worker started in a fixture lives on."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


# The end-to-end daemon the modules share (test_daemon, test_faults,
# test_metrics_vllm, test_status_page): one start (~15-60 s on a 2-core box)
# instead of one per module. WATCHDOG_USEC is test_daemon's: its watchdog test counts the pings.
SHARED_DAEMON_ENV = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": ""}


@pytest.fixture(scope="session")
def shared_daemon(tmp_path_factory, demo_models):
    from daemon_harness import SharedDaemon  # it imports this module

    shared = SharedDaemon(tmp_path_factory.mktemp("wcd-shared"), demo_models,
                          env=SHARED_DAEMON_ENV)
    yield shared
    shared.close()


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "stops_shared_daemon: stops the shared daemon; run after its other users")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    """A test that stops the shared daemon runs after every test that shares
    it, so the rest need no second start; it passes in any order regardless."""
    items.sort(key=lambda item: item.get_closest_marker("stops_shared_daemon") is not None)
