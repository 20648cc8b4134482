"""wcd answers as `vllm serve` does: the same requests to vLLM's own OpenAI
server and to a wcd daemon, both on small-a with the same engine args, give
the same status and the same JSON (ids and timestamps aside), streamed or not.

Greedy decoding on both: the generated tokens, logprobs and text must match
too, since both run the same vLLM on the same weights.

Three pairs of servers, one pair after the other (the two of a pair start
side by side): plain, with parsers (vLLM's `--enable-auto-tool-choice
--tool-call-parser hermes --reasoning-parser qwen3`, wcd's small-a with the
same tool_call_parser and reasoning_parser) for tool calling and reasoning,
and pooling (`--runner pooling` on the
embedding model embed-a, whose vectors and scores must be equal to the bit:
the same engine on the same tokens). The random-weight model calls tools
when a forced tool_choice or a structured output makes it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import jsonschema
import pytest

from conftest import ENGINE_ARGS, ROOT, installed_vllm
from daemon_harness import DEVICE, POLICY, free_port, started

# Fields that differ by construction: ids and clocks.
IGNORED = {"id", "created"}
# Compared only for being there and set: it hashes the model's path, which
# vllm serve takes as given and wcd resolves to its real path (a symlinked
# models directory differs), and the engine config, equal here but not known
# to be on every device.
PRESENCE_ONLY = {"system_fingerprint"}
# Logprobs of the same model on two engines agree to the float; this allows
# for a last-bit difference in a reduction order.
TOLERANCE = 1e-4
# Vectors and scores agree to the bit on the CPU. On CUDA vLLM's server hands
# its engine a batch's requests as they come (a step may take some of them),
# where wcd's worker adds them at once: kernels of another batch shape may
# round a unit vector's component a float32 step apart (seen on a chat batch
# with vLLM 0.26).
POOLING_TOLERANCE = 0.0 if DEVICE == "cpu" else 1e-7


VLLM_026 = tuple(int(part) for part in (installed_vllm() or "0.0").split(".")[:2]) < (0, 27)
# vLLM 0.26 starts each streamed chunk's text_offset at the text so far and
# steps by token within it: offsets follow where the chunks break, so only
# streams cut alike compare them.
OFFSETS_FOLLOW_CHUNKS = VLLM_026
# Requests vLLM 0.26's own server cannot answer, or answers only inside a
# stream already begun: nothing to compare with.
VLLM_026_FAULTS = {
    ("/v1/completions", "beam search n=0"): "its server never answers (beam width 0)",
    ("/v1/completions", "beam search echo logprobs"): "its server answers 500, no message",
    # Its engine's input processor refuses thinking_token_budget on the V2
    # model runner (CUDA's default), after its server has begun the stream
    # (a 200, then an error event); wcd's worker refuses it before, a 400.
    ("/v1/chat/completions", "thinking_token_budget stream"):
        "its GPU model runner refuses it inside a 200 stream",
}
GREEDY = {"temperature": 0}
HI = [{"role": "user", "content": "hi"}]
CONTINUED = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "well"}]
WEATHER = {"type": "function", "function": {
    "name": "weather", "description": "The weather in a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]},
                                         "days": {"type": "integer", "minimum": 1,
                                                  "maximum": 7}},
        "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "time", "parameters": {
        "type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
        "required": ["zone"], "additionalProperties": False}}}
WEATHER_STRICT = {**WEATHER, "function": {**WEATHER["function"], "strict": True}}
TIME_STRICT = {**TIME, "function": {**TIME["function"], "strict": True}}
TOOL_HISTORY = [
    {"role": "user", "content": "weather in Rome?"},
    {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call-1", "type": "function",
        "function": {"name": "weather", "arguments": '{"city": "Rome", "days": 1}'}}]},
    {"role": "tool", "tool_call_id": "call-1", "content": "sunny"}]
PLAIN, PARSERS, POOLING = "plain", "parsers", "pooling"
PARSER_FLAGS = ["--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                "--reasoning-parser", "qwen3", "--trust-request-chat-template"]
WCD_PARSERS = {"tool_call_parser": "hermes", "reasoning_parser": "qwen3"}

BEAMS = {"use_beam_search": True, "n": 2}
COMPLETIONS = {
    "plain": {"prompt": "hello world", "max_tokens": 5},
    "batch": {"prompt": ["hello world", "tell me"], "max_tokens": 3},
    "token ids": {"prompt": [1, 300, 301, 302], "max_tokens": 3},
    "logprobs": {"prompt": "hello world", "max_tokens": 3, "logprobs": 2},
    "echo": {"prompt": "hello world", "max_tokens": 5, "echo": True},
    "echo logprobs": {"prompt": "hello world", "max_tokens": 3, "echo": True, "logprobs": 2},
    "echo only": {"prompt": "hello world", "max_tokens": 0, "echo": True},
    "echo only logprobs": {"prompt": "hello world", "max_tokens": 0, "echo": True,
                           "logprobs": 1},
    "echo token ids": {"prompt": [1, 300, 301, 302], "max_tokens": 3, "echo": True},
    "echo batch": {"prompt": ["hello world", "tell me"], "max_tokens": 2, "echo": True},
    "prompt_logprobs": {"prompt": "hello world", "max_tokens": 3, "prompt_logprobs": 2},
    "return_token_ids": {"prompt": "hello world", "max_tokens": 3, "return_token_ids": True},
    "return_token_ids echo": {"prompt": "hello world", "max_tokens": 3,
                              "return_token_ids": True, "echo": True},
    "no special tokens": {"prompt": "hello world", "max_tokens": 3,
                          "add_special_tokens": False, "return_token_ids": True},
    "truncated": {"prompt": "hello world this is a long prompt with words", "max_tokens": 3,
                  "truncate_prompt_tokens": 3, "return_token_ids": True},
    "truncated left": {"prompt": "hello world this is a long prompt with words",
                       "max_tokens": 3, "truncate_prompt_tokens": 3, "truncation_side": "left",
                       "return_token_ids": True},
    "stop string": {"prompt": "hello world", "max_tokens": 8, "stop": [" 82"]},
    "stream": {"prompt": "hello world", "max_tokens": 3, "stream": True},
    "stream echo logprobs": {"prompt": "hello world", "max_tokens": 3, "echo": True,
                             "logprobs": 1, "stream": True},
    "stream return_token_ids": {"prompt": "hello world", "max_tokens": 3, "stream": True,
                                "return_token_ids": True},
    "return_tokens_as_token_ids": {"prompt": "hello world", "max_tokens": 3, "logprobs": 2,
                                   "return_tokens_as_token_ids": True},
    "return_tokens_as_token_ids echo": {"prompt": "Hello, world! How are you today?",
                                        "max_tokens": 20, "echo": True, "logprobs": 1,
                                        "prompt_logprobs": 1, "return_token_ids": True,
                                        "return_tokens_as_token_ids": True},
    "stream return_tokens_as_token_ids echo": {"prompt": "hello world", "max_tokens": 3,
                                               "echo": True, "logprobs": 1, "stream": True,
                                               "return_tokens_as_token_ids": True},
    "return_tokens_as_token_ids false": {"prompt": "hello world", "max_tokens": 3,
                                         "logprobs": 1, "return_tokens_as_token_ids": False},
    "stream usage": {"prompt": "hello world", "max_tokens": 3, "stream": True,
                     "stream_options": {"include_usage": True,
                                        "continuous_usage_stats": True}},
    # Refusals: same status, same message.
    "stream prompt_logprobs": {"prompt": "hello world", "max_tokens": 3, "stream": True,
                               "prompt_logprobs": 1},
    # vLLM ignores a field it does not know (a misspelt one too).
    "unknown field": {"prompt": "hello", "max_tokens": 3, "max_token": 9, "bogus": {"a": 1}},
    "truncation past the context": {"prompt": "hello", "max_tokens": 3,
                                    "truncate_prompt_tokens": 100000},
    # vLLM bounds truncation by the context less the output asked for.
    "truncation to the context": {"prompt": "hello world", "max_tokens": 3,
                                  "truncate_prompt_tokens": 512, "return_token_ids": True},
    "truncation beside max_tokens": {"prompt": "hello world", "max_tokens": 5,
                                     "truncate_prompt_tokens": 510},
    "empty prompt": {"prompt": "", "max_tokens": 3},
    "suffix": {"prompt": "hello", "max_tokens": 3, "suffix": "world"},
    "empty prompt list": {"prompt": [], "max_tokens": 3},
    "empty cache_salt": {"prompt": "hello", "max_tokens": 3, "cache_salt": ""},
    "cache_salt with a slash": {"prompt": "hello", "max_tokens": 3, "cache_salt": "a/b"},
    "empty prompt and prompt_embeds": {"prompt": None, "prompt_embeds": [], "max_tokens": 3},
    "prompt_embeds": {"prompt": None, "prompt_embeds": "AAAA", "max_tokens": 3},
    "json_schema without its schema": {"prompt": "hello", "max_tokens": 3,
                                       "response_format": {"type": "json_schema"}},
    "logit_bias keys not token ids": {"prompt": "hello", "max_tokens": 3,
                                      "logit_bias": {"x": 1, "7": 2}},
    "logit_bias": {"prompt": "hello", "max_tokens": 3, "logit_bias": {"7": 100}},
    # vLLM 0.32 ignores best_of, and OpenAI's other fields it does not know.
    "best_of": {"prompt": "hello", "max_tokens": 3, "best_of": 3, "store": True,
                "metadata": {"a": 1}, "service_tier": "flex"},
    # Beam search: the best n beams, searched in one-token rounds; the logprobs
    # are each position's 2n, of which the first logprobs+1 are listed.
    "beam search": {"prompt": "hello world", "max_tokens": 5, **BEAMS},
    "beam search batch": {"prompt": ["hello world", "tell me"], "max_tokens": 4, **BEAMS,
                          "n": 3, "logprobs": 2, "return_token_ids": True},
    "beam search length_penalty": {"prompt": "hello world", "max_tokens": 8, **BEAMS,
                                   "length_penalty": 0.3, "include_stop_str_in_output": True,
                                   "return_token_ids": True},
    "beam search ignore_eos": {"prompt": "hello world", "max_tokens": 6, **BEAMS,
                               "ignore_eos": True, "logprobs": 0},
    "beam search echo": {"prompt": [1, 300, 301, 302], "max_tokens": 3, **BEAMS, "echo": True},
    "beam search echo alone": {"prompt": "hello world", "max_tokens": 0, **BEAMS,
                               "echo": True, "return_token_ids": True},
    "beam search prompt_logprobs": {"prompt": "hello world", "max_tokens": 3, **BEAMS,
                                    "prompt_logprobs": 1},
    "beam search ignores sampling fields": {"prompt": "hello world", "max_tokens": 3, **BEAMS,
                                            "top_p": 0.1, "stop": [" "], "min_tokens": 2},
    "beam search stream": {"prompt": "hello world", "max_tokens": 3, **BEAMS, "stream": True},
    "beam search echo logprobs": {"prompt": "hello world", "max_tokens": 3, **BEAMS,
                                  "echo": True, "logprobs": 1},
    "beam search n=0": {"prompt": "hello world", "max_tokens": 3, **BEAMS, "n": 0},
    # Logprobs of chosen tokens at each position, all of them listed.
    "logprob_token_ids": {"prompt": "hello world", "max_tokens": 3, "logprobs": 1,
                          "logprob_token_ids": [7, 300, 301]},
    "logprob_token_ids stream": {"prompt": "hello world", "max_tokens": 3, "logprobs": 0,
                                 "logprob_token_ids": [7, 300], "stream": True},
    "logprob_token_ids echo": {"prompt": "hello world", "max_tokens": 2, "echo": True,
                               "logprobs": 1, "logprob_token_ids": [7, 300]},
    "logprob_token_ids without logprobs": {"prompt": "hello", "max_tokens": 3,
                                           "logprob_token_ids": [7]},
    "logprob_token_ids echo only": {"prompt": "hello", "max_tokens": 0, "echo": True,
                                    "logprobs": 1, "logprob_token_ids": [7]},
    "logprob_token_ids beam search": {"prompt": "hello", "max_tokens": 3, **BEAMS,
                                      "logprobs": 1, "logprob_token_ids": [7]},
    "watermarking without a watermark": {"prompt": "hello world", "max_tokens": 3,
                                         "watermarking": True},
    "extension and transfer arguments": {"prompt": "hello world", "max_tokens": 3,
                                         "vllm_xargs": {"a": 1, "b": ["x", 2.5]},
                                         "kv_transfer_params": {"do_remote_prefill": False},
                                         "ec_transfer_params": {"x": 1}},
    "repetition_detection": {"prompt": "hello world", "max_tokens": 24, "ignore_eos": True,
                             "repetition_detection": {"max_pattern_size": 3,
                                                      "min_count": 2}},
    "repetition_detection refused": {"prompt": "hello", "max_tokens": 3,
                                     "repetition_detection": {"max_pattern_size": 2,
                                                              "min_count": 1}},
    "thinking_token_budget without a reasoning parser": {"prompt": "hello", "max_tokens": 3,
                                                         "thinking_token_budget": 4},
    "thinking_token_budget unlimited": {"prompt": "hello", "max_tokens": 3,
                                        "thinking_token_budget": -1},
    "thinking_token_budget a float": {"prompt": "hello", "max_tokens": 3,
                                      "thinking_token_budget": 1.5},
    "routed_experts_prompt_start": {"prompt": "hello world", "max_tokens": 3,
                                    "routed_experts_prompt_start": 1},
    "routed_experts_prompt_start past the prompt": {"prompt": "hello", "max_tokens": 3,
                                                    "routed_experts_prompt_start": 1000},
    # vLLM's render endpoints' fields, ignored by generation.
    "render fields": {"prompt": "hello world", "max_tokens": 3, "return_token_offsets": True,
                      "mm_payload": "none", "return_mm_kwargs": False},
}
CHATS = {
    "plain": {"messages": HI, "max_tokens": 4},
    "truncation beside max_completion_tokens": {"messages": HI, "max_completion_tokens": 5,
                                                "truncate_prompt_tokens": 510},
    "logprobs": {"messages": HI, "max_tokens": 3, "logprobs": True, "top_logprobs": 2},
    "echo": {"messages": CONTINUED, "max_tokens": 4, "echo": True,
             "add_generation_prompt": False, "continue_final_message": True},
    "echo after a generation prompt": {"messages": HI, "max_tokens": 4, "echo": True},
    "return_token_ids": {"messages": HI, "max_tokens": 4, "return_token_ids": True},
    "prompt_logprobs": {"messages": HI, "max_tokens": 2, "prompt_logprobs": 1},
    "custom role and extra fields": {"messages": [{"role": "narrator", "content": "hi",
                                                   "extra": 1}], "max_tokens": 3},
    "extra content part fields": {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]}],
        "max_tokens": 3},
    "no generation prompt": {"messages": HI, "max_tokens": 3, "add_generation_prompt": False,
                             "return_token_ids": True},
    "special tokens": {"messages": HI, "max_tokens": 3, "add_special_tokens": True,
                       "return_token_ids": True},
    "stream": {"messages": HI, "max_tokens": 3, "stream": True},
    "stream return_token_ids": {"messages": HI, "max_tokens": 3, "return_token_ids": True,
                                "stream": True},
    "return_tokens_as_token_ids": {"messages": HI, "max_tokens": 3, "logprobs": True,
                                   "top_logprobs": 2, "return_tokens_as_token_ids": True},
    "stream return_tokens_as_token_ids": {"messages": HI, "max_tokens": 3, "logprobs": True,
                                          "top_logprobs": 2, "stream": True,
                                          "return_tokens_as_token_ids": True},
    "stream echo": {"messages": CONTINUED, "max_tokens": 3, "echo": True,
                    "add_generation_prompt": False, "continue_final_message": True,
                    "stream": True},
    "both generation prompt and continuation": {"messages": HI, "max_tokens": 4,
                                                "continue_final_message": True},
    "stream usage": {"messages": HI, "max_tokens": 3, "stream": True,
                     "stream_options": {"include_usage": True, "continuous_usage_stats": True}},
    "stream stop string": {"messages": HI, "max_tokens": 8, "stream": True, "stop": ["warm"]},
    # Without a tool-call parser, as vllm serve without one.
    "tools, no tool_choice": {"messages": HI, "max_tokens": 3, "tools": [WEATHER]},
    "tools, tool_choice none": {"messages": HI, "max_tokens": 3, "tools": [WEATHER],
                                "tool_choice": "none", "return_token_ids": True},
    "tool_choice required": {"messages": HI, "max_tokens": 3, "tools": [WEATHER],
                             "tool_choice": "required"},
    "tool_choice named": {"messages": HI, "max_tokens": 3, "tools": [WEATHER],
                          "tool_choice": {"type": "function", "function": {"name": "weather"}}},
    "tools empty": {"messages": HI, "max_tokens": 3, "tools": []},
    "tool_choice without tools": {"messages": HI, "max_tokens": 3, "tool_choice": "auto"},
    "tool_choice unknown": {"messages": HI, "max_tokens": 3, "tools": [WEATHER],
                            "tool_choice": "sometimes"},
    "tool_choice names no tool": {"messages": HI, "max_tokens": 3, "tools": [WEATHER],
                                  "tool_choice": {"type": "function",
                                                  "function": {"name": "time"}}},
    "tool_choice without a function": {"messages": HI, "max_tokens": 3, "tools": [WEATHER],
                                       "tool_choice": {"type": "function"}},
    "tool history": {"messages": TOOL_HISTORY, "max_tokens": 3, "tools": [WEATHER],
                     "tool_choice": "none", "return_token_ids": True},
    "beam search": {"messages": HI, "max_tokens": 4, **BEAMS},
    "beam search logprobs": {"messages": HI, "max_tokens": 3, **BEAMS, "n": 3,
                             "logprobs": True, "top_logprobs": 2, "return_token_ids": True},
    "beam search echo": {"messages": CONTINUED, "max_tokens": 4, **BEAMS, "echo": True,
                         "add_generation_prompt": False, "continue_final_message": True},
    # vLLM streams a chat's beams: each whole, in one chunk, once searched.
    "beam search stream": {"messages": HI, "max_tokens": 4, **BEAMS, "stream": True},
    "beam search stream logprobs": {"messages": HI, "max_tokens": 3, **BEAMS, "stream": True,
                                    "logprobs": True, "top_logprobs": 1,
                                    "return_token_ids": True},
    "beam search stream usage": {"messages": HI, "max_tokens": 3, **BEAMS, "n": 3,
                                 "stream": True, "stream_options": {
                                     "include_usage": True, "continuous_usage_stats": True}},
    "logprob_token_ids": {"messages": HI, "max_tokens": 3, "logprobs": True,
                          "logprob_token_ids": [7, 300]},
    "logprob_token_ids stream": {"messages": HI, "max_tokens": 3, "logprobs": True,
                                 "top_logprobs": 2, "logprob_token_ids": [7, 300, 301],
                                 "stream": True},
    "logprob_token_ids without logprobs": {"messages": HI, "max_tokens": 3,
                                           "logprob_token_ids": [7]},
    "top_logprobs without logprobs": {"messages": HI, "max_tokens": 3, "top_logprobs": 2},
    "top_logprobs below -1": {"messages": HI, "max_tokens": 3, "logprobs": True,
                              "top_logprobs": -2},
    "return_prompt_text": {"messages": HI, "max_tokens": 2, "return_prompt_text": True},
    "stream return_prompt_text": {"messages": HI, "max_tokens": 2, "return_prompt_text": True,
                                  "stream": True},
    # OpenAI's fields vLLM does not know: ignored, whatever they ask for.
    "OpenAI fields vLLM lacks": {"messages": HI, "max_tokens": 3, "store": True,
                                 "metadata": {"a": "b"}, "service_tier": "flex",
                                 "modalities": ["text", "audio"], "audio": {"voice": "x"},
                                 "functions": [{"name": "f", "parameters": {}}],
                                 "function_call": "auto", "prediction": {"type": "content"},
                                 "prompt_cache_key": "k", "safety_identifier": "s"},
    "multimodal options": {"messages": HI, "max_tokens": 3, "mm_processor_kwargs": {"a": 1}},
    "media options": {"messages": HI, "max_tokens": 3, "media_io_kwargs": {"image": {"x": 1}}},
}
# With the parsers. Strict tools: a forced call's arguments follow their schema.
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
TOOLS = {"tools": [WEATHER_STRICT, TIME_STRICT], **NO_THINKING, "max_tokens": 200}
REQUIRED = {**TOOLS, "tool_choice": "required"}
NAMED = {**TOOLS, "tool_choice": {"type": "function", "function": {"name": "weather"}}}
# A structured output that is a hermes call: what makes a random model call a
# tool by itself (tool_choice auto, tools not strict, so no structural tag).
CALLS_TIME = {"tools": [WEATHER, TIME], **NO_THINKING, "max_tokens": 100,
              "structured_outputs": {"regex": r'<tool_call>\{"name": "time", "arguments": '
                                              r'\{"zone": "(UTC|CET)"\}\}</tool_call>'}}
USAGE = {"stream_options": {"include_usage": True, "continuous_usage_stats": True}}
PARSER_CHATS = {
    "reasoning": {"messages": HI, "max_tokens": 6},
    "reasoning stream": {"messages": HI, "max_tokens": 6, "stream": True, **USAGE},
    "reasoning hidden": {"messages": HI, "max_tokens": 6, "include_reasoning": False,
                         "logprobs": True, "return_token_ids": True},
    "reasoning hidden stream": {"messages": HI, "max_tokens": 6, "include_reasoning": False,
                                "logprobs": True, "return_token_ids": True, "stream": True},
    "thinking off": {"messages": HI, "max_tokens": 6, **NO_THINKING},
    "thinking off stream": {"messages": HI, "max_tokens": 6, "stream": True, **NO_THINKING,
                            **USAGE},
    "reasoning echo": {"messages": CONTINUED, "max_tokens": 4, "echo": True,
                       "add_generation_prompt": False, "continue_final_message": True},
    "tool_choice none": {"messages": HI, **TOOLS, "max_tokens": 6, "tool_choice": "none"},
    "tool_choice none stream": {"messages": HI, **TOOLS, "max_tokens": 6,
                                "tool_choice": "none", "stream": True},
    "required": {"messages": HI, **REQUIRED},
    "required stream": {"messages": HI, **REQUIRED, "stream": True, **USAGE},
    "required, one call": {"messages": HI, **REQUIRED, "parallel_tool_calls": False},
    "required, cut short": {"messages": HI, **REQUIRED, "max_tokens": 20},
    "named": {"messages": HI, **NAMED},
    "named stream": {"messages": HI, **NAMED, "stream": True},
    "named with logprobs": {"messages": HI, **NAMED, "logprobs": True, "top_logprobs": 1,
                            "return_token_ids": True},
    "required while thinking": {"messages": HI, **REQUIRED, "max_tokens": 8,
                                "chat_template_kwargs": {}},
    "auto, no call": {"messages": HI, **TOOLS, "max_tokens": 8},
    "auto, no call stream": {"messages": HI, **TOOLS, "max_tokens": 8, "stream": True},
    "auto with a call": {"messages": HI, **CALLS_TIME},
    "auto with a call stream": {"messages": HI, **CALLS_TIME, "stream": True},
    "tool_choice null": {"messages": HI, **TOOLS, "max_tokens": 6, "tool_choice": None},
    "tool_choice null and a structured output": {"messages": HI, **CALLS_TIME,
                                                 "tool_choice": None},
    "tool history": {"messages": TOOL_HISTORY, **TOOLS, "max_tokens": 6,
                     "tool_choice": "none", "return_token_ids": True},
    "named and a structured output": {"messages": HI, **NAMED,
                                      "structured_outputs": {"regex": "[a-z]+"}},
    "named, n=2": {"messages": HI, **NAMED, "n": 2},
    # What the template sees of the tools, in the prompt's tokens.
    "tools in the template": {
        "messages": HI, "max_tokens": 2, "return_token_ids": True, **NO_THINKING,
        "tools": [WEATHER_STRICT, {**TIME, "extra": 1}], "tool_choice": "none",
        "chat_template": "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}"
                         "{{ messages[-1]['content'] }}"},
    "reasoning n=2 stream": {"messages": HI, "max_tokens": 4, "n": 2, "stream": True,
                             "stream_options": {"include_usage": True}},
    "reasoning beam search": {"messages": HI, "max_tokens": 6, **BEAMS},
    "reasoning beam search stream": {"messages": HI, "max_tokens": 6, **BEAMS, "stream": True,
                                     **USAGE},
    "named beam search": {"messages": HI, **NAMED, "max_tokens": 12, **BEAMS},
    # The reasoning parser's think tokens bound the thinking.
    "thinking_token_budget": {"messages": HI, "max_tokens": 10, "thinking_token_budget": 2},
    "thinking_token_budget stream": {"messages": HI, "max_tokens": 10, "stream": True,
                                     "thinking_token_budget": 0},
}

# Whole bodies: no sampling fields, which these endpoints do not take.
OTHERS = {
    ("/tokenize", "prompt"): {"model": "small-a", "prompt": "hello world"},
    ("/tokenize", "prompt, token strings, no special tokens"): {
        "model": "small-a", "prompt": "hello world", "return_token_strs": True,
        "add_special_tokens": False},
    ("/tokenize", "messages"): {"model": "small-a", "messages": HI},
    ("/tokenize", "messages continued"): {"model": "small-a", "messages": CONTINUED,
                                          "add_generation_prompt": False,
                                          "continue_final_message": True},
    ("/tokenize", "without a model"): {"prompt": "hello"},
    ("/tokenize", "both generation prompt and continuation"): {
        "model": "small-a", "messages": HI, "continue_final_message": True},
    ("/tokenize", "unknown model"): {"model": "nope", "prompt": "hello"},
    ("/detokenize", "tokens"): {"model": "small-a", "tokens": [341, 383, 921, 272]},
    ("/detokenize", "without a model"): {"tokens": [341, 383]},
    ("/invocations", "completion"): {"model": "small-a", "prompt": "hello world",
                                     "max_tokens": 3, "temperature": 0},
    ("/invocations", "chat"): {"model": "small-a", "messages": HI, "max_tokens": 3,
                               "temperature": 0},
    ("/v1/completions", "without a model"): {"prompt": "hello world", "max_tokens": 3,
                                             "temperature": 0},
}


# embed-a's, as vLLM's pooling server answers them: every form of an
# embedding request, chats rendered with the model's chat template (or the
# request's, which both servers trust here), its pooling and its scoring
# (bi-encoder) endpoints.
SECOND = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "yo"}]
DOCUMENTS = ["yo", "the quick brown fox", "hi", "tell me a story about llamas"]
POOLING_CASES = {
    ("/v1/embeddings", "text"): {"input": "hello world"},
    ("/v1/embeddings", "chat"): {"messages": HI},
    ("/v1/embeddings", "chat, base64"): {"messages": HI, "encoding_format": "base64"},
    ("/v1/embeddings", "chat batch"): {"messages": [HI, SECOND]},
    ("/v1/embeddings", "chat in input"): {"input": SECOND},
    ("/v1/embeddings", "chat batch in input"): {"input": [HI, SECOND]},
    ("/v1/embeddings", "chat and input"): {"input": "hello world", "messages": HI},
    ("/v1/embeddings", "chat of text parts"): {
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
    ("/v1/embeddings", "chat, generation prompt"): {"messages": HI,
                                                    "add_generation_prompt": True},
    ("/v1/embeddings", "chat continued"): {"messages": CONTINUED,
                                           "continue_final_message": True},
    ("/v1/embeddings", "chat, special tokens"): {"messages": HI, "add_special_tokens": True},
    ("/v1/embeddings", "chat truncated"): {"messages": SECOND, "truncate_prompt_tokens": 3,
                                           "truncation_side": "left"},
    ("/v1/embeddings", "chat, no activation"): {"messages": HI, "use_activation": False},
    ("/v1/embeddings", "chat, request template and kwargs"): {
        "messages": SECOND, "chat_template_kwargs": {"greeting": "hello"},
        "chat_template": "{{ greeting }}{% for m in messages %}|{{ m.content }}{% endfor %}"},
    ("/v1/embeddings", "chat, dimensions"): {"messages": HI, "dimensions": 8},
    ("/v1/embeddings", "chat, both prompts"): {"messages": HI, "add_generation_prompt": True,
                                               "continue_final_message": True},
    ("/v1/embeddings", "empty chat"): {"messages": []},
    ("/v1/embeddings", "chat too long"): {"messages": [{"role": "user",
                                                        "content": "hello " * 600}]},
    ("/pooling", "text"): {"input": "hello world"},
    ("/pooling", "batch"): {"input": ["hello world", "tell me"]},
    ("/pooling", "token ids batch"): {"input": [[462, 397, 399], [381]]},
    ("/pooling", "base64"): {"input": "hello world", "encoding_format": "base64"},
    ("/pooling", "no activation, truncated"): {"input": "the quick brown fox",
                                               "use_activation": False,
                                               "truncate_prompt_tokens": 2},
    ("/pooling", "chat"): {"messages": SECOND, "add_generation_prompt": True},
    ("/pooling", "task embed"): {"input": "hi", "task": "embed"},
    ("/pooling", "task of another pooler"): {"input": "hi", "task": "token_embed"},
    ("/pooling", "unsupported task"): {"input": "hi", "task": "classify"},
    ("/pooling", "removed task"): {"input": "hi", "task": "encode"},
    ("/pooling", "plugin data"): {"data": "x"},
    ("/pooling", "dimensions"): {"input": "hi", "dimensions": 8},
    ("/pooling", "too long"): {"input": list(range(600))},
    ("/pooling", "unknown model"): {"model": "nope", "input": "hi"},
    # vLLM's encodings (the worker's tensor2binary): a float ignores the dtype.
    ("/v1/embeddings", "float, a dtype"): {"input": "hello world", "embed_dtype": "float16",
                                           "endianness": "big"},
    ("/v1/embeddings", "base64 float32 big"): {"input": "hello world", "encoding_format": "base64",
                                               "endianness": "big"},
    ("/v1/embeddings", "base64 float16"): {"input": "hello world", "encoding_format": "base64",
                                           "embed_dtype": "float16"},
    ("/v1/embeddings", "base64 bfloat16 little"): {"input": ["hello world", "tell me"],
                                                   "encoding_format": "base64",
                                                   "embed_dtype": "bfloat16",
                                                   "endianness": "little"},
    ("/v1/embeddings", "base64 fp8_e4m3"): {"messages": HI, "encoding_format": "base64",
                                            "embed_dtype": "fp8_e4m3"},
    ("/v1/embeddings", "base64 fp8_e5m2 big"): {"input": "hello world",
                                                "encoding_format": "base64",
                                                "embed_dtype": "fp8_e5m2", "endianness": "big"},
    ("/v1/embeddings", "bytes"): {"input": ["hello world", "tell me"], "encoding_format": "bytes"},
    ("/v1/embeddings", "bytes bfloat16 big"): {"input": ["hello world", "tell me"],
                                               "encoding_format": "bytes",
                                               "embed_dtype": "bfloat16", "endianness": "big"},
    ("/v1/embeddings", "bytes fp8_e4m3, dimensions"): {"messages": [HI, SECOND],
                                                       "encoding_format": "bytes",
                                                       "embed_dtype": "fp8_e4m3",
                                                       "dimensions": 8},
    ("/v1/embeddings", "bytes_only float16 little"): {"input": ["hello world", "tell me"],
                                                      "encoding_format": "bytes_only",
                                                      "embed_dtype": "float16",
                                                      "endianness": "little"},
    ("/pooling", "base64 bfloat16 big"): {"input": "hello world", "encoding_format": "base64",
                                          "embed_dtype": "bfloat16", "endianness": "big"},
    ("/pooling", "bytes float16"): {"input": ["hello world", "tell me"],
                                    "encoding_format": "bytes", "embed_dtype": "float16"},
    ("/pooling", "bytes_only fp8_e5m2"): {"input": "hello world", "encoding_format": "bytes_only",
                                          "embed_dtype": "fp8_e5m2"},
    # Padding to the model's length with the pad token (0.26 ignores it).
    ("/v1/embeddings", "padding"): {"input": "hello world", "padding": "max_length"},
    ("/v1/embeddings", "no padding"): {"input": "hello world", "padding": "do_not_pad"},
    ("/v1/embeddings", "chat padded"): {"messages": HI, "padding": "max_length"},
    ("/v1/embeddings", "padding, truncated"): {"input": "the quick brown fox",
                                               "padding": "max_length",
                                               "truncate_prompt_tokens": 2},
    ("/v1/embeddings", "padding, too long"): {"input": list(range(600)),
                                              "padding": "max_length"},
    ("/pooling", "token ids padded"): {"input": [[462, 397, 399], [381]], "padding": "max_length"},
    ("/score", "padding"): {"text_1": "hi", "text_2": ["yo", "tell me"],
                            "padding": "max_length"},
    # Every pooling request's cache_salt validator.
    ("/v1/embeddings", "empty cache_salt"): {"input": "hi", "cache_salt": ""},
    ("/v1/embeddings", "chat, cache_salt with a slash"): {"messages": HI, "cache_salt": "a/b"},
    ("/pooling", "empty cache_salt"): {"input": "hi", "cache_salt": ""},
    ("/score", "empty cache_salt"): {"text_1": "hi", "text_2": "yo", "cache_salt": ""},
    ("/rerank", "cache_salt"): {"query": "hi", "documents": ["yo"], "cache_salt": "salt"},
    # A request's multi-modal kwargs, refused as by a server without
    # --trust-request-mm-kwargs (0.26 takes them, a text model ignores them).
    ("/v1/embeddings", "mm_processor_kwargs"): {"input": "hi", "mm_processor_kwargs": {"a": 1}},
    ("/v1/embeddings", "empty mm_processor_kwargs"): {"input": "hi", "mm_processor_kwargs": {}},
    ("/v1/embeddings", "chat, mm_processor_kwargs"): {"messages": HI,
                                                      "mm_processor_kwargs": {"a": 1}},
    ("/v1/embeddings", "media_io_kwargs"): {"input": "hi", "media_io_kwargs": {"image": {"x": 1}}},
    ("/v1/embeddings", "chat, media_io_kwargs"): {"messages": HI,
                                                  "media_io_kwargs": {"image": {"x": 1}}},
    ("/v1/embeddings", "mm_processor_kwargs, unknown model"): {"model": "nope", "input": "hi",
                                                               "mm_processor_kwargs": {"a": 1}},
    ("/pooling", "mm_processor_kwargs"): {"input": "hi", "mm_processor_kwargs": {"a": 1}},
    ("/score", "mm_processor_kwargs"): {"text_1": "hi", "text_2": "yo",
                                        "mm_processor_kwargs": {"a": 1}},
    ("/score", "1:1"): {"text_1": "hi", "text_2": "yo"},
    ("/score", "1:N"): {"queries": "hi", "documents": DOCUMENTS},
    ("/score", "N:N"): {"queries": ["hi", "a"], "items": ["yo", "b"]},
    ("/score", "data, a list of one"): {"data_1": ["hello world"], "data_2": DOCUMENTS},
    ("/score", "truncated"): {"text_1": "hello world there", "text_2": "the quick brown fox",
                              "max_tokens_per_query": 1, "max_tokens_per_doc": 2},
    ("/score", "truncated prompts"): {"text_1": "hello world", "text_2": "quick brown fox",
                                      "truncate_prompt_tokens": 1, "truncation_side": "left"},
    ("/score", "no activation"): {"text_1": "hi", "text_2": DOCUMENTS, "use_activation": False},
    ("/score", "instruction"): {"text_1": "hi", "text_2": "yo", "instruction": "compare"},
    ("/v1/score", "1:N"): {"text_1": "hi", "text_2": DOCUMENTS},
    ("/score", "N:M"): {"data_1": ["hi", "a"], "data_2": DOCUMENTS},
    ("/score", "no queries"): {"text_1": [], "text_2": "yo"},
    ("/score", "no documents"): {"text_1": "hi", "text_2": []},
    ("/score", "multi-modal"): {"text_1": {"content": [{"type": "text", "text": "hi"}]},
                                "text_2": "yo"},
    ("/score", "query limit past the model's"): {"text_1": "hi", "text_2": "yo",
                                                 "max_tokens_per_query": 600},
    ("/score", "negative document limit"): {"text_1": "hi", "text_2": "yo",
                                            "max_tokens_per_doc": -1},
    ("/score", "truncation past the model's"): {"text_1": "hi", "text_2": "yo",
                                                "truncate_prompt_tokens": 600},
    ("/score", "too long"): {"text_1": "hi", "text_2": "hello " * 600},
    ("/score", "unknown model"): {"model": "nope", "text_1": "hi", "text_2": "yo"},
    ("/rerank", "documents"): {"query": "hi", "documents": DOCUMENTS},
    ("/rerank", "top 2"): {"query": "hi", "documents": DOCUMENTS, "top_n": 2},
    ("/rerank", "top past the documents"): {"query": "hi", "documents": DOCUMENTS, "top_n": 9},
    ("/rerank", "one document"): {"query": "hi", "documents": "yo"},
    ("/rerank", "no documents"): {"query": "hi", "documents": []},
    ("/v1/rerank", "documents"): {"query": "the quick brown fox", "documents": DOCUMENTS},
    ("/v2/rerank", "documents"): {"query": "hello world", "documents": DOCUMENTS},
    ("/rerank", "unknown model"): {"model": "nope", "query": "hi", "documents": ["yo"]},
    ("/invocations", "embedding"): {"input": "hello world"},
    ("/invocations", "rerank"): {"query": "hi", "documents": DOCUMENTS},
    ("/invocations", "score"): {"text_1": "hi", "text_2": DOCUMENTS},
}


@pytest.fixture(scope="module")
def flavor(request) -> str:
    """PLAIN, PARSERS or POOLING: which pair of servers a test talks to (one
    pair at a time: pytest groups the tests by it)."""
    return request.param


@pytest.fixture(scope="module")
def vllm_url(flavor, wcd_daemon, demo_models, tmp_path_factory):
    """vLLM's own OpenAI server on the flavor's model, as `vllm serve` runs it,
    started while wcd's daemon comes up: the pair is ready in the time of the
    slower (each start is mostly one busy core)."""
    port = free_port()
    model = _MODEL[flavor]
    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(demo_models / model), "--served-model-name", model,
            "--port", str(port), *_VLLM_FLAGS.get(flavor, ())]
    for key, value in ENGINE_ARGS.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    log_path = tmp_path_factory.mktemp("vllm") / "server.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, server, log_path)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def _wait_ready(url: str, server: subprocess.Popen, log_path) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        assert server.poll() is None, log_path.read_text()[-4000:]
        try:
            with urllib.request.urlopen(url + "/health", timeout=5):
                return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.5)
    raise AssertionError(f"vLLM's server never came up:\n{log_path.read_text()[-4000:]}")


_MODEL = {PLAIN: "small-a", PARSERS: "small-a", POOLING: "embed-a"}
_VLLM_FLAGS = {PARSERS: PARSER_FLAGS,
               POOLING: ["--runner", "pooling", "--trust-request-chat-template"]}
_WCD_MODEL_ARGS = {PARSERS: WCD_PARSERS, POOLING: {"runner": "pooling"}}


@pytest.fixture(scope="module")
def wcd_daemon(flavor, demo_models, tmp_path_factory, request):
    """wcd's daemon for the flavor, started, not yet serving."""
    if flavor == POOLING:
        request.getfixturevalue("embed_model")
    # small-a alone, as vLLM serves it: refusals name the models served.
    model = _MODEL[flavor]
    models = {model: {"path": str(demo_models / model), **_WCD_MODEL_ARGS.get(flavor, {})}}
    http = {"host": "127.0.0.1", "port": free_port(),
            "trust_request_chat_template": flavor in (PARSERS, POOLING)}
    with started(tmp_path_factory.mktemp("wcd"), demo_models, models=models, http=http,
                 preload=[model], policy={**POLICY, "max_resident": 1}) as daemon:
        yield daemon


