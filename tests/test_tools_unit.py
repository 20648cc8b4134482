"""Tool calling and reasoning, the parts without an engine: the request
checks (against vLLM's own validators), the shaping of parsed output into
messages and chunks (against vLLM's own DeltaMessage), the worker's refusals,
the config keys, and the API against a FakeWorker streaming scripted parsed
Outputs. tests/test_vllm_parity.py runs them with real engines."""

from __future__ import annotations

import json
from types import SimpleNamespace

import msgspec
import pydantic
import pytest

from test_openai_unit import FakeScheduler, FakeWorker, post, run_async, serve, sse_events
from wcd.daemon import errors
from wcd.daemon import openai_tools
from wcd.daemon import openai_types as t
from wcd.daemon.catalog import Catalog
from wcd.daemon.config import ConfigError, parse_settings
from wcd.workers import parsing
from wcd.workers import protocol as p

HI = [{"role": "user", "content": "hi"}]
F = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
G = {"type": "function", "function": {"name": "g"}}
NAMED_F = {"type": "function", "function": {"name": "f"}}


# ---- the request: vLLM's checks, in its words ------------------------------------------


def _wcd_refusal(body: dict) -> str | None:
    request = msgspec.convert({"model": "m", "messages": HI, **body}, t.ChatCompletionRequest)
    try:
        request.check()
    except errors.BadRequest as exc:
        return str(exc)
    return None


def _vllm_refusal(body: dict) -> str | None:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.exceptions import VLLMValidationError

    try:
        ChatCompletionRequest.model_validate({"model": "m", "messages": HI, **body})
    except VLLMValidationError as exc:
        return str(exc)
    except pydantic.ValidationError as exc:
        return str(exc.errors()[0]["ctx"]["error"])
    return None


@pytest.mark.parametrize("body", [
    {"tools": []},
    {"tool_choice": "required"},
    {"tool_choice": "auto"},
    {"tools": [F], "tool_choice": "sometimes"},
    {"tools": [F], "tool_choice": {"type": "function", "function": {"name": "h"}}},
    {"tools": [F], "tool_choice": {"type": "function"}},
    {"tools": [F], "tool_choice": {"type": "function", "function": {}}},
    {"tools": [F], "tool_choice": {"type": "function", "function": {"name": ""}}},
    {"tools": [F], "tool_choice": NAMED_F, "structured_outputs": {"regex": "a+"}},
    {"tools": [F], "tool_choice": None, "structured_outputs": {"json": {}}},
    {"tools": [F, G]},
    {"tools": [F], "tool_choice": "required", "structured_outputs": {"regex": "a+"}},
    {"tools": [F], "tool_choice": NAMED_F},
    {"tool_choice": "none"},
    {"tool_choice": None},
], ids=repr)
def test_tool_fields_are_refused_or_taken_as_vllm_does(body):
    assert _wcd_refusal(body) == _vllm_refusal(body)


@pytest.mark.parametrize("body, choice", [
    ({}, "none"), ({"tools": [F]}, "auto"), ({"tools": [F], "tool_choice": None}, None),
    ({"tools": [F], "tool_choice": "required"}, "required"),
    ({"tools": [F], "tool_choice": NAMED_F}, NAMED_F)])
def test_an_unset_tool_choice_is_auto_with_tools(body, choice):
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    vllm = ChatCompletionRequest.model_validate({"messages": HI, **body}).tool_choice
    if hasattr(vllm, "model_dump"):
        vllm = vllm.model_dump()
    request = msgspec.convert({"model": "m", "messages": HI, **body}, t.ChatCompletionRequest)
    assert request.chat_options().tool_choice == choice == vllm


def test_tools_reach_the_template_as_vllm_dumps_them():
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionToolsParam

    from wcd.workers import vllm_seams

    tool = {"type": "function", "extra": 1, "function": {
        "name": "f", "strict": None, "cache_control": {}, "parameters": {"type": "object"}}}
    request = msgspec.convert({"model": "m", "messages": HI, "tools": [tool]},
                              t.ChatCompletionRequest)
    sent = request.render().tools
    assert vllm_seams.normalized_tools(sent) == \
        [ChatCompletionToolsParam.model_validate(tool).model_dump()]


