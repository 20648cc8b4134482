"""Ports vLLM's tests/entrypoints/openai/completion/test_usage_policy.py and
chat_completion/test_usage_policy.py: usage is in every non-streamed
response, and in a stream only when stream_options.include_usage asks."""

from __future__ import annotations

import pytest


def _create(client, model, endpoint: str, **params):
    if endpoint == "completion":
        return client.completions.create(model=model, prompt="Hello", max_tokens=5,
                                         temperature=0.0, **params)
    return client.chat.completions.create(model=model, max_completion_tokens=5,
                                          messages=[{"role": "user", "content": "Hello"}],
                                          temperature=0.0, **params)


ENDPOINTS = pytest.mark.parametrize("endpoint", ["completion", "chat"])


@ENDPOINTS
def test_non_streaming(client, model, endpoint):
    response = _create(client, model, endpoint, stream=False)
    assert response.usage is not None
    assert response.usage.prompt_tokens > 0
    assert response.usage.completion_tokens > 0


@ENDPOINTS
def test_streaming_no_usage(client, model, endpoint):
    chunks = list(_create(client, model, endpoint, stream=True))
    assert chunks
    assert not any(chunk.usage is not None and not chunk.choices for chunk in chunks)


@ENDPOINTS
def test_streaming_with_usage_option(client, model, endpoint):
    chunks = list(_create(client, model, endpoint, stream=True,
                          stream_options={"include_usage": True}))
    final = [chunk for chunk in chunks if chunk.usage is not None and not chunk.choices]
    assert final
    assert all(chunk.usage.prompt_tokens > 0 for chunk in final)
