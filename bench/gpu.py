"""GPU benchmark: the wcd daemon on a CUDA device with real vLLM, against vLLM's own paths.

    python bench/gpu.py --out DIR [--models DIR] [--parts wcd,cold,sleep]

Runs on the device machine (../shared/gpu/README.md says how vLLM gets there);
`make`-free and stdlib-only beyond what wcd and vLLM import. Models big-a and
big-b (one shape, ~1.5 GB bf16) and bigwide-a (another) are made there by
wcd.workers.demo_models; with WCD_BENCH_SIZE=8b every part runs on 8B-class
ones instead: llama8b-a and llama8b-b (Llama-3.1-8B's layers, ~14 GB) and
qwen7b-a (Qwen2.5-7B's, ~13 GB).

- wcd: a daemon with one CUDA worker, driven by wcctl and the OpenAI endpoint:
  same-shape swaps from disk and from the host cache, different-shape swaps
  with CUDA graphs and with eager, from disk and from the cache; a greedy
  completion after every swap, checked against the model's own first answer;
  GPU memory after the first swap, after 20 swaps and after unload.
- cold: a fresh process to its first output with vLLM's own `LLM`.
- sleep: vLLM's sleep mode on the same model, the peer baseline: level 1
  sleep and wake; level 2 sleep, wake with reload_weights of the sibling.
- parked: a daemon that parks up to two engines on the GPU: swaps back to a
  parked engine (with CUDA graphs, and eager) after the rebuilds.
- switch (issue 18, item 5; not in the default parts): six models (four of
  SAME's shape, two of OTHER's) resident on one CUDA worker, then a greedy
  stream along every ordered pair of them (30): first tokens against the same
  model asked twice, answers against each model's own first one.
- rebuild (issue 18, item 4; not in the default parts): a pooling engine, then
  a generate one rebuilt; rebuilds with CUDA graphs, shapes compiled before,
  under vLLM's compilation settings (REBUILD_VARIANTS), graphs of small batches
  first (wcd's default), then all of them before serving (vLLM's way); a batch
  of BATCH requests right after a rebuild and once every graph is captured.
- batches (not in the default parts): answers of graphs captured while idle
  against graphs captured at build, two daemons side by side (run_batches).
- tp (2 GPUs): a TP=2 worker group; swaps keep both processes; big-a's
  answer against vLLM's own TP=2 run.
- throughput: the same streamed load (bench/serve.py's clients) against vLLM's
  own API server and then wcd's OpenAI endpoint, each serving big-a alone.
- residents (issue 14; not in the default parts: `--parts residents`, ~4 min):
  one daemon, one CUDA worker keeping up to three models resident. bigwide-a
  and big-b loaded beside big-a (load paths and times, footprints, torch's
  allocated memory); a greedy 128-token completion of each alone, then the
  three at once (same texts? wall against the sum alone); bench/mixed.py's
  load with big-a as the long model and bigwide-a as the short one (TTFT and
  tokens/s alone and together, swaps: none); then a budget (reloaded by
  SIGHUP) short of three busy models: 512-token streams of big-a and
  bigwide-a, then big-b: suspensions, texts against alone, big-b's first token.

`wcctl` runs as a console script in a bare venv of its own (cli_command);
vLLM's and wcd's sources are byte-compiled first, as pip's install leaves them
(compile_sources).
Writes DIR/gpu-PART.json per part. Back on the development machine,
`python bench/gpu.py --report DIR` turns them into the "## GPU (bench/gpu.py)"
section of BENCHMARKS.md and bench/gpu-swaps.png.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# vLLM checks at start-up that the free memory covers gpu_memory_utilization,
# even with an explicit KV cache size: 0.5 leaves room for what a rebuild
# leaves behind (see BENCHMARKS.md).
ENGINE_ARGS = {"dtype": "bfloat16", "max_model_len": 1024, "kv_cache_memory_bytes": 2 << 30,
               "gpu_memory_utilization": 0.5, "seed": 0}
# WCD_BENCH_SIZE=8b runs every part on 8B-class models (issue 18) instead.
SIZE = os.environ.get("WCD_BENCH_SIZE", "1.4gb")
SAME, OTHER = {"1.4gb": (("big-a", "big-b"), "bigwide-a"),
               "8b": (("llama8b-a", "llama8b-b"), "qwen7b-a")}[SIZE]
GiB = 1 << 30
# Pinned host memory for the daemons' host caches: both same-shape models and
# the other shape, with room to spare.
HOST_CACHE_BYTES = {"1.4gb": 8 * GiB, "8b": 48 * GiB}[SIZE]


def log(*args) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *args, flush=True)


def make_models(models: Path, names: list[str]) -> None:
    """8B-class models of one shape share its first model's layer files (the
    device machine's disk holds two 8B checkpoints, not six)."""
    if all((models / n / "config.json").is_file() for n in names):
        return
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "wcd.workers.demo_models", str(models),
                    "--names", ",".join(names), *(["--share-layers"] if SIZE == "8b" else [])],
                   check=True, cwd=ROOT)
    log(f"models made in {time.perf_counter() - started:.1f} s")


def compile_sources() -> None:
    """wcd's sources, and vLLM's site directory if it has no bytecode,
    byte-compiled as pip's install leaves them: the device recipe installs
    with --no-compile, so an interpreter that may not write bytecode
    (PYTHONDONTWRITEBYTECODE) would compile every vLLM module again at each
    worker's start, and wcctl's own at each call: the figures would be the
    recipe's, not a user's."""
    import importlib.util

    package = Path(importlib.util.find_spec("vllm").origin).parent
    sources = [str(ROOT / "wcd"),
               *([] if (package / "__pycache__").is_dir() else [str(package.parent)])]
    started = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", *sources], env=env,
                   stdout=subprocess.DEVNULL)
    log(f"{', '.join(sources)} byte-compiled in {time.perf_counter() - started:.1f} s")


def weight_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


# ---- cold and sleep: vLLM's own paths, each in a fresh process ----------------------

COLD = """
import sys, time, json
started = float(sys.argv[1])
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[2], **json.loads(sys.argv[3]))
out = llm.generate(["hello world"], SamplingParams(max_tokens=16, temperature=0), use_tqdm=False)
print("WCD-RESULT", json.dumps({"first_output_s": time.time() - started,
                               "text": out[0].outputs[0].text}), flush=True)
"""

SLEEP = """
import sys, time, json, gc
import torch
from vllm import LLM, SamplingParams
a, b, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
llm = LLM(model=a, enable_sleep_mode=True, **args)
params = SamplingParams(max_tokens=8, temperature=0)
def text():
    return llm.generate(["hello world"], params, use_tqdm=False)[0].outputs[0].text
first = text()
result = {}
t = time.perf_counter(); llm.sleep(level=1); result["level1_sleep_s"] = time.perf_counter() - t
t = time.perf_counter(); llm.wake_up(); result["level1_wake_s"] = time.perf_counter() - t
result["level1_same_output"] = text() == first
t = time.perf_counter(); llm.sleep(level=2); result["level2_sleep_s"] = time.perf_counter() - t
t = time.perf_counter()
llm.wake_up(tags=["weights"])
llm.collective_rpc("reload_weights", kwargs={"weights_path": b, "is_checkpoint_format": True})
llm.wake_up(tags=["kv_cache"])
llm.reset_prefix_cache()
result["level2_wake_reload_sibling_s"] = time.perf_counter() - t
result["sibling_output"] = text()
print("WCD-RESULT", json.dumps(result), flush=True)
"""


def fresh_process(code: str, *args: str, timeout: float = 500) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd="/tmp")
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("WCD-RESULT ")), None)
    if line is None:
        return {"error": done.stderr[-3000:]}
    return json.loads(line.split(" ", 1)[1])


def run_cold(models: Path) -> dict:
    log("cold: fresh process, LLM(...) + generate")
    result = fresh_process(COLD, str(time.time()), str(models / SAME[0]),
                           json.dumps(ENGINE_ARGS))
    log("cold:", result if "error" not in result else result["error"][-500:])
    return result


def run_sleep(models: Path) -> dict:
    log("sleep: vLLM sleep mode levels 1 and 2")
    result = fresh_process(SLEEP, str(models / SAME[0]), str(models / SAME[1]),
                           json.dumps(ENGINE_ARGS))
    log("sleep:", result if "error" not in result else result["error"][-500:])
    return result


# ---- wcd ------------------------------------------------------------------------------


CLI_VENV = Path("/tmp/wcd-cli-venv")


def cli_command() -> list[str]:
    """`wcctl` as a user's install runs it: a console script in a venv of its
    own, whose interpreter skips the system site-packages (where the device
    machine's numba-cuda .pth alone costs 44 ms a start). The CLI imports only
    the stdlib, so the venv needs nothing but a path to wcd. The system
    interpreter when venv is unavailable."""
    venv = CLI_VENV
    script = venv / "bin" / "wcctl"
    if not script.exists():
        done = subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)],
                              capture_output=True, text=True)
        if done.returncode:
            log("no CLI venv, wcctl runs on the system interpreter:", done.stderr[-300:])
            return [sys.executable, "-m", "wcd.cli"]
        site = next(venv.glob("lib/python3*/site-packages"))
        (site / "wcd-root.pth").write_text(f"{ROOT}\n")
        script.write_text(f"#!{venv}/bin/python\nimport sys\nfrom wcd.cli import main\n"
                          "sys.exit(main())\n")
        script.chmod(0o755)
    return [str(script)]


