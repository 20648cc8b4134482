"""A model's tool-call and reasoning parsers, vLLM's own, run in the worker
on what its engine generates, as `vllm serve --enable-auto-tool-choice
--tool-call-parser X --reasoning-parser Y` runs them in its API server.

A resident whose ModelSpec names parsers keeps their composed vLLM Parser
class (`model_parsers`). Each chat request becomes a `ChatTurn`, which
- refuses a tool_choice the model has no parser for, in vLLM's words;
- has the parsers adjust the request before its SamplingParams are built
  (a forced tool call becomes a structured-output constraint, special
  tokens are kept where the parser reads them);
- tells the engine whether the prompt already ended the reasoning;
- parses each completion with a parser of its own (they keep state): delta
  by delta when streamed, whole at its end when not.
What it produces is protocol data (`protocol.Parsed`): the daemon shapes
the response from it as vLLM's server does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import msgspec

from wcd.workers import protocol as p
from wcd.workers import vllm_seams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelParsers:
    """A resident's parsers: vLLM's Parser class (None: the model has none)
    and what its instances are made with."""

    cls: Any
    auto_tools: bool  # a tool-call parser: vllm serve's --enable-auto-tool-choice
    tokenizer: Any
    model_config: Any

    @property
    def parses_tools(self) -> bool:
        return self.cls is not None and self.cls.tool_parser_cls is not None

    @property
    def counts_reasoning(self) -> bool:
        return self.cls is not None and self.cls.reasoning_parser_cls is not None

    def make(self, tools, chat_template_kwargs: dict):
        return self.cls(self.tokenizer, tools, chat_template_kwargs=chat_template_kwargs,
                        model_config=self.model_config)


def check_names(spec: p.ModelSpec) -> None:
    """Refuse parser names vLLM does not know before any engine is touched."""
    unknown = vllm_seams.unknown_parsers(spec.tool_call_parser, spec.reasoning_parser)
    if unknown:
        raise ValueError(f"{spec.name}: vLLM has no {' and no '.join(unknown)}")


def model_parsers(spec: p.ModelSpec, engine) -> ModelParsers:
    """The parsers of a resident, checked against its tokenizer (ValueError)."""
    return ModelParsers(
        vllm_seams.parser_class(spec.tool_call_parser, spec.reasoning_parser, engine),
        spec.tool_call_parser is not None, engine.renderer.tokenizer, engine.model_config)


def refuse_unparsed_tool_choice(options: p.ChatOptions, parsers: ModelParsers) -> None:
    """A tool_choice that needs a tool-call parser the model lacks is refused
    as vLLM's server refuses it (OnlineRenderer.render_chat), flags and all."""
    choice = options.tool_choice
    if parsers.parses_tools or choice in (None, "none"):
        return
    if choice == "auto":
        if not parsers.auto_tools:
            raise ValueError('"auto" tool choice requires --enable-auto-tool-choice and '
                             "--tool-call-parser to be set")
        return
    described = f'function "{choice["function"]["name"]}"' if isinstance(choice, dict) \
        else f'"{choice}"'
    raise ValueError(f"tool_choice={described} requires --tool-call-parser to be set")


@dataclass
class _Completion:
    """One completion's parser and what it generated so far."""

    parser: Any
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)


