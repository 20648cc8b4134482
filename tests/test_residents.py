"""Several resident engines in one worker (issue 14), end to end: a real
worker with real vLLM on CPU serves models side by side, steps them in turn,
brings models in and out while others stream, and suspends one by vLLM's
preemption by recompute; outputs stay vLLM's own."""

from __future__ import annotations

import asyncio
import time

import pytest

from conftest import GREEDY, PROMPTS
from test_worker import serving, spec
from wcd.daemon.worker_process import WorkerError, WorkerOptions, WorkerProcess
from wcd.workers import protocol as p

pytestmark = pytest.mark.vllm

# Long enough that a stream is still going when an operation lands mid-way.
LONG = {"temperature": 0.0, "max_tokens": 96, "ignore_eos": True}
SEEDED = {"temperature": 1.0, "seed": 1234, "max_tokens": 96, "ignore_eos": True}


@pytest.fixture(scope="module")
def worker(loop, demo_models):
    worker = loop.run_until_complete(WorkerProcess.start(WorkerOptions()))
    yield worker
    loop.run_until_complete(worker.stop())


class Stream:
    """One request, read in its own task; every Output's arrival is appended
    to `arrivals` (shared by the streams of a test) as the request's id."""

    def __init__(self, worker: WorkerProcess, model: str, prompt: str, sampling: dict,
                 arrivals: list[str]):
        self.id = f"{model}-{time.monotonic_ns()}"
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        request = p.Generate(self.id, model, [p.Prompt(prompt=prompt)], dict(sampling))
        self.task = asyncio.create_task(self._read(worker, request, arrivals))

    async def _read(self, worker, request, arrivals) -> list[int]:
        async for out in worker.generate(request):
            self.tokens += out.token_ids
            self.logprobs += [entry["logprob"] for entry in out.logprobs or ()]
            arrivals.append(self.id)
        return self.tokens

    async def until(self, tokens: int) -> None:
        while len(self.tokens) < tokens and not self.task.done():
            await asyncio.sleep(0.005)


def interleaved(arrivals: list[str], a: str, b: str) -> bool:
    """Outputs of both arrived before either finished."""
    def last(x):
        return len(arrivals) - 1 - arrivals[::-1].index(x)
    return arrivals.index(a) < last(b) and arrivals.index(b) < last(a)


def run(loop, coroutine):
    return loop.run_until_complete(coroutine)


def residents(loop, worker) -> dict[str, p.Resident]:
    return {r.name: r for r in run(loop, worker.ping(5)).residents}


async def alone(worker, model: str, prompt: str, sampling: dict) -> list[int]:
    stream = Stream(worker, model, prompt, sampling, [])
    return await stream.task


def test_two_then_three_residents_serve_together(loop, worker, demo_models, reference):
    first = run(loop, worker.swap(spec(demo_models, "small-a")))
    second = run(loop, worker.swap(spec(demo_models, "wide-a")))
    assert (first.path, second.path) == ("rebuild", "rebuild")
    assert [r.name for r in second.residents] == ["small-a", "wide-a"]

    async def together(models):
        arrivals: list[str] = []
        streams = {(model, i): Stream(worker, model, prompt, GREEDY, arrivals)
                   for model in models for i, prompt in enumerate(PROMPTS[:2])}
        await asyncio.gather(*(s.task for s in streams.values()))
        return streams, arrivals

    for models in (["small-a", "wide-a"], ["small-a", "wide-a", "small-b"]):
        if "small-b" in models:
            third = run(loop, worker.swap(spec(demo_models, "small-b")))
            assert third.path == "rebuild"  # beside small-a, whose shape it has
            assert [r.name for r in third.residents] == models
        streams, arrivals = run(loop, together(models))
        for (model, i), stream in streams.items():
            assert stream.tokens == reference[model]["prompts"][i]["token_ids"], (model, i)
        for a, b in zip(models, models[1:]):
            assert interleaved(arrivals, streams[a, 0].id, streams[b, 0].id), (a, b)
    assert run(loop, worker.stats()).models == ["small-a", "wide-a", "small-b"]


