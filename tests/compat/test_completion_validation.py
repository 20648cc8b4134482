"""Ports vLLM's tests/entrypoints/openai/completion/test_completion_error.py,
test_prompt_validation.py and test_empty_prompt_list.py: requests vLLM
refuses with a 400, checked over HTTP instead of on vLLM's request classes.
(finish_reason "error" cannot be provoked from outside; the prompt-embeds
loader and hidden-state cases need server flags or vLLM internals.)"""

from __future__ import annotations

import base64
import io

import openai
import pytest


def _refused(http, body: dict) -> str:
    """The message of the 400 that `body` gets from /v1/completions."""
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 400, response.text
    return response.json()["error"]["message"]


def test_json_schema_response_format_missing_schema(http, model):
    message = _refused(http, {"model": model, "prompt": "Test prompt", "max_tokens": 10,
                              "response_format": {"type": "json_schema"}})
    assert "json_schema" in message and "must be provided" in message


@pytest.mark.parametrize("prompt", [[[-1]], [-1]], ids=["nested", "flat"])
def test_negative_prompt_token_ids(http, model, prompt):
    message = _refused(http, {"model": model, "prompt": prompt, "max_tokens": 10})
    assert "greater than or equal to 0" in message


def test_empty_prompt(client, model):
    with pytest.raises(openai.BadRequestError,
                       match="Either prompt or prompt_embeds must be provided and non-empty."):
        client.completions.create(model=model, prompt=None, max_tokens=5, temperature=0.0,
                                  extra_body={"prompt_embeds": []})


def test_out_of_vocab_token_ids(client, model):
    with pytest.raises(openai.BadRequestError, match=".*out of vocabulary.*"):
        client.completions.create(model=model, prompt=[999999], max_tokens=5, temperature=0.0)


def test_disable_prompt_embeds(client, model):
    """Prompt embeddings on a server started without --enable-prompt-embeds."""
    torch = pytest.importorskip("torch")
    buffer = io.BytesIO()
    torch.save(torch.randn((2, 2), dtype=torch.float32), buffer)
    with pytest.raises(openai.BadRequestError, match="--enable-prompt-embeds"):
        client.completions.create(model=model, prompt=None, max_tokens=5, extra_body={
            "prompt_embeds": base64.b64encode(buffer.getvalue()).decode()})


def test_empty_prompt_list_rejected(http, model):
    # vLLM 0.32's words; later versions say "Either prompt or prompt_embeds...".
    assert "You must pass at least one prompt" in _refused(http, {"model": model, "prompt": []})


def test_nonempty_prompt_list_ok(client, model):
    completion = client.completions.create(model=model, prompt=["hello"], max_tokens=5)
    assert len(completion.choices) == 1