@pytest.fixture(scope="module")
def wcd_url(flavor, wcd_daemon):
    wcd_daemon.wait_serving(_MODEL[flavor])
    return wcd_daemon.url


@pytest.mark.parametrize("flavor", [PLAIN], indirect=True)
@pytest.mark.parametrize("path, name", [
    *(("/v1/completions", name) for name in COMPLETIONS),
    *(("/v1/chat/completions", name) for name in CHATS),
    *OTHERS])
def test_answers_as_vllm_serve(vllm_url, wcd_url, path, name):
    if VLLM_026 and (path, name) in VLLM_026_FAULTS:
        pytest.skip(f"vLLM 0.26: {VLLM_026_FAULTS[path, name]}")
    body = OTHERS.get((path, name)) or {
        "model": "small-a", **GREEDY, **(COMPLETIONS if path == "/v1/completions" else CHATS)[name]}
    _assert_same_answer(vllm_url, wcd_url, path, body)


@pytest.mark.parametrize("flavor", [PARSERS], indirect=True)
@pytest.mark.parametrize("name", PARSER_CHATS)
def test_tools_and_reasoning_as_vllm_serve(vllm_url, wcd_url, name):
    if VLLM_026 and ("/v1/chat/completions", name) in VLLM_026_FAULTS:
        pytest.skip(f"vLLM 0.26: {VLLM_026_FAULTS['/v1/chat/completions', name]}")
    body = {"model": "small-a", **GREEDY, **PARSER_CHATS[name]}
    _assert_same_answer(vllm_url, wcd_url, "/v1/chat/completions", body)


