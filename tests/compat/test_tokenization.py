"""Ports vLLM's tests/entrypoints/serve/tokenize/test_tokenization.py: /tokenize
for prompts and conversations (with tools), token strings, /detokenize, all
checked against the model's own tokenizer. max_model_len is the served
model's (its card's). The tokenizer_info cases need
--enable-tokenizer-info-endpoint: not ported."""

from __future__ import annotations

import pytest

CONVERSATION = [{"role": "user", "content": "Hi there!"},
                {"role": "assistant", "content": "Nice to meet you!"},
                {"role": "user", "content": "Can I ask a question? vllm1"}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}}}]


def _tokenize(http, body: dict) -> dict:
    response = http.post("/tokenize", json=body)
    response.raise_for_status()
    return response.json()


@pytest.mark.parametrize("add_special", [False, True])
def test_tokenize_completions(http, model, tokenizer, max_model_len, add_special):
    prompt = "vllm1 This is a test prompt."
    tokens = tokenizer.encode(prompt, add_special_tokens=add_special)
    result = _tokenize(http, {"add_special_tokens": add_special, "model": model,
                              "prompt": prompt})
    assert result["tokens"] == tokens
    assert result["count"] == len(tokens)
    assert result["max_model_len"] == max_model_len
    assert result["token_strs"] is None


def _chat_cases(conversation: list[dict]):
    """(add_generation_prompt, continue_final_message, add_special_tokens, messages)
    as vLLM's own loops go through them."""
    for add_generation in (False, True):
        for add_special in (False, True):
            messages = list(conversation)
            for continue_final in (False, True):
                if add_generation and continue_final:
                    continue
                if continue_final:
                    messages.append({"role": "assistant", "content": "Sure,"})
                yield add_generation, continue_final, add_special, list(messages)


@pytest.mark.parametrize("tools", [None, TOOLS], ids=["plain", "with_tools"])
def test_tokenize_chat(http, model, tokenizer, max_model_len, tools):
    conversation = CONVERSATION if tools is None else [
        {"role": "user", "content": "What's the weather like in Paris today?"}]
    for add_generation, continue_final, add_special, messages in _chat_cases(conversation):
        prompt = tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation,
            continue_final_message=continue_final, tools=tools, tokenize=False)
        tokens = tokenizer.encode(prompt, add_special_tokens=add_special)
        body = {"add_generation_prompt": add_generation,
                "continue_final_message": continue_final, "add_special_tokens": add_special,
                "messages": messages, "model": model}
        if tools is not None:
            body["tools"] = tools
        result = _tokenize(http, body)
        assert result["tokens"] == tokens
        assert result["count"] == len(tokens)
        assert result["max_model_len"] == max_model_len
        assert result["token_strs"] is None


def test_tokenize_with_return_token_strs(http, model, tokenizer, max_model_len):
    prompt = "This is a token_strs test prompt! vllm1"
    result = _tokenize(http, {"prompt": prompt, "model": model, "return_token_strs": True})
    tokens = tokenizer.encode(prompt, add_special_tokens=True)
    assert result["tokens"] == tokens
    assert result["count"] == len(tokens)
    assert result["max_model_len"] == max_model_len
    assert result["token_strs"] == tokenizer.convert_ids_to_tokens(tokens)


def test_detokenize(http, model, tokenizer):
    prompt = "This is a test prompt. vllm1"
    response = http.post("/detokenize", json={
        "model": model, "tokens": tokenizer.encode(prompt, add_special_tokens=False)})
    response.raise_for_status()
    assert response.json() == {"prompt": prompt}