def interpreter_start_s(python: str, runs: int = 7) -> float:
    """Median wall time of `python -c pass`."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([python, "-c", "pass"], check=True)
        times.append(time.perf_counter() - started)
    return median(times)



# As systemd/wcd.service runs it: no vLLM usage-stats thread per build.
DAEMON_ENV = {**os.environ, "VLLM_NO_USAGE_STATS": "1"}


class Wcd:
    def __init__(self, directory: Path, models: Path, workers: list | None = None,
                 defaults: dict | None = None, http: dict | None = None,
                 preload: list[str] | None = None, models_extra: dict | None = None,
                 env: dict | None = None, forkserver: str | None = None, **policy):
        directory.mkdir(parents=True, exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.socket = str(directory / "control.sock")
        config = {
            "control": {"socket": self.socket},
            "http": {"host": "127.0.0.1", "port": self.port, **(http or {})},
            "workers": workers or [{"device": "cuda:0"}],
            "model_roots": [str(models)],
            "defaults": defaults or ENGINE_ARGS,
            "models": {**{n: {"path": str(models / n)} for n in (*SAME, OTHER)},
                       "bigwide-eager": {"path": str(models / OTHER), "enforce_eager": True},
                       TP1: {"path": str(models / SAME[0]), "tensor_parallel_size": 1},
                       **(models_extra or {})},
            "preload": [SAME[0]] if preload is None else preload,
            "policy": {"host_cache_bytes": HOST_CACHE_BYTES, "worker_ready_timeout": "600s",
                       "queue_wait": "600s", "drain_timeout": "60s", "health_timeout": "60s",
                       "health_interval": "1s",  # pings carry the memory figures read here
                       **policy},
            "forkserver": forkserver,
        }
        path = directory / "wcd.yaml"
        path.write_text(json.dumps(config))  # JSON is YAML
        self.log_path = directory / "wcd.log"
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "wcd.daemon.main", "--config", str(path)], cwd=ROOT,
            stdout=self.log_path.open("w"), stderr=subprocess.STDOUT,
            env={**DAEMON_ENV, **(env or {})})

    def wcctl(self, *args: str) -> tuple[float, dict]:
        started = time.perf_counter()
        done = subprocess.run([*cli_command(), "--socket", self.socket,
                               "--timeout", "900", *args, "--json"], capture_output=True,
                              text=True, cwd=ROOT)
        wall = time.perf_counter() - started
        if done.returncode:
            raise RuntimeError(f"wcctl {' '.join(args)}: {done.stderr.strip()}\n{self.tail()}")
        return wall, json.loads(done.stdout)

    def operate(self, command: str, model: str) -> dict:
        """`wcctl swap` or `load` of `model`: the path the worker took, where
        the weights came from, the worker's own time and phases, and wcctl's
        wall time around it."""
        wall, event = self.wcctl(command, model)
        return {"model": model, "path": event["path"], "weights": event.get("weights"),
                "worker_s": event["total_s"], "wcctl_s": wall, "phases": event["phases"]}

    def worker(self) -> dict:
        return self.wcctl("ps")[1]["workers"][0]

    def wait_ready(self, timeout: float = 900) -> dict:
        """The worker, once it is up with nothing loaded."""
        return self._wait(lambda w: bool(w.get("pid")) and w.get("state") in ("idle", "serving"),
                          "no worker ready", timeout)

    def wait_serving(self, model: str, timeout: float = 900) -> dict:
        return self._wait(lambda w: w.get("model") == model and w.get("state") == "serving",
                          f"{model} never served", timeout)

    def _wait(self, done: Callable[[dict], bool], failure: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"wcd exited:\n{self.tail()}")
            try:
                worker = self.worker()
            except RuntimeError:
                worker = {}
            if done(worker):
                return worker
            time.sleep(0.5)
        raise RuntimeError(f"{failure}:\n{self.tail()}")

    def complete(self, model: str) -> str:
        return self.post("/v1/completions", {"model": model, "prompt": "hello world",
                                             "max_tokens": 16, "temperature": 0}
                         )[1]["choices"][0]["text"]

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}",
                                         data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=600) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as exc:
            return exc.code, json.load(exc)

    def device_bytes(self) -> int:
        time.sleep(1.2)  # one health ping, which carries the figure
        return self.worker()["device_bytes"]

    def tail(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-40:])

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


@contextlib.contextmanager
def daemon_part(wcd: Wcd, result: dict, part: str):
    """Keep what a part measured and why it stopped; the daemon stops either way."""
    try:
        yield
    except Exception as exc:
        result["error"] = f"{exc}\n{wcd.tail()}"
        log(f"{part} part failed:", result["error"][-3000:])
    finally:
        result["exit_code"] = wcd.stop()


def run_wcd(models: Path, out: Path) -> dict:
    result: dict = {"swaps": [], "failures": []}
    wcd = Wcd(out / "wcd-run", models)
    answers: dict[str, str] = {}

    def swap(model: str, label: str) -> dict:
        row = {"label": label, **wcd.operate("swap", model)}
        text = wcd.complete(model)
        answers.setdefault(model, text)
        row["same_output"] = same = text == answers[model]
        if not same:
            result["failures"].append(f"{model} answered differently after {label}")
        result["swaps"].append(row)
        log(f"{label}: {model} {row['path']} from {row['weights']} "
            f"wcctl {row['wcctl_s']:.3f} s worker {row['worker_s']:.3f} s "
            f"build {row['phases'].get('build', 0):.3f} s same_output={same}")
        return row

    with daemon_part(wcd, result, "wcd"):
        ready = wcd.wait_serving(SAME[0])
        result["start_to_serving_s"] = time.perf_counter() - wcd.started
        result["first_load"] = ready.get("last_swap")
        log("serving", SAME[0], "after", f"{result['start_to_serving_s']:.1f} s", ready)
        answers[SAME[0]] = wcd.complete(SAME[0])
        result["model_bytes"] = weight_bytes(models / SAME[0])
        swap(SAME[1], "same shape, from disk")
        result["device_bytes_after_first"] = wcd.device_bytes()
        for i in range(20):
            swap(SAME[i % 2],
                 "same shape, from host cache")
        result["device_bytes_after_20"] = wcd.device_bytes()
        swap(OTHER, "other shape, CUDA graphs, from disk")
        swap(SAME[0], "other shape, CUDA graphs, from host cache")
        swap(OTHER, "other shape, CUDA graphs, from host cache")
        swap(SAME[0], "other shape, CUDA graphs, from host cache")
        swap("bigwide-eager", "other shape, eager, from disk")
        swap(SAME[0], "other shape, CUDA graphs, from host cache")
        result["device_bytes_serving_end"] = wcd.device_bytes()
        wall, event = wcd.wcctl("unload", SAME[0])
        result["unload"] = {"wcctl_s": wall, "phases": event["phases"]}
        result["device_bytes_after_unload"] = wcd.device_bytes()
        result["worker"] = wcd.worker()
    # The worker logs each snapshot copy's own rate (weights.apply_rank_snapshot).
    result["copies_gb_per_s"] = [float(line.rsplit("(", 1)[1].split()[0])
                                 for line in wcd.log_path.read_text().splitlines()
                                 if "into the model (kernel)" in line]
    log("wcd: snapshot copies, GB/s:", result["copies_gb_per_s"])
    result["cli"] = cli_command()
    result["interpreter_start_s"] = {
        "system": interpreter_start_s(sys.executable),
        "cli": interpreter_start_s(str(CLI_VENV / "bin" / "python"))
        if (CLI_VENV / "bin" / "python").exists() else None}
    log("wcd: interpreter starts", result["interpreter_start_s"])
    result["vllm_timings"] = vllm_timings(wcd.log_path)
    return result


# What vLLM logs with a time in it, during each build (issue 18, item 4: where
# a rebuild with CUDA graphs spends its seconds).
VLLM_TIMING_WORDS = ("took", " secs", "seconds", "Compil", "compil", "graph", "Graph",
                     "Loading weights", "Model loading", "warm", "KV cache", "profil")


def vllm_timings(log_path: Path) -> list[str]:
    return [line[-400:] for line in log_path.read_text(errors="replace").splitlines()
            if any(w in line for w in VLLM_TIMING_WORDS)][-400:]


# ---- hostile clients (issue 13) on CUDA ---------------------------------------------

RUNAWAY_TEMPLATE = "{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}{% endfor %}"


def run_hostile(models: Path, out: Path) -> dict:
    """The worker-side defences on a CUDA worker: a batch is one request whose
    choices equal the prompts' own answers; a runaway request template is
    interrupted (render_timeout 2 s); a stream nobody reads loses its lease
    (write_timeout 2 s). The worker process stays the same throughout."""
    result: dict = {"failures": []}
    wcd = Wcd(out / "wcd-hostile", models,
              http={"trust_request_chat_template": True, "write_timeout": "2s"},
              render_timeout="2s", min_resident=0)
    with daemon_part(wcd, result, "hostile"):
        pid = wcd.wait_serving(SAME[0])["pid"]
        greedy = {"model": SAME[0], "max_tokens": 8, "temperature": 0}
        prompts = ["hello world", "the quick brown fox", "tell me a story"]
        alone = [wcd.post("/v1/completions", {**greedy, "prompt": p})[1]["choices"][0]["text"]
                 for p in prompts]
        started = time.perf_counter()
        status, batch = wcd.post("/v1/completions", {**greedy, "prompt": prompts})
        result["batch"] = {"status": status, "seconds": time.perf_counter() - started,
                           "choices": len(batch.get("choices", []))}
        texts = [c["text"] for c in batch.get("choices", [])]
        if texts != alone:
            result["failures"].append(f"batch answers {texts} differ from alone {alone}")
        started = time.perf_counter()
        status, reply = wcd.post("/v1/chat/completions", {
            "model": SAME[0], "chat_template": RUNAWAY_TEMPLATE,
            "messages": [{"role": "user", "content": "hi"}]})
        result["runaway_template"] = {"status": status,
                                      "seconds": time.perf_counter() - started,
                                      "message": reply.get("error", {}).get("message")}
        if status != 400:
            result["failures"].append(f"runaway template answered {status}")
        result["unread_stream_s"] = _unread_stream(wcd)
        after = wcd.worker()
        result["worker_after"] = {"pid": after["pid"], "restarts": after["restarts"]}
        if after["pid"] != pid or after["restarts"]:
            result["failures"].append("the worker restarted")
        if wcd.complete(SAME[0]) != wcd.complete(SAME[0]):
            result["failures"].append("greedy answers differ after the attacks")
        log("hostile:", {k: v for k, v in result.items() if k != "failures"},
            "failures:", result["failures"])
    return result


def _unread_stream(wcd: Wcd) -> float:
    """Seconds from a never-read stream's start until the worker runs nothing."""
    body = json.dumps({"model": SAME[0], "prompt": "hello", "max_tokens": 900, "n": 8,
                       "logprobs": 5, "stream": True, "ignore_eos": True}).encode()
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", wcd.port))
        started = time.perf_counter()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: " + str(len(body)).encode()
                     + b"\r\n\r\n" + body)
        time.sleep(1)
        while (view := wcd.worker())["active"] or view["running"]:
            if time.perf_counter() - started > 120:
                return float("inf")
            time.sleep(0.2)
        return time.perf_counter() - started


