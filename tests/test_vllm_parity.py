"""wcd answers as `vllm serve` does: the same requests to vLLM's own OpenAI
server and to a wcd daemon, both on small-a with the same engine args, give
the same status and the same JSON (ids and timestamps aside), streamed or not.

Greedy decoding on both: the generated tokens, logprobs and text must match
too, since both run the same vLLM on the same weights.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from conftest import ENGINE_ARGS, ROOT
from daemon_harness import POLICY, free_port, serving

# Fields that differ by construction: ids, clocks, and server-wide settings.
IGNORED = {"id", "created", "system_fingerprint", "service_tier", "kv_transfer_params",
           "ec_transfer_params", "metrics", "prompt_text", "routed_experts"}
# Logprobs of the same model on two engines agree to the float; this allows
# for a last-bit difference in a reduction order.
TOLERANCE = 1e-4
GREEDY = {"temperature": 0}
HI = [{"role": "user", "content": "hi"}]
CONTINUED = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "well"}]

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
    "stream usage": {"prompt": "hello world", "max_tokens": 3, "stream": True,
                     "stream_options": {"include_usage": True,
                                        "continuous_usage_stats": True}},
    # Refusals: same status, same message.
    "stream prompt_logprobs": {"prompt": "hello world", "max_tokens": 3, "stream": True,
                               "prompt_logprobs": 1},
    "truncation past the context": {"prompt": "hello", "max_tokens": 3,
                                    "truncate_prompt_tokens": 100000},
    "empty prompt": {"prompt": "", "max_tokens": 3},
    "suffix": {"prompt": "hello", "max_tokens": 3, "suffix": "world"},
    "empty prompt list": {"prompt": [], "max_tokens": 3},
    "empty prompt and prompt_embeds": {"prompt": None, "prompt_embeds": [], "max_tokens": 3},
    "prompt_embeds": {"prompt": None, "prompt_embeds": "AAAA", "max_tokens": 3},
    "json_schema without its schema": {"prompt": "hello", "max_tokens": 3,
                                       "response_format": {"type": "json_schema"}},
    "logit_bias keys not token ids": {"prompt": "hello", "max_tokens": 3,
                                      "logit_bias": {"x": 1, "7": 2}},
    "logit_bias": {"prompt": "hello", "max_tokens": 3, "logit_bias": {"7": 100}},
    # vLLM 0.32 ignores best_of.
    "best_of": {"prompt": "hello", "max_tokens": 3, "best_of": 3},
}
CHATS = {
    "plain": {"messages": HI, "max_tokens": 4},
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
    "stream echo": {"messages": CONTINUED, "max_tokens": 3, "echo": True,
                    "add_generation_prompt": False, "continue_final_message": True,
                    "stream": True},
    "both generation prompt and continuation": {"messages": HI, "max_tokens": 4,
                                                "continue_final_message": True},
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


@pytest.fixture(scope="module")
def vllm_url(demo_models, tmp_path_factory):
    """vLLM's own OpenAI server on small-a, as `vllm serve` runs it."""
    port = free_port()
    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(demo_models / "small-a"), "--served-model-name", "small-a",
            "--port", str(port)]
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


@pytest.fixture(scope="module")
def wcd_url(demo_models, tmp_path_factory):
    # small-a alone, as vLLM serves it: refusals name the models served.
    with serving(tmp_path_factory.mktemp("wcd"), demo_models,
                 models={"small-a": {"path": str(demo_models / "small-a")}},
                 policy={**POLICY, "max_resident": 1}) as daemon:
        yield daemon.url


@pytest.mark.parametrize("path, name", [
    *(("/v1/completions", name) for name in COMPLETIONS),
    *(("/v1/chat/completions", name) for name in CHATS),
    *OTHERS])
def test_answers_as_vllm_serve(vllm_url, wcd_url, path, name):
    body = OTHERS.get((path, name)) or {
        "model": "small-a", **GREEDY, **(COMPLETIONS if path == "/v1/completions" else CHATS)[name]}
    expected, got = _answer(vllm_url, path, body), _answer(wcd_url, path, body)
    assert got[0] == expected[0], (expected, got)
    if expected[0] == 200:
        assert _differences(expected[1], got[1]) == []
    else:
        assert got[1]["error"]["message"] == expected[1]["error"]["message"]


def _answer(url: str, path: str, body: dict) -> tuple[int, object]:
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
    if body.get("stream"):
        return status, [_without_ignored(json.loads(line[6:])) for line in text.splitlines()
                        if line.startswith("data: ") and line != "data: [DONE]"]
    return status, _without_ignored(json.loads(text))


def _without_ignored(value):
    if isinstance(value, dict):
        return {k: _without_ignored(v) for k, v in value.items() if k not in IGNORED}
    if isinstance(value, list):
        return [_without_ignored(v) for v in value]
    return value


def _differences(expected, got, where: str = "") -> list[str]:
    if isinstance(expected, float) and isinstance(got, float):
        return [] if abs(expected - got) <= TOLERANCE else [f"{where}: {expected} != {got}"]
    if type(expected) is not type(got):
        return [f"{where}: {expected!r} != {got!r}"]
    if isinstance(expected, dict):
        return [d for key in sorted(set(expected) | set(got)) for d in (
            _differences(expected[key], got[key], f"{where}.{key}")
            if key in expected and key in got
            else [f"{where}.{key}: only on {'vLLM' if key in expected else 'wcd'}"])]
    if isinstance(expected, list):
        if len(expected) != len(got):
            return [f"{where}: {len(expected)} items != {len(got)}"]
        return [d for i, (e, g) in enumerate(zip(expected, got))
                for d in _differences(e, g, f"{where}[{i}]")]
    return [] if expected == got else [f"{where}: {expected!r} != {got!r}"]
