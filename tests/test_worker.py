"""The warm worker end to end: one real worker process with real vLLM on CPU,
driven over the worker protocol, compared with vLLM's own offline output."""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ENGINE_ARGS, GREEDY, PROMPTS, ROOT
from daemon_harness import alive
from wcd.daemon.worker_process import WorkerError, WorkerGone, WorkerOptions, WorkerProcess
from wcd.workers import protocol as p

pytestmark = pytest.mark.vllm


def spec(models, name: str, path=None, **engine_args) -> p.ModelSpec:
    return p.ModelSpec(name, str(path or models / name), {**ENGINE_ARGS, **engine_args})


async def generate(worker: WorkerProcess, model: str, prompt: str,
                   in_flight: asyncio.Event | None = None, **sampling) -> list[int]:
    """`in_flight` is set at the first output: the engine is generating it."""
    request = p.Generate(f"t-{time.monotonic_ns()}", model, [p.Prompt(prompt=prompt)],
                         {**GREEDY, **sampling})
    tokens = []
    async for out in worker.generate(request):
        tokens += out.token_ids
        if in_flight is not None:
            in_flight.set()
    return tokens


@pytest.fixture(scope="module")
def workers(loop, demo_models):
    """The module's worker, started again for the next test once one killed it."""
    started: list[WorkerProcess] = []

    def live() -> WorkerProcess:
        if not started or not started[-1].alive:
            started.append(loop.run_until_complete(
                WorkerProcess.start(WorkerOptions(p.Setup(render_timeout_s=2.0)))))
        return started[-1]

    yield live
    if started and started[-1].alive:
        loop.run_until_complete(started[-1].stop())


@pytest.fixture
def worker(workers) -> WorkerProcess:
    return workers()


def serving(loop, worker) -> list[str]:
    """The worker's residents."""
    return [r.name for r in loop.run_until_complete(worker.ping(5)).residents]


def swap(loop, worker, model: p.ModelSpec, **options) -> p.OpDone:
    """Serve `model` in place of whatever the worker serves."""
    return loop.run_until_complete(worker.swap(model, replace=serving(loop, worker), **options))


def assert_matches_reference(loop, worker, model: str, reference) -> None:
    for i, prompt in enumerate(PROMPTS[:2]):
        got = loop.run_until_complete(generate(worker, model, prompt))
        assert got == reference[model]["prompts"][i]["token_ids"], (model, prompt)


def test_swaps_on_both_paths_match_vllm(loop, worker, demo_models, reference):
    expected_paths = [("small-a", "rebuild"), ("small-b", "same_shape"),
                      ("wide-a", "rebuild"), ("small-a", "rebuild")]
    if residents := serving(loop, worker):  # small-a's first swap builds from nothing
        loop.run_until_complete(worker.unload(residents))
    pid = worker.pid
    for name, path in expected_paths:
        phases = []
        done = swap(loop, worker, spec(demo_models, name), on_phase=phases.append)
        assert (done.model, done.path) == (name, path)
        assert list(done.phases) == list(p.SWAP_PHASES)
        assert [ph.phase for ph in phases] == list(p.SWAP_PHASES)
        assert done.total_s >= sum(done.phases.values()) * 0.99
        assert_matches_reference(loop, worker, name, reference)
    assert worker.pid == pid  # one process across every model


def test_swap_to_the_served_model_is_a_noop(loop, worker, demo_models):
    swap(loop, worker, spec(demo_models, "small-a"))
    done = swap(loop, worker, spec(demo_models, "small-a"))
    assert done.path == "noop"


def test_residents_carry_the_system_fingerprint_of_what_they_serve(loop, worker, demo_models):
    """vLLM's server fingerprint (its version and a hash of its engine config,
    the checkpoint's path included): one per checkpoint, the same whether
    reloaded in place or built, in every report."""
    def fingerprint(done: p.OpDone) -> str:
        (resident,) = done.residents
        return resident.fingerprint

    a = fingerprint(swap(loop, worker, spec(demo_models, "small-a")))
    in_place = swap(loop, worker, spec(demo_models, "small-b"))
    assert in_place.path == "same_shape"
    swap(loop, worker, spec(demo_models, "wide-a"))
    built = swap(loop, worker, spec(demo_models, "small-b"))
    assert built.path == "rebuild"
    assert fingerprint(built) == fingerprint(in_place) != a
    version = re.escape(worker.ready.vllm_version)
    assert re.fullmatch(rf"vllm-{version}-[0-9a-f]{{8}}", a)
    (resident,) = loop.run_until_complete(worker.ping(5)).residents
    assert resident.fingerprint == fingerprint(built)


