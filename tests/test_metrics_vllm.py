"""The vllm:* series on wcd's /metrics: vLLM's own names, types, help, labels
and buckets (checked against a real vLLM PrometheusStatLogger), and the
values a request's Outputs give them."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import MODELS
from daemon_harness import openai_client
from wcd.daemon.metrics import Metrics
from wcd.workers import protocol as p

MODEL = "small-a"
# Per request: the ones vLLM keeps per finished request whose inputs the daemon sees.
PER_REQUEST = ("vllm:prompt_tokens", "vllm:generation_tokens", "vllm:request_success",
               "vllm:request_prompt_tokens", "vllm:request_generation_tokens",
               "vllm:request_max_num_generation_tokens", "vllm:request_params_n",
               "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
               "vllm:request_time_per_output_token_seconds", "vllm:e2e_request_latency_seconds")
# Per engine step and per finished engine request: what the worker's engines record.
ENGINE = ("vllm:num_preemptions", "vllm:prefix_cache_queries", "vllm:prefix_cache_hits",
          "vllm:prompt_tokens_cached", "vllm:iteration_tokens_total",
          "vllm:request_params_max_tokens", "vllm:request_queue_time_seconds",
          "vllm:request_inference_time_seconds", "vllm:request_prefill_time_seconds",
          "vllm:request_decode_time_seconds", "vllm:request_num_preemptions",
          "vllm:request_prefill_kv_computed_tokens")
GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting",
          "vllm:num_requests_waiting_by_reason", "vllm:kv_cache_usage_perc")
TOKEN_COUNTS = ("vllm:request_prompt_tokens", "vllm:request_generation_tokens",
                "vllm:request_max_num_generation_tokens", "vllm:request_params_max_tokens",
                "vllm:request_prefill_kv_computed_tokens")
CACHE_CONFIG = {"block_size": "16", "num_gpu_blocks": "4096", "kv_cache_size_tokens": "65536"}


@pytest.fixture(scope="module")
def vllm_families() -> dict:
    """What `vllm serve` exposes, from vLLM's own stat logger."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    config = EngineArgs(model=str(MODELS / MODEL), max_model_len=512).create_engine_config()
    PrometheusStatLogger(config, [0])
    return {f.name: f for f in prometheus_client.REGISTRY.collect()
            if f.name.startswith("vllm:")}


def _output(index: int, tokens: list[int], finish: str | None = None,
            prompt_index: int = 0) -> p.Output:
    return p.Output(request_id="r", index=index, text="x" * len(tokens), token_ids=tokens,
                    prompt_tokens=5 + prompt_index, finish_reason=finish,
                    prompt_index=prompt_index)


def _run(metrics: Metrics, outputs: list[p.Output], outcome: str = "200",
         read: int | None = None) -> None:
    """One request through a RequestTimer, as openai_api drives it; `read`
    Outputs taken before the client goes away."""
    async def source():
        for output in outputs:
            yield output

    async def drive():
        timer = metrics.request_timer()
        timer.model = MODEL
        observed = timer.observe(source())
        taken = 0
        async for _ in observed:
            taken += 1
            if taken == read:
                break
        await observed.aclose()
        timer.finish(outcome)

    asyncio.run(drive())


def _served(metrics: Metrics) -> Metrics:
    metrics.track(lambda: 3, lambda: [
        {"model": MODEL, "worker": 0, "state": "serving", "bytes": 1, "running": 2, "waiting": 3,
         "kv_usage": 0.25, "cache_config": CACHE_CONFIG},
        {"model": MODEL, "worker": 1, "state": "serving", "bytes": 1, "running": 1, "waiting": 3,
         "kv_usage": 0.5, "cache_config": CACHE_CONFIG},
        {"model": "small-b", "worker": 1, "state": "draining", "bytes": 1, "running": 0,
         "waiting": 0, "kv_usage": 0.0, "cache_config": {**CACHE_CONFIG, "block_size": "32"}}], lambda: 0, lambda: {MODEL: 3, "wide-a": 2})
    return metrics