def test_pong_reports_each_resident_with_its_footprint_and_requests(loop, worker, demo_models):
    assert serving(loop, worker) == ["small-a", "wide-a", "small-b"]

    async def busy():
        arrivals: list[str] = []
        streams = [Stream(worker, "small-a", PROMPTS[0], LONG, arrivals),
                   Stream(worker, "small-a", PROMPTS[1], LONG, arrivals),
                   Stream(worker, "wide-a", PROMPTS[0], LONG, arrivals)]
        await asyncio.gather(*(s.until(4) for s in streams))
        pong = await worker.ping(5)
        await asyncio.gather(*(s.task for s in streams))
        return pong

    pong = run(loop, busy())
    assert {r.name: r.running for r in pong.residents} == {
        "small-a": 2, "wide-a": 1, "small-b": 0}
    for r in pong.residents:
        weights = sum(f.stat().st_size for f in (demo_models / r.name).glob("*.safetensors"))
        assert r.bytes > weights and not r.suspended, r
        print(f"footprint {r.name}: {r.bytes} bytes ({weights} of weight files)")


def test_generate_for_a_model_not_resident_is_refused(loop, worker):
    with pytest.raises(WorkerError) as raised:
        run(loop, alone(worker, "wide-b", "hello", GREEDY))
    assert raised.value.error.kind == p.NOT_LOADED


def test_unload_of_one_resident_while_another_streams(loop, worker):
    expected = run(loop, alone(worker, "small-a", PROMPTS[2], LONG))

    async def unload_mid_stream():
        stream = Stream(worker, "small-a", PROMPTS[2], LONG, [])
        await stream.until(4)
        done = await worker.unload(["small-b"])
        streamed_before = len(stream.tokens)
        return done, streamed_before, await stream.task

    done, streamed_before, tokens = run(loop, unload_mid_stream())
    assert [r.name for r in done.residents] == ["small-a", "wide-a"]
    assert streamed_before < len(expected)  # the stream went on after the unload
    assert tokens == expected


def test_a_model_comes_in_beside_a_busy_resident(loop, worker, demo_models, reference):
    expected = run(loop, alone(worker, "small-a", PROMPTS[1], LONG))

    async def swap_in_mid_stream():
        stream = Stream(worker, "small-a", PROMPTS[1], LONG, [])
        await stream.until(4)
        done = await worker.swap(spec(demo_models, "small-b"))
        streamed_before = len(stream.tokens)
        return done, streamed_before, await stream.task

    done, streamed_before, tokens = run(loop, swap_in_mid_stream())
    assert done.path == "rebuild"
    assert [r.name for r in done.residents] == ["small-a", "wide-a", "small-b"]
    assert streamed_before < len(expected)
    assert tokens == expected
    assert tokens[:GREEDY["max_tokens"]] == reference["small-a"]["prompts"][1]["token_ids"]


def suspend_mid_stream_then_resume(loop, worker, model_spec: p.ModelSpec, prompts):
    """Streams of `prompts` [(prompt, sampling)] on a resident, suspended once
    each has 8 tokens, then resumed; while it is suspended another resident
    serves and a new request for it waits. Returns what the test checks."""
    model = model_spec.name

    async def uninterrupted():
        streams = [Stream(worker, model, prompt, sampling, []) for prompt, sampling in prompts]
        await asyncio.gather(*(s.task for s in streams))
        return [(s.tokens, s.logprobs) for s in streams]

    expected = run(loop, uninterrupted())
    expected_late = run(loop, alone(worker, model, PROMPTS[0], GREEDY))
    before = residents(loop, worker)[model]

    async def suspended_mid_stream():
        arrivals: list[str] = []
        streams = [Stream(worker, model, prompt, sampling, arrivals)
                   for prompt, sampling in prompts]
        await asyncio.gather(*(s.until(8) for s in streams))
        suspended = await worker.suspend(model)
        at_suspend = [len(s.tokens) for s in streams]
        other = Stream(worker, "wide-a", PROMPTS[0], GREEDY, arrivals)
        late = Stream(worker, model, PROMPTS[0], GREEDY, arrivals)
        await other.task  # another resident serves while this one is suspended
        pong = await worker.ping(5)
        await asyncio.sleep(0.3)
        still = [len(s.tokens) for s in streams] + [len(late.tokens)]
        resumed = await worker.swap(model_spec)
        await asyncio.gather(*(s.task for s in streams))
        outputs = [(s.tokens, s.logprobs) for s in streams]
        return suspended, at_suspend, pong, still, resumed, outputs, await late.task

    suspended, at_suspend, pong, still, resumed, outputs, late = run(loop, suspended_mid_stream())
    assert suspended.path == "suspend" and resumed.path == "resume"
    assert all(8 <= n < LONG["max_tokens"] for n in at_suspend), at_suspend
    while_suspended = {r.name: r for r in pong.residents}[model]
    assert while_suspended.suspended and while_suspended.running == len(prompts) + 1
    assert 0 < while_suspended.bytes < before.bytes  # its KV cache went, its weights stay
    assert still == at_suspend + [0]  # not stepped while suspended
    assert residents(loop, worker)[model] == before
    assert late == expected_late
    print(f"{model}: suspend {suspended.total_s * 1000:.1f} ms {suspended.phases}, "
          f"resume {resumed.total_s * 1000:.1f} ms {resumed.phases}")
    return outputs, expected


