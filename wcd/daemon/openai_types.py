"""Typed shapes of the OpenAI-compatible API: requests as clients send them,
responses as the daemon writes them.

Requests are decoded strictly: every field is either honoured, explicitly
ignored as harmless, or refused with a 400 naming it, never silently dropped.
Shapes are checked here; values (ranges of temperature, n, logprobs...) are
vLLM's business and are checked by vLLM's own SamplingParams in the worker.
The same structs generate the schemas of openapi.json.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from wcd.daemon import errors
from wcd.workers import protocol as p

# OpenAI sampling fields with the same name in vLLM's SamplingParams, and vLLM's
# own extensions that clients send through `extra_body`.
_SAME_NAME = ("n", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
              "frequency_penalty", "repetition_penalty", "stop_token_ids", "ignore_eos",
              "min_tokens", "include_stop_str_in_output", "skip_special_tokens", "logit_bias",
              "allowed_token_ids", "bad_words", "stream_interval")
# vLLM request fields wcd does not implement yet: accepted at their defaults
# (vLLM's, as the structs declare them), since clients written for `vllm serve`
# send them; refused at any other value, never silently ignored. None counts as
# the default where the type allows it, and false for such a flag.
_UNIMPLEMENTED = ("use_beam_search", "watermarking", "length_penalty", "truncate_prompt_tokens",
                  "truncation_side", "prompt_logprobs", "logprob_token_ids",
                  "return_tokens_as_token_ids", "return_token_ids", "routed_experts_prompt_start",
                  "return_token_offsets", "mm_payload", "return_mm_kwargs", "kv_transfer_params",
                  "ec_transfer_params", "vllm_xargs", "repetition_detection",
                  "thinking_token_budget")


def _is_default(value: Any, default: Any) -> bool:
    # A flag whose default is None is as off at false.
    return value is None or value == default or (default is None and value is False)


# OpenAI's completions default, which vLLM's SamplingParams happens to share;
# sent explicitly so a model's generation_config cannot change the API's meaning.
COMPLETIONS_MAX_TOKENS = 16
# A torch generator's seed is an int64: vLLM's server refuses others with a 400.
Seed = Annotated[int, Meta(ge=-(2 ** 63), le=2 ** 63 - 1)]


# ---- requests -------------------------------------------------------------------


class _Request(Struct, forbid_unknown_fields=True):
    pass


class StreamOptions(_Request):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = False


class JsonSchema(_Request):
    name: str | None = None
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


class TextFormat(_Request, tag_field="type", tag="text"):
    pass


class JsonObjectFormat(_Request, tag_field="type", tag="json_object"):
    pass


class JsonSchemaFormat(_Request, tag_field="type", tag="json_schema"):
    json_schema: JsonSchema


class _Sampling(_Request, kw_only=True):
    """Fields both endpoints share."""

    model: str
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: Seed | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    # JSON keys are strings; msgspec reads them as the token ids vLLM wants.
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    response_format: TextFormat | JsonObjectFormat | JsonSchemaFormat | None = None
    # vLLM's own structured-outputs request (json, regex, choice, grammar, ...).
    structured_outputs: dict[str, Any] | None = None
    # Accepted and ignored: they change nothing about the tokens produced.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # vLLM's fields that only tag the request, without changing its output
    # (wcd has no priority scheduling, and a session or salt only keys caches).
    request_id: str | None = None
    priority: int = 0
    session_id: str | None = None
    cache_salt: str | None = None
    # vLLM's fields, honoured.
    spaces_between_special_tokens: bool = True
    # Tokens per streamed chunk, at least the engine's own interval.
    stream_interval: Annotated[int, Meta(ge=1)] | None = None
    # vLLM's fields, accepted only at their defaults (_UNIMPLEMENTED).
    use_beam_search: bool = False
    watermarking: bool | None = None
    length_penalty: float = 1.0
    truncate_prompt_tokens: Annotated[int, Meta(ge=-1, le=2 ** 63 - 1)] | None = None
    truncation_side: Literal["left", "right"] | None = None
    prompt_logprobs: int | None = None
    logprob_token_ids: list[int] | None = None
    return_tokens_as_token_ids: bool | None = None
    return_token_ids: bool | None = None
    routed_experts_prompt_start: int = 0
    return_token_offsets: bool | None = False
    mm_payload: Literal["tensors", "none"] = "tensors"
    return_mm_kwargs: bool | None = None
    kv_transfer_params: dict[str, Any] | None = None
    ec_transfer_params: dict[str, Any] | None = None
    vllm_xargs: dict[str, Any] | None = None
    repetition_detection: dict[str, Any] | None = None
    thinking_token_budget: int | None = None

    def check(self) -> None:
        """Raise a 400 naming the first field this request sets that wcd cannot honour."""
        if self.stream_options is not None and not self.stream:
            raise errors.BadRequest("stream_options is only allowed when stream is true",
                                    param="stream_options")
        defaults = {f.name: f.default for f in msgspec.structs.fields(self)}
        for name in (*_UNIMPLEMENTED, *self._unimplemented()):
            if not _is_default(getattr(self, name), default := defaults[name]):
                raise errors.BadRequest(f"{name} is not supported (only its default "
                                        f"{default!r})", param=name)
        if self.structured_outputs is not None and self._format() is not None:
            raise errors.BadRequest("set response_format or structured_outputs, not both",
                                    param="structured_outputs")

    def sampling(self) -> dict[str, Any]:
        """vLLM SamplingParams fields for what the client set, and only that: the
        worker applies the model's generation_config defaults to the rest."""
        params = {name: value for name in _SAME_NAME
                  if (value := getattr(self, name)) is not None}
        if not self.spaces_between_special_tokens:
            params["spaces_between_special_tokens"] = False
        if self.stop is not None:
            params["stop"] = [self.stop] if isinstance(self.stop, str) else self.stop
        structured = self._format() or self.structured_outputs
        if structured is not None:
            params["structured_outputs"] = structured
        return params

    def prompt_count(self) -> int:
        return 1

    def _unimplemented(self) -> tuple[str, ...]:
        """This endpoint's own fields to add to _UNIMPLEMENTED."""
        return ()

    def template(self, trusted: bool) -> str | None:
        """The request's own chat template; only chat requests have one."""
        return None

    def template_kwargs(self) -> dict[str, Any]:
        return {}

    def _format(self) -> dict[str, Any] | None:
        fmt = self.response_format
        if isinstance(fmt, JsonObjectFormat):
            return {"json_object": True}
        if isinstance(fmt, JsonSchemaFormat):
            if fmt.json_schema.schema is None:
                raise errors.BadRequest("response_format json_schema needs a schema",
                                        param="response_format.json_schema.schema")
            return {"json": fmt.json_schema.schema}
        return None


