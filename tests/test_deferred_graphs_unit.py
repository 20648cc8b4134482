"""Unit tests of CUDA graphs captured in two parts (vllm_seams seam 22) against
vLLM's own CudaGraphManager: its batch descriptors and dispatch are real, its
capture is replaced by one that records what it was asked to capture (no
CUDA graph can be captured on this CPU-only machine; bench/gpu.py --parts
rebuild runs the real thing on an H200)."""

from __future__ import annotations

import queue
from types import SimpleNamespace as NS

import pytest
import torch
from vllm.config.compilation import CUDAGraphMode
from vllm.v1.worker.gpu import cudagraph_utils

from wcd.workers import vllm_seams
from wcd.workers.main import Worker

CAPTURE_SIZES = [1, 2, 4] + list(range(8, 257, 8))  # vLLM's for max_num_seqs 128
MAX_NUM_SEQS = 128
FIRST_TOKENS = 16


def manager(monkeypatch) -> cudagraph_utils.ModelCudaGraphManager:
    """vLLM's manager of a dense model's graphs, as the V2 runner makes it
    for FULL_AND_PIECEWISE (vLLM's default), on one rank."""
    monkeypatch.setattr(cudagraph_utils, "get_pp_group",
                        lambda: NS(is_first_rank=True, is_last_rank=True))
    monkeypatch.setattr(cudagraph_utils, "current_platform",
                        NS(get_global_graph_pool=lambda: None))
    vllm_config = NS(scheduler_config=NS(max_num_seqs=MAX_NUM_SEQS),
                     compilation_config=NS(cudagraph_capture_sizes=CAPTURE_SIZES,
                                           max_cudagraph_capture_size=CAPTURE_SIZES[-1]),
                     parallel_config=NS(tensor_parallel_size=1, data_parallel_size=1),
                     cache_config=NS(use_kda_recoverssm=False),
                     speculative_config=None)
    return cudagraph_utils.ModelCudaGraphManager(
        vllm_config, torch.device("cpu"), CUDAGraphMode.FULL_AND_PIECEWISE, 1)


class RecordedCapture:
    """Stands for vLLM's CudaGraphManager.capture: records the descriptors
    it was given, and marks them captured as vLLM does."""

    def __init__(self):
        self.calls: list[list[tuple[CUDAGraphMode, int]]] = []
        self.captured: set = set()
        self.forward_fns: list = []

    def __call__(self, manager, create_forward_fn, *args, **kwargs):
        self.forward_fns.append(create_forward_fn)
        self.calls.append([(mode, d.num_tokens) for mode in manager._capture_descs
                           for d in manager._capture_descs[mode]])
        for descs in manager._capture_descs.values():
            self.captured.update(descs)
        manager._graphs_captured = True


def dispatched(made) -> dict[tuple[int, bool], object]:
    """What dispatch runs each batch on: a uniform decode batch of n requests
    and a prefill of n tokens in one request, for every captured size."""
    return {(n, decode): made.dispatch(n if decode else 1, n, 1 if decode else None, 0)
            for n in range(1, CAPTURE_SIZES[-1] + 1) for decode in (True, False)}


def graphless(desc) -> bool:
    return desc.cg_mode == CUDAGraphMode.NONE


@pytest.fixture
def split(monkeypatch):
    """A manager after a build's capture, and the capture that recorded it."""
    monkeypatch.setattr(vllm_seams, "_first_graph_tokens", FIRST_TOKENS)
    made, capture = manager(monkeypatch), RecordedCapture()
    vllm_seams._capture_first(made, capture, "create_forward_fn")
    return made, capture