def test_suspend_mid_stream_then_resume_keeps_outputs(loop, worker, demo_models):
    """Greedy and seeded sampling: the preempted requests recompute their
    prefix on resume and go on as if never interrupted (the seeded requests'
    generators are kept). In float32 the recomputed prefix gives the decoded
    numbers (logprobs within 4e-6), so every token must be equal; in bfloat16
    it differs from the decoded one in the last bits (logprobs by up to 0.05
    here), so a seeded sample can flip where two tokens nearly tie, as under
    vLLM's own preemption: there greedy is checked."""
    f32 = spec(demo_models, "small-a", dtype="float32")
    f32 = p.ModelSpec("small-a-f32", f32.path, f32.engine_args)
    assert run(loop, worker.swap(f32)).path == "rebuild"
    with_logprobs = {"logprobs": 0}
    outputs, expected = suspend_mid_stream_then_resume(loop, worker, f32, [
        (PROMPTS[0], {**LONG, **with_logprobs}), (PROMPTS[1], {**SEEDED, **with_logprobs}),
        (PROMPTS[2], {**SEEDED, **with_logprobs})])
    for (tokens, logprobs), (expected_tokens, expected_logprobs) in zip(outputs, expected):
        assert tokens == expected_tokens
        # A batch of recomputed prefixes rounds a little otherwise than decodes
        # (3.6e-6 seen): the numbers are the same computation.
        assert logprobs == pytest.approx(expected_logprobs, abs=1e-4)
    outputs, expected = suspend_mid_stream_then_resume(
        loop, worker, spec(demo_models, "small-a"), [(PROMPTS[0], LONG), (PROMPTS[2], LONG)])
    assert [tokens for tokens, _ in outputs] == [tokens for tokens, _ in expected]
    assert [r.name for r in run(loop, worker.unload(["small-a-f32"])).residents] == \
        ["small-a", "wide-a", "small-b"]


def test_suspend_of_a_model_not_resident_is_refused(loop, worker):
    with pytest.raises(WorkerError) as raised:
        run(loop, worker.suspend("wide-b"))
    assert raised.value.error.kind == p.NOT_LOADED
    assert [r.name for r in raised.value.residents] == ["small-a", "wide-a", "small-b"]


def test_a_build_that_fails_beside_residents_leaves_them_serving(loop, worker, demo_models,
                                                                 reference):
    with pytest.raises(WorkerError) as raised:
        run(loop, worker.swap(p.ModelSpec("wide-b", str(demo_models / "wide-a"),
                                          {**spec(demo_models, "wide-a").engine_args,
                                           "kv_cache_memory_bytes": 1 << 45})))
    assert raised.value.error.kind == p.OUT_OF_MEMORY
    assert [r.name for r in raised.value.residents] == ["small-a", "wide-a", "small-b"]
    for model in ("small-a", "wide-a"):
        assert run(loop, alone(worker, model, PROMPTS[0], GREEDY)) == \
            reference[model]["prompts"][0]["token_ids"]


def test_a_tensor_parallel_group_keeps_one_resident(demo_models):
    """A group re-forms its world per tensor-parallel size, so a swap that
    would leave two residents in it is refused before anything is touched."""
    from types import SimpleNamespace

    from wcd.workers.engine import EngineHost, ModelError, PhaseClock
    from wcd.workers.weights import HostCache

    host = EngineHost(HostCache(0, pinned=False), group=SimpleNamespace(size=2))
    resident = SimpleNamespace(plan=host.resolve(spec(demo_models, "small-a")), suspended=False)
    host.residents["small-a"] = resident

    def drain(names):
        raise AssertionError("nothing may be drained")

    with pytest.raises(ModelError) as raised:
        host.swap(spec(demo_models, "wide-a"), [], PhaseClock(lambda name, s: None), drain)
    assert raised.value.kind == p.BAD_ARGS and "one model at a time" in str(raised.value)
    assert host.residents == {"small-a": resident}