class CompletionRequest(_Sampling, kw_only=True):
    # One prompt (text or token ids) or a batch of them; checked in prompts().
    # Optional as in vLLM, which refuses a missing prompt as an empty one.
    prompt: str | list[str | int | list[int]] | None = None
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None
    add_special_tokens: bool = True
    prompt_embeds: bytes | list[bytes] | None = None

    def check(self) -> None:
        super().check()
        if self.prompt is None or self.prompt == "":
            raise errors.VllmBadRequest("Either prompt or prompt_embeds must be provided and "
                                        "non-empty. (parameter=prompt)", param="prompt")
        if self.echo:
            raise errors.BadRequest("echo is not supported", param="echo")
        if self.suffix:
            raise errors.BadRequest("suffix (insertion) is not supported", param="suffix")
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise errors.BadRequest("best_of other than n is not supported", param="best_of")

    def sampling(self) -> dict[str, Any]:
        params = super().sampling()
        params["max_tokens"] = self.max_tokens if self.max_tokens is not None \
            else COMPLETIONS_MAX_TOKENS
        if self.logprobs is not None:
            params["logprobs"] = self.logprobs
        return params

    def prompt_count(self) -> int:
        return len(self._prompts())

    def _unimplemented(self) -> tuple[str, ...]:
        return "add_special_tokens", "prompt_embeds"

    def prompts(self) -> list[p.Prompt]:
        """One worker input per prompt: text or token ids."""
        return [p.Prompt(prompt=item) if isinstance(item, str) else p.Prompt(prompt_token_ids=item)
                for item in self._prompts()]

    def _prompts(self) -> list[str | list[int]]:
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(item, int) for item in prompt):
            return [prompt]
        if prompt and (all(isinstance(item, str) for item in prompt)
                       or all(isinstance(item, list) for item in prompt)):
            return prompt
        raise errors.BadRequest("prompt must be a string, a list of token ids, or a "
                                "non-empty list of either (a batch)", param="prompt")


class TextPart(_Request, tag_field="type", tag="text"):
    text: str


