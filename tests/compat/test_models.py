"""Ports vLLM's tests/entrypoints/openai/models/test_models.py, base model only
(its LoRA cases need adapters). vLLM's own serves a hub id, whose root is that
id; a served model's root is where its files came from, so the port checks
that it names one. vLLM 0.32 serves no GET /v1/models/{id}: the retrieve
cases fail on it too and are skipped."""

from __future__ import annotations

import openai
import pytest


def test_check_models(client, model):
    models = {card.id: card for card in client.models.list().data}
    assert model in models
    assert models[model].root


NO_RETRIEVE = pytest.mark.skip(reason="vLLM 0.32 fails it too: it has no GET /v1/models/{id}")


@NO_RETRIEVE
def test_retrieve_base_model(client, model):
    card = client.models.retrieve(model)
    assert card.id == model
    assert card.root


@NO_RETRIEVE
def test_retrieve_unknown_model(client):
    with pytest.raises(openai.NotFoundError) as refused:
        client.models.retrieve("this-model-does-not-exist")
    assert "does not exist" in str(refused.value)
