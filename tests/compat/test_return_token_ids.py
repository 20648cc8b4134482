"""Ports vLLM's tests/entrypoints/openai/basic/test_return_token_ids.py:
return_token_ids puts the prompt's and the output's token ids in completions
and chat completions, streamed or not, consistent with the text, the logprobs
(return_tokens_as_token_ids) and the tokenizer."""

from __future__ import annotations

TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a given location",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string",
                             "description": "The city and state, e.g. San Francisco, CA"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"],
                         "description": "The unit of temperature"},
            },
            "required": ["location"],
        },
    },
}]


def _contains(sequence: list[int], part: list[int]) -> bool:
    return any(sequence[i:i + len(part)] == part for i in range(len(sequence) - len(part) + 1))


def _ids(token_strs: list[str]) -> list[int]:
    """Token ids from logprob tokens written as "token_id:N"."""
    return [int(token.removeprefix("token_id:")) for token in token_strs
            if token.startswith("token_id:")]


def test_basic_completion_with_emoji(client, model, tokenizer):
    prompt = "Complete this sentence with emojis: I love coding 🚀"
    completion = client.completions.create(model=model, prompt=prompt, max_tokens=10,
                                           temperature=0, logprobs=1,
                                           extra_body={"return_token_ids": True})
    choice = completion.choices[0]
    assert "prompt_token_ids" in completion.model_dump()["choices"][0]
    assert isinstance(choice.prompt_token_ids, list)
    assert _contains(choice.prompt_token_ids, tokenizer.encode(prompt))
    assert isinstance(choice.token_ids, list) and len(choice.token_ids) > 0
    assert tokenizer.decode(choice.token_ids).startswith(choice.text)

    without = client.completions.create(model=model, prompt=prompt, max_tokens=10,
                                        temperature=0, logprobs=1,
                                        extra_body={"return_token_ids": False}).model_dump()
    assert without["choices"][0].get("token_ids") is None
    assert without.get("prompt_token_ids") is None


def test_chat_completion_with_tool_use(client, model, tokenizer):
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What's the weather like in Paris?"}]
    params = {"model": model, "messages": messages, "tools": TOOLS, "tool_choice": "auto",
              "max_tokens": 100, "temperature": 0, "logprobs": True}
    response = client.chat.completions.create(**params, extra_body={"return_token_ids": True})
    assert isinstance(response.choices[0].token_ids, list)
    assert isinstance(response.prompt_token_ids, list)
    prompt_text = tokenizer.decode(response.prompt_token_ids)
    assert "You are a helpful assistant" in prompt_text
    assert "What's the weather like in Paris?" in prompt_text
    assert len(tokenizer.decode(response.choices[0].token_ids)) > 0
    assert response.choices[0].message.content is not None
    for tool_call in response.choices[0].message.tool_calls or ():
        assert tool_call.function.name == "get_weather"

    without = client.chat.completions.create(**params, extra_body={"return_token_ids": False})
    assert without.choices[0].token_ids is None
    assert without.prompt_token_ids is None


def test_comparison_with_prompt_logprobs_and_logprobs(client, model, tokenizer):
    completion = client.completions.create(
        model=model, prompt="Hello, world! How are you today?", max_tokens=20,
        temperature=0, echo=True, logprobs=1,
        extra_body={"return_token_ids": True, "return_tokens_as_token_ids": True,
                    "prompt_logprobs": 1})
    choice = completion.choices[0]
    assert choice.token_ids is not None
    assert choice.prompt_token_ids is not None
    assert choice.prompt_logprobs is not None
    assert choice.logprobs is not None
    # With echo the logprobs cover the prompt, then the output.
    logprob_ids = _ids(choice.logprobs.tokens)
    assert len(choice.token_ids) < len(logprob_ids)
    assert logprob_ids[-len(choice.token_ids):] == choice.token_ids
    assert "Hello, world" in tokenizer.decode(choice.prompt_token_ids)
    # Random weights may end inside a multi-byte character: the text holds its
    # bytes back, decode() writes U+FFFD for them. They also write special
    # tokens (<pad>), which the text leaves out (skip_special_tokens).
    response_text = tokenizer.decode(choice.token_ids, skip_special_tokens=True)
    assert choice.text.endswith(response_text.rstrip("\ufffd"))

    stream = client.completions.create(
        model=model, prompt="Tell me a short fact about Python:", max_tokens=30,
        temperature=0, stream=True, echo=False, logprobs=1,
        extra_body={"return_token_ids": True, "return_tokens_as_token_ids": True})
    prompt_ids, output_ids, logprob_ids = None, [], []
    for chunk in stream:
        logprob_ids += _ids(chunk.choices[0].logprobs.tokens)
        if prompt_ids is None:
            prompt_ids = chunk.choices[0].prompt_token_ids
        output_ids += chunk.choices[0].token_ids
    assert len(prompt_ids) > 0
    assert output_ids == logprob_ids


def test_chat_completion_with_emoji_and_token_ids(client, model, tokenizer):
    messages = [{"role": "system", "content": "You like to use emojis in your responses."},
                {"role": "user", "content": "Repeat after me: I love cats 🐱"}]
    response = client.chat.completions.create(model=model, messages=messages, max_tokens=50,
                                              temperature=0, logprobs=True,
                                              extra_body={"return_token_ids": True})
    assert response.choices[0].token_ids is not None
    assert "prompt_token_ids" in response.model_dump()
    assert response.choices[0].message.content is not None
    decoded_prompt = tokenizer.decode(response.prompt_token_ids)
    assert "You like to use emojis in your responses" in decoded_prompt
    assert "I love cats 🐱" in decoded_prompt
    assert len(tokenizer.decode(response.choices[0].token_ids)) > 0

    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=50,
                                            temperature=0, stream=True,
                                            extra_body={"return_token_ids": True})
    content, token_ids = "", []
    for position, chunk in enumerate(stream):
        if position == 0:
            assert isinstance(chunk.prompt_token_ids, list)
            assert tokenizer.decode(chunk.prompt_token_ids) == decoded_prompt
        else:
            assert "prompt_token_ids" not in chunk.model_dump(), \
                "only the first chunk carries prompt_token_ids"
        if chunk.choices:
            content += chunk.choices[0].delta.content or ""
            if "token_ids" in chunk.choices[0].model_dump():
                token_ids += chunk.choices[0].token_ids
    assert len(content) > 0
    assert len(token_ids) > 0
    assert len(tokenizer.decode(token_ids)) > 0