@pytest.mark.parametrize("flavor", [POOLING], indirect=True)
@pytest.mark.parametrize("path, name", POOLING_CASES)
def test_pooling_answers_as_vllm_serve(vllm_url, wcd_url, path, name):
    body = {"model": "embed-a", **POOLING_CASES[path, name]}
    _assert_same_answer(vllm_url, wcd_url, path, body, tolerance=POOLING_TOLERANCE)


# wcd alone, on the parsers pair's daemon.


@pytest.mark.parametrize("flavor", [PARSERS], indirect=True)
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("forced", [REQUIRED, NAMED], ids=["required", "named"])
def test_a_forced_call_of_a_random_model_is_valid(wcd_url, forced, stream):
    """tool_choice required or named: the call's arguments are JSON that
    satisfies its tool's schema, whatever the weights."""
    _needs_vllm_032_calls()
    body = {"model": "small-a", **GREEDY, "messages": HI, **forced, "stream": stream}
    status, answer = _post(wcd_url, "/v1/chat/completions", body)
    assert status == 200, answer
    calls = _calls(answer, stream)
    assert len(calls) == 1, answer
    (call,) = calls
    schemas = {tool["function"]["name"]: tool["function"]["parameters"]
               for tool in forced["tools"]}
    if isinstance(forced["tool_choice"], dict):
        assert call["name"] == forced["tool_choice"]["function"]["name"]
    jsonschema.validate(json.loads(call["arguments"]), schemas[call["name"]])
    assert call["id"].startswith("chatcmpl-tool-")


