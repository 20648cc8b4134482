"""Several resident engines in one worker (issue 14), end to end: a real
worker with real vLLM on CPU serves models side by side, steps them in turn,
brings models in and out while others stream, and suspends one mid-stream
(its KV blocks kept, its engine untouched); outputs stay vLLM's own, and a
resumed stream's are exactly those of an uninterrupted one."""

from __future__ import annotations

import asyncio
import time

import pytest

from conftest import ENGINE_ARGS, GREEDY, PROMPTS
from test_worker import serving, spec
from wcd.daemon.worker_process import WorkerError, WorkerOptions, WorkerProcess
from wcd.workers import protocol as p

pytestmark = pytest.mark.vllm

# Long enough that a stream is still going when an operation lands mid-way.
LONG = {"temperature": 0.0, "max_tokens": 96, "ignore_eos": True}
# A suspended stream: past a KV block (128 tokens on CPU) by its end.
SUSPENDED = {"max_tokens": 160, "ignore_eos": True, "logprobs": 0}
KV_CACHE_BYTES = ENGINE_ARGS["kv_cache_memory_bytes"]


@pytest.fixture(scope="module")
def worker(loop, demo_models):
    worker = loop.run_until_complete(WorkerProcess.start(WorkerOptions()))
    yield worker
    loop.run_until_complete(worker.stop())


class Stream:
    """One request, read in its own task; every Output's arrival is appended
    to `arrivals` (shared by the streams of a test) as the request's id.
    `prompt`: a string, or the Prompts of a request of several."""

    def __init__(self, worker: WorkerProcess, model: str, prompt: str | list[p.Prompt],
                 sampling: dict, arrivals: list[str]):
        self.id = f"{model}-{time.monotonic_ns()}"
        prompts = [p.Prompt(prompt=prompt)] if isinstance(prompt, str) else prompt
        self.tokens: list[int] = []  # of its first prompt
        self.logprobs: list[float] = []
        self.completions = [([], []) for _ in prompts]  # (tokens, logprobs) per prompt
        request = p.Generate(self.id, model, prompts, dict(sampling))
        self.task = asyncio.create_task(self._read(worker, request, arrivals))

    async def _read(self, worker, request, arrivals) -> list[int]:
        async for out in worker.generate(request):
            tokens, logprobs = self.completions[out.prompt_index]
            tokens += out.token_ids
            logprobs += [entry["logprob"] for entry in out.logprobs or ()]
            arrivals.append(self.id)
        self.tokens, self.logprobs = self.completions[0]
        return self.tokens

    async def until(self, tokens: int) -> None:
        while min(len(t) for t, _ in self.completions) < tokens and not self.task.done():
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


async def completions(worker, model: str, prompts: list[p.Prompt], sampling: dict):
    stream = Stream(worker, model, prompts, sampling, [])
    await stream.task
    return stream.completions


def suspend_mid_stream_then_resume(loop, worker, model_spec: p.ModelSpec,
                                   prompts: list[p.Prompt], sampling: dict,
                                   late: list[p.Prompt] | None = None):
    """A request of `prompts`, suspended once each has 16 tokens, then
    resumed; while it is suspended another resident serves, and a request of
    `late` for this model waits. Returns the completions of both."""
    model = model_spec.name
    before = residents(loop, worker)[model]

    async def suspended_mid_stream():
        stream = Stream(worker, model, prompts, sampling, [])
        await stream.until(16)
        suspended = await worker.suspend(model)
        at_suspend = [len(tokens) for tokens, _ in stream.completions]
        waits = late and Stream(worker, model, late, GREEDY, [])
        await Stream(worker, "wide-a", PROMPTS[0], GREEDY, []).task  # served meanwhile
        pong = await worker.ping(5)
        await asyncio.sleep(0.3)
        still = [len(tokens) for tokens, _ in stream.completions]
        resumed = await worker.swap(model_spec)
        await asyncio.gather(stream.task, *([waits.task] if waits else []))
        return (suspended, at_suspend, pong, still, resumed, stream.completions,
                waits and waits.completions)

    suspended, at_suspend, pong, still, resumed, done, done_late = run(
        loop, suspended_mid_stream())
    assert suspended.path == "suspend" and resumed.path == "resume"
    assert all(16 <= n < sampling["max_tokens"] for n in at_suspend), at_suspend
    while_suspended = {r.name: r for r in pong.residents}[model]
    assert while_suspended.suspended and while_suspended.running == 1 + bool(late)
    # Its KV cache went; the blocks its requests use stay, in host memory (the CPU's device).
    kept = while_suspended.bytes - (before.bytes - KV_CACHE_BYTES)
    assert 0 < kept < KV_CACHE_BYTES, (while_suspended, before)
    assert still == at_suspend  # not stepped while suspended
    assert residents(loop, worker)[model] == before
    print(f"{model} {sampling}: suspended at {at_suspend} tokens, {kept} bytes kept; "
          f"suspend {suspended.total_s * 1000:.1f} ms {suspended.phases}, "
          f"resume {resumed.total_s * 1000:.1f} ms {resumed.phases}")
    return done, done_late


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 1.0, "seed": 1234}],
                         ids=["greedy", "seeded"])