# ---- parked engines -------------------------------------------------------------------

PARKED_SEQUENCE = [(OTHER, "rebuild, big-a parked"), (SAME[0], "unpark big-a"),
                   (OTHER, "unpark bigwide-a"), ("bigwide-eager", "rebuild, eager"),
                   (SAME[0], "unpark big-a"), ("bigwide-eager", "unpark eager (KV re-allocated)")]


def run_parked(models: Path, out: Path) -> dict:
    """A daemon that parks up to two engines: swaps back to a parked one
    against the rebuilds they replace, outputs checked, memory per swap."""
    result: dict = {"swaps": [], "failures": []}
    wcd = Wcd(out / "wcd-parked", models, max_parked=2, park_min_free_bytes=8 * GiB)
    answers: dict[str, str] = {}
    with daemon_part(wcd, result, "parked"):
        wcd.wait_serving(SAME[0])
        answers[SAME[0]] = wcd.complete(SAME[0])
        for model, label in PARKED_SEQUENCE:
            row = {"label": label, **wcd.operate("swap", model)}
            text = wcd.complete(model)
            same = answers.setdefault(model, text) == text
            if not same:
                result["failures"].append(f"{model} answered differently after {label}")
            allocated = wcd.device_bytes()  # after a ping, which also reports what is parked
            parked = [m["name"] for m in wcd.wcctl("models")[1]["models"]
                      if m["where"] == "device"]
            row.update(same_output=same, parked=parked, device_bytes=allocated)
            result["swaps"].append(row)
            log(f"parked: {label}: {row['path']} worker {row['worker_s']:.3f} s "
                f"wcctl {row['wcctl_s']:.3f} s parked={parked} same_output={same} "
                f"allocated {row['device_bytes'] / GiB:.2f} GiB")
    return result


# ---- rebuilds with CUDA graphs: what they capture, how they load (issue 18, item 4) --

# vLLM's compilation settings a model can be given as engine args; each is its
# own compile key, so each shape compiles once under it before the timed rebuilds.
REBUILD_VARIANTS = {
    "default": {},  # FULL_AND_PIECEWISE, 35 sizes x 17 pieces + 19 full decode graphs
    "full_decode_only": {"compilation_config": {"cudagraph_mode": "FULL_DECODE_ONLY"}},
}
REBUILD_ROUNDS = 3
EMBED = "embed-a"
BATCH = 32  # requests at once: decode batches past the graphs a build captures first
GRAPHS_DONE = "CUDA graphs left by its build captured"


def run_rebuild(models: Path, out: Path) -> dict:
    """Rebuilds between SAME[0] and OTHER from the host cache, shapes compiled
    before, under each of REBUILD_VARIANTS as workers run them (graphs of up
    to policy.first_graph_tokens tokens before serving, the rest while idle),
    then the default with every graph captured before serving
    (first_graph_tokens 0, a daemon of its own: vLLM's way); answers against
    the default's. After each variant's rebuilds, BATCH requests at once
    right after a rebuild and again once its graphs are all captured. And a
    pooling model's engine (vLLM's V1 runner) with graphs, then SAME[0]
    rebuilt (the V2 runner's capture, vllm_seams seam 21)."""
    result: dict = {"variants": {}, "failures": []}
    answers: dict = {}  # a model's first answer; a batch's first texts
    for label, policy, variants in (("first_graphs", {}, REBUILD_VARIANTS),
                                    ("all_graphs", {"first_graph_tokens": 0},
                                     {"all_graphs": {}})):
        extra = {f"{m}.{v}": {"path": str(models / m), **args}
                 for v, args in variants.items() for m in (SAME[0], OTHER)}
        wcd = Wcd(out / f"wcd-rebuild-{label}", models, preload=[],
                  models_extra={**extra, EMBED: {"path": str(models / EMBED)}},
                  host_cache_bytes=24 * GiB, **policy)
        with daemon_part(wcd, result, f"rebuild {label}"):
            wcd.wait_ready()
            if label == "first_graphs":
                try:
                    result["pooling_then_generate"] = [
                        _rebuild(wcd, m, answers, result["failures"])
                        for m in (EMBED, f"{SAME[0]}.default")]
                except RuntimeError as exc:  # a failed swap: the variants still run
                    result["failures"].append(f"pooling then generate: {str(exc)[:500]}")
            for variant in variants:
                result["variants"][variant] = _rebuilds(wcd, variant, answers, result["failures"])
        result.setdefault("vllm_timings", {})[label] = vllm_timings(wcd.log_path)
        result.setdefault("graphs_done", {})[label] = [
            line[-200:] for line in wcd.log_path.read_text(errors="replace").splitlines()
            if GRAPHS_DONE in line]
    log("rebuild:", {v: r.get("timed_worker_s") for v, r in result["variants"].items()},
        "failures:", result["failures"])
    return result


def _rebuilds(wcd: Wcd, variant: str, answers: dict, failures: list[str]) -> dict:
    a, b = f"{SAME[0]}.{variant}", f"{OTHER}.{variant}"
    first = [_rebuild(wcd, m, answers, failures) for m in (a, b)]  # compiles each shape
    timed = [_rebuild(wcd, m, answers, failures) for m in [a, b] * REBUILD_ROUNDS]
    return {"first": first, "timed": timed,
            "timed_worker_s": median([r["worker_s"] for r in timed]),
            "batch": _batch_after_rebuild(wcd, a, answers, failures)}


def _greedy_replies(wcd: Wcd, model: str, prompts: list[str],
                    at_once: bool = True) -> list[tuple[int, str]]:
    """Each prompt's greedy 32-token completion as (status, text; the error
    body where the status is not 200), sent all at once or one at a time."""
    body = {"model": model, "max_tokens": 32, "ignore_eos": True, "temperature": 0}

    def ask(prompt: str) -> tuple[int, str]:
        status, reply = wcd.post("/v1/completions", {**body, "prompt": prompt})
        return status, reply["choices"][0]["text"] if status == 200 else str(reply)

    if not at_once:
        return [ask(p) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(ask, prompts))


def _batch_after_rebuild(wcd: Wcd, model: str, answers: dict, failures: list[str]) -> dict:
    """BATCH greedy completions at once right after a rebuild to `model`
    (batches bigger than the graphs captured first), and again once its
    worker has captured the rest; each set of texts against the first
    daemon's (info: a batch run without graphs may round differently)."""

    def batch() -> dict:
        started = time.perf_counter()
        replies = _greedy_replies(wcd, model, BATCH_PROMPTS)
        statuses = sorted({status for status, _ in replies})
        if statuses != [200]:
            failures.append(f"{model}: a batch got {statuses}")
        return {"seconds": time.perf_counter() - started,
                "texts": [text for _, text in replies]}

    row = wcd.operate("swap", model)
    now = batch()
    time.sleep(5)  # the worker idle: the rest of the graphs are captured
    later = batch()
    first = answers.setdefault(f"batch {model.split('.')[0]}", now["texts"])
    log(f"rebuild: {model}: batch of {BATCH} {now['seconds']:.3f} s right after the rebuild, "
        f"{later['seconds']:.3f} s with every graph")
    return {"swap": row, "right_after_s": now["seconds"], "with_every_graph_s": later["seconds"],
            "same_texts": now["texts"] == later["texts"],
            "as_first_batch": [now["texts"] == first, later["texts"] == first]}


def run_batches(models: Path, out: Path) -> dict:
    """Whether graphs captured while idle answer as graphs captured at build:
    two daemons side by side, first_graph_tokens 16 (wcd's default) and 0
    (every graph at build). Each swaps to SAME[0] and answers BATCH greedy
    prompts at once right after the swap, the same again once the rest of its
    graphs are captured, BATCH new prompts, and 4 prompts one at a time; each
    set counted against the other daemon's."""
    daemons = {label: Wcd(out / f"wcd-batches-{label}", models, preload=[], **policy)
               for label, policy in (("first", {}), ("all", {"first_graph_tokens": 0}))}
    texts: dict[str, dict[str, list[str]]] = {}
    result: dict = {"failures": []}

    def answer(wcd: Wcd, prompts: list[str], at_once: bool = True) -> list[str]:
        return [text for _, text in _greedy_replies(wcd, SAME[0], prompts, at_once)]

    try:
        for wcd in daemons.values():
            wcd.wait_ready()
        for label, wcd in daemons.items():
            wcd.operate("swap", SAME[0])
            texts[label] = {"right_after": answer(wcd, BATCH_PROMPTS)}
            time.sleep(5)  # idle: the rest of the graphs are captured
            texts[label]["with_every_graph"] = answer(wcd, BATCH_PROMPTS)
            texts[label]["new_prompts"] = answer(wcd, [f"{p} again" for p in BATCH_PROMPTS])
            texts[label]["one_at_a_time"] = answer(wcd, BATCH_PROMPTS[:4], at_once=False)
    except Exception as exc:
        result["error"] = str(exc)
    finally:
        result["exit_codes"] = [wcd.stop() for wcd in daemons.values()]
    if len(texts) == 2:
        result["same_as_every_graph_at_build"] = {
            k: [sum(a == b for a, b in zip(texts["first"][k], texts["all"][k])), len(v)]
            for k, v in texts["first"].items()}
    log("batches:", result)
    return result

def _rebuild(wcd: Wcd, model: str, answers: dict, failures: list[str]) -> dict:
    row = wcd.operate("swap", model)
    base = model.split(".")[0]
    if base == EMBED:
        status, reply = wcd.post("/v1/embeddings", {"model": model, "input": "hello world"})
        text = str(status)
    else:
        text = wcd.complete(model)
    row["same_output"] = same = answers.setdefault(base, text) == text
    if not same:
        failures.append(f"{model} answered differently from {base}'s first answer")
    log(f"rebuild: {model}: {row['path']} from {row['weights']} worker "
        f"{row['worker_s']:.3f} s build {row['phases'].get('build', 0):.3f} s same={same}")
    return row


# ---- any-to-any among six models on one GPU (issue 18, item 5) -----------------------