@pytest.mark.parametrize("flavor", [PARSERS], indirect=True)
@pytest.mark.parametrize("stream", [False, True])
def test_auto_finds_the_call_the_model_made(wcd_url, stream):
    """tool_choice auto: the hermes parser finds the <tool_call> a structured
    output made the model write, and the answer is that call."""
    _needs_vllm_032_calls()
    body = {"model": "small-a", **GREEDY, "messages": HI, **CALLS_TIME, "stream": stream}
    status, answer = _post(wcd_url, "/v1/chat/completions", body)
    assert status == 200, answer
    calls = _calls(answer, stream)
    assert len(calls) == 1, answer
    (call,) = calls
    assert call["name"] == "time"
    assert json.loads(call["arguments"]) in ({"zone": "UTC"}, {"zone": "CET"})
    if not stream:
        assert answer["choices"][0]["message"]["content"] is None
        assert answer["choices"][0]["finish_reason"] == "tool_calls"
    else:
        assert answer[-1]["choices"][0]["finish_reason"] == "tool_calls"


def _calls(answer, stream: bool) -> list[dict]:
    """The tool calls of the first choice as {id, name, arguments}, a
    stream's deltas put together."""
    if not stream:
        return [{"id": call["id"], **call["function"]}
                for call in answer["choices"][0]["message"].get("tool_calls", [])]
    calls: dict[int, dict] = {}
    for chunk in answer:
        for part in (chunk["choices"] or [{}])[0].get("delta", {}).get("tool_calls", []):
            call = calls.setdefault(part["index"], {"id": "", "name": "", "arguments": ""})
            call["id"] += part.get("id") or ""
            call["name"] += part.get("function", {}).get("name") or ""
            call["arguments"] += part.get("function", {}).get("arguments") or ""
    return [calls[index] for index in sorted(calls)]


