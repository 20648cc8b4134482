"""Ports vLLM's tests/entrypoints/openai/completion/test_completion.py.
Token counts come from the model's own tokenizer instead of opt-125m's
numbers; prompt_tokens_details needs a server flag and is left out."""

from __future__ import annotations

import openai
import pytest

from .usage import assert_none, assert_totals, assert_usage_closes

PROMPT_IDS = [0, 0, 0, 0, 0]


def test_single_completion(client, model, tokenizer):
    prompt = "Hello, my name is"
    completion = client.completions.create(model=model, prompt=prompt, max_tokens=5,
                                           temperature=0.0)
    assert completion.id is not None
    assert completion.choices is not None and len(completion.choices) == 1
    choice = completion.choices[0]
    assert len(choice.text) >= 5
    assert choice.finish_reason == "length"
    prompt_tokens = len(tokenizer.encode(prompt))
    assert completion.usage.completion_tokens == 5
    assert completion.usage.prompt_tokens == prompt_tokens
    assert completion.usage.total_tokens == prompt_tokens + 5

    completion = client.completions.create(model=model, prompt=PROMPT_IDS, max_tokens=5,
                                           temperature=0.0)
    assert len(completion.choices[0].text) >= 1
    assert completion.choices[0].prompt_logprobs is None


def test_completion_truncation_side_controls_prompt_truncation(client, model):
    prompt_token_ids = list(range(8))
    for side, kept in (("right", prompt_token_ids[:4]), ("left", prompt_token_ids[-4:])):
        completion = client.completions.create(
            model=model, prompt=prompt_token_ids, max_tokens=1, temperature=0.0,
            extra_body={"return_token_ids": True, "truncate_prompt_tokens": 4,
                        "truncation_side": side})
        assert completion.choices[0].prompt_token_ids == kept


def test_no_logprobs(client, model):
    completion = client.completions.create(model=model, prompt=PROMPT_IDS, max_tokens=5,
                                           temperature=0.0, logprobs=None)
    assert completion.choices[0].logprobs is None


def test_zero_logprobs(client, model):
    completion = client.completions.create(model=model, prompt=PROMPT_IDS, max_tokens=5,
                                           temperature=0.0, logprobs=0)
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.token_logprobs is not None
    assert logprobs.top_logprobs is not None
    assert len(logprobs.top_logprobs[0]) == 1


def test_some_logprobs(client, model):
    completion = client.completions.create(model=model, prompt=PROMPT_IDS, max_tokens=5,
                                           temperature=0.0, logprobs=5)
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.token_logprobs is not None
    assert logprobs.top_logprobs is not None
    assert 5 <= len(logprobs.top_logprobs[0]) <= 6


def test_too_many_completion_logprobs(client, model):
    # vLLM's default max_logprobs is 20.
    with pytest.raises((openai.BadRequestError, openai.APIError)):
        client.completions.create(model=model, prompt=PROMPT_IDS, max_tokens=5,
                                  temperature=0.0, logprobs=21)
    with pytest.raises((openai.BadRequestError, openai.APIError)):
        stream = client.completions.create(model=model, prompt=PROMPT_IDS, max_tokens=5,
                                           temperature=0.0, logprobs=30, stream=True)
        for _ in stream:
            pass
    # The server still works afterwards.
    completion = client.completions.create(model=model, prompt=PROMPT_IDS, max_tokens=5,
                                           temperature=0.0)
    assert len(completion.choices[0].text) >= 0


@pytest.mark.parametrize("prompt_logprobs", [-1, 0, 1, None])
def test_prompt_logprobs_completion(client, model, prompt_logprobs):
    params: dict = {"prompt": ["A robot may not injure another robot", "My name is"],
                    "model": model, "max_tokens": 5}
    if prompt_logprobs is not None:
        params["extra_body"] = {"prompt_logprobs": prompt_logprobs}
    if prompt_logprobs is not None and prompt_logprobs < 0:
        with pytest.raises(openai.BadRequestError):
            client.completions.create(**params)
        return
    completion = client.completions.create(**params)
    if prompt_logprobs is None:
        assert completion.choices[0].prompt_logprobs is None
        return
    for choice in completion.choices[:2]:
        assert choice.prompt_logprobs is not None
        assert len(choice.prompt_logprobs) > 0


