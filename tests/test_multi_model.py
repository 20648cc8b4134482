"""Several models busy at once through the daemon (issue 14), end to end: real
vLLM on CPU, the OpenAI endpoint, wcctl. Models serve side by side on one
worker, come in beside busy ones without draining them, evict idle ones when
memory is short, are suspended and resumed when memory cannot hold every busy
one, and all come back after the worker dies; every output is vLLM's own."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import urllib.request

import pytest
import yaml

from conftest import ENGINE_ARGS, MODELS, PROMPTS, run_reference
from daemon_harness import POLICY, openai_client, serving

pytestmark = pytest.mark.vllm

# Long enough that every stream is still going when the others start. (Past
# ~280 tokens two demo models' greedy outputs part from vLLM's on a near-tie,
# alone as much as beside others: an older difference, not a resident's.)
LONG = {"temperature": 0.0, "max_tokens": 256, "ignore_eos": True}
MIB = 1 << 20
# Two demo models fit (small: 3.3 MB + a 64 MiB KV cache; wide: 9.1 MB + 64
# MiB), three do not; one suspended (its KV cache released) makes room.
TWO_FIT = 160 * MIB


@pytest.fixture(scope="module")
def long_reference(demo_models) -> dict:
    return run_reference({
        "models": {name: {"path": str(demo_models / name), "engine_args": ENGINE_ARGS}
                   for name in ("small-a", "small-b", "wide-a")},
        "prompts": PROMPTS[:1], "sampling": LONG})


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, demo_models):
    directory = tmp_path_factory.mktemp("multi")
    with serving(directory, MODELS, policy=policy(max_resident=3)) as daemon:
        yield daemon


def policy(**keys) -> dict:
    return {**POLICY, "preempt_after": "0.3s", **keys}


def reconfigure(daemon, **keys) -> None:
    """A new policy by SIGHUP, as `systemctl reload wcd` sends it."""
    config = yaml.safe_load(daemon.config.read_text())
    config["policy"] = policy(**keys)
    daemon.config.write_text(yaml.safe_dump(config))
    before = len(daemon.notify.messages)
    daemon.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while not any(m.startswith("READY=1") for m in daemon.notify.messages[before:]):
        assert time.monotonic() < deadline, daemon.log_text()
        time.sleep(0.05)


def residents(daemon) -> dict[str, str]:
    worker = daemon.json("ps")["workers"][0]
    return {r["model"]: r["state"] for r in worker["residents"]}


def wait_residents(daemon, expected: dict[str, str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while residents(daemon) != expected:
        assert time.monotonic() < deadline, (residents(daemon), daemon.log_text())
        time.sleep(0.1)


class Stream(threading.Thread):
    """A streamed completion read in its own thread: tokens and the times
    its first and last chunks arrived."""

    def __init__(self, daemon, model: str, sampling: dict = LONG):
        super().__init__(daemon=True)
        self.client = openai_client(daemon)
        self.model, self.sampling = model, sampling
        self.text = ""
        self.first: float | None = None
        self.last: float | None = None
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            stream = self.client.completions.create(
                model=self.model, prompt=PROMPTS[0], stream=True,
                max_tokens=self.sampling["max_tokens"], temperature=0.0,
                extra_body={"ignore_eos": True})
            for chunk in stream:
                now = time.monotonic()
                self.first = self.first or now
                self.last = now
                self.text += chunk.choices[0].text
        except Exception as exc:  # reported by the test's assertions
            self.error = exc

    def result(self, timeout: float = 300) -> str:
        self.join(timeout)
        assert not self.is_alive(), f"{self.model} stream never ended"
        assert self.error is None, f"{self.model}: {self.error!r}"
        return self.text


def text_of(daemon, model: str) -> str:
    return openai_client(daemon).completions.create(
        model=model, prompt=PROMPTS[0], max_tokens=16, temperature=0.0).choices[0].text


def metric(daemon, name: str) -> float:
    """The sum of a counter's series on /metrics."""
    text = urllib.request.urlopen(daemon.url + "/metrics", timeout=30).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_three_models_stream_side_by_side_each_as_vllm_alone(daemon, long_reference):
    for model in ("wide-a", "small-b"):
        done = daemon.wcctl("load", model)
        assert done.returncode == 0, done.stderr
    assert residents(daemon) == {"small-a": "serving", "wide-a": "serving",
                                 "small-b": "serving"}
    streams = [Stream(daemon, m) for m in ("small-a", "wide-a", "small-b")]
    for stream in streams:
        stream.start()
    for stream in streams:
        assert stream.result() == long_reference[stream.model]["prompts"][0]["text"]
    # They progressed together: each began before any of them ended.
    assert max(s.first for s in streams) < min(s.last for s in streams)
    assert metric(daemon, "wcd_suspensions_total") == 0


