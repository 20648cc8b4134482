"""Typed shapes of the OpenAI-compatible API: requests as clients send them,
responses as the daemon writes them.

Requests are decoded as vLLM's server reads them: each of its fields is
honoured, or ignored where vLLM ignores it too, and a field neither knows
is ignored (and logged). Shapes are checked here; values (ranges of temperature, n, logprobs...) are
vLLM's business and are checked by vLLM's own SamplingParams in the worker.
The same structs generate the schemas of openapi.json.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from wcd.daemon import errors
from wcd.daemon.vllm_dialect import VLLM_032, Dialect
from wcd.workers import protocol as p

# OpenAI sampling fields with the same name in vLLM's SamplingParams, and vLLM's
# own extensions that clients send through `extra_body`.
_SAME_NAME = ("n", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
              "frequency_penalty", "repetition_penalty", "stop_token_ids", "ignore_eos",
              "min_tokens", "include_stop_str_in_output", "skip_special_tokens",
              "allowed_token_ids", "bad_words", "stream_interval", "watermarking")


def check_mm_kwargs(dialect: Dialect, mm_processor_kwargs: dict | None,
                    media_io_kwargs: dict | None) -> None:
    """vLLM's validate_request_mm_kwargs, as its server without
    --trust-request-mm-kwargs runs it (wcd has no such flag: its text models
    use neither)."""
    if not dialect.refuses_request_mm_kwargs:
        return
    for name, given, what in (("mm_processor_kwargs", mm_processor_kwargs, "preprocessing"),
                              ("media_io_kwargs", media_io_kwargs, "media loading")):
        if given:
            raise errors.VllmValidationError(
                f"Per-request {name} are disabled by default because they can change "
                f"multimodal {what} resource usage. Start the server with "
                "--trust-request-mm-kwargs only when clients are trusted.", name)


def check_cache_salt(salt: str | None, dialect: Dialect, **refusal: Any) -> None:
    """vLLM's validate_cache_salt: a salt keys cache backends, which take
    neither an empty one nor path-like characters. `refusal`: how vLLM's
    request model raises it (errors.ValidatorRefusal's keywords)."""
    if salt is None:
        return
    if not salt:
        raise errors.ValidatorRefusal("Parameter 'cache_salt' must be a non-empty string if "
                                      "provided.", "cache_salt", **refusal)
    if dialect.cache_salt_charset and (len(salt) > 128
                                       or any(char in "@/\\\0" for char in salt)):
        raise errors.ValidatorRefusal("Parameter 'cache_salt' must be at most 128 characters "
                                      "and must not contain '@', '/', '\\\\', or NUL.",
                                      "cache_salt", **refusal)


def _token_keys(bias: dict[str, float]) -> dict[int, float]:
    bad = [key for key in bias if not key.lstrip("-").isdigit()]
    if bad:
        raise errors.VllmValidationError(f"logit_bias contains key(s) that cannot be converted "
                                         f"to integer token IDs: {bad}", "logit_bias", bad)
    return {int(key): value for key, value in bias.items()}


def _thinking_budget(value: int | float | bool | None) -> int | None:
    """vLLM's validate_thinking_token_budget: None where unset or unlimited (-1)."""
    if value is None:
        return None
    if isinstance(value, (bool, float)) or value < -1:
        raise errors.ValidatorRefusal("`thinking_token_budget` must be a non-negative integer "
                                      "or -1 for unlimited.", "thinking_token_budget", value,
                                      field="thinking_token_budget")
    return None if value == -1 else value


# OpenAI's completions default, which vLLM's SamplingParams happens to share;
# sent explicitly so a model's generation_config cannot change the API's meaning.
COMPLETIONS_MAX_TOKENS = 16
# A torch generator's seed is an int64: vLLM's server refuses others with a 400.
Seed = Annotated[int, Meta(ge=-(2 ** 63), le=2 ** 63 - 1)]
TokenId = Annotated[int, Meta(ge=0)]


# ---- requests -------------------------------------------------------------------


class _Request(Struct):
    """A body's fields wcd does not know are ignored, as vLLM's server ignores
    them (openai_api logs them at debug level, as vLLM does)."""


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
    # Required; checked in _format() to refuse its absence in vLLM's words.
    json_schema: JsonSchema | None = None


class RepetitionDetection(_Request):
    """vLLM's RepetitionDetectionParams: generation ends early on an n-gram
    repeated min_count times (max_pattern_size 0: never)."""

    max_pattern_size: int = 0
    min_pattern_size: int = 0
    min_count: int = 0

    def check(self) -> None:
        """vLLM's __post_init__, in its words (0.26's a plain ValueError)."""
        if (self.max_pattern_size < 0 or self.min_pattern_size < 0
                or self.min_pattern_size > self.max_pattern_size):
            raise errors.ValidatorRefusal("max_pattern_size, min_pattern_size must be >=0, with "
                                          "min_pattern_size <= max_pattern_size. Set both to 0 "
                                          "to disable repetitive pattern detection.",
                                          bare=True, field="repetition_detection")
        if self.max_pattern_size > 0 and self.min_count < 2:
            raise errors.ValidatorRefusal("min_count must be >= 2 to detect repetitive patterns "
                                          "in engine output. If you do not wish to detect "
                                          "repetitive patterns, set max_pattern_size to 0.",
                                          bare=True, field="repetition_detection")


class _Sampling(_Request, kw_only=True):
    """Fields both endpoints share."""

    # Optional as in vLLM, whose server then uses its one model: wcd's default
    # model (openai_api) stands in.
    model: str | None = None
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
    # Token ids as JSON keys: converted in sampling(), refused in vLLM's words.
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    response_format: TextFormat | JsonObjectFormat | JsonSchemaFormat | None = None
    # vLLM's own structured-outputs request (json, regex, choice, grammar, ...).
    structured_outputs: dict[str, Any] | None = None
    # vLLM's, and ignored there: it changes nothing about the tokens. OpenAI's
    # fields vLLM does not know (store, metadata, functions, modalities...)
    # are unknown here too, ignored as there.
    user: str | None = None
    # vLLM's fields that only tag the request, without changing its output
    # (wcd has no priority scheduling, and a session or salt only keys caches).
    request_id: str | None = None
    priority: int = 0
    session_id: str | None = None
    cache_salt: str | None = None
    # vLLM's fields, honoured.
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: Annotated[int, Meta(ge=-1, le=2 ** 63 - 1)] | None = None
    truncation_side: Literal["left", "right"] | None = None
    prompt_logprobs: int | None = None
    return_token_ids: bool | None = None
    # Logprob tokens as "token_id:N"; None: the server's default
    # (http.return_tokens_as_token_ids, vLLM's --return-tokens-as-token-ids).
    return_tokens_as_token_ids: bool | None = None
    # Tokens per streamed chunk, at least the engine's own interval.
    stream_interval: Annotated[int, Meta(ge=1)] | None = None
    # vLLM's beam search: the n completions are the best beams of width n,
    # searched by the worker as vLLM's server searches them; length_penalty
    # applies to nothing else, and is ignored without it (as in vLLM).
    use_beam_search: bool = False
    length_penalty: float = 1.0
    # The engine's watermark, where one is configured (vLLM 0.32: else a
    # warning and none); logprobs of these tokens at each generated position.
    watermarking: bool | None = None
    logprob_token_ids: list[int] | None = None
    # Checked as vLLM's validator does (a bool or float is refused; -1: none).
    thinking_token_budget: int | float | bool | None = None
    repetition_detection: RepetitionDetection | None = None
    routed_experts_prompt_start: Annotated[int, Meta(ge=0)] = 0
    # For custom extensions and disaggregated serving: the engine gets them as
    # SamplingParams.extra_args, as from vLLM's server.
    vllm_xargs: dict[str, str | int | float | list[str | int | float]] | None = None
    kv_transfer_params: dict[str, Any] | None = None
    ec_transfer_params: dict[str, Any] | None = None
    # vLLM's fields for its /render endpoints, which its generation endpoints
    # ignore: typed, so a wrong type is refused as there.
    return_token_offsets: bool | None = False
    mm_payload: Literal["tensors", "none"] = "tensors"
    return_mm_kwargs: bool | None = None

    def check(self, dialect: Dialect = VLLM_032) -> None:
        """Raise a 400 naming the first field this request sets that wcd cannot
        honour, or that the workers' vLLM refuses."""
        if self.stream_options is not None and not self.stream:
            raise errors.BadRequest("stream_options is only allowed when stream is true",
                                    param="stream_options")
        if self.logprob_token_ids and self.use_beam_search:
            raise errors.ValidatorRefusal("`logprob_token_ids` is not supported with beam "
                                          "search.", "logprob_token_ids")
        if self.structured_outputs is not None and self._format() is not None:
            raise errors.BadRequest("set response_format or structured_outputs, not both",
                                    param="structured_outputs")
        check_cache_salt(self.cache_salt, dialect)
        if (asked := self.prompt_logprobs) is not None:
            if self.stream and (asked > 0 or asked == -1):
                raise errors.ValidatorRefusal("`prompt_logprobs` are not available when "
                                              "`stream=True`.", "prompt_logprobs")
            if asked < -1:
                raise errors.ValidatorRefusal("`prompt_logprobs` must be a positive value or -1.",
                                              "prompt_logprobs", asked)
        _thinking_budget(self.thinking_token_budget)
        if self.repetition_detection is not None:
            self.repetition_detection.check()

    def validated_input(self, body: dict[str, Any],
                        refusal: errors.ValidatorRefusal) -> dict[str, Any]:
        """The request's JSON `body` as vLLM 0.26's validators had it when one
        raised `refusal`."""
        return body

    def sampling(self) -> dict[str, Any]:
        """vLLM SamplingParams fields for what the client set, and only that: the
        worker applies the model's generation_config defaults to the rest."""
        params = {name: value for name in _SAME_NAME
                  if (value := getattr(self, name)) is not None}
        if self.logit_bias is not None:
            params["logit_bias"] = _token_keys(self.logit_bias)
        if not self.spaces_between_special_tokens:
            params["spaces_between_special_tokens"] = False
        if self.stop is not None:
            params["stop"] = [self.stop] if isinstance(self.stop, str) else self.stop
        structured = self._format() or self.structured_outputs
        if structured is not None:
            params["structured_outputs"] = structured
        prompt_logprobs = self.prompt_logprobs
        if prompt_logprobs is None and self._echo():
            prompt_logprobs = self._echo_prompt_logprobs()
        if prompt_logprobs is not None:
            params["prompt_logprobs"] = prompt_logprobs
        if self.logprob_token_ids:
            params["logprob_token_ids"] = self.logprob_token_ids
        if (budget := _thinking_budget(self.thinking_token_budget)) is not None:
            params["thinking_token_budget"] = budget
        if self.repetition_detection is not None:
            params["repetition_detection"] = msgspec.to_builtins(self.repetition_detection)
        if self.routed_experts_prompt_start:
            params["routed_experts_prompt_start"] = self.routed_experts_prompt_start
        if extra_args := self._extra_args():
            params["extra_args"] = extra_args
        return params

    def _extra_args(self) -> dict[str, Any]:
        """vLLM's to_sampling_params: the extensions' arguments, with the
        transfer parameters of disaggregated serving among them."""
        extra_args = dict(self.vllm_xargs or {})
        if self.kv_transfer_params:
            extra_args["kv_transfer_params"] = self.kv_transfer_params
        if self.ec_transfer_params:
            extra_args["ec_transfer_params"] = self.ec_transfer_params
        return extra_args

    def listed_logprobs(self) -> int | None:
        """How many of each position's logprobs a response lists, as k of the
        top k (-1: all of them, as with logprob_token_ids); None: no logprobs."""
        return None

    def beam_search(self) -> p.BeamSearch | None:
        return p.BeamSearch(self.length_penalty) if self.use_beam_search else None

    def render(self) -> p.RenderOptions:
        """How the worker tokenizes this request's prompts."""
        return p.RenderOptions(truncate_prompt_tokens=self.truncate_prompt_tokens,
                               truncation_side=self.truncation_side)

    def wants_prompt(self) -> bool:
        """Whether responses show the prompt's tokens, logprobs or text."""
        return bool(self.return_token_ids or self.prompt_logprobs is not None or self._echo()
                    or self._returns_prompt_text())

    def _returns_prompt_text(self) -> bool:
        return False

    def _echo(self) -> bool:
        return False

    def _echo_prompt_logprobs(self) -> int | None:
        """The prompt logprobs an echo asks for, as vLLM's to_sampling_params."""
        return None

    def prompt_count(self) -> int:
        return 1

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
            if fmt.json_schema is None:
                raise errors.ValidatorRefusal("When response_format type is 'json_schema', the "
                                              "'json_schema' field must be provided.",
                                              "response_format")
            if fmt.json_schema.schema is None:
                raise errors.BadRequest("response_format json_schema needs a schema",
                                        param="response_format.json_schema.schema")
            return {"json": fmt.json_schema.schema}
        return None


class CompletionRequest(_Sampling, kw_only=True):
    # One prompt (text or token ids) or a batch of them; checked in prompts().
    # Optional as in vLLM, which refuses a missing prompt as an empty one.
    prompt: str | list[str | TokenId | list[TokenId]] | None = None
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    add_special_tokens: bool = True
    prompt_embeds: bytes | list[bytes] | None = None

    def check(self, dialect: Dialect = VLLM_032) -> None:
        super().check(dialect)
        if self.prompt in (None, "") and not self.prompt_embeds:
            raise errors.ValidatorRefusal("Either prompt or prompt_embeds must be provided and "
                                          "non-empty.", "prompt")
        if self.prompt_embeds:  # as a server started without --enable-prompt-embeds
            raise errors.VllmValidationError("You must set `--enable-prompt-embeds` to input "
                                             "`prompt_embeds`.", "prompt_embeds")
        self._check_suffix(dialect)
        if self.use_beam_search:
            self._check_beam_search()
        self._check_logprob_token_ids()

    def _check_logprob_token_ids(self) -> None:
        """vLLM's refusals of token ids for logprobs on a completion."""
        if not self.logprob_token_ids:
            return
        if self.echo and self.max_tokens == 0:
            raise errors.ValidatorRefusal("`logprob_token_ids` is not supported when `echo=True` "
                                          "and `max_tokens=0` because no output tokens are "
                                          "generated.", "logprob_token_ids")
        if self.logprobs is None:
            raise errors.ValidatorRefusal("when using `logprob_token_ids`, `logprobs` must be "
                                          "set.", "logprob_token_ids")

    def _check_suffix(self, dialect: Dialect) -> None:
        """No model wcd serves renders a suffix (FIM completion)."""
        if self.suffix is not None and not dialect.fim_suffix:
            raise errors.VllmBadRequest("suffix is not currently supported")
        if self.suffix:
            raise errors.VllmBadRequest("suffix is only supported for models with FIM "
                                        "completion rendering", param="suffix")

    def _check_beam_search(self) -> None:
        """vLLM's refusals of beam search: its request validator's, then its
        server's (which streams no beam search of a completion)."""
        if self.echo and self.logprobs is not None:
            raise errors.VllmValidationError("`echo` with `logprobs` is not supported with beam "
                                             "search because beam search does not compute "
                                             "prompt logprobs.", "echo")
        if self.stream:
            raise errors.VllmBadRequest("Streaming is not currently supported with beam search")

    def sampling(self) -> dict[str, Any]:
        params = super().sampling()
        params["max_tokens"] = self.max_tokens if self.max_tokens is not None \
            else COMPLETIONS_MAX_TOKENS
        # An echo of the prompt alone still runs one engine step, as in vLLM;
        # its beam search takes none.
        if self.echo and self.max_tokens == 0 and not self.use_beam_search:
            params["max_tokens"] = 1
        if self.logprobs is not None and not self.logprob_token_ids:
            params["logprobs"] = self.logprobs
        return params

    def listed_logprobs(self) -> int | None:
        if self.logprobs is None:
            return None
        return -1 if self.logprob_token_ids else self.logprobs

    def render(self) -> p.RenderOptions:
        return msgspec.structs.replace(
            super().render(), add_special_tokens=self.add_special_tokens,
            max_output_tokens=self.max_tokens if self.max_tokens is not None
            else COMPLETIONS_MAX_TOKENS)

    def prompt_count(self) -> int:
        return len(self._prompts())

    def _echo(self) -> bool:
        return bool(self.echo)

    def _echo_prompt_logprobs(self) -> int | None:
        return self.logprobs

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
        if prompt == []:
            raise errors.VllmBadRequest("You must pass at least one prompt")
        raise errors.BadRequest("prompt must be a string, a list of token ids, or a "
                                "non-empty list of either (a batch)", param="prompt")


# Messages and their parts take fields of other clients' dialects (OpenAI's
# newer ones, vendors' extensions) without a 400, as vLLM's parser does; like
# it, the template sees only the fields below.
class TextPart(Struct, tag_field="type", tag="text"):
    text: str


class Message(Struct, omit_defaults=True):
    # Any role, as vLLM's custom messages: the chat template decides what it means.
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None


# vLLM's ChatCompletionToolsParam: fields of other dialects are taken and
# dropped, as its model does.
class ToolFunction(Struct):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None
    defer_loading: bool | None = None


class Tool(Struct):
    function: ToolFunction
    type: Literal["function"] = "function"
    defer_loading: bool | None = None


class ToolsAsSent(_Request):
    """A chat body's tools with every field the client sent."""

    tools: list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Sampling, kw_only=True):
    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # vLLM's own field: a Jinja template of the client's, run only where the
    # operator trusts request templates (http.trust_request_chat_template).
    chat_template: str | None = None
    # vLLM's tool calling: the tools reach the chat template, and the model's
    # parsers (its tool_call_parser) make its output tool calls. Unset,
    # tool_choice is "auto" with tools and "none" without; null stays null.
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None | UnsetType = UNSET
    parallel_tool_calls: bool | None = True
    # vLLM's: reasoning_effort reaches the chat template (template_kwargs);
    # include_reasoning false drops what the model's reasoning_parser finds.
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh",
                              "max"] | None = None
    include_reasoning: bool = True
    # vLLM's, honoured.
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    documents: list[dict[str, str]] | None = None
    # The prompt as the chat template wrote it, in the response.
    return_prompt_text: bool | None = None
    # vLLM's multimodal options, for a chat's own media: checked in
    # _check_mm_kwargs; wcd's text models use neither.
    media_io_kwargs: dict[str, dict[str, Any]] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None

    def render(self) -> p.RenderOptions:
        return msgspec.structs.replace(
            super().render(), add_special_tokens=self.add_special_tokens,
            add_generation_prompt=self.add_generation_prompt,
            continue_final_message=self.continue_final_message, documents=self.documents,
            tools=None if self.tools is None else msgspec.to_builtins(self.tools),
            **self._output_limit())

    def _output_limit(self) -> dict[str, Any]:
        if self.max_completion_tokens is not None:
            return {"max_output_tokens": self.max_completion_tokens,
                    "max_output_tokens_param": "max_completion_tokens"}
        return {"max_output_tokens": self.max_tokens or 0}

    def chat_options(self) -> p.ChatOptions:
        """What the model's parsers need of this request."""
        usage = self.stream_options
        return p.ChatOptions(
            tool_choice=self.effective_tool_choice(),
            parallel_tool_calls=self.parallel_tool_calls,
            include_reasoning=self.include_reasoning, stream=bool(self.stream),
            continuous_usage=bool(usage and usage.include_usage and usage.continuous_usage_stats))

    def response_role(self) -> str:
        """The role vLLM's server answers with (get_chat_request_role)."""
        if self.add_generation_prompt:
            return "assistant"
        return self.messages[-1].role if self.messages else "assistant"

    def echoed(self) -> str | None:
        """What an echo repeats: the last message's content, where it is the
        response's role (the message the model continues); None without echo."""
        if not self.echo:
            return None
        if not self.messages or self.messages[-1].role != self.response_role():
            return ""
        content = self.messages[-1].content or ""
        if isinstance(content, list):
            return "\n".join(part.text for part in content)
        return content

    def _echo(self) -> bool:
        return self.echo

    def _returns_prompt_text(self) -> bool:
        return bool(self.return_prompt_text)

    def _echo_prompt_logprobs(self) -> int | None:
        return self.top_logprobs or 0  # vLLM's default top_logprobs

    def check(self, dialect: Dialect = VLLM_032) -> None:
        super().check(dialect)
        self._check_tools()
        self._check_logprobs()
        check_template_kwargs(self.chat_template_kwargs)
        check_mm_kwargs(dialect, self.mm_processor_kwargs, self.media_io_kwargs)

    def _check_logprobs(self) -> None:
        """vLLM's check_logprobs, in its words."""
        if self.logprob_token_ids and not self.logprobs:
            raise errors.ValidatorRefusal("when using `logprob_token_ids`, `logprobs` must be "
                                          "set to true.", "logprob_token_ids")
        if (top := self.top_logprobs) is not None:
            if top < -1:
                raise errors.ValidatorRefusal("`top_logprobs` must be a positive value or -1.",
                                              "top_logprobs", top)
            if top != 0 and not self.logprobs:
                raise errors.ValidatorRefusal("when using `top_logprobs`, `logprobs` must be set "
                                              "to true.", "top_logprobs")

    def effective_tool_choice(self) -> str | dict[str, Any] | None:
        """tool_choice as vLLM reads it: unset, "auto" with tools, else "none"."""
        if self.tool_choice is UNSET:
            return "auto" if self.tools else "none"
        return self.tool_choice

    def _check_tools(self) -> None:
        """vLLM's refusals of tool fields, in its words and order
        (ChatCompletionRequest's check_tool_usage, then
        check_structured_outputs_count)."""
        if self.tools == []:
            raise errors.ValidatorRefusal("`tools` must not be an empty array. Either provide "
                                          "at least one tool or omit the field entirely.",
                                          "tools", bare=True)
        choice = self.effective_tool_choice()
        if choice not in (None, "none"):
            if self.tools is None:
                raise errors.ValidatorRefusal("When using `tool_choice`, `tools` must be set.",
                                              "tool_choice")
            if isinstance(choice, dict):
                _check_named_tool(choice, self.tools)
            elif choice not in ("auto", "required"):
                raise errors.ValidatorRefusal(f"Invalid value for `tool_choice`: {choice}! Only "
                                              'named tools, "none", "auto" or "required" are '
                                              "supported.", "tool_choice")
        constraints = [key for key in ("json", "regex", "choice")
                       if (self.structured_outputs or {}).get(key) is not None]
        if constraints and choice not in ("none", "auto", "required"):
            raise errors.ValidatorRefusal("You can only either use constraints for structured "
                                          "outputs or tools, not both.")

    def validated_input(self, body: dict[str, Any],
                        refusal: errors.ValidatorRefusal) -> dict[str, Any]:
        # vLLM 0.26 runs its validators last-defined first: check_tool_usage,
        # which gives tools without a tool_choice "auto" in the body itself,
        # runs before check_logprobs and validate_response_format.
        if (refusal.param in ("prompt_logprobs", "response_format")
                and "tool_choice" not in body and body.get("tools")):
            body["tool_choice"] = "auto"
        return body

    def template(self, trusted: bool) -> str | None:
        return request_template(self.chat_template, self.chat_template_kwargs, trusted)

    def sampling(self) -> dict[str, Any]:
        params = super().sampling()
        # Left unset, vLLM generates up to the model's context length, as OpenAI does.
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens
        if max_tokens is not None:
            params["max_tokens"] = max_tokens
        if self.logprobs and not self.logprob_token_ids:
            params["logprobs"] = self.top_logprobs or 0
        return params

    def listed_logprobs(self) -> int | None:
        if not self.logprobs:
            return None
        return -1 if self.logprob_token_ids else self.top_logprobs or 0

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