def test_concurrent_requests_are_batched_and_correct(loop, worker, demo_models, reference):
    swap(loop, worker, spec(demo_models, "small-a"))

    async def many():
        return await asyncio.gather(*(generate(worker, "small-a", prompt)
                                      for prompt in PROMPTS * 3))

    results = loop.run_until_complete(many())
    expected = [r["token_ids"] for r in reference["small-a"]["prompts"]] * 3
    assert results == expected


def test_a_batch_is_one_request_with_one_stream(loop, worker, demo_models, reference):
    """Its prompts share one sampling dict; each Output names its prompt, and
    only the request's very last one says finished."""
    swap(loop, worker, spec(demo_models, "small-a"))
    request = p.Generate(f"b-{time.monotonic_ns()}", "small-a",
                         [p.Prompt(prompt=prompt) for prompt in PROMPTS], dict(GREEDY))

    async def collect():
        return [out async for out in worker.generate(request)]

    outputs = loop.run_until_complete(collect())
    tokens = {i: [t for out in outputs if out.prompt_index == i for t in out.token_ids]
              for i in range(len(PROMPTS))}
    assert tokens == {i: r["token_ids"] for i, r in enumerate(reference["small-a"]["prompts"])}
    assert [out.finished for out in outputs] == [False] * (len(outputs) - 1) + [True]


# Runs for ~10^10 iterations: only the render watchdog ends it.
SLOW_TEMPLATE = "{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}{% endfor %}"


def test_a_runaway_request_template_is_interrupted(loop, worker, demo_models):
    swap(loop, worker, spec(demo_models, "small-a"))
    pid = worker.pid
    request = p.Generate(f"s-{time.monotonic_ns()}", "small-a",
                         [p.Prompt(messages=[{"role": "user", "content": "hi"}])], dict(GREEDY),
                         chat_template=SLOW_TEMPLATE)

    async def collect():
        return [out async for out in worker.generate(request)]

    started = time.monotonic()
    with pytest.raises(WorkerError) as raised:
        loop.run_until_complete(collect())
    assert raised.value.error.kind == p.BAD_ARGS
    assert "render_timeout" in raised.value.error.message
    assert time.monotonic() - started < 10  # 2 s limit, and a poll
    assert worker.pid == pid and serving(loop, worker) == ["small-a"]
    assert loop.run_until_complete(generate(worker, "small-a", "hello"))


def test_swap_drains_in_flight_requests_first(loop, worker, demo_models):
    swap(loop, worker, spec(demo_models, "small-a"))

    async def swap_during_request():
        in_flight = asyncio.Event()
        request = asyncio.create_task(generate(worker, "small-a", "hello", in_flight,
                                               max_tokens=64, ignore_eos=True))
        await in_flight.wait()
        done = await worker.swap(spec(demo_models, "small-b"), replace=["small-a"])
        return await request, done

    tokens, done = loop.run_until_complete(swap_during_request())
    assert len(tokens) == 64  # finished on the old model, not cut off
    assert done.path == "same_shape"


def test_forced_swap_aborts_in_flight_requests(loop, worker, demo_models):
    swap(loop, worker, spec(demo_models, "small-a"))

    async def forced():
        in_flight = asyncio.Event()
        request = asyncio.create_task(generate(worker, "small-a", "hello", in_flight,
                                               max_tokens=400, ignore_eos=True))
        await in_flight.wait()
        await worker.swap(spec(demo_models, "small-b"), replace=["small-a"], force=True)
        return await request

    with pytest.raises(WorkerError) as raised:
        loop.run_until_complete(forced())
    assert raised.value.error.kind == p.ABORTED
    assert serving(loop, worker) == ["small-b"]


def test_generate_for_another_model_is_refused(loop, worker, demo_models):
    swap(loop, worker, spec(demo_models, "small-a"))
    with pytest.raises(WorkerError) as raised:
        loop.run_until_complete(generate(worker, "wide-a", "hello"))
    assert raised.value.error.kind == p.NOT_LOADED


