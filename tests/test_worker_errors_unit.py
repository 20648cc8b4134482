"""Unit tests of how a worker classifies a failure: by the type of the
exception it caught, never its words. A client's mistake is BAD_ARGS (400),
a model vLLM cannot serve BAD_MODEL (422), memory OUT_OF_MEMORY (507), and
anything else INTERNAL: logged with its traceback, a 500 that names the
exception's type. vLLM is imported (its exception types, its engine config
checks on a demo model's directory) but no engine is built."""

from __future__ import annotations

import json
import logging
import shutil

import jinja2
import pytest
import torch
from safetensors import SafetensorError
from vllm.exceptions import VLLMValidationError
from vllm.v1.core import kv_cache_utils

from conftest import ENGINE_ARGS
from wcd.workers import engine, pooling
from wcd.workers import protocol as p
from wcd.workers.watchdog import RenderTimeout
from wcd.workers.weights import HostCache


def request_failure(exc: BaseException) -> engine.ModelError:
    with pytest.raises(engine.ModelError) as failed:
        with engine._request_errors():
            raise exc
    return failed.value


def raised(function, *args) -> BaseException:
    try:
        function(*args)
    except BaseException as exc:  # with its traceback, as a swap catches it
        return exc
    raise AssertionError(f"{function} raised nothing")


def internal_logged(caplog, exc_type: type) -> bool:
    return any(r.levelno == logging.ERROR and r.exc_info and r.exc_info[0] is exc_type
               for r in caplog.records)


@pytest.mark.parametrize("exc", [
    VLLMValidationError("max_tokens must be at least 1", parameter="max_tokens", value=0),
    ValueError("Token id 99999 is out of vocabulary"),
    TypeError("unhashable type: 'list'"),
    OverflowError("out of range integral type conversion attempted"),
    jinja2.exceptions.UndefinedError("'messages' is undefined"),
    jinja2.exceptions.TemplateSyntaxError("unexpected '}'", 1),
    RecursionError("maximum recursion depth exceeded"),
], ids=type)
def test_what_vllms_server_answers_400_for_is_the_clients_error(exc):
    failure = request_failure(exc)
    assert (failure.kind, str(failure)) == (p.BAD_ARGS, " ".join(str(exc).split()))


def test_wcds_own_refusals_keep_their_words_and_parameter():
    refused = request_failure(pooling.Refused("dimensions is not supported", "dimensions"))
    assert (refused.kind, str(refused), refused.param) == \
        (p.BAD_ARGS, "dimensions is not supported", "dimensions")
    late = request_failure(RenderTimeout("the render passed policy.render_timeout"))
    assert (late.kind, str(late)) == (p.BAD_ARGS, "the render passed policy.render_timeout")
    not_loaded = engine.ModelError(p.NOT_LOADED, "model 'x' is not served")
    assert request_failure(not_loaded) is not_loaded


@pytest.mark.parametrize("exc", [
    RuntimeError("CUDA error: an illegal memory access"),
    KeyError("request-7"),
    AttributeError("'NoneType' object has no attribute 'tokenizer'"),
    AssertionError("len(blocks) == 3"),
    NotImplementedError(),
], ids=type)
def test_any_other_failure_of_a_request_is_internal_and_logged(exc, caplog):
    failure = request_failure(exc)
    assert failure.kind == p.INTERNAL
    assert str(failure) == (f"a request: internal error ({type(exc).__name__}); see the "
                            "worker's log")
    assert internal_logged(caplog, type(exc))


def test_memory_is_recognised_by_type_and_by_the_vllm_check_that_refused():
    vllm_refusal = raised(kv_cache_utils._check_enough_kv_cache_memory, 0, lambda: 1, 512,
                          lambda available: 0)
    assert isinstance(vllm_refusal, ValueError)
    wrapped = RuntimeError("CUDA out of memory occurred when warming up sampler")
    wrapped.__cause__ = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
    for exc in (vllm_refusal, MemoryError(), wrapped,
                torch.OutOfMemoryError("CUDA out of memory")):
        failure = engine._as_model_error("m", exc)
        assert failure.kind == p.OUT_OF_MEMORY and str(failure).startswith("m: out of memory")


def test_a_model_vllms_loader_cannot_use_is_bad_model_whatever_its_words():
    # A ValueError vLLM's loader raised, even in words about memory, is not
    # one of its memory refusals.
    for exc in (raised(_loader_refusal, "weights for 2 GiB: out of memory"), KeyError("w"),
                FileNotFoundError("model.safetensors"), SafetensorError("invalid header")):
        failure = engine._as_model_error("m", exc)
        assert failure.kind == p.BAD_MODEL
        assert str(failure).startswith(f"m: {type(exc).__name__}: ")


def _loader_refusal(message: str) -> None:
    raise ValueError(message)


def test_any_other_failure_of_a_swap_is_internal_and_logged(caplog):
    failure = engine._as_model_error("m", RuntimeError("size mismatch for lm_head"))
    assert (failure.kind, str(failure)) == (
        p.INTERNAL, "m: internal error (RuntimeError); see the worker's log")
    assert internal_logged(caplog, RuntimeError)


@pytest.fixture
def host():
    return engine.EngineHost(HostCache(0, pinned=False))


def config_failure(host, path, **engine_args) -> engine.ModelError:
    plan = host.resolve(p.ModelSpec("m", str(path), {**ENGINE_ARGS, **engine_args}))
    with pytest.raises(engine.ModelError) as failed:
        host._engine_config(plan)
    return failed.value


def test_vllms_refusal_of_an_architecture_is_bad_model(host, demo_models, tmp_path):
    path = tmp_path / "unknown-architecture"
    shutil.copytree(demo_models / "small-a", path)
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["NoSuchModelForCausalLM"]
    (path / "config.json").write_text(json.dumps(config))
    failure = config_failure(host, path)
    assert failure.kind == p.BAD_MODEL and "NoSuchModelForCausalLM" in str(failure)


def test_engine_args_the_model_cannot_take_are_bad_model(host, demo_models):
    failure = config_failure(host, demo_models / "small-a", max_model_len=10**7)
    assert failure.kind == p.BAD_MODEL and "max_model_len" in str(failure)


def test_an_engine_arg_vllm_lacks_is_bad_args(host, demo_models):
    failure = config_failure(host, demo_models / "small-a", no_such_arg=1)
    assert (failure.kind, str(failure)) == \
        (p.BAD_ARGS, "m: 'no_such_arg' is not a vLLM engine argument")


def test_an_unexpected_failure_of_the_engine_config_is_internal(host, demo_models, monkeypatch,
                                                                caplog):
    def broken(self):
        raise AttributeError("'NoneType' object has no attribute 'hf_config'")

    monkeypatch.setattr(engine.EngineArgs, "create_engine_config", broken)
    failure = config_failure(host, demo_models / "small-a")
    assert (failure.kind, str(failure)) == (
        p.INTERNAL, "m: the engine config: internal error (AttributeError); see the worker's log")
    assert internal_logged(caplog, AttributeError)