def _unordered_lists(message: str) -> str:
    """A message with each Python list in it sorted: vLLM lists a model's
    supported tasks from a set, in an order that differs by process."""
    return re.sub(r"\[([^\[\]]*)\]",
                  lambda m: "[" + ", ".join(sorted(m.group(1).split(", "))) + "]", message)


def _assert_same_answer(vllm_url: str, wcd_url: str, path: str, body: dict,
                        tolerance: float = TOLERANCE) -> None:
    expected, got = _answer(vllm_url, path, body), _answer(wcd_url, path, body)
    assert got[0] == expected[0], (expected, got)
    if expected[0] != 200:
        assert _unordered_lists(got[1]["error"]["message"]) == \
            _unordered_lists(expected[1]["error"]["message"])
    elif body.get("stream") and len(expected[1]) != len(got[1]):
        # On a busy machine vLLM's AsyncLLM hands its server the deltas of
        # several steps at once, in fewer chunks: then what they carry, chunk
        # boundaries aside, must be the same.
        assert _differences(_merged(expected[1]), _merged(got[1]), tolerance) == []
    else:
        assert _differences(expected[1], got[1], tolerance) == []


def _needs_vllm_032_calls() -> None:
    if VLLM_026:
        pytest.skip("vLLM 0.26's own server answers these without a tool call: the parity "
                    "cases 'required', 'named' and 'auto with a call' compare wcd with it")