def test_a_build_captures_the_largest_graph_then_small_batches(split):
    made, capture = split
    small = [16, 8, 4, 2, 1]
    # vLLM's first, whose warm-up sizes the buffers of every later one
    assert capture.calls == [[(CUDAGraphMode.PIECEWISE, n) for n in [CAPTURE_SIZES[-1], *small]]
                             + [(CUDAGraphMode.FULL, n) for n in small]]
    # vLLM's own view of the manager is whole: only dispatch is cut.
    assert [d.num_tokens for d in made._capture_descs[CUDAGraphMode.PIECEWISE]] == \
        sorted(CAPTURE_SIZES, reverse=True)
    runs = dispatched(made)
    assert all(graphless(desc) or desc in capture.captured for desc in runs.values())
    assert runs[(3, True)].cg_mode == CUDAGraphMode.FULL and runs[(3, True)].num_tokens == 4
    assert runs[(12, False)].cg_mode == CUDAGraphMode.PIECEWISE
    assert runs[(CAPTURE_SIZES[-1], False)].cg_mode == CUDAGraphMode.PIECEWISE
    assert graphless(runs[(100, True)]) and graphless(runs[(17, False)])


def test_the_rest_come_one_graph_per_call_in_vllms_order(split, monkeypatch):
    made, capture = split
    whole = manager(monkeypatch)
    whole._graphs_captured = True
    more = True
    while more:
        more = vllm_seams.capture_next_graph(made, capture)
        assert len(capture.calls[-1]) == 1
        assert all(graphless(desc) or desc in capture.captured
                   for desc in dispatched(made).values())
    later = [call[0] for call in capture.calls[1:]]
    assert later == [(CUDAGraphMode.PIECEWISE, n) for n in sorted(CAPTURE_SIZES, reverse=True)
                     if FIRST_TOKENS < n < CAPTURE_SIZES[-1]] + \
        [(CUDAGraphMode.FULL, n) for n in sorted(CAPTURE_SIZES, reverse=True)
         if FIRST_TOKENS < n <= MAX_NUM_SEQS]
    assert set(capture.forward_fns) == {"create_forward_fn"}  # the build's own inputs
    assert made._wcd_deferred is None and made._candidates == whole._candidates
    assert dispatched(made) == dispatched(whole)


def test_nothing_is_deferred_when_the_first_graphs_are_all_of_them(monkeypatch):
    monkeypatch.setattr(vllm_seams, "_first_graph_tokens", CAPTURE_SIZES[-1])
    made, capture = manager(monkeypatch), RecordedCapture()
    candidates = made._candidates
    vllm_seams._capture_first(made, capture, "create_forward_fn")
    assert len(capture.calls[0]) == len(CAPTURE_SIZES) + len(made._capture_descs[CUDAGraphMode.FULL])
    assert not hasattr(made, "_wcd_deferred") and made._candidates is candidates


@pytest.mark.parametrize("kept_whole", [
    lambda made: setattr(made, "lora_capture_cases", [0, 1]),
    lambda made: setattr(made.vllm_config, "speculative_config", NS(num_speculative_tokens=1)),
    lambda made: setattr(made, "use_aux_hidden_state_outputs", True),
], ids=["lora", "speculative", "aux_hidden_states"])
def test_lora_and_speculative_decoding_capture_every_graph_at_build(monkeypatch, kept_whole):
    made = manager(monkeypatch)
    assert vllm_seams._deferrable(made)
    kept_whole(made)
    assert not vllm_seams._deferrable(made)


class IdleHost:
    """Stands for the worker's EngineHost: no requests, graphs left."""

    def __init__(self, graphs_left: int):
        self.graphs_left = graphs_left

    def has_work(self) -> bool:
        return False

    def graphs_deferred(self) -> bool:
        return self.graphs_left > 0

    def capture_deferred_graph(self) -> None:
        self.graphs_left -= 1


def idle_worker(graphs_left: int) -> Worker:
    worker = Worker.__new__(Worker)
    worker.host = IdleHost(graphs_left)
    worker.deferred, worker.commands = [], queue.Queue()
    return worker


def test_an_idle_worker_captures_one_graph_at_a_time_and_takes_commands_between():
    worker = idle_worker(graphs_left=3)
    assert worker._next_command() is None and worker.host.graphs_left == 2
    worker.commands.put("a command")
    assert worker._next_command() == "a command" and worker.host.graphs_left == 2
    assert worker._next_command() is None and worker._next_command() is None
    assert worker.host.graphs_left == 0
    worker.commands.put("the next")
    assert worker._next_command() == "the next"  # blocks for commands once none are left
