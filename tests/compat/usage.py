"""What vLLM's tests check of a usage block, shared by the chat and
completion cases."""


def assert_totals(usage) -> None:
    assert usage is not None
    assert usage.prompt_tokens > 0
    assert usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def assert_usage_closes(stream, check_chunk) -> None:
    """Each chunk passes check_chunk(usage); the one that finishes the
    choice is followed by a chunk of usage totals and no choices."""
    for chunk in stream:
        check_chunk(chunk.usage)
        if chunk.choices[0].finish_reason is not None:
            final = next(stream)
            assert_totals(final.usage)
            assert final.choices == []


def assert_none(usage) -> None:
    assert usage is None
