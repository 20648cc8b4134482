"""Ports vLLM's tests/entrypoints/openai/chat_completion/test_chat.py, base model
only (its LoRA twins need an adapter). Random weights answer nothing right:
where vLLM's case checks an answer ("2", {"result": 2}) the port checks what
the server guarantees (valid JSON of the schema, string and list content
alike), greedy sampling is asked where the case only measures the output,
and output lengths are capped for CPU. The request-class unit tests at the
file's end are covered by the n cases over HTTP."""

from __future__ import annotations

import json
import re
from collections import defaultdict

import jsonschema
import openai
import pytest

from .usage import assert_none, assert_usage_closes

MESSAGES = [{"role": "system", "content": "you are a helpful assistant"},
            {"role": "user", "content": "what is 1+1?"}]
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Who won the world series in 2020?"},
    {"role": "assistant", "content": "The Los Angeles Dodgers won the World Series in 2020."},
    {"role": "user", "content": "Where was it played?"},
]
LANGUAGE = [{"role": "system", "content": "you are a helpful assistant"},
            {"role": "user", "content": "The best language for type-safe systems programming is "}]
INT64 = 2 ** 63


def _chat(client, model, messages=MESSAGES, **params):
    return client.chat.completions.create(model=model, messages=messages, **params)


def test_no_logprobs_chat(client, model):
    completion = _chat(client, model, max_completion_tokens=5, temperature=0.0, logprobs=False)
    assert completion.choices[0].logprobs is None


def test_zero_logprobs_chat(client, model):
    completion = _chat(client, model, max_completion_tokens=5, temperature=0.0, logprobs=True,
                       top_logprobs=0)
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert len(logprobs.content[0].top_logprobs) == 0


def test_some_logprobs_chat(client, model):
    completion = _chat(client, model, max_completion_tokens=5, temperature=0.0, logprobs=True,
                       top_logprobs=5)
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert len(logprobs.content[0].top_logprobs) == 5


def test_too_many_chat_logprobs(client, model):
    # vLLM's default max_logprobs is 20.
    with pytest.raises((openai.BadRequestError, openai.APIError)):
        for _ in _chat(client, model, max_completion_tokens=10, logprobs=True,
                       top_logprobs=21, stream=True):
            pass
    with pytest.raises(openai.BadRequestError):
        _chat(client, model, max_completion_tokens=10, logprobs=True, top_logprobs=30,
              stream=False)
    # The server still works afterwards.
    message = _chat(client, model, max_completion_tokens=10, stream=False).choices[0].message
    assert message.content is not None and len(message.content) >= 0


@pytest.mark.parametrize("prompt_logprobs", [1, 0, -1, None])
def test_prompt_logprobs_chat(client, model, prompt_logprobs):
    params: dict = {"max_completion_tokens": 5}
    if prompt_logprobs is not None:
        params["extra_body"] = {"prompt_logprobs": prompt_logprobs}
    if prompt_logprobs is not None and prompt_logprobs < 0:
        with pytest.raises(openai.BadRequestError):
            _chat(client, model, CONVERSATION, **params)
        return
    completion = _chat(client, model, CONVERSATION, **params)
    if prompt_logprobs is None:
        assert completion.prompt_logprobs is None
    else:
        assert completion.prompt_logprobs is not None
        assert len(completion.prompt_logprobs) > 0


def test_more_than_one_prompt_logprobs_chat(client, model):
    one = _chat(client, model, CONVERSATION, max_completion_tokens=5,
                extra_body={"prompt_logprobs": 1})
    two = _chat(client, model, CONVERSATION, max_completion_tokens=5,
                extra_body={"prompt_logprobs": 2})
    # k most likely tokens, and the prompt's own where it is not among them
    # (random weights seldom rank it first; vLLM's own asserts exactly k).
    assert 1 <= len(one.prompt_logprobs[3]) <= 2
    assert 2 <= len(two.prompt_logprobs[3]) <= 3