SWITCH = [f"{SAME[0].split('-')[0]}-{c}" for c in "abcd"] + \
    [f"{OTHER.split('-')[0]}-{c}" for c in "ab"]
# vLLM refuses to build when the device's free memory is below
# gpu_memory_utilization of the whole; with five 8B engines resident ~60 GB is
# free. The KV cache's size is explicit, so this fraction sizes nothing else.
SWITCH_UTILIZATION = 0.25
SWITCH_TOKENS = 16


def every_ordered_pair(names: list[str], start: str) -> list[str]:
    """Targets of a walk from `start` that takes each ordered pair of names
    once: an Eulerian circuit of the complete digraph (Hierholzer)."""
    unused = {a: [b for b in reversed(names) if b != a] for a in names}
    stack, walk = [start], []
    while stack:
        if unused[stack[-1]]:
            stack.append(unused[stack[-1]].pop())
        else:
            walk.append(stack.pop())
    return walk[::-1][1:]


def run_switch(models: Path, out: Path) -> dict:
    """Six models resident on one CUDA worker, each its own engine (a parked
    engine only outlives a swap to another shape; same-shape models share one
    engine, reloaded in place): `wcctl swap` the first, `wcctl load` the rest
    beside it. Then a greedy stream along every ordered pair of them (30), each
    answer checked against the model's own first one, its first token timed
    against the same model asked twice in a row; all six answers must differ,
    and no swap may happen."""
    result: dict = {"models": SWITCH, "loads": [], "switches": [], "failures": []}
    wcd = Wcd(out / "wcd-switch", models, preload=[],
              defaults={**ENGINE_ARGS, "gpu_memory_utilization": SWITCH_UTILIZATION},
              models_extra={n: {"path": str(models / n)} for n in SWITCH},
              max_resident=len(SWITCH), host_cache_bytes=0, min_resident="0s")
    answers: dict[str, str] = {}

    def ask(model: str, label: str) -> dict:
        reply = _stream(wcd, model, SWITCH_TOKENS)
        same = answers.setdefault(model, reply["text"]) == reply["text"]
        if not same or "error" in reply:
            result["failures"].append(f"{model} ({label}): {reply.get('error', 'other text')}")
        return {"model": model, "ttft_s": reply["ttft_s"], "seconds": reply["seconds"],
                "same_output": same}

    with daemon_part(wcd, result, "switch"):
        wcd.wait_ready()
        for i, model in enumerate(SWITCH):
            result["loads"].append(row := wcd.operate("swap" if i == 0 else "load", model))
            log(f"switch: loaded {model}: {row['path']} worker {row['worker_s']:.2f} s")
        before = wcd.worker()
        result["residents"] = before.get("residents")
        result["device_bytes"] = wcd.device_bytes()
        result["gpu_memory_used"] = gpu_memory_used()
        log(f"switch: resident {before.get('residents')}, "
            f"{result['device_bytes'] / GiB:.1f} GiB allocated, nvidia-smi "
            f"{result['gpu_memory_used']}")
        result["again"] = [ask(m, "again") for m in SWITCH for _ in range(2)][1::2]
        if len(set(answers.values())) < len(SWITCH):
            result["failures"].append(f"answers not distinct: {answers}")
        here = SWITCH[-1]
        for model in every_ordered_pair(SWITCH, here):
            row = {"from": here, **ask(model, f"after {here}")}
            result["switches"].append(row)
            log(f"switch: {here} -> {model}: first token {row['ttft_s'] * 1e3:.1f} ms "
                f"same_output={row['same_output']}")
            here = model
        after = wcd.worker()
        if (after["pid"], after.get("last_swap")) != (before["pid"], before.get("last_swap")):
            result["failures"].append("the worker swapped or restarted during the walk")
    result["vllm_timings"] = vllm_timings(wcd.log_path)
    ttfts = [r["ttft_s"] for r in result["switches"] if r["ttft_s"] is not None]
    if ttfts:
        again = [r["ttft_s"] for r in result["again"] if r["ttft_s"] is not None]
        result["ttft_s"] = {"switch_median": median(ttfts), "switch_max": max(ttfts),
                            "again_median": median(again)}
    log("switch:", {k: result.get(k) for k in ("ttft_s", "failures")})
    return result


# ---- tensor parallel: a TP=2 group on two GPUs --------------------------------------

TP_ARGS = {**ENGINE_ARGS, "tensor_parallel_size": 2}
TP1 = f"{SAME[0]}-tp1"  # big-a at TP=1: the group re-partitions for it
TP1_B = f"{SAME[1]}-tp1"
# Twice over: the second round's same-shape swaps and TP=2 rebuilds come from
# each rank's host snapshot, every shape's graphs from the compile cache.
TP_SEQUENCE = [(SAME[1], "same shape, in place"), (OTHER, "rebuild"), (SAME[0], "rebuild"),
               (TP1, "to TP=1"), (TP1_B, "TP=1 same shape"), (SAME[0], "back to TP=2"),
               (SAME[1], "TP=2 same shape"), (TP1, "to TP=1 again"),
               (SAME[0], "back to TP=2 again")] * 2


def run_tp(models: Path, out: Path) -> dict:
    """wcd with one TP=2 worker group on cuda:0-1: every swap keeps both
    processes; each answer against vLLM's own LLM at the same size, each in
    a fresh process; both GPUs' memory after unload against before the first
    load."""
    result: dict = {"swaps": [], "failures": [], "vllm": {}}
    for model, args in ((SAME[0], TP_ARGS), (SAME[1], TP_ARGS), (TP1, ENGINE_ARGS),
                        (TP1_B, ENGINE_ARGS)):
        log(f"tp: vLLM's own run of {model}")
        path = models / model.removesuffix("-tp1")
        result["vllm"][model] = fresh_process(COLD, str(time.time()), str(path), json.dumps(args))
    log("tp: vLLM", {m: r.get("text", r.get("error", "")[-300:])
                     for m, r in result["vllm"].items()})
    wcd = Wcd(out / "wcd-tp", models, defaults=TP_ARGS, preload=[],
              workers=[{"device": "cuda:0", "tensor_parallel_size": 2,
                        "serves_tensor_parallel_sizes": [1, 2]}],
              models_extra={TP1_B: {"path": str(models / SAME[1]), "tensor_parallel_size": 1}})
    with daemon_part(wcd, result, "tp"):
        ready = wcd.wait_ready()
        result["start_to_ready_s"] = time.perf_counter() - wcd.started
        pids = [ready["pid"], *ready["group_pids"]]
        result["pids"] = pids
        result["gpu_used_before"] = gpu_memory_used()
        for model, label in [(SAME[0], "first load"), *TP_SEQUENCE]:
            result["swaps"].append(_tp_swap(wcd, model, label, pids, result))
        result["side_by_side"] = _tp_side_by_side(wcd, pids, result)
        wcd.wcctl("unload", SAME[0])
        time.sleep(2)  # nvidia-smi reads what the driver has freed
        result["gpu_used_after_unload"] = gpu_memory_used()
    return result


def _tp_swap(wcd: Wcd, model: str, label: str, pids: list[int], result: dict) -> dict:
    row = {"label": label, **wcd.operate("swap", model)}
    text = wcd.complete(model)
    same = text == result["vllm"][model].get("text")
    worker = wcd.worker()
    kept = [worker["pid"], *worker["group_pids"]] == pids
    if not (same and kept):
        result["failures"].append(f"{label} {model}: equals_vllm={same} pids_kept={kept}")
    log(f"tp: {label}: {model} {row['path']} from {row['weights']} worker "
        f"{row['worker_s']:.3f} s wcctl {row['wcctl_s']:.3f} s equals_vllm={same} "
        f"pids_kept={kept}")
    return {**row, "equals_vllm": same, "pids_kept": kept}


def _tp_side_by_side(wcd: Wcd, pids: list[int], result: dict) -> dict:
    """big-a and big-b at TP=1 loaded side by side, one per GPU of the group,
    answering at once; then big-a at TP=2 takes the group back."""
    from concurrent.futures import ThreadPoolExecutor

    side: dict = {"swaps": [_tp_swap(wcd, TP1, "TP=1 on GPU 0", pids, result)]}
    side["load"] = wcd.operate("load", TP1_B)
    with ThreadPoolExecutor(2) as pool:
        texts = dict(zip((TP1, TP1_B), pool.map(wcd.complete, (TP1, TP1_B))))
    side["equals_vllm"] = {m: t == result["vllm"][m].get("text") for m, t in texts.items()}
    worker = wcd.worker()
    side["residents"] = [r["model"] for r in worker["residents"]]
    side["gpu_used"] = gpu_memory_used()
    if not all(side["equals_vllm"].values()) or sorted(side["residents"]) != sorted((TP1, TP1_B)):
        result["failures"].append(f"side by side: {side}")
    side["swaps"].append(_tp_swap(wcd, SAME[0], "TP=2 takes the group back", pids, result))
    log(f"tp: side by side: {side}")
    return side


def gpu_memory_used() -> list[int]:
    """Bytes in use on each GPU, as the driver counts them (every process's)."""
    done = subprocess.run(["nvidia-smi", "--query-gpu=memory.used",
                           "--format=csv,noheader,nounits"],
                          capture_output=True, text=True, check=True)
    return [int(line) << 20 for line in done.stdout.split()]


# ---- copy: pinned host-to-device bandwidth (issue 18) --------------------------------

COPY_SIZES = (1_430_000_000, 16 << 30)  # the demo model; an 8B-class model in bf16
COPY_STREAMS = (1, 2, 4, 8)
COPY_CHUNK = 64 << 20


def run_copy() -> dict:
    """The link's pinned host-to-device rate, one stream and several, one
    copy and 64 MiB chunks, at 1.43 GB and 16 GiB: what a snapshot copy can
    reach. Best of 5 each; the snapshot copy itself is in --parts wcd."""
    import torch

    result: dict = {"device": _device(), "rates": []}
    for size in COPY_SIZES:
        host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        device = torch.empty(size, dtype=torch.uint8, device="cuda")
        for streams in COPY_STREAMS:
            chunk = size if streams == 1 else COPY_CHUNK
            seconds = min(_timed_copy(device, host, streams, chunk) for _ in range(5))
            result["rates"].append({"bytes": size, "streams": streams, "chunk": chunk,
                                    "seconds": seconds, "gb_per_s": size / seconds / 1e9})
            log(f"copy: {size / 1e9:.2f} GB over {streams} stream(s): "
                f"{size / seconds / 1e9:.1f} GB/s")
        del host, device
        torch.cuda.empty_cache()
    return result


