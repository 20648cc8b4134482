"""Connections to the OpenAI endpoint are bounded (issue 13 item 8), against a
real daemon: idle ones closed after keepalive_timeout, a request head that
trickles in closed after header_timeout, past max_connections /health still
answers and the surplus is closed; a stream or a request body slower than
header_timeout is never cut.

The daemon runs with header_timeout 1 s and keepalive_timeout 2 s: different,
so each close can be told apart by when it came.
"""

from __future__ import annotations

import contextlib
import json
import select
import selectors
import socket
import threading
import time
import urllib.request

import pytest

from daemon_harness import free_port, openai_client, paused, serving

pytestmark = pytest.mark.vllm

HEADER_TIMEOUT = 1.0
KEEPALIVE_TIMEOUT = 2.0
MAX_CONNECTIONS = 50
SLACK = 0.6  # the server's timers against ours, on a busy 2-core machine
HEALTH = b"GET /health HTTP/1.1\r\nHost: wcd\r\n\r\n"
SLOW_HEAD = b"GET /health HTTP/1.1\r\nHost: wcd\r\nX-Slow: " + b"a" * 100  # never ends


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, demo_models):
    http = {"host": "127.0.0.1", "port": free_port(), "header_timeout": f"{HEADER_TIMEOUT}s",
            "keepalive_timeout": f"{KEEPALIVE_TIMEOUT}s", "max_connections": MAX_CONNECTIONS}
    with serving(tmp_path_factory.mktemp("wcd-connections"), demo_models, http=http) as daemon:
        yield daemon


def connect(daemon) -> socket.socket:
    return socket.create_connection(("127.0.0.1", daemon.port), timeout=10)


def read_response(sock: socket.socket) -> bytes:
    """One whole response with a Content-Length body, the connection kept."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += _recv(sock)
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += _recv(sock)
    return head


def _recv(sock: socket.socket) -> bytes:
    chunk = sock.recv(65536)
    assert chunk, "the server closed the connection mid-response"
    return chunk


def is_closed(sock: socket.socket) -> bool:
    """Whether the server closed it, without waiting (recv on a socket with
    a timeout would wait for it to become readable)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    if not poller.poll(0):
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except ConnectionError:
        return True


def lifetimes(socks: list[socket.socket], since: float, limit: float,
              trickle: bytes = b"", every: float = 0.0) -> list[float]:
    """Seconds from `since` until the server closed each socket (all within
    `limit`); with `trickle`, one byte of it sent to each open socket per
    `every` seconds meanwhile."""
    closed: dict[socket.socket, float] = {}
    sent = 0
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            selector.register(sock, selectors.EVENT_READ)
        next_byte = time.monotonic()
        while len(closed) < len(socks):
            now = time.monotonic()
            assert now - since < limit, f"{len(socks) - len(closed)} still open after {limit}s"
            if trickle and now >= next_byte:
                for sock in socks:
                    if sock not in closed:
                        with contextlib.suppress(OSError):
                            sock.send(trickle[sent:sent + 1])
                sent += 1
                next_byte += every
            wait = max(next_byte - now, 0.0) if trickle else 0.5
            for key, _ in selector.select(min(wait, 0.5)):
                if is_closed(key.fileobj):
                    closed[key.fileobj] = time.monotonic() - since
                    selector.unregister(key.fileobj)
    return [closed[sock] for sock in socks]


def health_latency(daemon) -> float:
    started = time.monotonic()
    with urllib.request.urlopen(daemon.url + "/health", timeout=5) as response:
        assert response.status == 200
        response.read()
    return time.monotonic() - started


def test_idle_connections_are_closed_after_keepalive_timeout(daemon):
    socks = [connect(daemon) for _ in range(20)]
    try:
        for sock in socks:
            sock.sendall(HEALTH)
            assert read_response(sock).startswith(b"HTTP/1.1 200")
        lived = lifetimes(socks, since=time.monotonic(), limit=KEEPALIVE_TIMEOUT + 5)
    finally:
        for sock in socks:
            sock.close()
    print(f"idle after a response: closed after {min(lived):.2f}..{max(lived):.2f} s")
    # The whole keep-alive, not the header timeout: nothing was being sent.
    assert KEEPALIVE_TIMEOUT - SLACK < min(lived) and max(lived) < KEEPALIVE_TIMEOUT + SLACK