# ---- what the parsers found, shaped as vLLM's server shapes it ---------------------------


def _options(**fields) -> p.ChatOptions:
    return p.ChatOptions(**{"tool_choice": "auto", **fields})


CALLS = [p.ToolCall("id-1", "f", '{"a": 1}'), p.ToolCall("id-2", "g", "{}")]


def _json(struct) -> dict:
    return json.loads(msgspec.json.encode(struct))


@pytest.mark.parametrize("choice", ["required", NAMED_F])
def test_a_forced_call_has_empty_content_and_its_calls(choice):
    message, called = openai_tools.message("assistant", p.ParsedMessage(None, None, CALLS[:1]),
                                           _options(tool_choice=choice))
    assert _json(message)["content"] == "" and not called
    assert _json(message)["tool_calls"] == [
        {"id": "id-1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]


def test_auto_calls_are_the_models_choice():
    message, called = openai_tools.message("assistant", p.ParsedMessage("pre", "why", CALLS),
                                           _options())
    assert called and [c["function"]["name"] for c in _json(message)["tool_calls"]] == ["f", "g"]
    assert (message.content, message.reasoning) == ("pre", "why")
    message, called = openai_tools.message("assistant", p.ParsedMessage("text", None, []),
                                           _options())
    assert not called and "tool_calls" not in _json(message) and message.content == "text"


def test_parallel_tool_calls_false_keeps_the_first_call():
    message, _ = openai_tools.message("assistant", p.ParsedMessage(None, None, CALLS),
                                      _options(parallel_tool_calls=False))
    assert [c.id for c in message.tool_calls] == ["id-1"]
    delta = p.MessageDelta(tool_calls=[p.ToolCallDelta(1, function=p.FunctionDelta(name="g"))])
    assert "tool_calls" not in _json(openai_tools.delta(delta, _options(
        parallel_tool_calls=False)))


def test_include_reasoning_false_drops_the_reasoning():
    message, _ = openai_tools.message("assistant", p.ParsedMessage("c", "r", []),
                                      _options(include_reasoning=False))
    assert (message.content, message.reasoning) == ("c", None)


@pytest.mark.parametrize("reason, called, choice, expected", [
    ("stop", True, "auto", "tool_calls"), ("length", True, "auto", "tool_calls"),
    ("stop", False, "required", "tool_calls"), ("length", False, "required", "length"),
    ("stop", False, NAMED_F, "stop"), ("stop", False, "none", "stop"),
    (None, False, "none", "stop")])
def test_finish_reason_of_a_whole_completion(reason, called, choice, expected):
    assert openai_tools.finish_reason(reason, called, _options(tool_choice=choice)) == expected


@pytest.mark.parametrize("reason, streamed, choice, expected", [
    ("stop", True, "auto", "tool_calls"), ("stop", True, "required", "tool_calls"),
    ("stop", True, NAMED_F, "stop"), ("length", True, "auto", "length"),
    ("stop", False, "required", "stop")])
def test_finish_reason_of_a_stream(reason, streamed, choice, expected):
    assert openai_tools.stream_finish_reason(reason, streamed,
                                             _options(tool_choice=choice)) == expected


def _vllm_deltas():
    from vllm.entrypoints.generate.base.protocol import (DeltaFunctionCall, DeltaMessage,
                                                         DeltaToolCall)

    # As hermes and the reasoning parsers make them.
    return [
        DeltaMessage(content=None, tool_calls=[DeltaToolCall(
            index=0, type="function", id="x",
            function=DeltaFunctionCall(name="f").model_dump(exclude_none=True))]),
        DeltaMessage(content=None, tool_calls=[DeltaToolCall(
            index=0, function=DeltaFunctionCall(arguments="{").model_dump(exclude_none=True))]),
        DeltaMessage(reasoning="why"), DeltaMessage(content="text"), DeltaMessage(),
        DeltaMessage(content="", tool_calls=[])]


@pytest.mark.parametrize("index", range(6))
def test_a_delta_is_written_as_vllm_writes_it(index):
    vllm = _vllm_deltas()[index]
    ours = openai_tools.delta(parsing.message_delta(vllm), _options())
    assert _json(ours) == json.loads(vllm.model_dump_json(exclude_unset=True))


def test_a_held_back_delta_is_none():
    assert parsing.message_delta(None) is None
    assert openai_tools.delta(None, _options()) is None


# ---- the worker's refusals ---------------------------------------------------------------


def _parsers(tool_parser: bool, auto: bool) -> parsing.ModelParsers:
    cls = SimpleNamespace(tool_parser_cls=object() if tool_parser else None,
                          reasoning_parser_cls=None)
    return parsing.ModelParsers(cls, auto, None, None)


@pytest.mark.parametrize("choice, message", [
    ("auto", '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser '
             "to be set"),
    ("required", 'tool_choice="required" requires --tool-call-parser to be set'),
    (NAMED_F, 'tool_choice=function "f" requires --tool-call-parser to be set')])
def test_a_tool_choice_without_a_tool_call_parser_is_refused_in_vllms_words(choice, message):
    with pytest.raises(ValueError, match="^" + message.replace('"', '.') + "$"):
        parsing.refuse_unparsed_tool_choice(_options(tool_choice=choice),
                                            _parsers(tool_parser=False, auto=False))
    parsing.refuse_unparsed_tool_choice(_options(tool_choice=choice),
                                        _parsers(tool_parser=True, auto=True))
    for unforced in ("none", None):
        parsing.refuse_unparsed_tool_choice(_options(tool_choice=unforced),
                                            _parsers(tool_parser=False, auto=False))


def test_unknown_parser_names_are_refused_before_a_load():
    spec = p.ModelSpec("m", "/x", tool_call_parser="hermes", reasoning_parser="qwen3")
    parsing.check_names(spec)
    with pytest.raises(ValueError, match="vLLM has no tool_call_parser 'nope' and no "
                                         "reasoning_parser 'never'"):
        parsing.check_names(msgspec.structs.replace(spec, tool_call_parser="nope",
                                                    reasoning_parser="never"))


# ---- the config keys ---------------------------------------------------------------------


def _settings(tmp_path, **entry):
    (tmp_path / "models" / "m1").mkdir(parents=True, exist_ok=True)
    data = {"model_roots": [str(tmp_path / "models")],
            "models": {"m1": {"path": "m1", "dtype": "bfloat16", **entry}}}
    return parse_settings(data, str(tmp_path / "wcd.yaml"))


def test_parsers_are_a_models_keys_not_engine_args(tmp_path):
    settings = _settings(tmp_path, tool_call_parser="hermes", reasoning_parser="qwen3")
    model = settings.models["m1"]
    assert model.engine_args == {"dtype": "bfloat16"}
    assert (model.tool_call_parser, model.reasoning_parser) == ("hermes", "qwen3")
    spec = Catalog(settings).resolve("m1").spec()
    assert (spec.tool_call_parser, spec.reasoning_parser) == ("hermes", "qwen3")
    assert spec.engine_args == {"dtype": "bfloat16"}
    assert _settings(tmp_path).models["m1"].tool_call_parser is None


@pytest.mark.parametrize("data, expected", [
    ({"defaults": {"tool_call_parser": "hermes"}}, "defaults.tool_call_parser: a model's own"),
    ({"defaults": {"reasoning_parser": "qwen3"}}, "defaults.reasoning_parser: a model's own"),
    ({"models": {"m1": {"path": "m1", "enable_auto_tool_choice": True}}},
     "models.m1.enable_auto_tool_choice: set the model's tool_call_parser"),
    ({"models": {"m1": {"path": "m1", "tool_call_parser": 3}}},
     "models.m1.tool_call_parser: expected str, got int")])
def test_parser_keys_in_the_wrong_place_are_refused(tmp_path, data, expected):
    (tmp_path / "models" / "m1").mkdir(parents=True)
    with pytest.raises(ConfigError, match=expected):
        parse_settings({"model_roots": [str(tmp_path / "models")],
                        "models": {"m1": {"path": "m1"}}, **data}, str(tmp_path / "wcd.yaml"))


# ---- the API, against a worker streaming parsed Outputs ----------------------------------


def _parsed_script(parts: list[p.Parsed], reasons=("stop",)):
    """A script of one choice: an Output per part, the last one finished."""
    def script(request: p.Generate) -> list[p.Output]:
        outputs = [p.Output(request.request_id, 0, f"t{i}", [100 + i], 5, parsed=parsed)
                   for i, parsed in enumerate(parts)]
        return [*outputs[:-1], msgspec.structs.replace(
            outputs[-1], finish_reason=reasons[0], finished=True)]
    return script


@run_async
async def test_a_required_call_is_the_message_and_its_finish_reason():
    last = p.Parsed(message=p.ParsedMessage(None, None, CALLS[:1]), reasoning_tokens=0)
    scheduler = FakeScheduler(FakeWorker(_parsed_script([p.Parsed(), last])))
    async with serve(scheduler) as url:
        status, _, answer = await post(url, "/v1/chat/completions", {
            "model": "demo", "messages": HI, "tools": [F], "tool_choice": "required"})
    assert status == 200, answer
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == ""
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "f",
                                                              "arguments": '{"a": 1}'}
    assert answer["usage"]["completion_tokens_details"] == {"reasoning_tokens": 0}
    sent = scheduler.worker.requests[0]
    assert sent.chat == p.ChatOptions(tool_choice="required")
    assert sent.render.tools[0]["function"]["name"] == "f"


@run_async
async def test_streamed_deltas_are_the_parsers_and_tools_end_in_tool_calls():
    name = p.MessageDelta(content=None, tool_calls=[p.ToolCallDelta(
        0, id="id-1", type="function", function=p.FunctionDelta(name="f"))])
    arguments = p.MessageDelta(content=None, tool_calls=[p.ToolCallDelta(
        0, function=p.FunctionDelta(arguments="{}"))])
    script = _parsed_script([p.Parsed(delta=None), p.Parsed(delta=name),
                             p.Parsed(delta=arguments), p.Parsed(delta=None)])
    async with serve(FakeScheduler(FakeWorker(script))) as url:
        events = await sse_events(url, "/v1/chat/completions", {
            "model": "demo", "messages": HI, "tools": [F], "stream": True})
    deltas = [(e["choices"][0]["delta"], e["choices"][0]["finish_reason"])
              for e in events[:-1]]
    assert deltas == [({"role": "assistant", "content": ""}, None),
                      ({"content": None, "tool_calls": [{"index": 0, "id": "id-1",
                                                         "type": "function",
                                                         "function": {"name": "f"}}]}, None),
                      ({"content": None, "tool_calls": [{"index": 0, "function": {
                          "arguments": "{}"}}]}, None),
                      ({}, "tool_calls")]


@run_async
async def test_hidden_reasoning_hides_its_tokens_too():
    script = _parsed_script([p.Parsed(delta=None), p.Parsed(delta=None)])
    async with serve(FakeScheduler(FakeWorker(script))) as url:
        events = await sse_events(url, "/v1/chat/completions", {
            "model": "demo", "messages": HI, "stream": True, "include_reasoning": False,
            "logprobs": True, "return_token_ids": True})
    ending = events[-2]["choices"][0]
    assert len(events) == 3 and (ending["logprobs"], ending["token_ids"]) == (None, None)


@pytest.mark.parametrize("stream", [False, True])
@run_async
async def test_a_parser_failure_fails_the_request(stream):
    script = _parsed_script([p.Parsed(error="ValueError: bad")])
    body = {"model": "demo", "messages": HI, "stream": stream}
    async with serve(FakeScheduler(FakeWorker(script))) as url:
        if stream:
            events = await sse_events(url, "/v1/chat/completions", body)
            assert "the model's parsers failed" in events[-2]["error"]["message"]
        else:
            status, _, answer = await post(url, "/v1/chat/completions", body)
            assert status == 502 and "ValueError: bad" in answer["error"]["message"]
