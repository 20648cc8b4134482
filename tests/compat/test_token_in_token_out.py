"""Ports vLLM's tests/entrypoints/openai/completion/test_token_in_token_out.py:
token ids in, token ids (and text) out. vLLM's own skips the tokenizer and
loads dummy weights; here the served model's tokenizer checks the ids. (The
chat_completion/test_token_in_token_out.py cases, prompt_token_ids on chat
completions, came after vLLM 0.32, which refuses them as an empty
conversation: not ported.)"""

from __future__ import annotations


def test_token_in_token_out_and_logprobs(client, model, tokenizer):
    text = "Hello, world! How are you today?"
    completion = client.completions.create(model=model, prompt=tokenizer.encode(text),
                                           max_tokens=20, temperature=0, echo=True,
                                           extra_body={"return_token_ids": True})
    choice = completion.choices[0]
    assert choice.token_ids is not None and 0 < len(choice.token_ids) <= 20
    assert choice.prompt_token_ids is not None
    assert tokenizer.decode(choice.prompt_token_ids) == text

