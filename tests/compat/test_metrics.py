"""Ports vLLM's tests/entrypoints/serve/instrumentator/test_metrics.py, text
model only (the multimodal one needs an image model; the run_batch case is
another entry point). On a server other cases share, counts are compared as
the change over this case's own requests, and the gauges are waited on to
settle first. Random weights may sample EOS early, so the counted requests
ignore it."""

from __future__ import annotations

import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

PROMPT_IDS = list(range(20, 30))

EXPECTED_METRICS_V1 = [
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:num_requests_waiting_by_reason",
    "vllm:kv_cache_usage_perc",
    "vllm:prefix_cache_queries",
    "vllm:prefix_cache_hits",
    "vllm:num_preemptions_total",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:iteration_tokens_total",
    "vllm:cache_config_info",
    "vllm:request_success_total",
    *(f"vllm:{histogram}_{suffix}"
      for histogram in ("request_prompt_tokens", "request_generation_tokens", "request_params_n",
                        "request_params_max_tokens", "time_to_first_token_seconds",
                        "inter_token_latency_seconds", "e2e_request_latency_seconds",
                        "request_queue_time_seconds", "request_inference_time_seconds",
                        "request_prefill_time_seconds", "request_decode_time_seconds",
                        "request_num_preemptions")
      for suffix in ("sum", "bucket", "count")),
]


def _expected_changes(num_requests: int, num_prompt_tokens: int, max_tokens: int) -> dict:
    """{sample name: change} for num_requests completions of max_tokens tokens."""
    per_request = ("time_to_first_token_seconds", "e2e_request_latency_seconds",
                   "request_queue_time_seconds", "request_inference_time_seconds",
                   "request_prefill_time_seconds", "request_decode_time_seconds",
                   "request_num_preemptions", "request_params_n")
    return {
        **{f"vllm:{name}_count": num_requests for name in per_request},
        "vllm:inter_token_latency_seconds_count": num_requests * (max_tokens - 1),
        "vllm:request_prompt_tokens_sum": num_requests * num_prompt_tokens,
        "vllm:request_prompt_tokens_count": num_requests,
        "vllm:request_generation_tokens_sum": num_requests * max_tokens,
        "vllm:request_generation_tokens_count": num_requests,
        "vllm:request_params_max_tokens_sum": num_requests * max_tokens,
        "vllm:request_params_max_tokens_count": num_requests,
        "vllm:iteration_tokens_total_sum": num_requests * (num_prompt_tokens + max_tokens),
        "vllm:iteration_tokens_total_count": num_requests * max_tokens,
        "vllm:prompt_tokens_total": num_requests * num_prompt_tokens,
        "vllm:generation_tokens_total": num_requests * max_tokens,
        "vllm:request_success_total": num_requests,
    }


def _gauges(metric_samples) -> tuple[float, float, float]:
    """(running, waiting, KV cache usage)."""
    samples = metric_samples()
    return (samples["vllm:num_requests_running"], samples["vllm:num_requests_waiting"],
            samples["vllm:kv_cache_usage_perc"])


def _poll_until(metric_samples, predicate, timeout: float, interval: float,
                description: str):
    """Waits up to `timeout` seconds for gauges that satisfy predicate(gauges)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate(gauges := _gauges(metric_samples)):
            return
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout} s waiting for: {description} "
                f"(running, waiting, KV cache usage: {gauges})")


def test_metrics_counts(client, model, metric_samples):
    num_requests, max_tokens = 10, 10
    before = metric_samples()
    for _ in range(num_requests):
        client.completions.create(model=model, prompt=PROMPT_IDS, max_tokens=max_tokens,
                                  extra_body={"ignore_eos": True})
    after = metric_samples()
    for name, change in _expected_changes(num_requests, len(PROMPT_IDS), max_tokens).items():
        assert name in after, f"{name} not on /metrics"
        assert after[name] - before.get(name, 0.0) == change, name


def test_metrics_exist(client, http, model):
    client.completions.create(model=model, prompt="Hello, my name is", max_tokens=5,
                              temperature=0.0)
    response = http.get("/metrics")
    assert response.status_code == 200
    for metric in EXPECTED_METRICS_V1:
        assert metric in response.text
    cache_config = [sample for family in text_string_to_metric_families(response.text)
                    if family.name == "vllm:cache_config_info" for sample in family.samples]
    assert cache_config
    for sample in cache_config:
        assert sample.labels.get("kv_cache_size_tokens") not in (None, "None", "")
        assert sample.labels.get("kv_cache_max_concurrency") not in (None, "None", "")


def test_abort_metrics_reset(model, metric_samples, post_unread):
    idle = (0, 0, 0)
    _poll_until(metric_samples, lambda gauges: gauges == idle, timeout=10.0, interval=0.2,
                description="an idle server")
    # vLLM's own starts 3 requests and polls. On 2 cores vLLM's /metrics can
    # wait for its engine to finish those, so more keep coming until the
    # polls see them running.
    body = {"model": model, "prompt": PROMPT_IDS, "max_tokens": 450, "temperature": 0.0,
            "ignore_eos": True}
    requests: list = []
    seen = threading.Event()

    def keep_busy() -> None:
        while not seen.wait(0.3) and len(requests) < 300:
            requests.extend(post_unread("/v1/completions", body) for _ in range(3))

    feeder = threading.Thread(target=keep_busy)
    feeder.start()
    try:
        _poll_until(metric_samples, lambda gauges: gauges[0] > 0 and gauges[2] > 0,
                    timeout=20.0, interval=0.05,
                    description="running requests and KV cache usage > 0")
    finally:
        seen.set()
        feeder.join()
        for request in requests:
            request.close()
    _poll_until(metric_samples, lambda gauges: gauges == idle, timeout=10.0, interval=0.2,
                description="gauges back to zero")
