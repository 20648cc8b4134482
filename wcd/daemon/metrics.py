"""Prometheus metrics (GET /metrics), in a registry of the daemon's own.

Model labels only ever carry canonical names of models the daemon resolved,
never what a client typed, so a hostile client cannot grow the label set.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable

from aiohttp import web
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram,
                               generate_latest)
from prometheus_client.core import GaugeMetricFamily

from wcd.workers import protocol as p

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_SWAP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
UNRESOLVED = ""  # requests refused before their model was resolved


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("wcd_requests", "OpenAI API requests by model and outcome",
                                ["model", "outcome"], registry=r)
        self.ttft = Histogram("wcd_time_to_first_token_seconds",
                              "Request arrival to its first generated token "
                              "(queueing and swaps included)", ["model"],
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("wcd_inter_token_latency_seconds",
                             "Time between a request's successive outputs", ["model"],
                             buckets=_TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("wcd_request_duration_seconds",
                             "Request arrival to its last output", ["model"],
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("wcd_tokens", "Tokens processed", ["model", "kind"], registry=r)
        self.swaps = Counter("wcd_swaps", "Swaps, loads and unloads by path and outcome",
                             ["model", "path", "outcome"], registry=r)
        self.swap_phase = Histogram("wcd_swap_phase_duration_seconds",
                                    "Duration of each swap phase", ["phase", "path"],
                                    buckets=_SWAP_BUCKETS, registry=r)
        self.swap_total = Histogram("wcd_swap_duration_seconds", "Whole swaps", ["path"],
                                    buckets=_SWAP_BUCKETS, registry=r)
        self.suspensions = Counter("wcd_suspensions", "Busy resident models suspended to "
                                   "make room (their requests paused, then resumed)",
                                   ["model"], registry=r)
        self.restarts = Counter("wcd_worker_restarts", "Worker processes restarted",
                                ["worker"], registry=r)
        self.weight_loads = Counter("wcd_weight_loads",
                                    "Swaps by where their weights came from: parked (on the "
                                    "device), host_cache (a hit) or disk (a miss)", ["source"],
                                    registry=r)

    def track(self, queue_length: Callable[[], int],
              resident: Callable[[], list[dict]],
              cached_bytes: Callable[[], int]) -> None:
        """Gauges read at scrape time from the state's owner."""
        self.registry.register(_StateCollector(queue_length, resident, cached_bytes))

    async def handler(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    def swap_done(self, model: str | None, event: dict) -> None:
        path = event["path"]
        self.swaps.labels(model or "", path, "ok").inc()
        for phase, seconds in event["phases"].items():
            self.swap_phase.labels(phase, path).observe(seconds)
        self.swap_total.labels(path).observe(event["total_s"])
        if event.get("weights"):
            self.weight_loads.labels(event["weights"]).inc()

    def swap_failed(self, model: str | None) -> None:
        self.swaps.labels(model or "", "", "failed").inc()

    def request_timer(self) -> RequestTimer:
        return RequestTimer(self)


class RequestTimer:
    """One request's timings; `model` is set once the request holds a lease."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self.model = UNRESOLVED
        # A stream that ended early without an error the handler saw: its
        # client stopped reading ("stalled") or went away ("client_gone").
        self.stream_end: str | None = None
        self.started = time.perf_counter()
        self.last: float | None = None
        self.prompt_tokens: dict[int, int] = {}
        self.completion_tokens = 0

    async def observe(self, outputs: AsyncIterator[p.Output]) -> AsyncIterator[p.Output]:
        """Closing this closes `outputs` at once, which aborts in the worker."""
        m = self.metrics
        async with contextlib.aclosing(outputs):
            async for output in outputs:
                now = time.perf_counter()
                if self.last is None:
                    m.ttft.labels(self.model).observe(now - self.started)
                else:
                    m.itl.labels(self.model).observe(now - self.last)
                self.last = now
                self.prompt_tokens[output.prompt_index] = output.prompt_tokens
                self.completion_tokens += len(output.token_ids)
                yield output

    def finish(self, outcome: str) -> None:
        m = self.metrics
        m.requests.labels(self.model, outcome).inc()
        if self.model == UNRESOLVED:
            return
        if self.last is not None:
            m.e2e.labels(self.model).observe(self.last - self.started)
        m.tokens.labels(self.model, "prompt").inc(sum(self.prompt_tokens.values()))
        m.tokens.labels(self.model, "completion").inc(self.completion_tokens)


class _StateCollector:
    def __init__(self, queue_length: Callable[[], int],
                 resident: Callable[[], list[dict]],
                 cached_bytes: Callable[[], int]):
        self.queue_length = queue_length
        self.resident = resident
        self.cached_bytes = cached_bytes

    def collect(self):
        yield GaugeMetricFamily("wcd_queue_requests", "Requests waiting for a model",
                                value=self.queue_length())
        labels = ["model", "worker"]
        models = GaugeMetricFamily("wcd_resident_models", "Models resident on a worker, by "
                                   "state (serving, draining, suspended)",
                                   labels=[*labels, "state"])
        footprint = GaugeMetricFamily("wcd_resident_bytes", "A resident model's footprint: "
                                      "weights plus KV cache", labels=labels)
        running = GaugeMetricFamily("wcd_resident_running_requests",
                                    "Requests in flight on a resident model", labels=labels)
        waiting = GaugeMetricFamily("wcd_resident_waiting_requests",
                                    "Requests waiting for a resident model", labels=labels)
        for r in self.resident():
            key = [r["model"], str(r["worker"])]
            models.add_metric([*key, r["state"]], 1)
            footprint.add_metric(key, r["bytes"])
            running.add_metric(key, r["running"])
            waiting.add_metric(key, r["waiting"])
        yield from (models, footprint, running, waiting)
        yield GaugeMetricFamily("wcd_host_cache_bytes",
                                "Bytes of model snapshots in the workers' host caches",
                                value=self.cached_bytes())