_NAMED_TOOL_USAGE = 'Correct usage: `{"type": "function", "function": {"name": "my_function"}}`'


def _check_named_tool(choice: dict[str, Any], tools: list[Tool]) -> None:
    function = choice.get("function")
    if not isinstance(function, dict):
        raise errors.ValidatorRefusal(f"Invalid value for `function`: `{function}` in "
                                      f"`tool_choice`! {_NAMED_TOOL_USAGE}",
                                      "tool_choice.function")
    if "name" not in function:
        raise errors.ValidatorRefusal(f"Expected field `name` in `function` in `tool_choice`! "
                                      f"{_NAMED_TOOL_USAGE}", "tool_choice.function.name")
    name = function["name"]
    if not isinstance(name, str) or not name:
        raise errors.ValidatorRefusal(f"Invalid `name` in `function`: `{name}` in "
                                      f"`tool_choice`! {_NAMED_TOOL_USAGE}",
                                      "tool_choice.function.name")
    if all(tool.function.name != name for tool in tools):
        raise errors.ValidatorRefusal("The tool specified in `tool_choice` does not match any "
                                      "of the specified `tools`", "tool_choice")


def check_template_kwargs(kwargs: dict[str, Any] | None) -> None:
    reserved = sorted(p.RESERVED_CHAT_TEMPLATE_KWARGS.intersection(kwargs or ())
                      - {"chat_template"})
    if reserved:
        raise errors.BadRequest(f"chat_template_kwargs may not set {reserved[0]!r}: wcd "
                                "sets it", param=f"chat_template_kwargs.{reserved[0]}")


