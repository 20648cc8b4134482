"""Faults against a real daemon (real worker, vLLM on CPU): workers killed
mid-stream and mid-swap, the daemon stopped during a swap. Every client gets
an answer (an error, never a hang), the worker comes back, nothing is orphaned."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import openai
import pytest

from conftest import ROOT
from daemon_harness import alive, openai_client, paused, wait_until

pytestmark = pytest.mark.vllm
LONG = {"max_tokens": 480, "temperature": 1.0, "stream": True,
        "extra_body": {"ignore_eos": True}}


@pytest.fixture
def daemon(shared_daemon):
    """conftest's shared daemon, live and serving."""
    return shared_daemon.get()


@pytest.fixture
def client(daemon):
    return openai_client(daemon, timeout=60)


def worker(daemon) -> dict:
    return daemon.json("ps")["workers"][0]


def wait_state(daemon, state: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while (view := worker(daemon))["state"] != state:
        assert time.monotonic() < deadline, (view, daemon.log_text())
        time.sleep(0.05)
    return view


def swap_in_background(daemon, model: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "wcd.cli", "--socket", daemon.socket,
                             "swap", model], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_worker_killed_mid_stream_ends_the_stream_with_an_error(daemon, client):
    """The stream's client gets an error at once; the worker restarts with the
    model it served (small-b, not the preload)."""
    stream = client.completions.create(model="small-b", prompt="hello", **LONG)
    chunks = iter(stream)
    next(chunks)
    before = worker(daemon)
    pid = before["pid"]
    started = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(openai.APIError) as raised:
        for _ in chunks:
            pass
    assert time.monotonic() - started < 30  # an answer, not a hang
    assert "exited" in str(raised.value) or "died" in str(raised.value)
    view = daemon.wait_serving("small-b")
    assert view["pid"] != pid and view["restarts"] == before["restarts"] + 1
    assert view["model"] == "small-b" and not alive(pid)
    reply = client.completions.create(model="small-b", prompt="hello", max_tokens=2)
    assert reply.usage.completion_tokens == 2


def test_worker_killed_mid_swap_fails_the_swap_and_comes_back(daemon, client):
    """The swap to wide-a waits for small-a's stream to drain; the worker dies
    meanwhile. The swap's caller and the stream's client both get errors; the
    worker restarts with the model it served."""
    daemon.json("swap", "small-a")
    stream = client.completions.create(model="small-a", prompt="hello", **LONG)
    chunks = iter(stream)
    next(chunks)
    pid = worker(daemon)["pid"]
    with paused(pid):
        swap = swap_in_background(daemon, "wide-a")
        wait_state(daemon, "draining")
        os.kill(pid, signal.SIGKILL)
    _, stderr = swap.communicate(timeout=60)
    assert swap.returncode == 1 and "died" in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1
    with pytest.raises(openai.APIError):
        for _ in chunks:
            pass
    view = daemon.wait_serving("small-a")
    assert view["pid"] != pid and not alive(pid)


def _worker_state(daemon) -> tuple[str, int | None]:
    """The worker's state straight off the control socket: polled every few
    milliseconds, it catches a swap's sub-second build."""
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(daemon.socket)
    with sock, sock.makefile("rb") as answer:
        sock.sendall(b"GET /v1/workers HTTP/1.0\r\nHost: wcd\r\n\r\n")
        body = answer.read().split(b"\r\n\r\n", 1)[1]
    view = json.loads(body)["workers"][0]
    return view["state"], view["pid"]


def test_worker_killed_while_it_builds_fails_the_swap_and_comes_back(daemon):
    daemon.json("swap", "small-a")
    swap = swap_in_background(daemon, "wide-a")
    deadline = time.monotonic() + 30
    while (state := _worker_state(daemon))[0] != "swapping":
        assert time.monotonic() < deadline and swap.poll() is None, "never saw the swap"
        time.sleep(0.002)
    os.kill(state[1], signal.SIGKILL)
    _, stderr = swap.communicate(timeout=60)
    assert swap.returncode == 1 and "died" in stderr, stderr
    # Back with what served before: the model it was swapping to may have killed it.
    view = daemon.wait_serving("small-a")
    assert view["pid"] != state[1] and not alive(state[1])


def test_a_swap_asked_for_during_another_waits_its_turn(daemon, client):
    """Not a fault: a control swap while the worker drains for another one is
    queued behind it instead of refused."""
    stream = client.completions.create(model="small-a", prompt="hello",
                                       **{**LONG, "max_tokens": 100})
    chunks = iter(stream)
    next(chunks)
    with paused(worker(daemon)["pid"]):
        first = swap_in_background(daemon, "wide-a")
        wait_state(daemon, "draining")
        second = swap_in_background(daemon, "small-b")
        # The daemon logs each operation it takes: the second has reached it.
        wait_until(lambda: f"control: /v1/swap from pid {second.pid} " in daemon.log_text(),
                   timeout=30, what="the second swap at the daemon")
    for _ in chunks:
        pass  # the request in flight ends, so the drain does
    for swap in (first, second):
        _, stderr = swap.communicate(timeout=120)
        assert swap.returncode == 0, stderr
    assert worker(daemon)["model"] == "small-b"


@pytest.mark.stops_shared_daemon
def test_sigterm_during_a_swap_drains_then_stops_cleanly(daemon, client):
    """The stream in flight finishes (drained), the pending swap is refused,
    nothing is orphaned."""
    stream = client.completions.create(model="small-a", prompt="hello",
                                       **{**LONG, "max_tokens": 200})
    chunks = iter(stream)
    next(chunks)
    with paused(worker(daemon)["pid"]):
        swap = swap_in_background(daemon, "wide-a")
        wait_state(daemon, "draining")
        workers = daemon.worker_pids()
        daemon.process.send_signal(signal.SIGTERM)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == "length"  # the request in flight was served to its end
    _, stderr = swap.communicate(timeout=60)
    assert swap.returncode != 0 and stderr.strip(), stderr
    # Within the daemon's own bounds: the drain (20 s here), a worker's
    # Shutdown then SIGTERM (stop_timeout, 20 s each: the worker may be mid-
    # build of wide-a, which a cold compile cache on a busy box makes long),
    # and each server's cleanup (drain_timeout each).
    try:
        code = daemon.process.wait(20 + 2 * 20 + 2 * 20 + 30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the daemon did not stop:\n{daemon.log_text()[-6000:]}")
    assert code == 0, daemon.log_text()
    for pid in workers:
        assert not alive(pid)