def test_suspend_mid_stream_then_resume_is_exact(loop, worker, demo_models, reference,
                                                sampling):
    """Two requests suspended mid-stream in bfloat16 and resumed go on as if
    never interrupted: every token and logprob equal, bit for bit (the engine
    is untouched and its KV blocks come back; nothing is recomputed). One
    request of both prompts, so that they enter the engine at the same step
    in both runs: a batch that mixes one's prefill with the other's decode
    rounds otherwise in bfloat16 on CPU."""
    prompts = [p.Prompt(prompt=prompt) for prompt in PROMPTS[:2]]
    sampling = {**SUSPENDED, **sampling}
    expected = run(loop, completions(worker, "small-a", prompts, sampling))
    resumed, _ = suspend_mid_stream_then_resume(loop, worker, spec(demo_models, "small-a"),
                                                prompts, sampling)
    assert resumed == expected
    assert all(len(tokens) == len(logprobs) == SUSPENDED["max_tokens"]
               for tokens, logprobs in resumed)
    if sampling["temperature"] == 0.0:
        for i, (tokens, _) in enumerate(resumed):
            assert tokens[:GREEDY["max_tokens"]] == \
                reference["small-a"]["prompts"][i]["token_ids"]


def test_after_a_resume_a_shared_prefix_is_computed_not_read_stale(loop, worker, demo_models,
                                                                  reference):
    """A finished request's full KV blocks stay in the prefix cache; a
    suspension releases their contents, so it must forget them: the same
    prompt after the resume gets the output it got before, not one read from
    the new, zeroed KV cache. A request asked while suspended waits, then
    gets vLLM's output."""
    shared = [p.Prompt(prompt_token_ids=[3 + i * 7 % 900 for i in range(200)])]
    greedy = {**GREEDY, "logprobs": 0}
    before = run(loop, completions(worker, "small-a", shared, greedy))  # 1 block hashed
    _, late = suspend_mid_stream_then_resume(
        loop, worker, spec(demo_models, "small-a"), [p.Prompt(prompt=PROMPTS[2])],
        {**SUSPENDED, "temperature": 0.0}, late=[p.Prompt(prompt=PROMPTS[0])])
    assert late[0][0] == reference["small-a"]["prompts"][0]["token_ids"]
    assert run(loop, completions(worker, "small-a", shared, greedy)) == before


def test_a_suspended_resident_that_leaves_parks_and_comes_back_clean(loop, demo_models,
                                                                    reference):
    """Unloaded while suspended: its request is aborted, its kept blocks are
    dropped, it parks; brought back, it serves vLLM's outputs."""
    worker = run(loop, WorkerProcess.start(WorkerOptions(p.Setup(
        max_parked=1, park_min_free_bytes=1 << 30))))
    try:
        run(loop, worker.swap(spec(demo_models, "small-a")))

        async def suspend_then_unload():
            stream = Stream(worker, "small-a", PROMPTS[1], {**SUSPENDED, "temperature": 0.0}, [])
            await stream.until(16)
            await worker.suspend("small-a")
            done = await worker.unload(["small-a"])
            ended = await asyncio.gather(stream.task, return_exceptions=True)
            return done, ended[0], (await worker.ping(5)).parked

        done, ended, parked = run(loop, suspend_then_unload())
        assert done.residents == [] and [c.name for c in parked] == ["small-a"]
        assert isinstance(ended, WorkerError) and ended.error.kind == p.ABORTED
        back = run(loop, worker.swap(spec(demo_models, "small-a")))
        assert back.path == "unpark" and not back.residents[0].suspended
        for i, prompt in enumerate(PROMPTS[:2]):
            assert run(loop, alone(worker, "small-a", prompt, GREEDY)) == \
                reference["small-a"]["prompts"][i]["token_ids"]
    finally:
        run(loop, worker.stop())


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


def test_a_resume_also_takes_out_the_residents_it_replaces(loop, worker, demo_models,
                                                           reference):
    """The daemon makes room for a suspended model by evicting an idle one in
    the same operation: the resume path must honour `replace` too."""
    run(loop, worker.suspend("wide-a"))
    done = run(loop, worker.swap(spec(demo_models, "wide-a"), replace=["small-b"]))
    assert done.path == "resume"
    assert [(r.name, r.suspended) for r in done.residents] == [("small-a", False),
                                                               ("wide-a", False)]
    assert run(loop, alone(worker, "wide-a", PROMPTS[0], GREEDY)) == \
        reference["wide-a"]["prompts"][0]["token_ids"]


def test_a_tensor_parallel_group_refuses_what_its_ranks_cannot_hold(demo_models):
    """A group runs one engine per rank, and an engine of more than one rank
    alone (its world is formed at that size): a swap that would break either
    is refused before anything is touched."""
    from types import SimpleNamespace

    from wcd.workers.engine import EngineHost, ModelError, PhaseClock
    from wcd.workers.weights import HostCache

    def host() -> EngineHost:
        return EngineHost(HostCache(0, pinned=False), group=SimpleNamespace(size=2))

    def drain(names):
        raise AssertionError("nothing may be drained")

    def refused(residents: dict, name: str) -> str:
        group = host()
        group.residents.update(residents)
        with pytest.raises(ModelError) as raised:
            group.swap(spec(demo_models, name), [], PhaseClock(lambda name, s: None), drain)
        assert raised.value.kind == p.BAD_ARGS
        assert group.residents == residents
        return str(raised.value)

    def resident(name: str, rank: int, tp: int = 1):
        plan = host().resolve(p.ModelSpec(name, str(demo_models / name),
                                          {**ENGINE_ARGS, "tensor_parallel_size": tp}))
        return SimpleNamespace(plan=plan, suspended=False, rank=rank)

    wide = {"small-a": resident("small-a", 0, tp=2)}
    assert "more than one rank alone" in refused(wide, "wide-a")
    full = {"small-a": resident("small-a", 0), "small-b": resident("small-b", 1)}
    assert "every rank of the group serves a model" in refused(full, "wide-a")