def test_a_model_comes_in_beside_a_busy_one_without_draining_it(daemon, long_reference,
                                                                 reference):
    assert daemon.wcctl("unload", "wide-a").returncode == 0
    busy = Stream(daemon, "small-a")
    busy.start()
    while busy.first is None and busy.is_alive():
        time.sleep(0.01)
    # wide-a loads and answers while small-a's stream is still going.
    assert text_of(daemon, "wide-a") == reference["wide-a"]["prompts"][0]["text"]
    answered = time.monotonic()
    assert busy.result() == long_reference["small-a"]["prompts"][0]["text"]
    assert answered < busy.last


def test_memory_short_an_idle_resident_is_evicted_least_recently_used_first(daemon,
                                                                             reference):
    reconfigure(daemon, max_resident=3, worker_memory_bytes=TWO_FIT)
    assert daemon.wcctl("unload", "small-b").returncode == 0
    text_of(daemon, "small-a")
    text_of(daemon, "wide-a")  # small-a is now the least recently used
    assert text_of(daemon, "small-b") == reference["small-b"]["prompts"][0]["text"]
    assert residents(daemon) == {"wide-a": "serving", "small-b": "serving"}
    worker = daemon.json("ps")["workers"][0]
    assert worker["memory_budget_bytes"] == TWO_FIT
    assert 0 < worker["resident_bytes"] <= TWO_FIT


def test_memory_short_busy_models_are_suspended_and_resumed_with_outputs_unchanged(
        daemon, long_reference):
    before = metric(daemon, "wcd_suspensions_total")
    streams = [Stream(daemon, m) for m in ("wide-a", "small-b")]
    for stream in streams:
        stream.start()
    while any(s.first is None and s.is_alive() for s in streams):
        time.sleep(0.01)
    # small-a fits only once a busy one is suspended: after the quantum.
    late = Stream(daemon, "small-a")
    late.start()
    for stream in [*streams, late]:
        assert stream.result() == long_reference[stream.model]["prompts"][0]["text"], \
            stream.model
    assert metric(daemon, "wcd_suspensions_total") > before
    assert "suspended" in (daemon.config.parent / "wcd.log").read_text()


def test_a_worker_death_brings_every_resident_back(daemon, reference):
    reconfigure(daemon, max_resident=3)
    for model in ("small-a", "wide-a", "small-b"):
        assert daemon.wcctl("load", model).returncode == 0
    held = residents(daemon)
    assert set(held) == {"small-a", "wide-a", "small-b"}, held
    pid = daemon.json("ps")["workers"][0]["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while daemon.json("ps")["workers"][0]["pid"] in (pid, None):
        assert time.monotonic() < deadline, daemon.log_text()
        time.sleep(0.1)
    wait_residents(daemon, {name: "serving" for name in held})
    assert daemon.json("ps")["workers"][0]["restarts"] == 1
    for model in held:
        assert text_of(daemon, model) == reference[model]["prompts"][0]["text"]
    log = (daemon.config.parent / "wcd.log").read_text()
    assert re.search(r"worker 0 died .* serving (small-a|wide-a|small-b), ", log)