def test_completion_streaming(client, model):
    prompt = "What is an LLM?"
    single = client.completions.create(model=model, prompt=prompt, max_tokens=5,
                                       temperature=0.0)
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=5,
                                       temperature=0.0, stream=True)
    chunks: list[str] = []
    finish_reason_count = 0
    for chunk in stream:
        chunks.append(chunk.choices[0].text)
        if chunk.choices[0].finish_reason is not None:
            finish_reason_count += 1
    # The finish reason comes in the last chunk only.
    assert finish_reason_count == 1
    assert chunk.choices[0].finish_reason == "length"
    assert chunk.choices[0].text
    assert "".join(chunks) == single.choices[0].text


def _assert_n_unique(texts: list[str], n: int) -> None:
    repeats = {text: texts.count(text) for text in texts if texts.count(text) > 1}
    assert len(set(texts)) == n, f"expected {n} unique completions; repeats: {repeats}"


# Random weights seldom sample EOS within 50 tokens: a stop string ends the
# samples at different times instead.
STOP = ["e"]


def test_parallel_no_streaming(client, model):
    """n samples in one response, finishing at different times."""
    n, max_tokens = 3, 50
    completion = client.completions.create(model=model, prompt="What is an LLM?",
                                           max_tokens=max_tokens, n=n, temperature=1.0,
                                           stream=False, logprobs=0, seed=42, stop=STOP)
    assert len(completion.choices) == n
    lengths = set()
    for index, choice in enumerate(completion.choices):
        assert choice.index == index
        assert choice.finish_reason is not None
        lengths.add(len(choice.logprobs.tokens))
    assert len(lengths) > 1
    _assert_n_unique([choice.text for choice in completion.choices], n)


def test_parallel_streaming(client, model):
    """n samples flattened into one stream, told apart by index."""
    n, max_tokens = 3, 50
    stream = client.completions.create(model=model, prompt="What is an LLM?",
                                       max_tokens=max_tokens, n=n, temperature=1.0,
                                       stream=True, seed=42, stop=STOP)
    chunks: list[list[str]] = [[] for _ in range(n)]
    finish_reason_count = 0
    for chunk in stream:
        chunks[chunk.choices[0].index].append(chunk.choices[0].text)
        if chunk.choices[0].finish_reason is not None:
            finish_reason_count += 1
    assert finish_reason_count == n
    assert all(len(texts) <= max_tokens for texts in chunks)
    assert len({len(texts) for texts in chunks}) > 1
    _assert_n_unique(["".join(texts) for texts in chunks], n)


def _stream(client, model, **options):
    return client.completions.create(model=model, prompt="What is the capital of France?",
                                     max_tokens=5, temperature=0.0, **options)


def test_completion_stream_options(client, model):
    for options in ({"include_usage": False, "continuous_usage_stats": False},
                    {"include_usage": False, "continuous_usage_stats": True}, {}):
        for chunk in _stream(client, model, stream=True, stream_options=options):
            assert chunk.usage is None

    stream = _stream(client, model, stream=True,
                     stream_options={"include_usage": True, "continuous_usage_stats": False})
    assert_usage_closes(stream, assert_none)

    stream = _stream(client, model, stream=True,
                     stream_options={"include_usage": True, "continuous_usage_stats": True})
    assert_usage_closes(stream, assert_totals)

    for options in ({"include_usage": None}, {"include_usage": True},
                    {"continuous_usage_stats": None}, {"continuous_usage_stats": True}):
        with pytest.raises(openai.BadRequestError):
            _stream(client, model, stream=False, stream_options=options)