def test_bad_sampling_params_are_refused_by_vllm(loop, worker, demo_models):
    swap(loop, worker, spec(demo_models, "small-a"))
    with pytest.raises(WorkerError) as raised:
        loop.run_until_complete(generate(worker, "small-a", "hello", temperature=-1.0))
    assert raised.value.error.kind == p.BAD_ARGS
    assert "temperature" in raised.value.error.message
    with pytest.raises(WorkerError) as raised:
        loop.run_until_complete(generate(worker, "small-a", "hello " * 600))
    assert raised.value.error.kind == p.BAD_ARGS  # longer than max_model_len


def test_vectors_that_do_not_pair_are_refused_and_the_worker_stays(loop, worker):
    """A Similarity is computed by the worker's torch: vectors of two lengths
    are refused as data, not a dead main thread."""
    two, three = (array.array("f", values).tobytes() for values in ([1, 0], [1, 0, 0]))
    assert loop.run_until_complete(worker.similarity([(two, two)])).scores == [1.0]
    with pytest.raises(WorkerError) as raised:
        loop.run_until_complete(worker.similarity([(two, three)]))
    assert raised.value.error.kind == p.BAD_ARGS
    assert loop.run_until_complete(worker.similarity([(three, three)])).scores == [1.0]


async def generate_ids(worker: WorkerProcess, model: str, prompt_len: int,
                       **sampling) -> list[p.Output]:
    request = p.Generate(f"t-{time.monotonic_ns()}", model,
                         [p.Prompt(prompt_token_ids=[100] * prompt_len)], {**GREEDY, **sampling})
    return [out async for out in worker.generate(request)]


def test_max_tokens_is_fitted_to_the_context_as_vllms_server_does(loop, worker, demo_models):
    """vLLM 0.32's OpenAI server (get_max_tokens, TokenizeParams) trims
    max_tokens to the rest of the context and refuses only what cannot fit."""
    swap(loop, worker, spec(demo_models, "small-a"))  # max_model_len 512
    outs = loop.run_until_complete(generate_ids(worker, "small-a", 500, max_tokens=100,
                                                ignore_eos=True))
    assert sum(len(out.token_ids) for out in outs) == 12
    assert outs[-1].finish_reason == "length"
    refused = {
        (500, 600): "max_tokens=600 cannot be greater than max_model_len=512. Please request "
                    "fewer output tokens. (parameter=max_tokens, value=600)",
        (520, 16): "This model's maximum context length is 512 tokens. However, your prompt "
                   "contains 520 input tokens, which exceeds this limit even without any output "
                   "tokens. Please reduce the length of the input prompt. "
                   "(parameter=input_tokens, value=520)",
        (512, 16): "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)",
    }
    for (prompt_len, max_tokens), message in refused.items():
        with pytest.raises(WorkerError) as raised:
            loop.run_until_complete(generate_ids(worker, "small-a", prompt_len,
                                                 max_tokens=max_tokens))
        assert raised.value.error.kind == p.BAD_ARGS
        assert raised.value.error.message == message


async def beam_search(worker: WorkerProcess, model: str, prompt: str,
                      **sampling) -> list[p.Output]:
    request = p.Generate(f"t-{time.monotonic_ns()}", model, [p.Prompt(prompt=prompt)],
                         {**GREEDY, **sampling}, beam_search=p.BeamSearch())
    return [out async for out in worker.generate(request)]


def test_a_beam_search_runs_beside_other_requests_and_aborts_whole(loop, worker, demo_models):
    """Its rounds are engine requests stepped with every other: a request sent
    meanwhile finishes first, and leaving the search aborts the round in flight."""
    swap(loop, worker, spec(demo_models, "small-a"))

    async def beside():
        search = asyncio.create_task(beam_search(worker, "small-a", "hello", n=3,
                                                 max_tokens=400, ignore_eos=True))
        while not (await worker.stats()).running_requests:  # its first round is stepping
            await asyncio.sleep(0.01)
        tokens = await generate(worker, "small-a", "hi", max_tokens=4)
        searching = not search.done()
        search.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await search
        return tokens, searching, await worker.stats()

    tokens, searching, stats = loop.run_until_complete(beside())
    assert len(tokens) == 4 and searching
    assert stats.running_requests == 0


def test_a_beam_search_with_nothing_to_generate_answers_at_once(loop, worker, demo_models):
    """As vLLM's server: at max_tokens 0 the one beam is the prompt alone."""
    swap(loop, worker, spec(demo_models, "small-a"))
    outs = loop.run_until_complete(beam_search(worker, "small-a", "hello", n=2, max_tokens=0))
    assert [(o.index, o.token_ids, o.finish_reason, o.finished) for o in outs] == \
        [(0, [], "length", True)]


