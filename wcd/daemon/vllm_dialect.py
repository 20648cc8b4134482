"""What the OpenAI API answers differently by the vLLM its workers run.

The reference is vLLM's own api_server of that version (tests/test_vllm_parity.py):
0.32 on CPU, 0.26 on CUDA. The workers' version picks one Dialect (`of`), and
the code that words or decides a difference reads its field, never a version.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Dialect:
    # Usage has completion_tokens_details (0.32's UsageInfo).
    completion_tokens_details: bool = True
    # A refusal of vLLM's request validators is answered as pydantic's
    # RequestValidationError (errors.WrappedRefusal): 0.26's VLLMValidationError
    # is a ValueError, which pydantic wraps.
    wrapped_refusals: bool = False
    # validate_cache_salt refuses a salt over 128 characters or with '@', '/',
    # '\\' or NUL too (vllm#51444); 0.26 only an empty one.
    cache_salt_charset: bool = True
    # A suffix is rendered for models with FIM completion, and refused in those
    # words for others; 0.26 refuses any, empty too.
    fim_suffix: bool = True
    # The tokenizer endpoints' unknown-model 404 names the models served.
    names_models: bool = True
    # A streamed completion's text_offset goes on from the tokens already
    # reported; 0.26 starts each chunk at the length of the text generated so
    # far, an echoed prompt not counted.
    offsets_follow_tokens: bool = True
    # A chat's or pooling request's own mm_processor_kwargs or media_io_kwargs
    # are refused, as by a server without --trust-request-mm-kwargs (wcd has
    # no such flag: its text models use neither); 0.26 takes them and a text
    # model ignores them.
    refuses_request_mm_kwargs: bool = True
    # A pooling request's padding pads its prompts; 0.26 has no such field,
    # and ignores it as any unknown field.
    pooling_padding: bool = True
    # /score's and /rerank's usage counts each input's tokens once; 0.26
    # counts each pair's prompt: its query's tokens, the tokenizer's pad token
    # (where it has one) and its document's, a query scored against N
    # documents N times.
    score_usage_of_inputs: bool = True
    # /pooling's refusals of its task or dimensions (ServingPooling.
    # _verify_pooling_task) are VLLMValidationErrors naming their parameter;
    # 0.26 raises plain ValueErrors, which name none.
    serving_refusals_name_parameter: bool = True


VLLM_032 = Dialect()
VLLM_026 = Dialect(completion_tokens_details=False, wrapped_refusals=True,
                   cache_salt_charset=False, fim_suffix=False, names_models=False,
                   offsets_follow_tokens=False, refuses_request_mm_kwargs=False,
                   pooling_padding=False, score_usage_of_inputs=False,
                   serving_refusals_name_parameter=False)


def of(version: str) -> Dialect:
    """0.26's below 0.27, whose VLLMValidationError stopped being a ValueError
    (vllm#49665): the one boundary known exactly. wcd's workers run 0.26 or
    0.32; the versions between are taken to answer as 0.32 does."""
    number = _major_minor(version)
    return VLLM_026 if number is not None and number < (0, 27) else VLLM_032


@functools.cache
def _major_minor(text: str) -> tuple[int, int] | None:
    """Of a version string such as 0.32.0+cpu; None where it has none."""
    parts = [int(part) for part in re.findall(r"\d+", text)[:2]]
    return (parts[0], parts[1]) if len(parts) == 2 else None