class ChatTurn:
    """One chat request to a model with parsers, from its sampling to the
    last parsed Output."""

    def __init__(self, parsers: ModelParsers, request: p.Generate, messages: list[dict],
                 sampling: dict[str, Any]):
        self.parsers = parsers
        self.options = request.chat
        self.request = vllm_seams.chat_request(messages, request.render.tools, self.options,
                                               request.render, request.chat_template_kwargs,
                                               sampling)
        self.template_kwargs = vllm_seams.template_kwargs(self.request)
        self.adjuster = parsers.make(self.request.tools,
                                     vllm_seams.adjusting_template_kwargs(self.request))
        # OnlineRenderer.preprocess_chat's rule; vLLM 0.26's parsers lack
        # always_adjust_request, which is false there.
        if getattr(parsers.cls, "always_adjust_request", False) or \
                parsers.counts_reasoning or self.options.tool_choice != "none":
            self.request = self.adjuster.adjust_request(request=self.request)
        self.completions: dict[int, _Completion] = {}

    @classmethod
    def start(cls, parsers: ModelParsers, request: p.Generate, messages: list[dict],
              sampling: dict[str, Any]) -> ChatTurn | None:
        """The turn of a chat request; None where the model has no parsers.
        A request vLLM would refuse raises ValueError with its message."""
        refuse_unparsed_tool_choice(request.chat, parsers)
        return None if parsers.cls is None else cls(parsers, request, messages, sampling)

    def sampling(self, sampling: dict[str, Any]) -> dict[str, Any]:
        """The sampling fields as the parsers adjusted them."""
        adjusted = {**sampling, "skip_special_tokens": self.request.skip_special_tokens,
                    "spaces_between_special_tokens":
                        self.request.spaces_between_special_tokens}
        adjusted.pop("structured_outputs", None)
        structured = self.request.extract_structured_outputs()
        if structured is not None:
            adjusted["structured_outputs"] = structured
        return adjusted

    def engine_reasoning(self, prompt_token_ids: list[int]) -> dict[str, Any]:
        """What vLLM's server tells the engine about this request's reasoning
        (OpenAIServingChat._engine_reasoning_kwargs)."""
        kwargs = {"chat_template_kwargs": self.template_kwargs} \
            if self.parsers.counts_reasoning else None
        return {"reasoning_ended": vllm_seams.reasoning_ended(self.request, self.adjuster,
                                                              prompt_token_ids),
                "reasoning_parser_kwargs": kwargs}

    def parse(self, completion, prompt_token_ids: list[int]) -> p.Parsed | None:
        """What the parsers make of one completion's new tokens (vLLM's
        CompletionOutput, a delta); a failure is reported, not raised."""
        state = self.completions.get(completion.index)
        if state is None:
            state = self.completions[completion.index] = _Completion(
                self.parsers.make(self.request.tools, self.template_kwargs))
        try:
            return self._parse(state, completion, list(prompt_token_ids))
        except Exception as exc:
            log.exception("the parsers failed on a completion")
            return p.Parsed(error=f"{type(exc).__name__}: {exc}")

    def _parse(self, state: _Completion, completion, prompt_token_ids: list[int]
               ) -> p.Parsed | None:
        finished = completion.finish_reason is not None
        new_ids = list(completion.token_ids)
        started = bool(state.token_ids)
        state.token_ids.extend(new_ids)
        if not self.options.stream:
            state.text.append(completion.text)
            return self._whole(state, prompt_token_ids) if finished else None
        delta = None
        # vLLM's server skips what has no tokens yet (chunked prefill).
        if completion.text or new_ids or started:
            delta = state.parser.parse_delta(
                delta_text=completion.text, delta_token_ids=new_ids, request=self.request,
                prompt_token_ids=prompt_token_ids, finished=finished)
        counted = finished or self.options.continuous_usage
        return p.Parsed(delta=message_delta(delta),
                        reasoning_tokens=self._reasoning_tokens(state) if counted else None)

    def _whole(self, state: _Completion, prompt_token_ids: list[int]) -> p.Parsed:
        # A no-op in 0.32's base parser, absent from 0.26's.
        if hasattr(state.parser, "set_prompt_token_ids"):
            state.parser.set_prompt_token_ids(prompt_token_ids)
        reasoning, content, calls = state.parser.parse(
            "".join(state.text), self.request, enable_auto_tools=self.parsers.auto_tools,
            model_output_token_ids=state.token_ids)
        calls = [p.ToolCall(call.id or vllm_seams.tool_call_id(), call.name, call.arguments)
                 for call in calls or ()]
        return p.Parsed(message=p.ParsedMessage(content, reasoning, calls),
                        reasoning_tokens=self._reasoning_tokens(state))

    def _reasoning_tokens(self, state: _Completion) -> int | None:
        # vLLM 0.26's parsers count no reasoning tokens (its usage has none).
        if not self.parsers.counts_reasoning or \
                not hasattr(state.parser, "count_reasoning_tokens"):
            return None
        return state.parser.count_reasoning_tokens(tuple(state.token_ids))


def message_delta(delta) -> p.MessageDelta | None:
    """vLLM's DeltaMessage with the fields its server's chunk would show
    (set ones, None included; an empty tool_calls dropped)."""
    if delta is None:
        return None
    return msgspec.convert(delta.model_dump(exclude_unset=True), p.MessageDelta)
