"""The OpenAI endpoint end to end: the official `openai` client against a real
wcd daemon with a real worker and vLLM on CPU, compared with vLLM's own
offline `LLM.generate` / `LLM.chat` output for the same model and parameters."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import time
import urllib.error
import urllib.request

import openai
import pytest
import yaml

from conftest import CHATS, ENGINE_ARGS, GREEDY, PROMPTS
from daemon_harness import POLICY, free_port, openai_client, paused, serving

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, demo_models):
    http = {"host": "127.0.0.1", "port": free_port(), "api_keys": ["test-key"]}
    # One model per worker: these tests follow requests through swaps (several
    # models at once are tests/test_multi_model.py's).
    with serving(tmp_path_factory.mktemp("wcd-openai"), demo_models, http=http,
                 policy={**POLICY, "max_resident": 1}) as daemon:
        yield daemon


@pytest.fixture(scope="module")
def client(daemon):
    return openai_client(daemon, api_key="test-key")


def post(daemon, path: str, body: bytes | dict, key: str | None = "test-key"):
    """(status, parsed JSON body) of a raw POST: for what the openai client
    would refuse to send."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(daemon.url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def test_completions_equal_vllm_offline(client, reference):
    for i, prompt in enumerate(PROMPTS):
        reply = client.completions.create(model="small-a", prompt=prompt, **GREEDY)
        expected = reference["small-a"]["prompts"][i]
        assert reply.choices[0].text == expected["text"], prompt
        assert reply.usage.completion_tokens == len(expected["token_ids"])
        assert reply.model == "small-a"


def test_streamed_completion_equals_vllm_offline(client, reference):
    chunks = list(client.completions.create(
        model="small-a", prompt=PROMPTS[1], stream=True,
        stream_options={"include_usage": True}, **GREEDY))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    expected = reference["small-a"]["prompts"][1]
    assert text == expected["text"]
    assert chunks[-1].usage.completion_tokens == len(expected["token_ids"])
    assert len([c for c in chunks if c.choices]) > 1  # tokens arrive as they are made


def test_chat_loads_on_demand_and_equals_vllm_offline(client, reference):
    """small-b is configured but not loaded: the request loads it (a same-shape
    swap) and is answered by it."""
    for i, messages in enumerate(CHATS):
        reply = client.chat.completions.create(model="small-b", messages=messages, **GREEDY)
        assert reply.choices[0].message.content == reference["small-b"]["chats"][i]["text"]
        assert reply.model == "small-b"


def test_streamed_chat_on_another_shape_equals_vllm_offline(client, reference):
    chunks = list(client.chat.completions.create(model="wide-a", messages=CHATS[0],
                                                 stream=True, **GREEDY))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference["wide-a"]["chats"][0]["text"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_two_models_alternating_under_8_concurrent_clients(client, reference):
    """Every request succeeds and is answered by the model it asked for: its
    greedy text is that model's own reference text."""
    def one(i: int) -> tuple[str, int, str]:
        model = ("small-a", "wide-a")[i % 2]
        prompt_index = i % len(PROMPTS)
        reply = client.completions.create(model=model, prompt=PROMPTS[prompt_index], **GREEDY)
        return model, prompt_index, reply.choices[0].text

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(32)))
    assert len(results) == 32
    for model, prompt_index, text in results:
        assert text == reference[model]["prompts"][prompt_index]["text"], (model, prompt_index)


def test_sampling_options_are_honoured(client):
    two = client.completions.create(model="small-a", prompt=PROMPTS[0], n=2, max_tokens=8,
                                    temperature=1.0, seed=7)
    assert [c.index for c in two.choices] == [0, 1]
    again = client.completions.create(model="small-a", prompt=PROMPTS[0], n=2, max_tokens=8,
                                      temperature=1.0, seed=7)
    assert [c.text for c in again.choices] == [c.text for c in two.choices]
    scored = client.completions.create(model="small-a", prompt=PROMPTS[0], max_tokens=4,
                                       temperature=0, logprobs=2)
    assert len(scored.choices[0].logprobs.tokens) == 4
    assert all(len(top) >= 1 for top in scored.choices[0].logprobs.top_logprobs)
    short = client.completions.create(model="small-a", prompt=PROMPTS[0], max_tokens=1,
                                       temperature=0)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 1


def test_response_format_constrains_output(client):
    reply = client.chat.completions.create(
        model="small-a", messages=CHATS[0], max_tokens=20, temperature=0,
        response_format={"type": "json_schema", "json_schema": {
            "name": "answer", "schema": {"type": "string", "enum": ["yes", "no"]}}})
    assert json.loads(reply.choices[0].message.content) in ("yes", "no")


def test_models_list_shows_states(client):
    client.completions.create(model="small-a", prompt="hello", max_tokens=1)
    models = {m.id: m for m in client.models.list().data}
    assert {"small-a", "small-b", "wide-a"} <= set(models)
    # One model per worker here: the one just used serves, the others wait on disk.
    assert (models["small-a"].state, models["small-a"].worker) == ("serving", 0)
    assert {models[name].state for name in ("small-b", "wide-a")} == {"available"}
    small_b = client.models.retrieve("small-b")
    assert (small_b.id, small_b.state, small_b.worker) == ("small-b", "available", None)


def test_version_and_model_fields_as_vllms(daemon, client):
    """/version is the running worker's vLLM, open without a key, as vLLM's."""
    import vllm  # the test process may; the daemon never does
    with urllib.request.urlopen(daemon.url + "/version", timeout=30) as response:
        assert json.load(response) == {"version": vllm.__version__}
    small_a = client.models.retrieve("small-a")
    assert (small_a.owned_by, small_a.parent, small_a.max_model_len) == \
        ("vllm", None, ENGINE_ARGS["max_model_len"])  # the engine arg, over config.json's 2048
    assert small_a.root.endswith("small-a") and small_a.permission[0]["allow_sampling"]


