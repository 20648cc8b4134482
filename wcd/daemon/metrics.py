"""Prometheus metrics (GET /metrics), in a registry of the daemon's own.

Model labels only ever carry canonical names of models the daemon resolved,
never what a client typed, so a hostile client cannot grow the label set.

Beside the wcd_* series, the vllm:* series that `vllm serve` (v1
PrometheusStatLogger) exposes and that the daemon can compute, with vLLM's
names, help, labels and buckets, so vLLM dashboards and routers read wcd as
they read vLLM. Each served model is one vLLM "engine" (engine="0"), as a
`vllm serve` without data parallelism labels it; a request's unit is one
completion (a prompt's i-th of n choices), as each is its own engine request
in vLLM.
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

# vLLM 0.32's defaults (vllm/v1/metrics/buckets.py), copied: the daemon never imports vLLM.
_VLLM_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                         50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
_VLLM_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                      2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_VLLM_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                     5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_VLLM_N_BUCKETS = (1, 2, 5, 10, 20)
_VLLM_ITERATION_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
_VLLM_PREEMPTION_BUCKETS = (1, 2, 3, 4, 5, 10, 20)
# vLLM caps its 1-2-5 token buckets at the one model's max_model_len; one
# registry here serves many models, so the cap covers a 1M-token context.
_VLLM_TOKEN_BUCKETS = tuple(m * 10 ** e for e in range(7) for m in (1, 2, 5)
                            if m * 10 ** e <= 10 ** 6)
VLLM_LABELS = ["model_name", "engine"]
VLLM_ENGINE = "0"


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
                                    "device), host_cache (a hit), snapshot_file (the cache's "
                                    "disk tier) or disk (a miss)", ["source"],
                                    registry=r)
        self.vllm = _VllmSeries(r)

    def track(self, queue_length: Callable[[], int],
              resident: Callable[[], list[dict]],
              cached_bytes: Callable[[], int],
              waiting: Callable[[], dict[str, int]]) -> None:
        """Gauges read at scrape time from the state's owner; `waiting`:
        requests waiting per model, resident or not."""
        self.registry.register(_StateCollector(queue_length, resident, cached_bytes, waiting))

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

    def engine_stats(self, stats: list[p.EngineStats]) -> None:
        for model_stats in stats:
            self.vllm.engine_stats(model_stats)

    def swap_failed(self, model: str | None) -> None:
        self.swaps.labels(model or "", "", "failed").inc()

    def request_timer(self) -> RequestTimer:
        return RequestTimer(self)


class _VllmSeries:
    """vLLM's per-request series (vllm/v1/metrics/loggers.py PrometheusStatLogger)."""

    def __init__(self, r: CollectorRegistry) -> None:
        def counter(name, doc, extra=()):
            return Counter(name, doc, [*VLLM_LABELS, *extra], registry=r)

        def histogram(name, doc, buckets):
            return Histogram(name, doc, VLLM_LABELS, buckets=buckets, registry=r)

        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens",
                                         "Number of generation tokens processed.")
        self.request_success = counter("vllm:request_success",
                                       "Count of successfully processed requests.",
                                       ["finished_reason"])
        self.request_prompt_tokens = histogram("vllm:request_prompt_tokens",
                                               "Number of prefill tokens processed.",
                                               _VLLM_TOKEN_BUCKETS)
        self.request_generation_tokens = histogram("vllm:request_generation_tokens",
                                                   "Number of generation tokens processed.",
                                                   _VLLM_TOKEN_BUCKETS)
        self.max_generation_tokens = histogram(
            "vllm:request_max_num_generation_tokens",
            "Histogram of maximum number of requested generation tokens.", _VLLM_TOKEN_BUCKETS)
        self.params_n = histogram("vllm:request_params_n",
                                  "Histogram of the n request parameter.", _VLLM_N_BUCKETS)
        self.ttft = histogram("vllm:time_to_first_token_seconds",
                              "Histogram of time to first token in seconds.", _VLLM_TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds",
                             "Histogram of inter-token latency in seconds.", _VLLM_ITL_BUCKETS)
        self.tpot = histogram("vllm:request_time_per_output_token_seconds",
                              "Histogram of time_per_output_token_seconds per request.",
                              _VLLM_ITL_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds",
                             "Histogram of e2e request latency in seconds.",
                             _VLLM_LATENCY_BUCKETS)
        # What only the engine sees: its steps and its requests' phases.
        self.preemptions = counter("vllm:num_preemptions",
                                   "Cumulative number of preemption from the engine.")
        self.prefix_cache_queries = counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.")
        self.prefix_cache_hits = counter("vllm:prefix_cache_hits",
                                         "Prefix cache hits, in terms of number of cached tokens.")
        self.prompt_tokens_cached = counter("vllm:prompt_tokens_cached",
                                            "Number of cached prompt tokens (local + external).")
        self.iteration_tokens = histogram("vllm:iteration_tokens_total",
                                          "Histogram of number of tokens per engine_step.",
                                          _VLLM_ITERATION_BUCKETS)
        self.max_tokens = histogram("vllm:request_params_max_tokens",
                                    "Histogram of the max_tokens request parameter.",
                                    _VLLM_TOKEN_BUCKETS)
        self.phases = {
            phase: histogram(f"vllm:request_{phase}_time_seconds",
                             f"Histogram of time spent in {state} phase for request.",
                             _VLLM_LATENCY_BUCKETS)
            for phase, state in (("queue", "WAITING"), ("inference", "RUNNING"),
                                 ("prefill", "PREFILL"), ("decode", "DECODE"))}
        self.request_preemptions = histogram(
            "vllm:request_num_preemptions",
            "Histogram of the number of times a request was preempted.",
            _VLLM_PREEMPTION_BUCKETS)
        self.prefill_kv_computed = histogram(
            "vllm:request_prefill_kv_computed_tokens",
            "Histogram of new KV tokens computed during prefill (excluding cached tokens).",
            _VLLM_TOKEN_BUCKETS)

    def engine_stats(self, stats: p.EngineStats) -> None:
        """One model's engine steps, as vLLM's PrometheusStatLogger.record
        counts them."""
        labels = (stats.model, VLLM_ENGINE)
        self.preemptions.labels(*labels).inc(stats.preemptions)
        self.prefix_cache_queries.labels(*labels).inc(stats.prefix_cache_queries)
        self.prefix_cache_hits.labels(*labels).inc(stats.prefix_cache_hits)
        self.prompt_tokens_cached.labels(*labels).inc(stats.cached_prompt_tokens)
        for tokens in stats.iteration_tokens:
            self.iteration_tokens.labels(*labels).observe(tokens)
        for finished in stats.finished:
            for phase, seconds in (("queue", finished.queued_s),
                                   ("inference", finished.inference_s),
                                   ("prefill", finished.prefill_s),
                                   ("decode", finished.decode_s)):
                self.phases[phase].labels(*labels).observe(seconds)
            self.request_preemptions.labels(*labels).observe(finished.preemptions)
            self.prefill_kv_computed.labels(*labels).observe(
                finished.prompt_tokens - max(finished.cached_tokens, 0))
            if finished.max_tokens:
                self.max_tokens.labels(*labels).observe(finished.max_tokens)