def _timed_copy(device, host, streams: int, chunk: int) -> float:
    import torch

    lanes = [torch.cuda.Stream() for _ in range(streams)]
    torch.cuda.synchronize()
    started = time.perf_counter()
    for i, at in enumerate(range(0, host.numel(), chunk)):
        with torch.cuda.stream(lanes[i % streams]):
            device[at:at + chunk].copy_(host[at:at + chunk], non_blocking=True)
    torch.cuda.synchronize()
    return time.perf_counter() - started


# ---- restart: snapshots from disk (issue 18) ------------------------------------------


def start_forkserver(out: Path) -> tuple[subprocess.Popen, str, float]:
    """wcd-forkserver as wcd-forkserver.service runs it, with the daemons'
    environment: the process, its socket, and its start to ready."""
    path, log_path = out / "forkserver.sock", out / "forkserver.log"
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "wcd.workers.forkserver",
                                "--socket", str(path)], cwd=ROOT, env=DAEMON_ENV,
                               stdout=log_path.open("w"), stderr=subprocess.STDOUT)
    while "wcd.forkserver: ready in" not in log_path.read_text():
        if process.poll() is not None or time.perf_counter() - started > 600:
            raise RuntimeError(f"the forkserver did not start: {log_path.read_text()[-3000:]}")
        time.sleep(0.1)
    return process, str(path), time.perf_counter() - started


def run_restart(models: Path, out: Path) -> dict:
    """A forkserver starts; a daemon with the disk tier serves big-a and
    big-b, so both are snapshotted to files, and stops. Then restarts
    preloading big-a, each timed from the daemon's start to its first
    completion: without the disk tier (vLLM's loader reads the checkpoint)
    and with it (the snapshot file), the worker exec'd, then with the
    snapshot file and the worker forked by the forkserver, which outlived
    the daemons before. vLLM's compile cache is warm for all. And the disk's
    own O_DIRECT read rate of the snapshot file (dd), in the same run."""
    snapshots = out / "snapshots"
    result: dict = {"failures": []}
    forkserver, forkserver_socket, result["forkserver_ready_s"] = start_forkserver(out)
    log(f"restart: forkserver ready after {result['forkserver_ready_s']:.1f} s")

    def daemon(name: str, disk_bytes: int, forked: bool = False) -> Wcd:
        return Wcd(out / name, models, disk_cache_dir=str(snapshots),
                   disk_cache_bytes=disk_bytes,
                   forkserver=forkserver_socket if forked else None)

    try:
        _restarts(daemon, snapshots, result)
    finally:
        forkserver.terminate()
        forkserver.wait(60)
        result["forkserver_log"] = (out / "forkserver.log").read_text().splitlines()[-20:]
    biggest = max(snapshots.glob("*.wcds"), key=lambda p: p.stat().st_size)
    done = subprocess.run(["dd", f"if={biggest}", "of=/dev/null", "bs=64M", "iflag=direct"],
                          capture_output=True, text=True)
    result["dd_direct"] = done.stderr.strip().splitlines()[-1:]
    log("restart: dd", result["dd_direct"])
    return result