def _copy(demo_models, tmp_path, name="small-b"):
    target = tmp_path / f"broken-{name}"
    shutil.copytree(demo_models / name, target)
    return target


def _truncate_weights(path):
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _drop_config(path):
    (path / "config.json").unlink()


def _unknown_architecture(path):
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["NoSuchModelForCausalLM"]
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("breakage, kind, words", [
    (None, p.BAD_MODEL, "does not exist"),
    (_drop_config, p.BAD_MODEL, "config.json"),
    (_truncate_weights, p.BAD_MODEL, "truncated"),
    (_unknown_architecture, p.BAD_MODEL, "NoSuchModelForCausalLM"),
])
def test_unusable_model_is_refused_and_previous_keeps_serving(
        loop, worker, demo_models, reference, tmp_path, breakage, kind, words):
    swap(loop, worker, spec(demo_models, "small-a"))
    path = tmp_path / "missing"
    if breakage is not None:
        path = _copy(demo_models, tmp_path)
        breakage(path)
    with pytest.raises(WorkerError) as raised:
        swap(loop, worker, spec(demo_models, "broken", path))
    assert raised.value.error.kind == kind
    assert words in raised.value.error.message
    assert [r.name for r in raised.value.residents] == ["small-a"]
    assert_matches_reference(loop, worker, "small-a", reference)


def test_unknown_engine_arg_names_the_arg(loop, worker, demo_models):
    swap(loop, worker, spec(demo_models, "small-a"))
    with pytest.raises(WorkerError) as raised:
        swap(loop, worker, spec(demo_models, "wide-a", no_such_arg=1))
    assert raised.value.error.kind == p.BAD_ARGS
    assert "no_such_arg" in raised.value.error.message
    assert [r.name for r in raised.value.residents] == ["small-a"]


def test_failure_after_release_brings_previous_model_back(
        loop, worker, demo_models, reference, tmp_path):
    """Weights whose names the architecture lacks pass every cheap check and
    fail inside vLLM's loader, after the previous engine was released."""
    swap(loop, worker, spec(demo_models, "small-a"))
    path = _copy(demo_models, tmp_path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.mlp.no_such_proj.weight"] = tensors.pop(
        "model.layers.0.mlp.up_proj.weight")
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    for name in ("small-b-renamed", "wide-renamed"):
        args = {} if name.startswith("small") else {"max_model_len": 256}  # forces a rebuild
        with pytest.raises(WorkerError) as raised:
            swap(loop, worker, spec(demo_models, name, path, **args))
        assert raised.value.error.kind == p.BAD_MODEL
        assert [r.name for r in raised.value.residents] == ["small-a"]
        assert_matches_reference(loop, worker, "small-a", reference)


def test_out_of_memory_while_building_is_reported_and_recovered(
        loop, worker, demo_models, reference):
    swap(loop, worker, spec(demo_models, "small-a"))
    with pytest.raises(WorkerError) as raised:
        swap(loop, worker, spec(demo_models, "wide-a", kv_cache_memory_bytes=1 << 45))
    assert raised.value.error.kind == p.OUT_OF_MEMORY
    assert [r.name for r in raised.value.residents] == ["small-a"]
    assert_matches_reference(loop, worker, "small-a", reference)


def test_ping_is_answered_while_an_engine_builds(loop, worker, demo_models):
    swap(loop, worker, spec(demo_models, "small-a"))

    async def ping_during_rebuild():
        fetched = asyncio.Event()  # the phase before the build

        def on_phase(phase: p.Phase) -> None:
            if phase.phase == "fetch":
                fetched.set()

        swapping = asyncio.create_task(worker.swap(spec(demo_models, "wide-a"),
                                                   replace=["small-a"], on_phase=on_phase))
        await fetched.wait()
        started = time.monotonic()
        pong = await worker.ping(timeout_s=2)
        latency = time.monotonic() - started
        await swapping
        return pong, latency

    pong, latency = loop.run_until_complete(ping_during_rebuild())
    assert pong.busy == "swap"
    assert latency < 2