def test_unknown_model_is_404_model_not_found(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    assert caught.value.code == "model_not_found"
    assert caught.value.body["message"] == "The model `no-such-model` does not exist."
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="../../etc/passwd",
                                       messages=CHATS[0], max_tokens=2)


def test_missing_key_is_401(daemon):
    status, body = post(daemon, "/v1/completions", {"model": "small-a", "prompt": "x"},
                        key=None)
    assert status == 401 and body["error"]["type"] == "authentication_error"
    with urllib.request.urlopen(daemon.url + "/health", timeout=10) as response:
        assert response.status == 200  # open without a key


@pytest.mark.parametrize("body, param", [
    (b'{"model": "small-a", "prompt": ', None),
    ({"model": "small-a", "prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ({"model": "small-a", "prompt": "x", "n": -1}, "n"),
    ({"model": "small-a", "prompt": "x", "temperature": -1.0}, "temperature"),
    ({"model": "small-a", "prompt": "x", "top_p": 7}, "top_p"),
    ({"model": "small-a", "prompt": "x " * 2000, "max_tokens": 4}, None),
    ({"model": "small-a", "prompt": "x", "max_tokens": 100000}, None),
])
def test_bad_requests_are_400_with_a_message(daemon, body, param):
    status, reply = post(daemon, "/v1/completions", body)
    assert status == 400, reply
    error = reply["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param or param in error["message"]
    ok, _ = post(daemon, "/v1/completions", {"model": "small-a", "prompt": "x",
                                             "max_tokens": 1})
    assert ok == 200  # and the daemon keeps serving


def test_client_disconnect_mid_stream_frees_its_slot(daemon, client):
    """The daemon's lease ends and the worker aborts the request: its own
    count of running requests (reported at each health ping) goes to 0."""
    def worker_view() -> dict:
        return daemon.json("ps")["workers"][0]

    def wait_until(check, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while not check(view := worker_view()) and time.monotonic() < deadline:
            time.sleep(0.1)
        return view

    stream = client.completions.create(model="small-a", prompt=PROMPTS[0], max_tokens=500,
                                       temperature=1.0, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    view = wait_until(lambda v: v["running"] == 1)
    assert (view["active"], view["running"]) == (1, 1)
    stream.close()
    view = wait_until(lambda v: v["active"] == 0 and v["running"] == 0)
    assert (view["active"], view["running"], view["state"]) == (0, 0, "serving")
    reply = client.completions.create(model="small-a", prompt="x", max_tokens=2)
    assert reply.usage.completion_tokens == 2 or reply.choices[0].finish_reason == "stop"


def test_metrics_reflect_what_was_served(daemon):
    with urllib.request.urlopen(daemon.url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
               for line in text.splitlines() if line and not line.startswith("#")}
    assert samples['wcd_requests_total{model="small-a",outcome="200"}'] >= 10
    assert samples['wcd_requests_total{model="",outcome="404"}'] >= 1
    assert samples['wcd_swaps_total{model="wide-a",outcome="ok",path="rebuild"}'] >= 1
    assert samples['wcd_swaps_total{model="small-b",outcome="ok",path="same_shape"}'] >= 1
    assert samples['wcd_swap_phase_duration_seconds_count{path="rebuild",phase="build"}'] >= 1
    assert samples["wcd_queue_requests"] == 0
    assert sum(v for k, v in samples.items() if k.startswith("wcd_resident_models{")) == 1
    assert samples['wcd_weight_loads_total{source="disk"}'] >= 2
    assert samples['wcd_weight_loads_total{source="host_cache"}'] >= 1
    assert samples["wcd_host_cache_bytes"] > 1_000_000


def _reload(daemon, **policy) -> None:
    config = yaml.safe_load(daemon.config.read_text())
    config["policy"].update(policy)
    daemon.config.write_text(yaml.safe_dump(config))
    before = daemon.log_text().count("configuration reloaded")
    daemon.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while daemon.log_text().count("configuration reloaded") == before:
        assert time.monotonic() < deadline, daemon.log_text()
        time.sleep(0.1)


def _post_with_headers(daemon, body: dict):
    request = urllib.request.Request(
        daemon.url + "/v1/completions", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": "Bearer test-key"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.load(exc)


def test_requests_past_the_queue_bounds_get_503_with_retry_after(daemon, client):
    """While small-a streams, a request for wide-a waits for small-a's drain:
    past queue_wait it is answered 503, and one past queue_max at once."""
    _reload(daemon, queue_wait="300ms", queue_max=1)
    stream = client.completions.create(model="small-a", prompt="x", max_tokens=480,
                                       temperature=1.0, stream=True,
                                       extra_body={"ignore_eos": True})
    try:
        next(iter(stream))
        body = {"model": "wide-a", "prompt": "x", "max_tokens": 2}
        # The worker stopped: small-a's stream stays in flight, so wide-a's
        # swap waits for its drain however fast this machine generates.
        with paused(daemon.json("ps")["workers"][0]["pid"]), \
                concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(_post_with_headers, daemon, body)
            time.sleep(0.1)
            second = pool.submit(_post_with_headers, daemon, body)
            answers = [first.result(), second.result()]
    finally:
        stream.close()
        _reload(daemon, queue_wait="120s", queue_max=64)
    messages = []
    for status, headers, reply in answers:
        assert status == 503 and int(headers["Retry-After"]) > 0, reply
        messages.append(reply["error"]["message"])
    assert "not ready within 0.3 s" in messages[0]
    assert "already wait" in messages[1]
    assert client.completions.create(model="small-a", prompt="x", max_tokens=2).choices
