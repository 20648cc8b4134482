"""Hostile and careless clients against a real daemon (real worker, vLLM on
CPU). Each attack of issue 13 is replayed as it was reported, and bounded:
refused with a 4xx and OpenAI error JSON, or served at a bounded cost. While
it runs, /health answers within a second and a bystander's request is served;
afterwards the worker is the same process (no restart) and the daemon's and
the worker's memory are back within 50 MB of where they started.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import statistics
import threading
import time
import urllib.error
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon_harness import free_port, paused, serving, wait_until

pytestmark = pytest.mark.vllm

KEY = "hostile-test-key"
LIMITED_KEY = "limited-key"  # may use small-a only
ENV_KEY = "key-from-the-environment"
MB = 1 << 20
HOSTILE_MODELS = ["../../etc/passwd", "/etc/passwd", "small-a/../../../etc", "small-a\x00",
                  "", "x" * 5000, "models--a--b", "small-a", "wide-a", "SMALL-A", "%2e%2e%2f",
                  "small-a/config.json", "~root", "small-a\n", "small-a\x1b[2J"]
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
    "seed": st.one_of(st.integers(), st.integers(min_value=2**63), JSON_VALUES),
    "stream": st.one_of(st.booleans(), JSON_VALUES),
    "response_format": JSON_VALUES,
    "chat_template_kwargs": JSON_VALUES,
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
                     b'{"model": "small-a", "prompt": "x", "structured_outputs": {"json": '
                     + b'[' * 50_000 + b']' * 50_000 + b'}}',  # deep inside a free-form field
                     b'{"model": "small-a", "prompt": "\xff\xfe"}',
                     b'{"model": "small-a", "prompt": "x", "max_tokens": 1e309}',
                     b'{"model": "small-a", "prompt": "x", "seed": 9223372036854775808}',
                     b'{"model": "small-a", "prompt": NaN}',
                     json.dumps({"model": "small-a", "prompt": "x " * 5_000_000}).encode()]),
)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, demo_models):
    directory = tmp_path_factory.mktemp("wcd-hostile")
    http = {"host": "127.0.0.1", "port": free_port(),
            "api_keys": [KEY, {"key": LIMITED_KEY, "models": ["small-a"]}],
            "write_timeout": "2s", "trust_request_chat_template": True}
    policy = {"health_interval": "250ms", "health_timeout": "5s", "drain_timeout": "20s",
              "restart_backoff_min": "0.5s", "queue_wait": "120s", "host_cache_bytes": 64 << 20,
              "min_resident": "5s", "render_timeout": "2s",
              # The evictions these attacks try need a worker that holds one model.
              "max_resident": 1}
    with serving(directory, demo_models, env={"WCD_API_KEYS": ENV_KEY}, http=http,
                 policy=policy) as daemon:
        yield daemon


def send(daemon, path: str, body: bytes | None = None, key: str | None = KEY,
         headers: dict | None = None, timeout: float = 120) -> tuple[int, bytes]:
    request = urllib.request.Request(daemon.url + path, data=body, headers={
        "Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}),
        **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def complete(daemon, body: dict, **kwargs) -> tuple[int, dict]:
    status, reply = send(daemon, "/v1/completions", json.dumps(body).encode(), **kwargs)
    return status, json.loads(reply)


def chat(daemon, body: dict, **kwargs) -> tuple[int, dict]:
    status, reply = send(daemon, "/v1/chat/completions", json.dumps(body).encode(), **kwargs)
    return status, json.loads(reply)


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * 4096


def the_worker(daemon) -> dict:
    return daemon.json("ps")["workers"][0]


class Bystander:
    """While an attack runs: /health polled every 100 ms, and small-a asked for
    two tokens in a loop by an honest client."""

    def __init__(self, daemon):
        self.daemon = daemon
        self.health: list[float] = []
        self.served: list[int] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._poll_health, daemon=True),
                         threading.Thread(target=self._ask, daemon=True)]

    def _poll_health(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            status, _ = send(self.daemon, "/health", key=None, timeout=10)
            self.health.append(time.monotonic() - started if status == 200 else float("inf"))
            self._stop.wait(0.1)

    def _ask(self) -> None:
        while not self._stop.is_set():
            status, _ = complete(self.daemon, {"model": "small-a", "prompt": "hello",
                                               "max_tokens": 2})
            self.served.append(status)
            self._stop.wait(0.2)

    def __enter__(self) -> Bystander:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(150)


@contextlib.contextmanager
def bounded_attack(daemon):
    """The invariants every attack must keep."""
    before = the_worker(daemon)
    daemon_rss, worker_rss = rss(daemon.process.pid), rss(before["pid"])
    with Bystander(daemon) as bystander:
        yield bystander
    after = the_worker(daemon)
    assert daemon.process.poll() is None, daemon.log_text()
    assert (after["pid"], after["restarts"]) == (before["pid"], before["restarts"])
    assert max(bystander.health) < 1.0, bystander.health
    assert bystander.served and set(bystander.served) == {200}, bystander.served
    assert rss(daemon.process.pid) - daemon_rss < 50 * MB
    assert rss(after["pid"]) - worker_rss < 50 * MB


def error_of(status: int, reply: dict) -> tuple[int, str]:
    assert reply["error"]["message"] and reply["error"]["type"], reply
    return status, reply["error"]["message"]


# ---- 1, 2: payloads that multiply on their way to the worker -----------------------------


def test_a_free_form_payload_that_multiplies_is_refused(daemon):
    """Under the body limit as JSON ("0.5," is 4 bytes), four times that as
    msgpack (9 bytes a float): the worker used to get it, and die of it."""
    floats = [0.5] * (3 * MB // 2)
    with bounded_attack(daemon):
        status, reply = complete(daemon, {"model": "small-a", "prompt": "x",
                                          "structured_outputs": {"json": floats}})
        assert error_of(status, reply)[0] == 413
        assert "max_sampling_bytes" in reply["error"]["message"]
        status, reply = chat(daemon, {"model": "small-a", "chat_template_kwargs": {"v": floats},
                                      "messages": [{"role": "user", "content": "hi"}]})
        assert error_of(status, reply)[0] == 413


def test_prompt_batches_and_choices_are_bounded(daemon):
    with bounded_attack(daemon):
        status, reply = complete(daemon, {"model": "small-a", "prompt": ["hi"] * 400,
                                          "stop": ["x" * (MB // 2)]})
        assert error_of(status, reply)[0] == 400 and "max_prompts" in reply["error"]["message"]
        started = time.monotonic()
        status, reply = complete(daemon, {"model": "small-a", "prompt": [[1]] * 600_000})
        assert error_of(status, reply)[0] in (400, 413)
        assert time.monotonic() - started < 5
        status, reply = complete(daemon, {"model": "small-a", "prompt": ["a", "b"], "n": 16384})
        assert error_of(status, reply)[0] == 400 and "max_choices" in reply["error"]["message"]
        # A batch within the limits shares one Generate and is served whole.
        status, reply = complete(daemon, {"model": "small-a", "prompt": ["a", "b", "c"], "n": 2,
                                          "max_tokens": 2})
        assert status == 200 and [c["index"] for c in reply["choices"]] == list(range(6))


# ---- 3: the client's own Jinja ---------------------------------------------------------------


SLOW_TEMPLATE = "{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}{% endfor %}"


def test_a_runaway_chat_template_is_interrupted_and_the_worker_serves_on(daemon):
    """This daemon trusts request templates (http.trust_request_chat_template);
    the render is still bounded by policy.render_timeout (2 s here)."""
    with bounded_attack(daemon):
        started = time.monotonic()
        status, reply = chat(daemon, {"model": "small-a", "chat_template": SLOW_TEMPLATE,
                                      "messages": [{"role": "user", "content": "hi"}]})
        took = time.monotonic() - started
        assert error_of(status, reply)[0] == 400 and "render_timeout" in reply["error"]["message"]
        assert took < 10, took
    status, reply = chat(daemon, {"model": "small-a", "max_tokens": 2,
                                  "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200 and reply["usage"]["completion_tokens"] == 2


def test_template_arguments_wcd_sets_cannot_be_overridden(daemon):
    for key in ("tools", "tokenize", "add_generation_prompt"):
        status, reply = chat(daemon, {"model": "small-a", "chat_template_kwargs": {key: True},
                                      "messages": [{"role": "user", "content": "hi"}]})
        assert error_of(status, reply)[0] == 400 and key in reply["error"]["message"]


# ---- 4, 5: names -----------------------------------------------------------------------------


def test_control_characters_in_a_model_name_never_reach_systemd(daemon, demo_models):
    name = "small-a/\nWATCHDOG_USEC=1\nSTATUS=pwned/.."
    status, reply = complete(daemon, {"model": name, "prompt": "x", "max_tokens": 1})
    assert error_of(status, reply)[0] in (400, 404)
    for path in ("/v1/models/small-a%0AWATCHDOG_USEC=1", "/v1/models/%ff%fe"):
        status, reply = send(daemon, path)
        assert error_of(status, json.loads(reply))[0] == 404
    # The daemon reports STATUS= at most once a second: the next one is of
    # its state after these requests.
    reported = len(daemon.notify.messages)
    wait_until(lambda: any(m.startswith("STATUS=") for m in daemon.notify.messages[reported:]),
               timeout=10, what="a STATUS= report after the requests")
    assert not [m for m in daemon.notify.messages if "WATCHDOG_USEC" in m or "pwned" in m]


def test_spellings_of_one_directory_are_one_model(daemon, demo_models):
    swaps = len(daemon.json("status")["recent_swaps"])
    spellings = ["small-a", "small-a/", "./small-a", "small-a/.", "small-a//", "small-b/../small-a",
                 str(demo_models / "small-a"), str(demo_models) + "/./small-a/"]
    for spelling in spellings:
        status, reply = complete(daemon, {"model": spelling, "prompt": "x", "max_tokens": 1})
        assert status == 200 and reply["model"] == spelling, reply
    assert len(daemon.json("status")["recent_swaps"]) == swaps
    metrics = send(daemon, "/metrics", key=None)[1].decode()
    labelled = {line.split('model="', 1)[1].split('"', 1)[0]
                for line in metrics.splitlines() if 'model="' in line}
    assert labelled <= {"small-a", "small-b", "wide-a", ""}, labelled


# ---- 6: eviction by other clients --------------------------------------------------------------


def test_requests_that_give_up_leave_no_swap_behind(daemon):
    """A victim streams from small-a while an attacker asks for small-b and
    hangs up after 50 ms, again and again: no swap happens, and a second
    victim request started meanwhile is served without waiting for a drain."""
    daemon.wait_serving("small-a")
    swaps = len(daemon.json("status")["recent_swaps"])
    stream = urllib.request.urlopen(urllib.request.Request(
        daemon.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}",
                                                 "Content-Type": "application/json"},
        data=json.dumps({"model": "small-a", "prompt": "hello", "max_tokens": 200,
                         "stream": True, "ignore_eos": True}).encode()), timeout=120)
    stream.readline()
    with paused(the_worker(daemon)["pid"]):
        for _ in range(10):
            with contextlib.suppress(OSError):
                complete(daemon, {"model": "small-b", "prompt": "x", "max_tokens": 1},
                         timeout=0.05)
    # The daemon has seen the last hang-up: no request waits for small-b any more.
    wait_until(lambda: daemon.json("status")["queue"]["waiting"] == 0, timeout=10,
               what="the attackers' requests gone from the queue")
    started = time.monotonic()
    status, reply = complete(daemon, {"model": "small-a", "prompt": "hi", "max_tokens": 2})
    assert status == 200 and time.monotonic() - started < 5
    assert stream.read().rstrip().endswith(b"data: [DONE]")
    assert len(daemon.json("status")["recent_swaps"]) == swaps
    assert the_worker(daemon)["model"] == "small-a"


@pytest.fixture
def escaping_model(demo_models, tmp_path):
    """A model directory under the root whose config.json links to a file
    outside it: the daemon's realpath check passes the directory, so only the
    worker's check beneath the root (openat2) stands between it and the file."""
    directory = demo_models / f"escape-{os.getpid()}"
    shutil.copytree(demo_models / "small-b", directory)
    outside = tmp_path / "config.json"
    (directory / "config.json").rename(outside)
    (directory / "config.json").symlink_to(outside)
    try:
        yield directory.name
    finally:
        shutil.rmtree(directory)