class _Completion:
    """One choice of one prompt: what vLLM calls a request."""

    def __init__(self) -> None:
        self.first: float | None = None  # its first token's arrival
        self.last: float | None = None
        self.tokens = 0
        self.finish_reason: str | None = None


class RequestTimer:
    """One request's timings; `model` is set once the request holds a lease.
    Every Output is observed once, here, and feeds both the wcd_* and the
    vllm:* series."""

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
        self.completions: dict[tuple[int, int], _Completion] = {}

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
                self._observe_vllm(output, now)
                yield output

    def _observe_vllm(self, output: p.Output, now: float) -> None:
        v, labels = self.metrics.vllm, (self.model, VLLM_ENGINE)
        c = self.completions.setdefault((output.prompt_index, output.index), _Completion())
        if output.token_ids:
            if c.first is None:
                c.first = now
                v.ttft.labels(*labels).observe(now - self.started)
                v.prompt_tokens.labels(*labels).inc(output.prompt_tokens)
            else:
                v.itl.labels(*labels).observe(now - c.last)
            c.last = now
            c.tokens += len(output.token_ids)
            v.generation_tokens.labels(*labels).inc(len(output.token_ids))
        if output.finish_reason is None:
            return
        # As vLLM, only completions the engine finished count: ones a client
        # abandoned are aborted without a finished-request record.
        c.finish_reason = output.finish_reason
        v.request_success.labels(*labels, output.finish_reason).inc()
        v.e2e.labels(*labels).observe((c.last or now) - self.started)
        v.request_prompt_tokens.labels(*labels).observe(output.prompt_tokens)
        v.request_generation_tokens.labels(*labels).observe(c.tokens)
        decode = (c.last - c.first) / (c.tokens - 1) if c.tokens > 1 else 0
        v.tpot.labels(*labels).observe(decode)

    def _finish_prompts(self) -> None:
        """vLLM records n and the longest choice once all of a prompt's n
        choices finished; by the request's end every choice has shown up."""
        prompts: dict[int, list[_Completion]] = {}
        for (prompt_index, _), c in self.completions.items():
            prompts.setdefault(prompt_index, []).append(c)
        v, labels = self.metrics.vllm, (self.model, VLLM_ENGINE)
        for choices in prompts.values():
            if all(c.finish_reason is not None for c in choices):
                v.params_n.labels(*labels).observe(len(choices))
                v.max_generation_tokens.labels(*labels).observe(max(c.tokens for c in choices))

    def finish(self, outcome: str) -> None:
        m = self.metrics
        m.requests.labels(self.model, outcome).inc()
        if self.model == UNRESOLVED:
            return
        if self.last is not None:
            m.e2e.labels(self.model).observe(self.last - self.started)
        m.tokens.labels(self.model, "prompt").inc(sum(self.prompt_tokens.values()))
        m.tokens.labels(self.model, "completion").inc(self.completion_tokens)
        self._finish_prompts()


