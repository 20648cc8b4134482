"""Hostile input against a real daemon (real worker, vLLM on CPU): hundreds of
malformed or abusive requests, each answered below 500 with OpenAI error JSON
when refused; afterwards the daemon still serves and its memory stayed bounded."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon_harness import serving

pytestmark = pytest.mark.vllm

HOSTILE_MODELS = ["../../etc/passwd", "/etc/passwd", "small-a/../../../etc", "small-a\x00",
                  "", "x" * 5000, "models--a--b", "small-a", "wide-a", "SMALL-A", "%2e%2e%2f",
                  "small-a/config.json", "~root"]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                               max_size=4),
    max_leaves=12)
FIELDS = {
    "max_tokens": st.one_of(st.integers(max_value=6), st.integers(min_value=10**6), JSON_VALUES),
    "n": st.one_of(st.integers(min_value=-5, max_value=3), st.integers(min_value=10**5),
                   JSON_VALUES),
    "temperature": st.one_of(st.floats(allow_nan=False), JSON_VALUES),
    "top_p": st.one_of(st.floats(allow_nan=False), JSON_VALUES),
    "top_k": st.one_of(st.integers(), JSON_VALUES),
    "logprobs": st.one_of(st.integers(), st.booleans(), JSON_VALUES),
    "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=3), max_size=40),
                      JSON_VALUES),
    "seed": st.one_of(st.integers(), JSON_VALUES),
    "stream": st.one_of(st.booleans(), JSON_VALUES),
    "response_format": JSON_VALUES,
    "unknown": JSON_VALUES,
}


def bodies(prompt_key: str, prompt: st.SearchStrategy) -> st.SearchStrategy:
    fields = st.fixed_dictionaries({}, optional={**FIELDS, prompt_key: prompt,
                                                 "model": st.sampled_from(HOSTILE_MODELS)})
    return fields.map(lambda body: json.dumps(body).encode())


RAW = st.one_of(
    bodies("prompt", st.one_of(st.text(max_size=50), st.lists(st.integers(), max_size=20),
                               JSON_VALUES)),
    bodies("messages", st.one_of(
        st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "tool",
                                                                 "x", ""]),
                                        "content": st.one_of(st.text(max_size=30),
                                                             JSON_VALUES)}), max_size=3),
        JSON_VALUES)),
    st.binary(max_size=200),  # invalid UTF-8, truncated JSON, garbage
    st.sampled_from([b"[" * 100_000 + b"]" * 100_000,  # deep nesting
                     b'{"model": "small-a", "prompt": "\xff\xfe"}',
                     b'{"model": "small-a", "prompt": "x", "max_tokens": 1e309}',
                     b'{"model": "small-a", "prompt": NaN}',
                     json.dumps({"model": "small-a", "prompt": "x " * 5_000_000}).encode()]),
)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, demo_models):
    with serving(tmp_path_factory.mktemp("wcd-hostile"), demo_models) as daemon:
        yield daemon


def send(daemon, path: str, body: bytes) -> tuple[int, bytes]:
    request = urllib.request.Request(daemon.url + path, data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_hostile_requests_never_get_a_5xx(daemon):
    answered = []
    before = rss(daemon.process.pid)

    @settings(max_examples=300, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), body=RAW)
    def one(path, body):
        status, reply = send(daemon, path, body)
        answered.append(status)
        assert status < 500, (status, body[:300], reply[:300])
        if status >= 400:
            error = json.loads(reply)["error"]
            assert error["message"] and error["type"], reply

    # Two passes of fresh examples: hypothesis stops early once it has seen enough.
    one()
    one()
    assert len(answered) >= 500
    assert daemon.process.poll() is None
    status, _ = send(daemon, "/v1/completions", json.dumps(
        {"model": "small-a", "prompt": "hello", "max_tokens": 2}).encode())
    assert status == 200
    assert rss(daemon.process.pid) - before < 100 << 20
    assert daemon.json("ps")["workers"][0]["restarts"] == 0
