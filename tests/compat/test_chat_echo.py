"""Ports vLLM's tests/entrypoints/openai/chat_completion/test_chat_echo.py (and
basic/test_chat_echo.py): echo with continue_final_message. Output capped
at 16 tokens, so a "length" finish is as good as "stop" (the older file's
assertion). Its prompt_logprobs=-1 and top_logprobs=-1 cases need the server
started with --max-logprobs of the vocabulary size: not ported."""

from __future__ import annotations

import pytest

SAYING = "Here is a common saying about apple. An apple a day, keeps"


@pytest.mark.parametrize("echo", [True, False])
def test_chat_session_with_echo_and_continue_final_message(client, model, echo):
    completion = client.chat.completions.create(
        model=model, max_tokens=16,
        messages=[{"role": "user", "content": "tell me a common saying"},
                  {"role": "assistant", "content": SAYING}],
        extra_body={"echo": echo, "continue_final_message": True,
                    "add_generation_prompt": False})
    assert completion.id is not None
    assert len(completion.choices) == 1
    choice = completion.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert choice.message.content is not None
    assert (SAYING in choice.message.content) == echo
    assert choice.message.role == "assistant"