class _StateCollector:
    def __init__(self, queue_length: Callable[[], int],
                 resident: Callable[[], list[dict]],
                 cached_bytes: Callable[[], int],
                 waiting: Callable[[], dict[str, int]]):
        self.queue_length = queue_length
        self.resident = resident
        self.cached_bytes = cached_bytes
        self.waiting = waiting

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
        resident = self.resident()
        for r in resident:
            key = [r["model"], str(r["worker"])]
            models.add_metric([*key, r["state"]], 1)
            footprint.add_metric(key, r["bytes"])
            running.add_metric(key, r["running"])
            waiting.add_metric(key, r["waiting"])
        yield from (models, footprint, running, waiting)
        yield from _vllm_gauges(resident, self.waiting())
        yield GaugeMetricFamily("wcd_host_cache_bytes",
                                "Bytes of model snapshots in the workers' host caches",
                                value=self.cached_bytes())


def _vllm_gauges(resident: list[dict], waiting_for: dict[str, int]):
    """vLLM's scheduler gauges, per model: running across the workers serving
    it, waiting whether or not a worker has it yet (a cold model's queue)."""
    running: dict[str, int] = {}
    kv_usage: dict[str, float] = {}
    for r in resident:
        running[r["model"]] = running.get(r["model"], 0) + r["running"]
        # A model on several workers is as full as its fullest KV cache.
        kv_usage[r["model"]] = max(kv_usage.get(r["model"], 0.0), r["kv_usage"])
    waiting = {**dict.fromkeys(running, 0), **waiting_for}
    # As vLLM's: the requests waiting for capacity, and none deferred.
    by_reason = GaugeMetricFamily(
        "vllm:num_requests_waiting_by_reason",
        "Number of waiting requests by reason. Reason labels: 'capacity' = waiting for "
        "scheduling capacity; 'deferred' = deferred by transient constraints (LoRA budget, "
        "KV transfer, blocked status). Sum of all reasons equals vllm:num_requests_waiting.",
        labels=[*VLLM_LABELS, "reason"])
    for model, count in waiting.items():
        by_reason.add_metric([model, VLLM_ENGINE, "capacity"], count)
        by_reason.add_metric([model, VLLM_ENGINE, "deferred"], 0)
    yield by_reason
    yield from _cache_config_info(resident)
    for name, doc, counts in (
            ("vllm:num_requests_running", "Number of requests in model execution batches.",
             running),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
             waiting),
            ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
             kv_usage)):
        family = GaugeMetricFamily(name, doc, labels=VLLM_LABELS)
        for model, count in counts.items():
            family.add_metric([model, VLLM_ENGINE], count)
        yield family


def _cache_config_info(resident: list[dict]):
    """vLLM's info gauge of its engine's CacheConfig (labelled with the
    config's fields and engine, not model_name): one sample per distinct
    config among the resident models."""
    family = GaugeMetricFamily("vllm:cache_config_info",
                               "Information of the LLMEngine CacheConfig")
    seen: set[tuple] = set()
    for r in resident:
        labels = {**r["cache_config"], "engine": VLLM_ENGINE}
        key = tuple(sorted(labels.items()))
        if r["cache_config"] and key not in seen:
            seen.add(key)
            family.add_sample("vllm:cache_config_info", labels, 1)
    yield family
