"""Unit test of the process-wide vLLM state an engine build starts from: the
build itself is replaced, so no engine is built (a CUDA graph capture cannot
happen on this CPU-only machine; bench/gpu.py --parts rebuild shows the
failure this prevents on CUDA)."""

from __future__ import annotations

import pytest
from vllm.compilation import monitor

from conftest import ENGINE_ARGS
from wcd.workers import engine
from wcd.workers import protocol as p
from wcd.workers.weights import HostCache


class Built(Exception):
    """Where the replaced build stops."""


def test_each_build_may_capture_cuda_graphs_as_in_a_fresh_process(demo_models, monkeypatch):
    host = engine.EngineHost(HostCache(0, pinned=False))
    plan = host.resolve(p.ModelSpec("m", str(demo_models / "small-a"), ENGINE_ARGS))
    config = host._engine_config(plan)
    allowed = []

    def from_vllm_config(config, **kwargs):
        allowed.append(monitor.cudagraph_capturing_enabled)
        raise Built

    monkeypatch.setattr(engine.LLMEngine, "from_vllm_config", staticmethod(from_vllm_config))
    # as vLLM's V1 runner leaves it after a pooling engine captured its graphs
    monkeypatch.setattr(monitor, "cudagraph_capturing_enabled", False)
    with pytest.raises(Built):
        host._build(plan, config)
    assert allowed == [True]
    monitor.validate_cudagraph_capturing_enabled()