def test_single_chat_session(client, model, tokenizer):
    messages = list(MESSAGES)
    completion = _chat(client, model, messages, max_completion_tokens=5, temperature=0.0,
                       logprobs=True, top_logprobs=5)
    assert completion.id is not None
    assert len(completion.choices) == 1
    choice = completion.choices[0]
    assert choice.finish_reason == "length"
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                           tokenize=False)
    prompt_tokens = len(tokenizer.encode(prompt, add_special_tokens=False))
    assert completion.usage == openai.types.CompletionUsage(
        completion_tokens=5, prompt_tokens=prompt_tokens, total_tokens=prompt_tokens + 5)
    message = choice.message
    assert message.content is not None and len(message.content) >= 5
    assert message.role == "assistant"

    messages.append({"role": "assistant", "content": message.content})
    messages.append({"role": "user", "content": "express your result in json"})
    message = _chat(client, model, messages, max_completion_tokens=5).choices[0].message
    assert message.content is not None and len(message.content) >= 0


def test_chat_streaming(client, model):
    completion = _chat(client, model, max_completion_tokens=10, temperature=0.0)
    output = completion.choices[0].message.content
    stop_reason = completion.choices[0].finish_reason
    chunks: list[str] = []
    finish_reason_count = 0
    for chunk in _chat(client, model, max_completion_tokens=10, temperature=0.0, stream=True):
        delta = chunk.choices[0].delta
        if delta.role:
            assert delta.role == "assistant"
        if delta.content:
            chunks.append(delta.content)
        if chunk.choices[0].finish_reason is not None:
            finish_reason_count += 1
    # The finish reason comes in the last chunk only. (vLLM's own also wants
    # text in that chunk; 0.32 sends the finish reason in a chunk of its own.)
    assert finish_reason_count == 1
    assert chunk.choices[0].finish_reason == stop_reason
    assert "".join(chunks) == output


def test_chat_completion_stream_options(client, model):
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is the capital of France?"}]
    params = {"max_completion_tokens": 10, "temperature": 0.0}
    for chunk in _chat(client, model, messages, stream=True,
                       stream_options={"include_usage": False}, **params):
        assert chunk.usage is None

    stream = _chat(client, model, messages, stream=True,
                   stream_options={"include_usage": True, "continuous_usage_stats": False},
                   **params)
    assert_usage_closes(stream, assert_none)

    for options in ({"include_usage": None}, {"include_usage": True}):
        with pytest.raises(openai.BadRequestError):
            _chat(client, model, messages, stream=False, stream_options=options, **params)

    last = 0
    for chunk in _chat(client, model, messages, stream=True, extra_body={"min_tokens": 10},
                       stream_options={"include_usage": True, "continuous_usage_stats": True},
                       **params):
        assert chunk.usage.prompt_tokens >= 0
        assert (last == 0 or chunk.usage.completion_tokens > last
                or (not chunk.choices and chunk.usage.completion_tokens == last))
        assert chunk.usage.total_tokens == chunk.usage.prompt_tokens + chunk.usage.completion_tokens
        last = chunk.usage.completion_tokens
    assert last == 10


def test_structured_outputs_choice_chat(client, model, sample_structured_outputs_choices):
    messages = list(LANGUAGE)
    params = {"max_completion_tokens": 10, "temperature": 0.7,
              "extra_body": {"structured_outputs": {"choice": sample_structured_outputs_choices}}}
    first = _chat(client, model, messages, **params).choices[0].message.content
    assert first in sample_structured_outputs_choices

    messages.append({"role": "assistant", "content": first})
    messages.append({"role": "user", "content": "I disagree, pick another one"})
    second = _chat(client, model, messages, **params).choices[0].message.content
    assert second in sample_structured_outputs_choices
    assert first != second


@pytest.mark.skip(reason="vLLM 0.32 fails it too with random weights: the JSON's whitespace "
                  "and strings, which the schema leaves unbounded, run past the context")
