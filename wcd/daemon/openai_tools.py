"""Tool calls and reasoning in chat responses, shaped as vLLM's server shapes
them (vLLM 0.32, OpenAIServingChat: chat_completion_full_generator and
chat_completion_stream_generator) from what the model's parsers found in the
worker (protocol.Parsed). Pure functions of a request's ChatOptions.

A tool_choice that needs a tool-call parser never gets here without one: the
worker refuses it, as vLLM's server does.
"""

from __future__ import annotations

from msgspec import UNSET
from msgspec.structs import replace

from wcd.daemon import openai_types as t
from wcd.workers import protocol as p


def message(role: str, parsed: p.ParsedMessage, options: p.ChatOptions
            ) -> tuple[t.ChatMessage, bool]:
    """A whole completion's message, and whether the model chose to call
    tools (tool_choice "auto"), which makes its finish_reason "tool_calls".
    A forced call's content is "" rather than null."""
    reasoning = parsed.reasoning if options.include_reasoning else None
    calls = [t.ToolCall(id=call.id, function=t.FunctionCall(name=call.name,
                                                           arguments=call.arguments))
             for call in parsed.tool_calls]
    if options.parallel_tool_calls is False:
        calls = calls[:1]
    if forced(options):
        return t.ChatMessage(role=role, content=parsed.content or "", reasoning=reasoning,
                             tool_calls=calls or UNSET), False
    if options.tool_choice == "auto" and calls:
        return t.ChatMessage(role=role, content=parsed.content, reasoning=reasoning,
                             tool_calls=calls), True
    return t.ChatMessage(role=role, content=parsed.content, reasoning=reasoning), False


def forced(options: p.ChatOptions) -> bool:
    """tool_choice "required" or a named function."""
    return options.tool_choice == "required" or isinstance(options.tool_choice, dict)


def finish_reason(reason: str | None, called: bool, options: p.ChatOptions) -> str:
    """A whole completion's: "tool_calls" where the model chose to call
    tools, or had to ("required") and stopped; a named call stops."""
    if called or (options.tool_choice == "required" and reason == "stop"):
        return "tool_calls"
    return reason or "stop"


def stream_finish_reason(reason: str, streamed_tools: bool, options: p.ChatOptions) -> str:
    """A stream's last chunk's: "tool_calls" where tool calls were streamed
    and the model stopped, unless the call was named."""
    if streamed_tools and not isinstance(options.tool_choice, dict) and reason == "stop":
        return "tool_calls"
    return reason


def delta(parsed: p.MessageDelta | None, options: p.ChatOptions) -> t.ChatDelta | None:
    """A streamed chunk's delta (None: the parsers held these tokens back);
    with parallel_tool_calls false, only the first call's parts."""
    if parsed is None:
        return None
    calls = parsed.tool_calls
    if options.parallel_tool_calls is False and calls is not UNSET:
        calls = [call for call in calls if call.index == 0]
        parsed = replace(parsed, tool_calls=calls or UNSET)
    return t.ChatDelta(content=parsed.content, reasoning=parsed.reasoning,
                       tool_calls=parsed.tool_calls)
