"""Ports vLLM's tests/entrypoints/openai/embedding_tests/test_embedding.py for
whatever embedding model the server lists (the embedding_model fixture skips
every case when it lists none). vLLM's own compare with the model run by
Hugging Face and know multilingual-e5-small's sizes; here embeddings are
compared with each other: one length throughout, token counts from token-id
inputs, base64 equal to floats, /invocations equal to /v1/embeddings, a
conversation equal to its prompt as the server's /tokenize renders it (vLLM's
renders it with Hugging Face's tokenizer and the chat template it serves)."""

from __future__ import annotations

import base64

import numpy as np
import openai
import pytest

TEXTS = ["The cat sat on the mat.", "A feline was resting on a rug.",
         "Stars twinkle brightly in the night sky."]
LONG_TEXT = "Como o Brasil pode fomentar o desenvolvimento de modelos de IA?"


def _embed(client, model, inputs, **params):
    return client.embeddings.create(model=model, input=inputs, encoding_format="float",
                                    **params)


def _assert_usage(response, prompt_tokens: int | None = None) -> None:
    assert response.usage.prompt_tokens > 0
    assert response.usage.total_tokens == response.usage.prompt_tokens
    if prompt_tokens is not None:
        assert response.usage.prompt_tokens == prompt_tokens


def test_single_embedding(client, embedding_model):
    texts = _embed(client, embedding_model, ["The chef prepared a delicious meal."])
    assert texts.id is not None
    assert len(texts.data) == 1
    assert len(texts.data[0].embedding) > 0
    _assert_usage(texts)

    tokens = _embed(client, embedding_model, [1, 1, 1, 1, 1])
    assert len(tokens.data) == 1
    assert len(tokens.data[0].embedding) == len(texts.data[0].embedding)
    _assert_usage(tokens, 5)


def test_batch_embedding(client, embedding_model):
    texts = _embed(client, embedding_model, TEXTS)
    assert len(texts.data) == 3
    assert len({len(item.embedding) for item in texts.data}) == 1
    _assert_usage(texts)

    tokens = _embed(client, embedding_model,
                    [[4, 5, 7, 9, 20], [15, 29, 499], [24, 24, 24, 24, 24], [25, 32, 64, 77]])
    assert len(tokens.data) == 4
    _assert_usage(tokens, 17)


def test_batch_base64_embedding(client, embedding_model):
    texts = ["Hello my name is",
             "The best thing about vLLM is that it supports many different models"]
    floats = [item.embedding for item in _embed(client, embedding_model, texts).data]
    encoded = client.embeddings.create(model=embedding_model, input=texts,
                                       encoding_format="base64")
    decoded = [np.frombuffer(base64.b64decode(item.embedding), dtype="float32")
               for item in encoded.data]
    np.testing.assert_allclose(decoded, floats, atol=1e-2)
    # The openai client asks for base64 by default and decodes it.
    default = [item.embedding for item in
               client.embeddings.create(model=embedding_model, input=texts).data]
    np.testing.assert_allclose(default, floats, atol=1e-2)


def test_single_embedding_truncation(client, embedding_model):
    texts = _embed(client, embedding_model, [LONG_TEXT],
                   extra_body={"truncate_prompt_tokens": 10})
    assert len(texts.data) == 1
    _assert_usage(texts, 10)

    # 21 token ids (vLLM's own are e5's, past a small vocabulary).
    tokens = _embed(client, embedding_model, list(range(10, 31)),
                    extra_body={"truncate_prompt_tokens": 10})
    _assert_usage(tokens, 10)


def test_single_embedding_truncation_invalid(client, http, embedding_model):
    card = next(card for card in http.get("/v1/models").json()["data"]
                if card["id"] == embedding_model)
    with pytest.raises(openai.BadRequestError):
        _embed(client, embedding_model, [LONG_TEXT],
               extra_body={"truncate_prompt_tokens": card["max_model_len"] + 1})


def test_invocations(client, http, embedding_model):
    request = {"model": embedding_model, "input": ["The chef prepared a delicious meal."],
               "encoding_format": "float"}
    embeddings = http.post("/v1/embeddings", json=request)
    invocation = http.post("/invocations", json=request)
    embeddings.raise_for_status()
    invocation.raise_for_status()
    assert embeddings.json().keys() == invocation.json().keys()
    for direct, invoked in zip(embeddings.json()["data"], invocation.json()["data"]):
        assert direct.keys() == invoked.keys()
        np.testing.assert_allclose(direct["embedding"], invoked["embedding"], atol=1e-2)


def test_normalize(http, embedding_model):
    """vLLM 0.32 calls the request's `normalize` use_activation (and refuses
    the old name)."""
    def embeddings(normalize) -> np.ndarray:
        response = http.post("/v1/embeddings", json={
            "model": embedding_model, "input": ["The chef prepared a delicious meal."],
            "encoding_format": "float", "use_activation": normalize})
        response.raise_for_status()
        return np.array([item["embedding"] for item in response.json()["data"]])

    default, normalized, raw = embeddings(None), embeddings(True), embeddings(False)
    assert np.allclose(default, normalized, atol=1e-2), "normalized by default"
    assert not np.allclose(normalized, raw, atol=1e-2)
    assert np.allclose(normalized, raw / np.linalg.norm(raw, axis=-1, keepdims=True),
                       atol=1e-2)


def test_conversation_embedding(http, embedding_model):
    messages = [{"role": "user", "content": "The cat sat on the mat."},
                {"role": "assistant", "content": "A feline was resting on a rug."},
                {"role": "user", "content": "Stars twinkle brightly in the night sky."}]
    chat = http.post("/v1/embeddings", json={
        "model": embedding_model, "messages": messages, "encoding_format": "float",
        "add_generation_prompt": True})
    chat.raise_for_status()
    tokens = http.post("/tokenize", json={"model": embedding_model, "messages": messages,
                                          "add_generation_prompt": True})
    tokens.raise_for_status()
    prompt = http.post("/v1/embeddings", json={
        "model": embedding_model, "input": tokens.json()["tokens"], "encoding_format": "float"})
    prompt.raise_for_status()
    chat, prompt = chat.json(), prompt.json()
    assert chat["id"] is not None and prompt["id"] is not None
    assert {k: v for k, v in chat.items() if k not in ("id", "created")} == \
        {k: v for k, v in prompt.items() if k not in ("id", "created")}