def test_structured_outputs_json_chat(client, model, sample_json_schema):
    messages = [{"role": "system", "content": "you are a helpful assistant"},
                {"role": "user", "content": "Give an example JSON for an employee profile that "
                 f"fits this schema: {sample_json_schema}"}]
    # vLLM's own asks 1000 tokens, past the demo models' 512-token context.
    params = {"max_completion_tokens": 300,
              "extra_body": {"structured_outputs": {"json": sample_json_schema}}}
    content = _chat(client, model, messages, **params).choices[0].message.content
    assert content is not None
    first = json.loads(content)
    jsonschema.validate(instance=first, schema=sample_json_schema)

    messages.append({"role": "assistant", "content": content})
    messages.append({"role": "user",
                     "content": "Give me another one with a different name and age"})
    content = _chat(client, model, messages, **params).choices[0].message.content
    assert content is not None
    second = json.loads(content)
    jsonschema.validate(instance=second, schema=sample_json_schema)
    assert first["name"] != second["name"]
    assert first["age"] != second["age"]


def test_structured_outputs_regex_chat(client, model, sample_regex):
    messages = [{"role": "system", "content": "you are a helpful assistant"},
                {"role": "user", "content": f"Give an example IP address with this regex: "
                 f"{sample_regex}"}]
    params = {"max_completion_tokens": 20,
              "extra_body": {"structured_outputs": {"regex": sample_regex}}}
    first = _chat(client, model, messages, **params).choices[0].message.content
    assert first is not None and re.fullmatch(sample_regex, first) is not None

    messages.append({"role": "assistant", "content": first})
    messages.append({"role": "user", "content": "Give me a different one"})
    second = _chat(client, model, messages, **params).choices[0].message.content
    assert second is not None and re.fullmatch(sample_regex, second) is not None
    assert first != second


def test_structured_outputs_type_error(client, model):
    with pytest.raises(openai.BadRequestError):
        _chat(client, model, LANGUAGE, max_completion_tokens=5,
              extra_body={"structured_outputs": {"regex": {1: "Python", 2: "C++"}}})


def test_structured_outputs_choice_chat_logprobs(client, model,
                                                 sample_structured_outputs_choices):
    completion = _chat(client, model, LANGUAGE, max_completion_tokens=10, logprobs=True,
                       top_logprobs=5, extra_body={"structured_outputs": {
                           "choice": sample_structured_outputs_choices}})
    assert completion.choices[0].logprobs is not None
    assert completion.choices[0].logprobs.content is not None
    top_logprobs = completion.choices[0].logprobs.content[0].top_logprobs
    # -9999.0 is the least logprob OpenAI returns.
    for item in top_logprobs:
        assert item.logprob >= -9999.0, f"top_logprobs={top_logprobs}"


def test_response_format_json_object(client, model):
    messages = [{"role": "user", "content": "what is 1+1? please respond with a JSON object, "
                 'the format is {"result": 2}'}]
    for _ in range(2):
        content = _chat(client, model, messages, max_completion_tokens=100, temperature=0.0,
                        response_format={"type": "json_object"}).choices[0].message.content
        assert content is not None
        assert isinstance(json.loads(content), dict)


def test_response_format_json_schema(client, model):
    schema = {"type": "object", "properties": {"result": {"type": "integer"}}}
    messages = [{"role": "user", "content": 'what is 1+1? The format is "result": 2'}]
    response_format = {"type": "json_schema",
                       "json_schema": {"name": "foo_test", "schema": schema}}
    for _ in range(2):
        content = _chat(client, model, messages, max_completion_tokens=100, temperature=0.0,
                        response_format=response_format).choices[0].message.content
        assert content is not None
        jsonschema.validate(instance=json.loads(content), schema=schema)


def test_response_format_text(client, model):
    for _ in range(2):
        content = _chat(client, model, [{"role": "user", "content": "what is 1+1?"}],
                        max_completion_tokens=10,
                        response_format={"type": "text"}).choices[0].message.content
        assert content is not None