@pytest.mark.parametrize("trickle", [b"", SLOW_HEAD], ids=["silent", "one-byte-per-0.3s"])
def test_a_request_head_that_does_not_arrive_in_time_is_closed(daemon, trickle):
    started = time.monotonic()
    socks = [connect(daemon) for _ in range(20)]
    try:
        lived = lifetimes(socks, since=started, limit=HEADER_TIMEOUT + 5,
                          trickle=trickle, every=0.3)
    finally:
        for sock in socks:
            sock.close()
    print(f"{'slowloris' if trickle else 'silent'}: closed after "
          f"{min(lived):.2f}..{max(lived):.2f} s")
    assert HEADER_TIMEOUT - SLACK < min(lived) and max(lived) < HEADER_TIMEOUT + SLACK


def test_past_the_cap_health_answers_and_the_surplus_is_closed(daemon):
    surplus = 100
    started = time.monotonic()
    flood = [connect(daemon) for _ in range(MAX_CONNECTIONS + surplus)]
    try:
        latency = health_latency(daemon)
        deadline = time.monotonic() + 0.5
        while sum(map(is_closed, flood)) <= surplus and time.monotonic() < deadline:
            time.sleep(0.02)
        closed = [is_closed(sock) for sock in flood]
        elapsed = time.monotonic() - started
    finally:
        for sock in flood:
            sock.close()
    print(f"{len(flood)} idle connections: /health in {latency * 1000:.1f} ms, "
          f"{sum(closed)} closed {elapsed:.2f} s after the first")
    assert latency < 1.0
    # The oldest make room, /health's connection included.
    assert all(closed[:surplus]) and len(flood) - sum(closed) <= MAX_CONNECTIONS
    if elapsed < HEADER_TIMEOUT:  # and no more than that, unless it all took too long
        assert sum(closed) == surplus + 1


def test_health_answers_throughout_a_sustained_flood(daemon):
    """An attacker holding 150 idle connections and opening new ones as fast
    as it can for 3 s; /health is asked every 100 ms meanwhile."""
    stop = threading.Event()
    opened = 0

    def attack():
        nonlocal opened
        held: list[socket.socket] = []
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(connect(daemon))
                opened += 1
            while len(held) > MAX_CONNECTIONS + 100:
                held.pop(0).close()
        for sock in held:
            sock.close()

    attacker = threading.Thread(target=attack)
    attacker.start()
    try:
        time.sleep(0.3)
        latencies = []
        for _ in range(30):
            latencies.append(health_latency(daemon))
            time.sleep(0.1)
    finally:
        stop.set()
        attacker.join(10)
    latencies.sort()
    print(f"{opened} flood connections in 3 s: /health p50 "
          f"{latencies[len(latencies) // 2] * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms")
    assert opened > MAX_CONNECTIONS + 100
    assert latencies[-1] < 1.0


def test_requests_in_progress_are_never_cut_and_the_cap_then_refuses(daemon):
    """Every slot holds a request whose body trickles in longer than
    header_timeout: none is cut, and a new connection is closed at once."""
    body = json.dumps({"model": "small-a"}).encode()  # refused (no prompt): nothing to run
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: wcd\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    busy = [connect(daemon) for _ in range(MAX_CONNECTIONS)]
    try:
        for sock in busy:
            sock.sendall(head + body[:1])
        time.sleep(0.3)
        started = time.monotonic()
        with connect(daemon) as late:
            late.settimeout(2)
            assert late.recv(1) == b"", "a connection past the cap was not closed"
        refused_in = time.monotonic() - started
        time.sleep(HEADER_TIMEOUT + 0.5)
        for sock in busy:
            sock.sendall(body[1:])
        statuses = [read_response(sock).split(b" ")[1] for sock in busy]
    finally:
        for sock in busy:
            sock.close()
    print(f"past the cap with every connection busy: closed in {refused_in * 1000:.1f} ms")
    assert statuses == [b"400"] * MAX_CONNECTIONS
    assert health_latency(daemon) < 1.0


def test_a_stream_longer_than_the_timeouts_is_not_cut(daemon):
    """The worker is stopped mid-stream for longer than both timeouts: the
    connection carries nothing that long with a request in progress, and the
    stream then runs to its end."""
    client = openai_client(daemon, timeout=60)
    max_tokens = 400
    stream = client.completions.create(model="small-a", prompt="hello", max_tokens=max_tokens,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    (worker,) = daemon.worker_pids()
    pause = KEEPALIVE_TIMEOUT + 0.5
    chunks = iter(stream)
    first = next(chunks)
    started = time.monotonic()
    with paused(worker):
        time.sleep(pause)
    rest = list(chunks)
    lasted = time.monotonic() - started
    print(f"stream: {len(rest) + 1} chunks, {lasted:.2f} s from the first chunk to the end "
          f"with a {pause:.1f} s pause")
    assert first.choices and rest[-1].usage.completion_tokens == max_tokens
    assert [c.choices[0].finish_reason for c in rest if c.choices][-1] == "length"
    assert lasted > pause