def _merged(chunks: list[dict]) -> dict:
    """A stream's choices, each one chunk: texts and argument fragments joined
    (null where every part was), tool calls by index, logprobs (a
    completion's each list of them) and token ids concatenated, the last
    finish; and the last usage."""
    choices: dict[int, dict] = {}
    for chunk in chunks:
        for part in chunk["choices"]:
            into = choices.setdefault(part["index"], {"delta": {}, "logprobs": [],
                                                      "token_ids": []})
            logprobs = part.get("logprobs") or {}
            if "delta" in part:
                _join(into["delta"], part["delta"])
                into["logprobs"] += logprobs.get("content") or []
            else:
                _join(into["delta"], {"text": part["text"]})
                for key, values in logprobs.items():
                    if not (key == "text_offset" and OFFSETS_FOLLOW_CHUNKS):
                        into.setdefault(key, []).extend(values)
            into["token_ids"] += part.get("token_ids") or []
            for key in ("finish_reason", "stop_reason"):
                if part.get(key) is not None:
                    into[key] = part[key]
    usages = [chunk["usage"] for chunk in chunks if chunk.get("usage")]
    return {"choices": choices, "usage": usages[-1] if usages else None}


def _join(into: dict, delta: dict) -> None:
    for key, value in delta.items():
        if key == "tool_calls":
            calls = into.setdefault(key, {})
            for call in value:
                _join(calls.setdefault(call["index"], {}), call)
        elif isinstance(value, dict):
            _join(into.setdefault(key, {}), value)
        elif isinstance(value, str) and key not in ("role", "type", "id"):
            into[key] = (into.get(key) or "") + value
        else:
            into.setdefault(key, value)


