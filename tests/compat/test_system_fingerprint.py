"""Ports vLLM's tests/entrypoints/openai/chat_completion/test_system_fingerprint_none.py
and tests/entrypoints/serve/utils/test_fingerprint.py as a server started
with the default --fingerprint-mode full shows them: every non-streamed chat
and text completion carries system_fingerprint "vllm-<version>-<config hash>"
(no parallelism parts on one device), the same for every request. The other
modes need server flags: not ported."""

from __future__ import annotations

import re

import pytest


def _fingerprint(http, model, endpoint: str) -> str:
    body = {"model": model, "max_tokens": 2}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": "Hi"}]
    else:
        body["prompt"] = "Hi"
    response = http.post(f"/v1/{'chat/' if endpoint == 'chat' else ''}completions", json=body)
    response.raise_for_status()
    assert "system_fingerprint" in response.json()
    return response.json()["system_fingerprint"]


@pytest.mark.parametrize("endpoint", ["chat", "completion"])
def test_key_present_when_fingerprint_is_set(http, model, endpoint):
    version = http.get("/version").json()["version"]
    fingerprint = _fingerprint(http, model, endpoint)
    assert re.fullmatch(rf"vllm-{re.escape(version)}-([0-9a-f]{{8}}|nohash)", fingerprint)


def test_get_respects_set_default(http, model):
    assert _fingerprint(http, model, "chat") == _fingerprint(http, model, "completion")