def _families(metrics: Metrics) -> dict:
    """As a scraper parses GET /metrics."""
    text = prometheus_client.generate_latest(metrics.registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(families: dict, name: str, sample: str, **labels) -> float:
    return sum(s.value for s in families[name].samples
               if s.name == sample and labels.items() <= s.labels.items())


def _label_names(family) -> set[str]:
    return {key for s in family.samples for key in s.labels} - {"le"}


def _buckets(family) -> list[float]:
    """The finite bounds: +Inf ends every histogram."""
    bounds = {float(s.labels["le"]) for s in family.samples if s.name.endswith("_bucket")}
    return sorted(bounds - {float("inf")})


def test_series_are_vllms(vllm_families):
    metrics = _served(Metrics())
    _run(metrics, [_output(0, [1]), _output(0, [2], "stop")])
    metrics.engine_stats([_engine_stats()])
    ours = _families(metrics)
    for name in (*PER_REQUEST, *ENGINE, *GAUGES):
        theirs, mine = vllm_families[name], ours[name]
        assert (mine.type, mine.documentation) == (theirs.type, theirs.documentation), name
        assert _label_names(mine) == _label_names(theirs), name
        assert {s.name for s in mine.samples} <= {s.name for s in theirs.samples}, name
        if name in TOKEN_COUNTS:  # vLLM's stop at its one model's max_model_len
            assert _buckets(theirs) == _buckets(mine)[:len(_buckets(theirs))], name
        else:
            assert _buckets(mine) == _buckets(theirs), name
    assert {s.labels["finished_reason"] for s in vllm_families["vllm:request_success"].samples
            } >= {"stop", "length", "abort"}


def _engine_stats() -> p.EngineStats:
    """Two steps of MODEL's engine: a prefill of 7 tokens (5 computed, 2 from
    the prefix cache) with one preemption, then one decode that finishes it."""
    return p.EngineStats(MODEL, iteration_tokens=[6, 1], preemptions=1,
                         prefix_cache_queries=7, prefix_cache_hits=2, cached_prompt_tokens=2,
                         finished=[p.FinishedStats(0.5, 0.25, 1.0, 0.75, 1, 16, 7, 2)])


def test_engine_stats_are_counted_as_vllm_counts_them():
    metrics = Metrics()
    metrics.engine_stats([_engine_stats(), p.EngineStats(MODEL, iteration_tokens=[3])])
    f = _families(metrics)
    model = {"model_name": MODEL, "engine": "0"}
    for name, sample, value in (
            ("vllm:num_preemptions", "vllm:num_preemptions_total", 1),
            ("vllm:prefix_cache_queries", "vllm:prefix_cache_queries_total", 7),
            ("vllm:prefix_cache_hits", "vllm:prefix_cache_hits_total", 2),
            ("vllm:prompt_tokens_cached", "vllm:prompt_tokens_cached_total", 2),
            ("vllm:iteration_tokens_total", "vllm:iteration_tokens_total_count", 3),
            ("vllm:iteration_tokens_total", "vllm:iteration_tokens_total_sum", 10),
            ("vllm:request_queue_time_seconds", "vllm:request_queue_time_seconds_sum", 0.5),
            ("vllm:request_prefill_time_seconds", "vllm:request_prefill_time_seconds_sum", 0.25),
            ("vllm:request_inference_time_seconds",
             "vllm:request_inference_time_seconds_sum", 1.0),
            ("vllm:request_decode_time_seconds", "vllm:request_decode_time_seconds_sum", 0.75),
            ("vllm:request_num_preemptions", "vllm:request_num_preemptions_sum", 1),
            ("vllm:request_params_max_tokens", "vllm:request_params_max_tokens_sum", 16),
            ("vllm:request_prefill_kv_computed_tokens",
             "vllm:request_prefill_kv_computed_tokens_sum", 5)):
        assert _value(f, name, sample, **model) == value, sample


def test_gauges_per_model():
    families = _families(_served(Metrics()))
    running, waiting = "vllm:num_requests_running", "vllm:num_requests_waiting"
    assert _value(families, running, running, model_name=MODEL, engine="0") == 3
    assert _value(families, waiting, waiting, model_name=MODEL, engine="0") == 3
    assert _value(families, running, running, model_name="small-b") == 0
    assert _value(families, waiting, waiting, model_name="small-b") == 0
    # On two workers: as full as the fuller.
    usage = "vllm:kv_cache_usage_perc"
    assert _value(families, usage, usage, model_name=MODEL, engine="0") == 0.5
    assert _value(families, usage, usage, model_name="small-b", engine="0") == 0
    # A model no worker has yet: its queue counts too.
    assert _value(families, waiting, waiting, model_name="wide-a", engine="0") == 2
    by_reason = "vllm:num_requests_waiting_by_reason"
    assert _value(families, by_reason, by_reason, model_name=MODEL, reason="capacity") == 3
    assert _value(families, by_reason, by_reason, model_name=MODEL, reason="deferred") == 0
    # One sample per distinct engine config, labelled as vLLM labels it.
    info = families["vllm:cache_config_info"].samples
    assert sorted(s.labels["block_size"] for s in info) == ["16", "32"]
    assert all(s.value == 1 and s.labels["engine"] == "0" and "model_name" not in s.labels
               for s in info)


def test_a_request_with_two_choices_and_two_prompts():
    metrics = Metrics()
    _run(metrics, [_output(0, [1, 2]), _output(1, [3]), _output(0, [4], "stop"),
                   _output(1, [5, 6, 7], "length"),
                   _output(0, [8], "stop", prompt_index=1), _output(1, [9], "stop", 1)])
    f = _families(metrics)
    model = {"model_name": MODEL, "engine": "0"}
    success = "vllm:request_success"
    assert _value(f, success, success + "_total", finished_reason="stop", **model) == 3
    assert _value(f, success, success + "_total", finished_reason="length", **model) == 1
    # Each choice is an engine request in vLLM: its prompt is counted once per choice.
    assert _value(f, "vllm:prompt_tokens", "vllm:prompt_tokens_total", **model) == 5 * 2 + 6 * 2
    assert _value(f, "vllm:generation_tokens", "vllm:generation_tokens_total") == 9
    assert _value(f, "vllm:time_to_first_token_seconds",
                  "vllm:time_to_first_token_seconds_count") == 4
    assert _value(f, "vllm:inter_token_latency_seconds",
                  "vllm:inter_token_latency_seconds_count") == 2
    assert _value(f, "vllm:e2e_request_latency_seconds",
                  "vllm:e2e_request_latency_seconds_count") == 4
    assert _value(f, "vllm:request_generation_tokens",
                  "vllm:request_generation_tokens_sum") == 9
    assert _value(f, "vllm:request_params_n", "vllm:request_params_n_count") == 2
    assert _value(f, "vllm:request_params_n", "vllm:request_params_n_sum") == 4
    assert _value(f, "vllm:request_max_num_generation_tokens",
                  "vllm:request_max_num_generation_tokens_sum") == 4 + 1
    # The wcd_* series see the same Outputs: prompts counted once each.
    assert _value(f, "wcd_tokens", "wcd_tokens_total", kind="prompt") == 5 + 6
    assert _value(f, "wcd_tokens", "wcd_tokens_total", kind="completion") == 9


def test_an_abandoned_request_counts_its_tokens_not_a_success():
    metrics = Metrics()
    _run(metrics, [_output(0, [1]), _output(0, [2]), _output(0, [3], "stop")],
         outcome="client_gone", read=2)
    f = _families(metrics)
    assert _value(f, "vllm:generation_tokens", "vllm:generation_tokens_total") == 2
    assert _value(f, "vllm:request_success", "vllm:request_success_total") == 0
    assert _value(f, "vllm:request_params_n", "vllm:request_params_n_count") == 0
    assert _value(f, "wcd_requests", "wcd_requests_total", outcome="client_gone") == 1


def _scrape(url: str) -> dict:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        return {f.name: f for f in text_string_to_metric_families(response.read().decode())}


def _poll(url: str, done, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        families = _scrape(url)
        if done(families) or time.monotonic() > deadline:
            return families
        time.sleep(0.1)


def test_a_daemon_serves_them(shared_daemon):
    """On conftest's shared daemon, serving small-a alone (one engine config):
    its counters as this test moved them."""
    model = {"model_name": MODEL, "engine": "0"}
    usage = "vllm:kv_cache_usage_perc"
    daemon = shared_daemon.get()
    swapped = daemon.wcctl("swap", MODEL)
    assert swapped.returncode == 0, swapped.stderr
    client = openai_client(daemon)
    before = _scrape(daemon.url)
    reply = client.completions.create(
        model=MODEL, prompt="hello world", n=2, max_tokens=4, seed=0)
    f = _scrape(daemon.url)
    # A long generation holds KV blocks, which the worker's health reports show.
    with client.completions.create(model=MODEL, prompt="hello world", max_tokens=400,
                                   stream=True, extra_body={"ignore_eos": True}) as stream:
        next(iter(stream))
        busy = _poll(daemon.url, lambda f: _value(f, usage, usage, **model) > 0)
    assert 0 < _value(busy, usage, usage, **model) <= 1

    def added(name: str, sample: str, **labels) -> float:
        return _value(f, name, sample, **labels) - _value(before, name, sample, **labels)

    reasons = [c.finish_reason for c in reply.choices]
    for reason in set(reasons):
        assert added("vllm:request_success", "vllm:request_success_total",
                     finished_reason=reason, **model) == reasons.count(reason)
    assert added("vllm:generation_tokens", "vllm:generation_tokens_total",
                 **model) == reply.usage.completion_tokens
    assert added("vllm:prompt_tokens", "vllm:prompt_tokens_total",
                 **model) == 2 * reply.usage.prompt_tokens
    assert added("vllm:request_params_n", "vllm:request_params_n_sum", **model) == 2
    # The engine's own records of the two choices (two engine requests).
    for phase in ("queue", "prefill", "decode", "inference"):
        name = f"vllm:request_{phase}_time_seconds"
        assert added(name, name + "_count", **model) == 2, name
    assert added("vllm:request_params_max_tokens", "vllm:request_params_max_tokens_sum",
                 **model) == 2 * 4
    iteration = "vllm:iteration_tokens_total"
    assert added(iteration, iteration + "_sum", **model) == (
        2 * reply.usage.prompt_tokens + reply.usage.completion_tokens)
    info = f["vllm:cache_config_info"].samples
    assert len(info) == 1 and int(info[0].labels["kv_cache_size_tokens"]) > 0
    assert _value(f, "vllm:num_requests_running", "vllm:num_requests_running", **model) == 0
    assert _value(f, "vllm:num_requests_waiting", "vllm:num_requests_waiting", **model) == 0