class Message(_Request, omit_defaults=True):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_Sampling, kw_only=True):
    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # vLLM's own field: a Jinja template of the client's, run only where the
    # operator trusts request templates (http.trust_request_chat_template).
    chat_template: str | None = None
    # Refused when set to anything that asks for behaviour wcd lacks.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    # vLLM's: reasoning_effort reaches the chat template (template_kwargs);
    # include_reasoning only matters with a reasoning parser, which wcd lacks.
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh",
                              "max"] | None = None
    include_reasoning: bool = True
    # vLLM's, accepted only at their defaults.
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    documents: list[dict[str, str]] | None = None
    media_io_kwargs: dict[str, dict[str, Any]] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    return_prompt_text: bool | None = None

    def _unimplemented(self) -> tuple[str, ...]:
        return ("echo", "add_generation_prompt", "continue_final_message", "add_special_tokens",
                "documents", "media_io_kwargs", "mm_processor_kwargs", "return_prompt_text")

    def check(self) -> None:
        super().check()
        for name in ("tools", "functions", "function_call", "audio", "prediction"):
            if getattr(self, name):
                raise errors.BadRequest(f"{name} is not supported", param=name)
        if self.tool_choice not in (None, "none", "auto"):
            raise errors.BadRequest("tool calling is not supported", param="tool_choice")
        if self.modalities not in (None, ["text"]):
            raise errors.BadRequest("only text output is supported", param="modalities")
        if self.top_logprobs and not self.logprobs:
            raise errors.BadRequest("top_logprobs needs logprobs: true", param="top_logprobs")
        reserved = sorted(p.RESERVED_CHAT_TEMPLATE_KWARGS.intersection(
            self.chat_template_kwargs or ()) - {"chat_template"})
        if reserved:
            raise errors.BadRequest(f"chat_template_kwargs may not set {reserved[0]!r}: wcd "
                                    "sets it", param=f"chat_template_kwargs.{reserved[0]}")

    def template(self, trusted: bool) -> str | None:
        """The request's own chat template, refused unless the operator trusts
        request templates, as vLLM's --trust-request-chat-template does."""
        template = (self.chat_template_kwargs or {}).get("chat_template", self.chat_template)
        if template is not None and not trusted:
            raise errors.BadRequest(
                "a chat template was passed with the request, but "
                "http.trust_request_chat_template is not set: refused", param="chat_template")
        if template is not None and not isinstance(template, str):
            raise errors.BadRequest("chat_template must be a string", param="chat_template")
        return template

    def sampling(self) -> dict[str, Any]:
        params = super().sampling()
        # Left unset, vLLM generates up to the model's context length, as OpenAI does.
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens
        if max_tokens is not None:
            params["max_tokens"] = max_tokens
        if self.logprobs:
            params["logprobs"] = self.top_logprobs or 0
        return params

    def prompts(self) -> list[p.Prompt]:
        return [p.Prompt(messages=msgspec.to_builtins(self.messages))]

    def template_kwargs(self) -> dict[str, Any]:
        kwargs = {k: v for k, v in (self.chat_template_kwargs or {}).items()
                  if k != "chat_template"}
        # As vLLM: the template gets reasoning_effort, and thinking turned on or
        # off by it unless the client chose; templates that read neither ignore them.
        if self.reasoning_effort is not None:
            kwargs["reasoning_effort"] = self.reasoning_effort
            kwargs.setdefault("enable_thinking", self.reasoning_effort != "none")
        return kwargs


# ---- responses ------------------------------------------------------------------


class Usage(Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(Struct, kw_only=True):
    tokens: list[str]
    token_logprobs: list[float]
    # Per token: the `logprobs` most likely tokens and the chosen one.
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(Struct, kw_only=True):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(Struct, kw_only=True):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(Struct, kw_only=True):
    """One `data:` event of a streamed completion."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    # Present (null, then the totals on a last chunk without choices) only
    # when stream_options.include_usage is set.
    usage: Usage | None | UnsetType = UNSET


class TopLogprob(Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Struct, kw_only=True):
    content: list[TokenLogprob] | None


class ChatMessage(Struct, kw_only=True):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(Struct, kw_only=True):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletion(Struct, kw_only=True):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(Struct, kw_only=True):
    role: Literal["assistant"] | UnsetType = UNSET
    content: str | UnsetType = UNSET


class ChatChunkChoice(Struct, kw_only=True):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(Struct, kw_only=True):
    """One `data:` event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None | UnsetType = UNSET


class ModelPermission(Struct, kw_only=True):
    """vLLM's ModelPermission, with its defaults."""

    id: str
    object: Literal["model_permission"] = "model_permission"
    created: int
    allow_create_engine: bool = False
    allow_sampling: bool = True
    allow_logprobs: bool = True
    allow_search_indices: bool = False
    allow_view: bool = True
    allow_fine_tuning: bool = False
    organization: str = "*"
    group: str | None = None
    is_blocking: bool = False


class Model(Struct, kw_only=True):
    """vLLM's ModelCard, and wcd's state of the model."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "vllm"
    root: str | None = None  # the model's directory
    parent: str | None = None
    max_model_len: int | None = None
    permission: list[ModelPermission]
    # wcd's additions: "serving", "loading" or "available" (loaded on first use).
    state: str
    worker: int | None


class ModelList(Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[Model]


class ErrorDetail(Struct, kw_only=True):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(Struct, kw_only=True):
    error: ErrorDetail


class Version(Struct, kw_only=True):
    version: str  # the vLLM the workers run


class Health(Struct, kw_only=True):
    status: Literal["ok"] = "ok"
