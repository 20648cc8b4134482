"""Ports vLLM's tests/entrypoints/openai/completion/test_completion_text_offset.py
over HTTP: streamed text offsets equal the non-streamed ones with a stop string
that holds text back, and count the token strings. (test_completion_logprobs.py's
case, a sampled token missing from its step's top logprobs, cannot be provoked
from outside.)"""

from __future__ import annotations


def test_stream_text_offset_matches_non_stream_with_stop_holdback(client, model):
    params = {"model": model, "prompt": "Hi", "max_tokens": 8, "logprobs": 0,
              "stop": ["\n\n"], "temperature": 0.0}
    logprobs = client.completions.create(**params).choices[0].logprobs
    assert logprobs is not None
    starts = [sum(len(token) for token in logprobs.tokens[:i])
              for i in range(len(logprobs.tokens))]
    assert logprobs.text_offset == starts

    streamed = [offset for chunk in client.completions.create(stream=True, **params)
                for choice in chunk.choices if choice.logprobs
                for offset in choice.logprobs.text_offset]
    assert streamed == logprobs.text_offset