def request_template(template: str | None, kwargs: dict[str, Any] | None,
                      trusted: bool) -> str | None:
    """A request's own chat template, refused unless the operator trusts
    request templates, as vLLM's --trust-request-chat-template does."""
    template = (kwargs or {}).get("chat_template", template)
    if template is not None and not trusted:
        raise errors.BadRequest(
            "a chat template was passed with the request, but "
            "http.trust_request_chat_template is not set: refused", param="chat_template")
    if template is not None and not isinstance(template, str):
        raise errors.BadRequest("chat_template must be a string", param="chat_template")
    return template


class TokenizeRequest(_Request, kw_only=True):
    """vLLM's /tokenize request: a completion's prompt or a chat's messages."""

    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    # None: added to a prompt, not to messages (the template writes them).
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool | None = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    media_io_kwargs: dict[str, dict[str, Any]] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise errors.BadRequest("give either prompt or messages", param="prompt")
        for name in ("media_io_kwargs", "mm_processor_kwargs"):
            if getattr(self, name):
                raise errors.BadRequest(f"{name} is not supported", param=name)
        check_template_kwargs(self.chat_template_kwargs)

    def template(self, trusted: bool) -> str | None:
        return request_template(self.chat_template, self.chat_template_kwargs, trusted)

    def prompt_input(self) -> p.Prompt:
        if self.messages is not None:
            return p.Prompt(messages=msgspec.to_builtins(self.messages))
        return p.Prompt(prompt=self.prompt)

    def render(self) -> p.RenderOptions:
        return p.RenderOptions(add_special_tokens=self.add_special_tokens,
                               add_generation_prompt=self.add_generation_prompt,
                               continue_final_message=self.continue_final_message,
                               tools=self.tools)

    def template_kwargs(self) -> dict[str, Any]:
        return {k: v for k, v in (self.chat_template_kwargs or {}).items()
                if k != "chat_template"}