def test_batch_completions(client, model):
    for prompts in (["Hello, my name is"] * 2, [PROMPT_IDS] * 2):
        batch = client.completions.create(model=model, prompt=prompts, max_tokens=5,
                                          temperature=0.0)
        assert len(batch.choices) == 2
        assert batch.choices[0].text == batch.choices[1].text

        # n > 1 with greedy sampling needs beam search in vLLM.
        batch = client.completions.create(model=model, prompt=prompts, n=2, max_tokens=5,
                                          temperature=0.0,
                                          extra_body={"use_beam_search": True})
        assert len(batch.choices) == 4
        assert batch.choices[0].text != batch.choices[1].text, "beams should differ"
        assert batch.choices[0].text == batch.choices[2].text
        assert batch.choices[1].text == batch.choices[3].text

        stream = client.completions.create(model=model, prompt=prompts, max_tokens=5,
                                           temperature=0.0, stream=True)
        texts = [""] * 2
        for chunk in stream:
            assert len(chunk.choices) == 1
            texts[chunk.choices[0].index] += chunk.choices[0].text
        assert texts[0] == texts[1]


@pytest.mark.parametrize("logprobs_arg", [1, 0])
def test_echo_logprob_completion(client, model, tokenizer, logprobs_arg):
    for prompt in ("Hello, my name is", PROMPT_IDS):
        completion = client.completions.create(model=model, prompt=prompt, max_tokens=5,
                                               temperature=0.0, echo=True,
                                               logprobs=logprobs_arg)
        prompt_text = tokenizer.decode(prompt) if isinstance(prompt, list) else prompt
        assert completion.choices[0].text.startswith(prompt_text)
        logprobs = completion.choices[0].logprobs
        assert logprobs is not None
        assert len(logprobs.text_offset) > 5
        assert len(logprobs.token_logprobs) > 5 and logprobs.token_logprobs[0] is None
        assert len(logprobs.top_logprobs) > 5 and logprobs.top_logprobs[0] is None
        for top in logprobs.top_logprobs[1:]:
            assert max(logprobs_arg, 1) <= len(top) <= logprobs_arg + 1
        assert len(logprobs.tokens) > 5


def test_invalid_json_schema(client, model):
    invalid_json_schema = {
        "$defs": {"CarType": {"enum": ["sedan", "SUV", "Truck", "Coupe"], "title": "CarType",
                              "type": "string"}},
        "properties": {"brand": {"title": "Brand", "type": "string"},
                       "model": {"title": "Model", "type": "string"},
                       "car_type": {"$ref": "#/$defs/CarType"},
                       "foo": "bar"},
        "required": ["brand", "model", "car_type"],
        "title": "CarDescription",
        "type": "object",
    }
    with pytest.raises((openai.BadRequestError, openai.APIError)):
        client.completions.create(
            model=model, prompt="Generate a JSON with the brand, model and car_type of the "
            "most iconic car from the 90's", max_tokens=5,
            extra_body={"structured_outputs": {"json": invalid_json_schema}})


def test_invalid_regex(client, model):
    with pytest.raises((openai.BadRequestError, openai.APIError)):
        client.completions.create(
            model=model, prompt="Generate an email address for Alan Turing, who works in "
            "Enigma. End in .com and new line. Example result: alan.turing@enigma.com\n",
            max_tokens=5, extra_body={"structured_outputs": {"regex": r"[.*"}, "stop": ["\n"]})


def test_invalid_grammar(client, model):
    invalid_simplified_sql_grammar = """
        root ::= select_statementinvalidsyntax

        select_statement ::= "SELECT " column " from " table " where " condition

        column ::= "col_1 " | "col_2 "

        table ::= "table_1 " | "table_2 "

        condition ::= column "= " number

        number ::= "1 " | "2 "
    """
    with pytest.raises((openai.BadRequestError, openai.APIError)):
        client.completions.create(
            model=model, prompt="Generate an SQL query to show the 'username' and 'email' "
            "from the 'users' table.", max_tokens=5,
            extra_body={"structured_outputs": {"grammar": invalid_simplified_sql_grammar}})