def _answer(url: str, path: str, body: dict) -> tuple[int, object]:
    status, answer = _post(url, path, body)
    return status, _without_ignored(answer)


def _post(url: str, path: str, body: dict) -> tuple[int, object]:
    """The status and the JSON answer: a list of chunks where streamed."""
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            status, data = response.status, response.read()
            if response.headers.get_content_type() == "application/octet-stream":
                return status, _octets(response.headers, data)
            text = data.decode()
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
    if body.get("stream"):
        return status, [json.loads(line[6:]) for line in text.splitlines()
                        if line.startswith("data: ") and line != "data: [DONE]"]
    return status, json.loads(text)


def _octets(headers, data: bytes) -> dict:
    """A bytes encoding's answer: its body, and its metadata header as JSON."""
    metadata = headers.get("metadata")
    return {"content-type": headers["Content-Type"], "body": data.hex(),
            "metadata": None if metadata is None else json.loads(metadata)}


def _without_ignored(value):
    if isinstance(value, dict):
        return {k: v is not None if k in PRESENCE_ONLY else _without_ignored(v)
                for k, v in value.items() if k not in IGNORED}
    if isinstance(value, list):
        return [_without_ignored(v) for v in value]
    return value


def _differences(expected, got, tolerance: float = TOLERANCE, where: str = "") -> list[str]:
    if isinstance(expected, float) and isinstance(got, float):
        return [] if abs(expected - got) <= tolerance else [f"{where}: {expected} != {got}"]
    if type(expected) is not type(got):
        return [f"{where}: {expected!r} != {got!r}"]
    if isinstance(expected, dict):
        return [d for key in sorted(set(expected) | set(got)) for d in (
            _differences(expected[key], got[key], tolerance, f"{where}.{key}")
            if key in expected and key in got
            else [f"{where}.{key}: only on {'vLLM' if key in expected else 'wcd'}"])]
    if isinstance(expected, list):
        if len(expected) != len(got):
            return [f"{where}: {len(expected)} items != {len(got)}"]
        return [d for i, (e, g) in enumerate(zip(expected, got))
                for d in _differences(e, g, tolerance, f"{where}[{i}]")]
    return [] if expected == got else [f"{where}: {expected!r} != {got!r}"]