class DetokenizeRequest(_Request, kw_only=True):
    model: str | None = None
    tokens: list[Annotated[int, Meta(ge=0, le=2 ** 63 - 1)]]


# ---- responses ------------------------------------------------------------------


class Usage(Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    # vLLM's: null in a response (without --enable-prompt-tokens-details or
    # reasoning), absent from chunks.
    prompt_tokens_details: dict[str, int] | None | UnsetType = UNSET
    completion_tokens_details: dict[str, int] | None | UnsetType = UNSET


class CompletionLogprobs(Struct, kw_only=True):
    tokens: list[str]
    # None for an echoed prompt's first token, which has no logprob.
    token_logprobs: list[float | None]
    # Per token: the `logprobs` most likely tokens and the chosen one.
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class PromptLogprob(Struct, kw_only=True):
    """vLLM's Logprob, as its server writes prompt_logprobs."""

    logprob: float
    rank: int | None
    decoded_token: str | None


# Per prompt position: None for the first, else token id -> its logprob.
PromptLogprobs = list[dict[int, PromptLogprob] | None]


class CompletionChoice(Struct, kw_only=True):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    # vLLM's: the stop string or token id that ended the completion.
    stop_reason: str | int | None = None
    # vLLM's, with return_token_ids and prompt_logprobs.
    token_ids: list[int] | None = None
    prompt_logprobs: PromptLogprobs | None = None
    prompt_token_ids: list[int] | None = None
    # vLLM's MoE routing data, which needs an engine wcd does not start.
    routed_experts: None = None


class Completion(Struct, kw_only=True):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    service_tier: None = None
    # vLLM's: the serving engine's version and configuration, null where unknown.
    system_fingerprint: str | None = None
    usage: Usage
    # vLLM's, null: no KV or encoder cache connector, no per-request metrics.
    kv_transfer_params: None = None
    ec_transfer_params: None = None
    metrics: None = None


class CompletionChunkChoice(Struct, kw_only=True):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    # On a choice's first chunk, with return_token_ids or echo.
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] | None = None


