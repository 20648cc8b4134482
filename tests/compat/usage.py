"""What vLLM's tests check of a usage block, shared by the chat and
completion cases."""


def assert_totals(usage) -> None:
    assert usage is not None
    assert usage.prompt_tokens > 0
    assert usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