def test_unload_gives_memory_back(loop, worker, demo_models):
    """RSS after unload within 50 MB of the empty worker's. The first cycle
    pays one-off costs (lazy imports, kernels), so the baseline is taken after
    it; the measured load uses a 256 MiB KV cache, which must come back."""
    swap(loop, worker, spec(demo_models, "wide-a"))
    loop.run_until_complete(worker.unload(["wide-a"]))
    before = loop.run_until_complete(worker.stats()).rss_bytes
    big = spec(demo_models, "wide-a", kv_cache_memory_bytes=256 << 20)
    swap(loop, worker, big)
    loaded = loop.run_until_complete(worker.stats()).rss_bytes
    done = loop.run_until_complete(worker.unload(["wide-a"]))
    after = loop.run_until_complete(worker.stats())
    assert done.path == "unload" and done.residents == [] and after.models == []
    assert loaded - before > 200 << 20  # the KV cache really was resident
    assert after.rss_bytes - before < 50 << 20, (before, loaded, after.rss_bytes)


def test_rebuilds_leave_nothing_behind(loop, worker, demo_models):
    """Each rebuild drops the previous engine whole, also one that took a
    same-shape swap. vLLM 0.32 kept them through Dynamo's bytecode hooks and
    its layerwise reload table (~5 MB per cycle of these models before wcd
    unpinned them); 4 cycles would show that."""
    def swap_cycle() -> int:
        for name in ("small-b", "wide-a", "small-a"):
            swap(loop, worker, spec(demo_models, name))
        return loop.run_until_complete(worker.stats()).rss_bytes

    swap_cycle()
    before = swap_cycle()
    for _ in range(4):
        after = swap_cycle()
    assert after - before < 10 << 20, (before, after)


def test_worker_crash_is_reported_not_hung(loop, worker, demo_models):
    """It kills the module's worker: the next test gets a new one."""
    swap(loop, worker, spec(demo_models, "small-a"))

    async def crash_during_request():
        in_flight = asyncio.Event()
        request = asyncio.create_task(generate(worker, "small-a", "hello", in_flight,
                                               max_tokens=400, ignore_eos=True))
        await in_flight.wait()
        worker.process.send_signal(signal.SIGKILL)
        return await asyncio.wait_for(request, 30)

    with pytest.raises(WorkerGone) as raised:
        loop.run_until_complete(crash_during_request())
    assert "exited with code -9" in str(raised.value)
    with pytest.raises(WorkerGone):
        loop.run_until_complete(worker.stats())


def test_worker_exits_when_its_parent_dies(demo_models):
    """A parent that dies without a word (SIGKILL) leaves no worker behind."""
    parent = subprocess.Popen(
        [sys.executable, "-c",
         "import asyncio, sys, time\n"
         "from wcd.daemon.worker_process import WorkerOptions, WorkerProcess\n"
         "async def main():\n"
         "    w = await WorkerProcess.start(WorkerOptions())\n"
         "    print(w.pid, flush=True)\n"
         "    await asyncio.sleep(600)\n"
         "asyncio.run(main())\n"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    worker_pid = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and alive(worker_pid):
        time.sleep(0.2)
    assert not alive(worker_pid)


def test_vllm_seams_still_fit_this_vllm():
    """Fails loudly when vLLM changes under a seam (wcd/workers/vllm_seams.py)."""
    done = subprocess.run(
        [sys.executable, "-c",
         "from wcd.workers import vllm_seams; vllm_seams.apply(); vllm_seams.check(); "
         "print('seams ok')"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert "seams ok" in done.stdout, done.stderr[-3000:]


VLLM_GC_CALLS_DURING_A_BUILD = """
import gc
from vllm.utils import gc_utils
from wcd.workers import vllm_seams

gc.freeze()
frozen = gc.get_freeze_count()
engine_objects = [[] for _ in range(1000)]  # allocated by a build, after the import freeze
with vllm_seams.collections_deferred():
    assert not gc.isenabled()
    gc_utils.freeze_gc_heap()  # EngineCore.__init__, CUDA Worker.compile_or_warm_up_model
    with gc_utils.freeze_gc_for_cudagraph_capture():
        pass
    gc.unfreeze()  # EngineCore.shutdown
print("frozen", frozen, gc.get_freeze_count(), "enabled", gc.isenabled())
"""


def test_vllm_gc_freezes_do_not_pin_an_engine():
    """vLLM's freeze_gc_heap inside a build would put the engine in the
    permanent generation, where no collection reaches it after release (its
    weights stayed on the H100); inside collections_deferred the frozen heap
    stays what the worker froze, and collection is back on afterwards."""
    done = subprocess.run([sys.executable, "-c", VLLM_GC_CALLS_DURING_A_BUILD],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    _, before, after, _, enabled = done.stdout.split()
    assert after == before and enabled == "True", done.stdout