def test_a_file_linked_out_of_the_root_is_never_loaded(daemon, escaping_model):
    # The request first: it may evict a resident only after min_resident (5 s),
    # which the module's small-a has served for, and wcctl's swap (it may
    # always) would have brought small-a back anew.
    status, reply = complete(daemon, {"model": escaping_model, "prompt": "x", "max_tokens": 1})
    assert error_of(status, reply)[0] == 422
    done = daemon.wcctl("swap", escaping_model)
    assert done.returncode != 0 and "root" in done.stderr, done.stderr
    assert the_worker(daemon)["model"] == "small-a"


def test_an_api_key_limited_to_some_models_cannot_load_others(daemon):
    status, reply = complete(daemon, {"model": "wide-a", "prompt": "x", "max_tokens": 1},
                             key=LIMITED_KEY)
    assert error_of(status, reply)[0] == 404
    status, reply = complete(daemon, {"model": "small-a", "prompt": "x", "max_tokens": 1},
                             key=LIMITED_KEY)
    assert status == 200
    listed = json.loads(send(daemon, "/v1/models", key=LIMITED_KEY)[1])
    assert [m["id"] for m in listed["data"]] == ["small-a"]


# ---- 7: a stream nobody reads ----------------------------------------------------------------


def test_a_stream_that_is_never_read_loses_its_lease(daemon):
    """n=8 choices with logprobs make megabytes of events; the client reads
    none of them (a tiny receive window). Past http.write_timeout (2 s here) the
    daemon drops it, the worker aborts it, and a swap does not wait for it."""
    body = json.dumps({"model": "small-a", "prompt": "hello", "max_tokens": 480, "n": 8,
                       "logprobs": 5, "stream": True, "ignore_eos": True}).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", daemon.port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                 b"\r\nAuthorization: Bearer " + KEY.encode() + b"\r\nContent-Length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body)
    try:
        deadline = time.monotonic() + 60
        while the_worker(daemon)["active"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        while (view := the_worker(daemon))["active"] or view["running"]:
            assert time.monotonic() < deadline, view
            time.sleep(0.2)
    finally:
        sock.close()
    started = time.monotonic()
    done = daemon.wcctl("swap", "small-b")
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 10
    assert daemon.wcctl("swap", "small-a").returncode == 0


# ---- 11, 12: odd inputs and what the status shows -------------------------------------------


def test_odd_credentials_and_numbers_get_4xx(daemon):
    status, reply = send(daemon, "/v1/models", key=None,
                         headers={"Authorization": "Bearer \udcff".encode(
                             "utf-8", "surrogateescape").decode("latin-1")})
    assert status == 401, reply
    status, reply = complete(daemon, {"model": "small-a", "prompt": "x", "seed": 2 ** 63})
    assert error_of(status, reply)[0] == 400


def test_the_api_keys_stay_out_of_the_workers(daemon):
    assert complete(daemon, {"model": "small-a", "prompt": "x", "max_tokens": 1},
                    key=ENV_KEY)[0] == 200
    with open(f"/proc/{the_worker(daemon)['pid']}/environ", "rb") as f:
        environ = f.read()
    assert b"WCD_API_KEYS" not in environ and ENV_KEY.encode() not in environ


def test_the_status_page_needs_the_key(daemon):
    for path in ("/", "/status.json"):
        assert send(daemon, path, key=None)[0] == 401
        assert send(daemon, path)[0] == 200
    assert send(daemon, "/health", key=None)[0] == 200


# ---- fuzz: whatever arrives, never a 5xx -----------------------------------------------------


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
    status, _ = complete(daemon, {"model": "small-a", "prompt": "hello", "max_tokens": 2})
    assert status == 200
    assert rss(daemon.process.pid) - before < 100 << 20
    assert daemon.json("ps")["workers"][0]["restarts"] == 0
    assert statistics.mean(s < 500 for s in answered) == 1