def test_extra_fields_allowed(client, model):
    content = _chat(client, model, [{"role": "user", "content": "what is 1+1?",
                                     "extra_field": "0"}],
                    max_completion_tokens=5, temperature=0, seed=0).choices[0].message.content
    assert content is not None


def test_complex_message_content(client, model):
    text = "what is 1+1? please provide the result without any other text."
    params = {"max_completion_tokens": 5, "temperature": 0, "seed": 0}
    parts = _chat(client, model, [{"role": "user", "content": [{"type": "text", "text": text}]}],
                  **params).choices[0].message.content
    plain = _chat(client, model, [{"role": "user", "content": text}],
                  **params).choices[0].message.content
    assert parts == plain


def test_custom_role(client, model):
    """String and list content of a role the template does not know are
    rendered alike."""
    params = {"max_completion_tokens": 5, "temperature": 0, "seed": 0}
    first = _chat(client, model, [{"role": "my-custom-role", "content": "what is 1+1?"}],
                  **params)
    second = _chat(client, model, [{"role": "my-custom-role",
                                    "content": [{"type": "text", "text": "what is 1+1?"}]}],
                   **params)
    assert first.choices[0].message.content == second.choices[0].message.content


@pytest.mark.parametrize("seed", [-INT64 - 1, INT64])
def test_long_seed(client, model, seed):
    with pytest.raises(openai.BadRequestError) as refused:
        _chat(client, model, [{"role": "system", "content": "You are a helpful assistant."}],
              max_completion_tokens=5, temperature=0, seed=seed)
    assert ("greater_than_equal" in refused.value.message
            or "less_than_equal" in refused.value.message)


def test_invocations(http, model):
    """/invocations answers as /v1/chat/completions. (Compared as JSON: the
    openai client's model_dump adds keys of its own.)"""
    request = {"model": model, "messages": MESSAGES, "max_completion_tokens": 5,
               "temperature": 0.0, "logprobs": False}
    chat = http.post("/v1/chat/completions", json=request)
    invocation = http.post("/invocations", json=request)
    chat.raise_for_status()
    invocation.raise_for_status()
    assert chat.json().keys() == invocation.json().keys()
    assert chat.json()["choices"] == invocation.json()["choices"]


def test_chat_completion_n_parameter_non_streaming(client, model):
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is the opposite of big?"}]
    completion = _chat(client, model, messages, max_completion_tokens=20, temperature=0.7,
                       n=3, stream=False)
    assert len(completion.choices) == 3
    for index, choice in enumerate(completion.choices):
        assert choice.index == index
        assert choice.message.content is not None and len(choice.message.content) > 0
    assert len({choice.message.content for choice in completion.choices}) > 1


def test_chat_completion_n_parameter_streaming(client, model):
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is the capital of France?"}]
    by_index = defaultdict(list)
    for chunk in _chat(client, model, messages, max_completion_tokens=15, temperature=0.7, n=2,
                       stream=True):
        for choice in chunk.choices:
            if choice.delta.content:
                by_index[choice.index].append(choice.delta.content)
    assert len(by_index[0]) > 0 and len(by_index[1]) > 0
    assert len("".join(by_index[0])) > 0 and len("".join(by_index[1])) > 0


def test_chat_completion_n_with_seed(client, model):
    completion = _chat(client, model, [{"role": "user", "content": "Say hello."}],
                       max_completion_tokens=10, temperature=0.8, n=2, seed=42, stream=False)
    assert len(completion.choices) == 2
    for index, choice in enumerate(completion.choices):
        assert choice.index == index
        assert choice.message.content is not None and len(choice.message.content) > 0


def test_chat_completion_n_equals_1(client, model):
    completion = _chat(client, model, [{"role": "user", "content": "Hello!"}],
                       max_completion_tokens=10, temperature=0.7, n=1, stream=False)
    assert len(completion.choices) == 1
    assert completion.choices[0].index == 0
    assert completion.choices[0].message.content is not None