class CompletionChunk(Struct, kw_only=True):
    """One `data:` event of a streamed completion."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    # Present (null, then the totals on a last chunk without choices) only
    # when stream_options.include_usage is set.
    usage: Usage | None | UnsetType = UNSET
    # vLLM's: only on a stream's last chunks (_Format._stamp).
    system_fingerprint: str | UnsetType = UNSET


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


class FunctionCall(Struct, kw_only=True):
    name: str
    arguments: str  # JSON text


class ToolCall(Struct, kw_only=True):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Struct, kw_only=True):
    # "assistant", or the last message's role when the model continues it
    # (add_generation_prompt false), as vLLM answers.
    role: str = "assistant"
    # null where the model's parsers found only reasoning or tool calls.
    content: str | None
    # OpenAI's fields, null as vLLM writes them for text.
    refusal: str | None = None
    annotations: list[dict[str, Any]] | None = None
    audio: dict[str, Any] | None = None
    function_call: dict[str, Any] | None = None
    # Absent without tool calls, as vLLM writes it.
    tool_calls: list[ToolCall] | UnsetType = UNSET
    reasoning: str | None = None


class ChatChoice(Struct, kw_only=True):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    token_ids: list[int] | None = None  # vLLM's, with return_token_ids
    routed_experts: None = None  # as CompletionChoice's


class ChatCompletion(Struct, kw_only=True):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    service_tier: None = None
    system_fingerprint: str | None = None  # as Completion's
    usage: Usage
    # vLLM's, with prompt_logprobs (or echo), return_token_ids, return_prompt_text.
    prompt_logprobs: PromptLogprobs | None = None
    prompt_token_ids: list[int] | None = None
    prompt_text: str | None = None
    kv_transfer_params: None = None  # as Completion's
    ec_transfer_params: None = None
    metrics: None = None


class ChatDelta(Struct, kw_only=True):
    """vLLM's DeltaMessage: a field it leaves unset is absent, one it sets to
    None is null."""

    role: str | UnsetType = UNSET
    content: str | None | UnsetType = UNSET
    reasoning: str | None | UnsetType = UNSET
    tool_calls: list[p.ToolCallDelta] | UnsetType = UNSET


class ChatChunkChoice(Struct, kw_only=True):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None | UnsetType = UNSET  # on the last chunk
    # vLLM's, with return_token_ids; null on other generated chunks.
    token_ids: list[int] | None | UnsetType = UNSET


class ChatCompletionChunk(Struct, kw_only=True):
    """One `data:` event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    # vLLM's: on the opening chunks, null unless return_token_ids (return_prompt_text).
    prompt_token_ids: list[int] | None | UnsetType = UNSET
    prompt_text: str | None | UnsetType = UNSET
    usage: Usage | None | UnsetType = UNSET
    system_fingerprint: str | UnsetType = UNSET  # as CompletionChunk's


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


class TokenizeResponse(Struct, kw_only=True):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(Struct, kw_only=True):
    prompt: str


class Version(Struct, kw_only=True):
    version: str  # the vLLM the workers run


class Health(Struct, kw_only=True):
    status: Literal["ok"] = "ok"