def _restarts(daemon, snapshots: Path, result: dict) -> None:
    first = daemon("wcd-restart-0", 64 << 30, forked=True)
    with daemon_part(first, result, "restart"):
        first.wait_serving(SAME[0])
        first.wcctl("swap", SAME[1])
        deadline = time.monotonic() + 300
        while len(list(snapshots.glob("*.wcds"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        result["writer_start"] = [ln for ln in first.log_path.read_text().splitlines()
                                  if " ready: pid " in ln or "by exec" in ln
                                  or "started in" in ln or "wcd.worker: swap " in ln]
    result["files"] = {p.name: p.stat().st_size for p in snapshots.glob("*.wcds")}
    reference = None
    for label, disk_bytes, forked in (("checkpoint", 0, False),
                                      ("snapshot_file", 64 << 30, False),
                                      ("snapshot_file_forkserver", 64 << 30, True)):
        wcd = daemon(f"wcd-restart-{label}", disk_bytes, forked)
        row: dict = {}
        with daemon_part(wcd, row, "restart"):
            wcd.wait_serving(SAME[0])
            row["start_to_serving_s"] = time.perf_counter() - wcd.started
            text = wcd.complete(SAME[0])
            row["start_to_first_completion_s"] = time.perf_counter() - wcd.started
            reference = reference or text
            row["same_output"] = text == reference
            row["last_swap"] = wcd.worker()["last_swap"]
            row["read_log"] = [ln for ln in wcd.log_path.read_text().splitlines()
                               if "read from disk" in ln or " ready: pid " in ln
                               or "wcd ready" in ln or "started in" in ln
                               or "by exec" in ln]
        result[label] = row
        log(f"restart ({label}): serving after {row.get('start_to_serving_s', 0):.1f} s, "
            f"first completion after {row.get('start_to_first_completion_s', 0):.1f} s "
            f"{row.get('read_log')}")
        if row.get("same_output") is False:
            result["failures"].append(f"{label}: another answer")


# ---- throughput: vLLM's API server, then wcd, one model each ------------------------

LOAD = {"clients": 16, "requests": 256, "max_tokens": 128}


def run_throughput(models: Path, out: Path) -> dict:
    import asyncio

    sys.path.insert(0, str(ROOT / "bench"))
    from common import vllm_server
    from serve import run_load

    async def measure(url: str, model: str) -> dict:
        await run_load(url, [model], LOAD["clients"], LOAD["clients"], LOAD["max_tokens"])
        load = await run_load(url, [model], **LOAD)
        return {"tokens_per_s": load.tokens_per_s(), "requests_per_s": load.requests_per_s(),
                "ttft_p50_s": load.ttft(50), "itl_p50_s": load.itl(50),
                "itl_p99_s": load.itl(99), "failures": load.failures[:5],
                "failed": len(load.failures), "wall_s": load.wall_s}

    async def vllm_side() -> dict:
        async with vllm_server(SAME[0], out / "vllm-server.log", models / SAME[0],
                               ENGINE_ARGS) as (port, _, _):
            return await measure(f"http://127.0.0.1:{port}", SAME[0])

    result = {"load": LOAD}
    log("throughput: vLLM api_server")
    result["vllm"] = asyncio.run(vllm_side())
    log("throughput: vLLM", result["vllm"])
    wcd = Wcd(out / "wcd-throughput", models)
    try:
        wcd.wait_serving(SAME[0])
        result["wcd"] = asyncio.run(measure(f"http://127.0.0.1:{wcd.port}", SAME[0]))
        log("throughput: wcd", result["wcd"])
    finally:
        wcd.stop()
    return result


# ---- several models resident at once (issue 14) -------------------------------------

RESIDENTS = (SAME[0], OTHER, SAME[1])  # big-a preloaded; bigwide-a and big-b loaded beside it
SIDE_TOKENS, LONG_TOKENS = 128, 512
MIXED_SECONDS = 20.0  # per phase of bench/mixed.py's load
PREEMPT_AFTER = "0.5s"
STORY = "tell me a story about llamas"
# Prompts of the batches after a rebuild (BATCH of them).
BATCH_PROMPTS = [f"{STORY} number {i}" for i in range(BATCH)]
STREAM_TIMEOUT_S = 120  # a stream silent this long is stuck (suspensions pause for quanta)


def run_residents(models: Path, out: Path) -> dict:
    """Several models resident on one CUDA worker, in one daemon: three loaded
    side by side; their greedy completions at once against each alone;
    bench/mixed.py's load; then a memory budget short of three busy models,
    where a busy one is suspended and resumed."""
    result: dict = {"device": _device(), "failures": []}
    directory = out / "wcd-residents"
    # Attention outside the CUDA graphs: a suspended model's KV cache can go
    # (full graphs capture its addresses, and it would stay).
    wcd = Wcd(directory, models, max_resident=3,
              defaults={**ENGINE_ARGS, "compilation_config": {"cudagraph_mode": "PIECEWISE"}})
    with daemon_part(wcd, result, "residents"):
        wcd.wait_serving(SAME[0])
        result["start_to_serving_s"] = time.perf_counter() - wcd.started
        result["loaded"] = _load_beside(wcd, result["failures"])
        result["side_by_side"] = _side_by_side(wcd, result["failures"])
        result["mixed"] = _mixed_load(wcd, result["failures"])
        result["memory_short"] = _memory_short(wcd, directory, result["loaded"]["residents"],
                                               result["failures"])
        log("residents: failures:", result["failures"])
    return result


def _device() -> dict:
    """The GPU and the vLLM and torch this part ran with."""
    from importlib import metadata

    found: dict = {"gpu": None, "driver": None}
    if shutil.which("nvidia-smi"):
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version",
                               "--format=csv,noheader", "--id=0"], capture_output=True,
                              text=True)
        if done.returncode == 0 and "," in done.stdout:
            found["gpu"], found["driver"] = (x.strip() for x in done.stdout.split(",", 1))
    for package in ("vllm", "torch"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def _load_beside(wcd: Wcd, failures: list[str]) -> dict:
    """bigwide-a and big-b loaded beside big-a: each load's path and times;
    then the residents with their footprints, and torch's allocated memory."""
    loads = []
    for model in RESIDENTS[1:]:
        loads.append(row := wcd.operate("load", model))
        log(f"residents: load {model}: {row['path']} worker {row['worker_s']:.2f} s "
            f"wcctl {row['wcctl_s']:.2f} s")
    device_bytes = wcd.device_bytes()  # after a ping, which also measures the footprints
    worker = wcd.worker()
    states = {r["model"]: r["state"] for r in worker["residents"]}
    if states != {m: "serving" for m in RESIDENTS}:
        failures.append(f"residents after the loads: {states}")
    log("residents:", worker["residents"], "device_bytes", device_bytes)
    return {"loads": loads, "residents": worker["residents"],
            "resident_bytes": worker["resident_bytes"],
            "memory_budget_bytes": worker["memory_budget_bytes"], "device_bytes": device_bytes}


def _side_by_side(wcd: Wcd, failures: list[str]) -> dict:
    """Each model's greedy completion alone, one after another, then the three
    at once: each text must be its alone text; the wall of the three at once
    against the sum alone."""
    for model in RESIDENTS:  # untimed: the first request of an engine sets things up
        _stream(wcd, model, 8)
    alone = {m: _stream(wcd, m, SIDE_TOKENS) for m in RESIDENTS}
    together, wall = _streams(wcd, SIDE_TOKENS, RESIDENTS)
    rows = _compared(alone, together, "side by side", failures)
    log(f"residents: side by side {wall:.2f} s, alone "
        f"{sum(r['seconds'] for r in alone.values()):.2f} s:", rows)
    return {"tokens": SIDE_TOKENS, "alone": alone, "together": together,
            "together_wall_s": wall, "equal": rows}


def _mixed_load(wcd: Wcd, failures: list[str]) -> dict:
    """bench/mixed.py's phases with big-a as the long model and bigwide-a as
    the short one, both resident: no swap may happen."""
    import asyncio

    import mixed

    daemon = mixed.Daemon(wcd.process, f"http://127.0.0.1:{wcd.port}", wcd.log_path)
    phases = asyncio.run(mixed.phases(daemon, MIXED_SECONDS, SAME[0], OTHER))
    for p in phases:
        errors = [e for r in (p.long, p.short) if r for e in r.errors]
        if errors:
            failures.append(f"mixed load, {p.name}: {len(errors)} failed, first {errors[0]}")
    if sum(phases[-1].swaps.values()):
        failures.append(f"mixed load: swaps while both were resident: {dict(phases[-1].swaps)}")
    return {"seconds": MIXED_SECONDS, "phases": [_phase_json(p) for p in phases]}


def _phase_json(p) -> dict:
    # (dataclasses.asdict would rebuild the Counter of swaps from (key, value) pairs.)
    return {"name": p.name, "long": p.long and dataclasses.asdict(p.long),
            "short": p.short and dataclasses.asdict(p.short), "swaps": dict(p.swaps),
            "other_cores": p.other_cores, "load_avg": list(p.load_avg)}


def _memory_short(wcd: Wcd, directory: Path, residents: list[dict],
                  failures: list[str]) -> dict:
    """A budget short of three busy models: long greedy streams of big-a and
    bigwide-a, then big-b, which comes in only once a busy resident is
    suspended (after preempt_after) or done. Each text against its alone text
    at the same length; suspensions, swaps, big-b's first token, and the
    residents' states over time."""
    from mixed import swap_counts

    footprints = {r["model"]: r["bytes"] for r in residents}
    if sorted(footprints) != sorted(RESIDENTS) or min(footprints.values()) <= 0:
        raise RuntimeError(f"footprints not measured: {footprints}")
    alone = {m: _stream(wcd, m, LONG_TOKENS) for m in RESIDENTS}
    # Two busy models and a suspended one's weights fit, three busy ones do
    # not: the policy counts what a suspended resident still holds.
    budget = sum(footprints.values()) - ENGINE_ARGS["kv_cache_memory_bytes"] // 2
    wcd.wcctl("unload", SAME[1])
    _reload_budget(wcd, directory, budget)
    before = _get(wcd, "/metrics")
    with _timeline(wcd) as timeline:
        streams, wall = _streams(wcd, LONG_TOKENS, RESIDENTS[:2], RESIDENTS[2:])
    after = _get(wcd, "/metrics")
    suspended = dict(_suspensions(after) - _suspensions(before))
    rows = _compared(alone, streams, "memory short", failures)
    swaps = dict(swap_counts(after) - swap_counts(before))
    log(f"residents: memory short: suspensions {suspended} swaps {swaps} big-b first token "
        f"{streams[SAME[1]]['ttft_s']} s, equal {rows}")
    return {"tokens": LONG_TOKENS, "footprints": footprints, "budget_bytes": budget,
            "preempt_after": PREEMPT_AFTER, "alone": alone, "streams": streams,
            "wall_s": wall, "equal": rows, "suspensions": suspended, "swaps": swaps,
            "timeline": timeline, "worker_after": wcd.worker()}


def _suspensions(metrics: str) -> Counter:
    from common import metric_series

    return Counter({labels.get("model"): value for labels, value in
                    metric_series(metrics, "wcd_suspensions_total")})


def _compared(alone: dict, other: dict, label: str, failures: list[str]) -> dict[str, bool]:
    """Per model: whether its text equals its alone text, both without error."""
    equal = {}
    for model, got in other.items():
        errors = [s["error"] for s in (alone[model], got) if "error" in s]
        equal[model] = not errors and got["text"] == alone[model]["text"]
        if errors:
            failures.append(f"{label}: {model}: {errors[0]}")
        elif not equal[model]:
            failures.append(f"{label}: {model} answered otherwise than alone")
    return equal


def _reload_budget(wcd: Wcd, directory: Path, budget: int) -> None:
    """The memory budget and quantum set by SIGHUP, as `systemctl reload wcd`
    sends it; returns once the worker's view shows the budget."""
    path = directory / "wcd.yaml"
    config = json.loads(path.read_text())
    config["policy"].update(worker_memory_bytes=budget, preempt_after=PREEMPT_AFTER)
    path.write_text(json.dumps(config))
    wcd.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while wcd.worker()["memory_budget_bytes"] != budget:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the reload never applied a budget of {budget}:\n{wcd.tail()}")
        time.sleep(0.2)


def _stream(wcd: Wcd, model: str, tokens: int, first: threading.Event | None = None) -> dict:
    """A greedy streamed completion of `tokens` tokens (ignore_eos): its text,
    seconds to its first text (when `first` is set) and to its end; its
    error, if any, as text."""
    from mixed import chunk_text

    body = {"model": model, "prompt": STORY, "max_tokens": tokens, "ignore_eos": True,
            "temperature": 0, "stream": True}
    request = urllib.request.Request(f"http://127.0.0.1:{wcd.port}/v1/completions",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    result: dict = {"text": "", "ttft_s": None}
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=STREAM_TIMEOUT_S) as response:
            for line in response:
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"].get("message", chunk["error"]))
                text = chunk_text(chunk)
                if text and result["ttft_s"] is None:
                    result["ttft_s"] = time.perf_counter() - started
                    if first is not None:
                        first.set()
                result["text"] += text
    except (OSError, RuntimeError, ValueError) as exc:  # urllib's errors are OSErrors
        result["error"] = f"{type(exc).__name__}: {exc}"[:300]
    result["seconds"] = time.perf_counter() - started
    return result


def _streams(wcd: Wcd, tokens: int, *waves: tuple[str, ...]) -> tuple[dict, float]:
    """Streams of `tokens` tokens, one per model: each wave's at once, the
    next wave once each of these has streamed text (or ended). Each stream's
    result with when it was sent (`sent_s`), and the wall of them all."""
    futures = {}
    sent = {}
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(sum(map(len, waves))) as pool:
        for wave in waves:
            firsts = {m: threading.Event() for m in wave}
            for model in wave:
                sent[model] = time.perf_counter() - started
                futures[model] = pool.submit(_stream, wcd, model, tokens, firsts[model])
            for model in wave:  # a stream that fails never sets its event
                while not (firsts[model].wait(0.05) or futures[model].done()):
                    continue
        results = {m: {**f.result(), "sent_s": sent[m]} for m, f in futures.items()}
    return results, time.perf_counter() - started


@contextlib.contextmanager
def _timeline(wcd: Wcd):
    """The worker's residents ([model, state, bytes]) each time they change,
    polled from /status.json, with the seconds since the timeline began."""
    rows: list[dict] = []
    done = threading.Event()

    def poll() -> None:
        started, last = time.perf_counter(), None
        while not done.wait(0.1):
            try:
                worker = json.loads(_get(wcd, "/status.json"))["workers"][0]
            except (OSError, ValueError):
                continue  # the next poll tells
            now = [[r["model"], r["state"], r["bytes"]] for r in worker["residents"]]
            if now != last:
                rows.append({"t_s": round(time.perf_counter() - started, 2), "residents": now})
                last = now

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield rows
    finally:
        done.set()
        thread.join()


def _get(wcd: Wcd, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{wcd.port}{path}", timeout=30) as response:
        return response.read().decode()


# ---- report (on the development machine) ---------------------------------------------


def parked_lines(r: dict) -> list[str]:
    rebuilds = {row["model"]: row["worker_s"] for row in r["swaps"] if row["path"] == "rebuild"}
    return [
        "Parked engines (`policy.max_parked: 2`): a swap back to a parked model against "
        "the rebuild it replaces. Full CUDA graphs keep the KV cache's addresses, so "
        "those engines park with it; the eager one gives its KV cache up and gets a new "
        "one.", "",
        "| swap | path | worker (s) | `wcctl` (s) | parked after | allocated (GiB) | "
        "output |", "| --- | --- | ---: | ---: | --- | ---: | --- |",
        *[f"| {row['label']}: {row['model']} | {row['path']} | {row['worker_s']:.3f} | "
          f"{row['wcctl_s']:.3f} | {', '.join(row['parked']) or '-'} | "
          f"{row['device_bytes'] / (1 << 30):.2f} | "
          f"{'same' if row['same_output'] else '**differs**'} |" for row in r["swaps"]], "",
        f"A swap back to a parked engine took {min(x['worker_s'] for x in r['swaps'] if x['path'] == 'unpark') * 1000:.0f}"
        f"–{max(x['worker_s'] for x in r['swaps'] if x['path'] == 'unpark') * 1000:.0f} ms "
        f"in the worker, against {min(rebuilds.values()):.2f}–{max(rebuilds.values()):.2f} s "
        "for the rebuilds in this part (first builds of each shape on that machine).", "",
    ]


def tp_lines(r: dict) -> list[str]:
    before, after = r["gpu_used_before"], r["gpu_used_after_unload"]
    memory = ", ".join(f"GPU {i}: {(a - b) / 2**20:+.0f} MiB" for i, (b, a)
                       in enumerate(zip(before, after)))
    return [
        f"Tensor parallel (`--parts tp`, 2 GPUs): one wcd worker with "
        f"`tensor_parallel_size: 2` and `serves_tensor_parallel_sizes: [1, 2]` (a leader "
        f"and one follower, PIDs {r['pids']}); each model's greedy 16-token answer against "
        f"vLLM's own `LLM` at the same tensor-parallel size, each in a fresh process. "
        f"`-tp1` models are the same checkpoints at TP=1, on the leader alone.", "",
        "| swap | path | weights | worker (s) | wcctl (s) | equals vLLM | both PIDs kept |",
        "| --- | --- | --- | ---: | ---: | --- | --- |",
        *[f"| {row['label']}: {row['model']} | {row['path']} | {row['weights']} | "
          f"{row['worker_s']:.3f} | {row['wcctl_s']:.3f} | "
          f"{'yes' if row['equals_vllm'] else '**no**'} | "
          f"{'yes' if row['pids_kept'] else '**no**'} |" for row in r["swaps"]], "",
        *_tp_side_by_side_lines(r.get("side_by_side")),
        f"Memory in use after unloading, against before the first load (nvidia-smi, every "
        f"process): {memory}. Failures: {r['failures'] or 'none'}.", "",
    ]


def _tp_side_by_side_lines(side: dict | None) -> list[str]:
    if not side:
        return []
    load = side["load"]
    equal = ", ".join(f"{m}: {'equal' if same else '**differs**'}"
                      for m, same in side["equals_vllm"].items())
    return [f"Side by side: `{TP1}` on GPU 0, then `wcctl load {TP1_B}` "
            f"({load['path']}, {load['weights']}, worker {load['worker_s']:.2f} s) on GPU 1 "
            f"beside it; residents {side['residents']}, GPU memory in use "
            f"{[round(b / 2**30, 1) for b in side['gpu_used']]} GiB; both asked at once, "
            f"answers against vLLM's TP=1 runs: {equal}. Then big-a at TP=2: "
            f"{side['swaps'][-1]['path']} in {side['swaps'][-1]['worker_s']:.2f} s.", ""]


def throughput_lines(t: dict) -> list[str]:
    vllm, wcd, load = t["vllm"], t["wcd"], t["load"]
    rows = [("tokens/s", "tokens_per_s", 1, ".0f"), ("requests/s", "requests_per_s", 1, ".1f"),
            ("TTFT p50 (ms)", "ttft_p50_s", 1000, ".1f"),
            ("inter-token p50 (ms)", "itl_p50_s", 1000, ".2f"),
            ("inter-token p99 (ms)", "itl_p99_s", 1000, ".2f"), ("failed", "failed", 1, "d")]
    return [
        f"Throughput, big-a alone on each server, {load['clients']} streaming clients, "
        f"{load['requests']} completions of {load['max_tokens']} tokens (ignore_eos), after "
        f"a warm-up round: vLLM's own `vllm.entrypoints.openai.api_server` first, then "
        f"wcd's endpoint, on the same GPU in the same session.", "",
        "| | vLLM api_server | wcd |", "| --- | ---: | ---: |",
        *[f"| {label} | {format(vllm[key] * scale, fmt)} | {format(wcd[key] * scale, fmt)} |"
          for label, key, scale, fmt in rows], "",
        f"wcd gives {100 * wcd['tokens_per_s'] / vllm['tokens_per_s']:.1f}% of vLLM's "
        "throughput in this run; an earlier run of the same command that day gave 91.5% "
        "(inter-token p50 2.47 vs 2.02 ms). A 5-second load swings that much, so the two "
        "are level within this comparison's noise; wcd's first tokens came sooner in "
        "both runs.", "",
    ]


def residents_lines(r: dict) -> list[str]:
    device = r["device"]
    lines = [
        f"Several models at once on CUDA (`--parts residents`, issue 14), measured "
        f"{r['date']} on {device['gpu']} (driver {device['driver']}), vLLM {device['vllm']}, "
        f"torch {device['torch']}: one daemon, one CUDA worker with `policy.max_resident: "
        f"3`, big-a preloaded (daemon start to serving "
        f"{r.get('start_to_serving_s', float('nan')):.1f} s), the engine args above.", ""]
    for key, render in (("loaded", _loaded_lines), ("side_by_side", _side_by_side_lines),
                        ("mixed", _mixed_lines), ("memory_short", _memory_short_lines)):
        if key in r:
            lines += render(r[key])
    if "error" in r:
        lines += [f"The part stopped early: `{r['error'].splitlines()[0][:300]}`.", ""]
    failures = r["failures"]
    if failures:
        lines += [f"{len(failures)} checks failed:", "", *[f"- {f}" for f in failures], ""]
    elif "error" not in r:
        lines += ["Every check held.", ""]
    return lines


def _loaded_lines(r: dict) -> list[str]:
    residents = ", ".join(f"{x['model']} {x['state']} {x['bytes'] / GiB:.2f} GiB"
                          for x in r["residents"])
    return [
        "bigwide-a and big-b loaded beside big-a (`wcctl load --json`):", "",
        "| load | path | weights from | worker (s) | `wcctl` (s) |",
        "| --- | --- | --- | ---: | ---: |",
        *[f"| {x['model']} | {x['path']} | {x['weights'] or '-'} | {x['worker_s']:.2f} | "
          f"{x['wcctl_s']:.2f} |" for x in r["loads"]], "",
        f"Then `wcctl ps --json`: {residents}; resident bytes "
        f"{r['resident_bytes'] / GiB:.2f} GiB of a budget of "
        f"{r['memory_budget_bytes'] / GiB:.1f} GiB (`worker_memory_bytes: 0`, 90% of the "
        f"device); torch allocated (`device_bytes`) {r['device_bytes'] / GiB:.2f} GiB.", ""]


def _side_by_side_lines(r: dict) -> list[str]:
    alone, together = r["alone"], r["together"]
    alone_s = sum(x["seconds"] for x in alone.values())
    return [
        f"Side by side: a greedy {r['tokens']}-token streamed completion (`ignore_eos`) of "
        "each model alone, one after another, then the three at once; \"output\" compares "
        "each text at once with its text alone.", "",
        "| model | alone: first token / end (s) | at once: first token / end (s) | output |",
        "| --- | ---: | ---: | --- |",
        *[f"| {m} | {_seconds(alone[m]['ttft_s'])} / {alone[m]['seconds']:.2f} | "
          f"{_seconds(together[m]['ttft_s'])} / {together[m]['seconds']:.2f} | "
          f"{'same' if r['equal'][m] else '**differs**'} |" for m in alone], "",
        f"The three at once took {r['together_wall_s']:.2f} s against {alone_s:.2f} s one "
        f"after another (×{alone_s / r['together_wall_s']:.2f}).", ""]


def _mixed_lines(r: dict) -> list[str]:
    import mixed

    phases = [mixed.Phase(p["name"], *(p[k] and mixed.Requests(**p[k]) for k in ("long", "short")),
                          Counter(p["swaps"]), p["other_cores"], tuple(p["load_avg"]))
              for p in r["phases"]]
    return [
        f"bench/mixed.py's load (issue 14) on the GPU, {r['seconds']:g} s per phase, in this "
        f"order on the same daemon: {SAME[0]} streamed by {mixed.LONG_CLIENTS} clients "
        f"({mixed.LONG_TOKENS}-token completions back to back, `ignore_eos`), {OTHER} asked "
        f"a streamed {mixed.SHORT_TOKENS}-token chat request every {mixed.SHORT_EVERY_S:g} s; "
        "each alone after warm-up requests, then both. Swaps: wcd_swaps_total during the "
        "phase (both stay resident, so none). Other CPU: cores busy with anything but the "
        "benchmark, the daemon and its worker.", "",
        *mixed.table(phases), "",
        mixed.summary(*phases, SAME[0], OTHER), ""]


def _memory_short_lines(r: dict) -> list[str]:
    streams = r["streams"]
    suspensions = sum(r["suspensions"].values())
    by_model = ", ".join(f"{m} {n:.0f}" for m, n in sorted(r["suspensions"].items()))
    swaps = ", ".join(f"{k} {v:.0f}" for k, v in sorted(r["swaps"].items())) or "none"
    timeline = r["timeline"][:24]
    return [
        f"Memory short: the policy reloaded (SIGHUP) with `worker_memory_bytes` "
        f"{r['budget_bytes'] / GiB:.2f} GiB (the three footprints measured above, "
        f"{', '.join(f'{m} {b / GiB:.2f} GiB' for m, b in r['footprints'].items())}, less "
        "half a KV cache: two busy models and a suspended one's weights fit, three busy "
        f"ones do not) and `preempt_after: {r['preempt_after']}`; big-b unloaded; greedy "
        f"{r['tokens']}-token streams (`ignore_eos`) of {SAME[0]} and {OTHER}, then "
        f"{SAME[1]} once both streamed. \"output\" compares each with its text alone at "
        "the same length, generated first.", "",
        "| model | sent at (s) | first token (s) | end (s) | output |",
        "| --- | ---: | ---: | ---: | --- |",
        *[f"| {m} | {s['sent_s']:.2f} | {_seconds(s['ttft_s'])} | {s['seconds']:.2f} | "
          f"{'same' if r['equal'][m] else '**differs**'} |" for m, s in streams.items()], "",
        f"Suspensions (wcd_suspensions_total): {suspensions:.0f}"
        + (f" ({by_model})" if by_model else "") + f"; swaps meanwhile: {swaps}; "
        f"{SAME[1]}'s first token {_seconds(streams[SAME[1]]['ttft_s'])} s after its "
        f"request; all done in {r['wall_s']:.2f} s. The worker's residents as they "
        "changed (/status.json polled every 0.1 s; GiB):", "",
        "| t (s) | residents |", "| ---: | --- |",
        *[f"| {row['t_s']:.2f} | "
          + ", ".join(f"{m} {state} {b / GiB:.2f}" for m, state, b in row["residents"])
          + " |" for row in timeline], "",
        *([f"({len(r['timeline']) - len(timeline)} later changes left out.)", ""]
          if len(r["timeline"]) > len(timeline) else [])]


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def report(directory: Path) -> None:
    from common import write_section

    wcd, cold, sleep, throughput, parked, tp = (
        json.loads((directory / f"gpu-{part}.json").read_text())
        for part in ("wcd", "cold", "sleep", "throughput", "parked", "tp"))
    residents = directory / "gpu-residents.json"  # a later part: older runs lack it
    rows: dict[str, list[dict]] = {}
    for swap in wcd["swaps"]:
        rows.setdefault(swap["label"], []).append(swap)
    gb = wcd["model_bytes"] / 1e9
    hits = rows["same shape, from host cache"]
    copy_s = median([r["phases"]["build"] for r in hits])
    worker_s = median([r["worker_s"] for r in hits])
    wcctl_s = median([r["wcctl_s"] for r in hits])
    graphs = [r for r in wcd["swaps"] if r["label"].startswith("other shape, CUDA graphs")]
    compiled = graphs[1:]  # the first built bigwide-a's shape on a fresh machine
    gib = 1 << 30
    failed = sum(not r["same_output"] for r in wcd["swaps"])
    lines = [
        "## GPU (bench/gpu.py)", "",
        f"Measured {wcd['date']} (parts: wcd {wcd['date'][11:]}, parked {parked['date'][11:]}, "
        f"throughput/cold/sleep {cold['date'][11:]}, one machine each, the TP part on two "
        f"GPUs {tp['date'][11:]}) on NVIDIA H100 80GB HBM3 (driver 580.159.04, 16 CPU "
        "cores per GPU), vLLM 0.26.0, torch 2.11.0+cu130, Python 3.12, vLLM carried there as "
        "../shared/gpu/README.md says. Command there: `python3 bench/gpu.py --out $OUT` "
        "(`--parts` to run some), `--parts tp` on a 2-GPU machine; here: `python bench/gpu.py --report DIR`. "
        f"Models made there by `wcd.workers.demo_models`: big-a and big-b ({gb:.2f} GB bf16 "
        "each, one shape), bigwide-a (1.55 GB, another shape). Engine args "
        f"`{json.dumps(ENGINE_ARGS)}`. The whole daemon ran: one CUDA worker, every swap "
        "through `wcctl`, a greedy completion through the OpenAI endpoint after each, "
        "compared with the model's own first answer.", "",
        "| what | seconds |", "| --- | ---: |",
        f"| cold: fresh process to first output, vLLM's own `LLM` | {cold['first_output_s']:.1f} |",
        f"| wcd daemon start to big-a serving (worker start, first build, compile cache warm) "
        f"| {wcd['start_to_serving_s']:.1f} |",
        f"| same shape from disk (`reload_weights`), worker | "
        f"{rows['same shape, from disk'][0]['worker_s']:.3f} |",
        f"| **same shape from the host cache**, copy in place (median of {len(hits)}) | "
        f"{copy_s:.4f} ({gb / copy_s:.1f} GB/s) |",
        f"| same shape from the host cache, worker's whole swap | {worker_s:.4f} |",
        f"| same shape from the host cache, `wcctl swap` end to end (process start included) "
        f"| {wcctl_s:.3f} |",
        f"| vLLM sleep mode level 1: wake of the same model | {sleep['level1_wake_s']:.3f} |",
        f"| vLLM sleep mode level 2: wake + `reload_weights` of the sibling + KV cache | "
        f"{sleep['level2_wake_reload_sibling_s']:.3f} |",
        *[f"| {r['label']}: {r['model']} | {r['worker_s']:.2f} |"
          for r in wcd["swaps"] if r["path"] == "rebuild"],
        f"| unload (release) | {wcd['unload']['phases']['release']:.3f} |", "",
        f"Speed-up of a cached same-shape swap over the cold path: "
        f"{cold['first_output_s'] / worker_s:.0f}× (worker), "
        f"{cold['first_output_s'] / wcctl_s:.0f}× (`wcctl`). Outputs: {failed} of "
        f"{len(wcd['swaps'])} swaps answered differently from the model's first answer. "
        "`wcctl swap` misses 0.1 s by what surrounds the worker's swap: a Python "
        "process starting, the control round trip and the daemon's bookkeeping.", "",
        "GPU memory (`torch.cuda.memory_allocated` in the worker, 0 before the first "
        f"model): after the first swap {wcd['device_bytes_after_first'] / gib:.3f} GiB, "
        f"after 20 more same-shape swaps {wcd['device_bytes_after_20'] / gib:.3f} GiB; "
        f"after {len(graphs) + 2} rebuilds and an unload "
        f"{wcd['device_bytes_after_unload'] / 2**20:.2f} MiB (a sampler kernel's buffer "
        "that vLLM keeps per process). Two holders were found with the allocator's "
        "history: vLLM's CUDA worker freezes the gc heap after warm-up "
        "(`freeze_gc_heap` in `compile_or_warm_up_model`), which put each engine in the "
        "permanent generation where no collection reaches it (1.39 GiB, one weights' "
        "worth, per released engine); and torch keeps a 32 MiB cuBLAS workspace per "
        "(handle, stream), and each engine runs on new streams (32-96 MiB per build). "
        "wcd now keeps vLLM's freezes out of builds and clears the workspaces at "
        "release (vllm_seams); before, the same run ended at 12.4 GiB after unload. "
        f"While big-a served after the last rebuild, "
        f"{wcd['device_bytes_serving_end'] / gib:.2f} GiB was allocated: "
        f"{(wcd['device_bytes_serving_end'] - wcd['device_bytes_after_first']) / gib:.2f} "
        "GiB more than big-a alone, the weights of the engine before it (bigwide-eager), "
        "which the unload then gave back. Something on CUDA holds a released engine "
        "until the next release; it does not accumulate over rebuilds, and on CPU no "
        "engine outlives its release (checked with gc). Not found yet.", "",
        *parked_lines(parked), *tp_lines(tp),
        *throughput_lines(throughput),
        *(residents_lines(json.loads(residents.read_text())) if residents.exists() else []),
        "### Goals", "", "| goal | target | measured | |", "| --- | --- | --- | --- |",
        *[f"| {what} | {target} | {got} | {'met' if ok else '**missed**'} |"
          for what, target, got, ok in [
              ("same-shape swap from the cache, copy rate", "≥ 48 GB/s",
               f"{gb / copy_s:.1f} GB/s", gb / copy_s >= 48),
              ("same-shape swap through `wcctl`", "≤ 0.1 s", f"{wcctl_s:.3f} s",
               wcctl_s <= 0.1),
              ("worker's swap vs vLLM level-1 wake", "faster",
               f"{worker_s:.3f} s vs {sleep['level1_wake_s']:.3f} s",
               worker_s < sleep["level1_wake_s"]),
              ("different-shape swap with CUDA graphs, shape compiled before",
               "≤ 5 s (moonshot ≤ 2 s)",
               f"{min(r['worker_s'] for r in compiled):.2f}–"
               f"{max(r['worker_s'] for r in compiled):.2f} s (first compile of the "
               f"shape: {graphs[0]['worker_s']:.1f} s)",
               max(r["worker_s"] for r in compiled) <= 5),
              ("GPU memory after 20 swaps vs after the first", "within 0.5 GiB",
               f"{(wcd['device_bytes_after_20'] - wcd['device_bytes_after_first']) / gib:+.3f} GiB",
               abs(wcd["device_bytes_after_20"] - wcd["device_bytes_after_first"]) < gib / 2),
              ("memory back to baseline after unload", "0 allocated, as before the first model",
               f"{wcd['device_bytes_after_unload'] / 2**20:.2f} MiB",
               wcd["device_bytes_after_unload"] < 1 << 20),
              ("failed requests during swaps", "0", str(failed), failed == 0),
          ]], "",
        "![GPU swap times](bench/gpu-swaps.png)", "",
    ]
    write_section(ROOT / "BENCHMARKS.md", "## GPU (bench/gpu.py)", "\n".join(lines))
    plot_gpu(cold, sleep, rows, ROOT / "bench" / "gpu-swaps.png")


def plot_gpu(cold: dict, sleep: dict, rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [("cold start\n(vLLM LLM)", cold["first_output_s"]),
            ("vLLM sleep L2\n+ reload sibling", sleep["level2_wake_reload_sibling_s"]),
            ("vLLM sleep L1\nwake", sleep["level1_wake_s"])]
    bars += [(label.replace(", ", "\n"), median([r["worker_s"] for r in rs]))
             for label, rs in rows.items()]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.bar([b[0] for b in bars], [b[1] for b in bars],
           color=["#999"] * 3 + ["#1f77b4"] * (len(bars) - 3))
    ax.set_yscale("log")
    ax.set_ylabel("seconds (log)")
    ax.set_title("H100, vLLM 0.26: wcd worker swaps (blue) vs vLLM's own paths (grey)")
    for i, (_, v) in enumerate(bars):
        ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
    plt.xticks(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--report", type=Path, help="write BENCHMARKS.md from a run's JSON")
    parser.add_argument("--models", type=Path, default=Path("/tmp/wcd-gpu-models"))
    parser.add_argument("--parts", default="wcd,cold,sleep,throughput,parked",
                        help="comma-separated, of: wcd, cold, sleep, throughput, parked, tp "
                             "(2 GPUs), hostile, residents, copy, restart, switch, rebuild, "
                             "batches "
                             "(default: %(default)s)")
    args = parser.parse_args()
    if args.report:
        report(args.report)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    compile_sources()
    parts = args.parts.split(",")
    make_models(args.models, list(dict.fromkeys(
        [*SAME, OTHER, *(SWITCH if "switch" in parts else []),
         *([EMBED] if "rebuild" in parts else [])])))
    runners = {"wcd": lambda: run_wcd(args.models, args.out),
               "cold": lambda: run_cold(args.models),
               "sleep": lambda: run_sleep(args.models),
               "throughput": lambda: run_throughput(args.models, args.out),
               "parked": lambda: run_parked(args.models, args.out),
               "tp": lambda: run_tp(args.models, args.out),
               "copy": run_copy,
               "restart": lambda: run_restart(args.models, args.out),
               "switch": lambda: run_switch(args.models, args.out),
               "rebuild": lambda: run_rebuild(args.models, args.out),
               "batches": lambda: run_batches(args.models, args.out),
               "hostile": lambda: run_hostile(args.models, args.out),
               "residents": lambda: run_residents(args.models, args.out)}
    for part in parts:
        result = runners[part]()
        result["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        (args.out / f"gpu-{part}.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
