"""The compatibility suite's fixtures: vLLM's own OpenAI-server tests
(vllm-project/vllm tests/entrypoints/openai/, ported in the test_*.py beside
this file) against any server.

With WCD_COMPAT_BASE_URL set, the suite runs against that server and model
(WCD_COMPAT_MODEL, default small-a; the embedding cases against
WCD_COMPAT_EMBEDDING_MODEL, else a served model that embeds, else they skip)
and expects every case to pass: that is how bench/compat.py calibrates it on
vLLM's own api_server. Without it, one wcd daemon serving the demo models is
started for the whole package, and the cases known_gaps.py lists are expected
to fail (strict xfail: a gap that closes fails the run until it leaves the
list); its timing-sensitive cases may fail, as they may on any server.

The tokenizer and vocabulary size some cases compare with come from the
model's directory: WCD_COMPAT_MODEL_DIR, else models/<model> of this checkout.
"""

from __future__ import annotations

import json
import os
import socket
import urllib.parse
from pathlib import Path
from typing import NamedTuple

import openai
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import DEMO_MODELS, MODELS
from daemon_harness import POLICY, free_port, serving

from .known_gaps import KNOWN_GAPS, TIMING_SENSITIVE

BASE_URL = os.environ.get("WCD_COMPAT_BASE_URL", "").rstrip("/")
MODEL = os.environ.get("WCD_COMPAT_MODEL", "small-a")
API_KEY = os.environ.get("WCD_COMPAT_API_KEY", "EMPTY")
TIMEOUT_S = 120
# Cases that pass a chat template of their own need a server that trusts
# request templates (vllm serve --trust-request-chat-template).
HTTP = {"host": "127.0.0.1", "trust_request_chat_template": True}


class Target(NamedTuple):
    url: str
    model: str
    embedding_model: str | None  # None: find one among the served models


def _package_items(items: list[pytest.Item]) -> list[pytest.Item]:
    here = Path(__file__).parent
    return [item for item in items if item.path.is_relative_to(here)]


def case_id(item: pytest.Item) -> str:
    """An item's id relative to this package, as known_gaps.py names it."""
    return item.nodeid.split("compat/", 1)[1]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    for item in _package_items(items):
        if not BASE_URL:
            # Every case needs the daemon this package starts, with real vLLM workers.
            item.add_marker(pytest.mark.vllm)
            case = case_id(item)
            if case in KNOWN_GAPS:
                item.add_marker(pytest.mark.xfail(strict=True,
                                                  reason=f"wcd gap: {KNOWN_GAPS[case]}"))
            elif case in TIMING_SENSITIVE:
                item.add_marker(pytest.mark.xfail(strict=False,
                                                  reason=f"timing: {TIMING_SENSITIVE[case]}"))


@pytest.fixture(scope="package")
def target(request, tmp_path_factory) -> Target:
    if BASE_URL:
        yield Target(BASE_URL, MODEL, os.environ.get("WCD_COMPAT_EMBEDDING_MODEL"))
        return
    demo_models = request.getfixturevalue("demo_models")
    models = {name: {"path": str(demo_models / name)} for name in DEMO_MODELS}
    # As bench/compat.py's vllm serve: --enable-auto-tool-choice --tool-call-parser hermes.
    models["small-a"]["tool_call_parser"] = "hermes"
    # The pooling demo model, where this checkout's demo models include it
    # (make models); two residents, so that neither evicts the other.
    embedding = "embed-a" if (demo_models / "embed-a" / "config.json").is_file() else None
    if embedding:
        models[embedding] = {"path": str(demo_models / embedding), "runner": "pooling"}
    with serving(tmp_path_factory.mktemp("wcd-compat"), demo_models, models=models,
                 http={**HTTP, "port": free_port()},
                 policy={**POLICY, "max_resident": 2}) as daemon:
        yield Target(daemon.url, "small-a", embedding)


@pytest.fixture(scope="package")
def base_url(target) -> str:
    return target.url


@pytest.fixture(scope="package")
def model(target) -> str:
    return target.model


@pytest.fixture(scope="package")
def client_with(base_url):
    """A client of the server that gives up after `timeout` seconds."""
    def make(timeout: float) -> openai.OpenAI:
        return openai.OpenAI(base_url=base_url + "/v1", api_key=API_KEY, max_retries=0,
                             timeout=timeout)
    return make


@pytest.fixture(scope="package")
def client(client_with) -> openai.OpenAI:
    return client_with(TIMEOUT_S)


class Http(requests.Session):
    """Raw requests to the server: for what the openai client would not send."""

    def __init__(self, base_url: str):
        super().__init__()
        self.base_url = base_url
        self.headers["Authorization"] = f"Bearer {API_KEY}"

    def request(self, method, path, *args, **kwargs):
        kwargs.setdefault("timeout", TIMEOUT_S)
        return super().request(method, self.base_url + path, *args, **kwargs)


@pytest.fixture(scope="package")
def http(base_url) -> Http:
    with Http(base_url) as session:
        yield session


@pytest.fixture(scope="package")
def metric_samples(http, model):
    """Reads the model's samples on /metrics (buckets left out), summed over
    their other labels."""
    def read() -> dict[str, float]:
        response = http.get("/metrics")
        assert response.status_code == 200
        totals: dict[str, float] = {}
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                if sample.labels.get("model_name", model) == model and "le" not in sample.labels:
                    totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
        return totals
    return read


@pytest.fixture(scope="package")
def post_unread(base_url):
    """Sends a JSON POST without reading the answer; returns the socket, so
    the caller can hang up as a client that gives up does."""
    url = urllib.parse.urlsplit(base_url)

    def post(path: str, body: dict) -> socket.socket:
        data = json.dumps(body).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                f"Authorization: Bearer {API_KEY}\r\n\r\n")
        sock = socket.create_connection((url.hostname, url.port))
        sock.sendall(head.encode() + data)
        return sock
    return post


@pytest.fixture(scope="package")
def model_dir(model) -> Path:
    directory = Path(os.environ.get("WCD_COMPAT_MODEL_DIR") or MODELS / model)
    if not (directory / "config.json").is_file():
        pytest.skip(f"no local copy of {model}'s files (set WCD_COMPAT_MODEL_DIR)")
    return directory


@pytest.fixture(scope="package")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


@pytest.fixture(scope="package")
def vocab_size(model_dir) -> int:
    """The model's vocabulary, as vLLM's ModelConfig.get_vocab_size reads it."""
    return json.loads((model_dir / "config.json").read_text())["vocab_size"]


@pytest.fixture(scope="package")
def max_model_len(http, model) -> int:
    response = http.get("/v1/models")
    response.raise_for_status()
    return next(card["max_model_len"] for card in response.json()["data"]
                if card["id"] == model)


@pytest.fixture(scope="package")
def embedding_model(target, http) -> str:
    """A model the server embeds with: the target's, else the first served
    model that answers /v1/embeddings. Models a wcd card shows as not loaded
    are not tried, so the probe brings none in."""
    if target.embedding_model:
        return target.embedding_model
    for card in http.get("/v1/models").json()["data"]:
        if card.get("state", "serving") != "serving":
            continue
        probe = http.post("/v1/embeddings", json={"model": card["id"], "input": "hi"})
        if probe.status_code == 200:
            return card["id"]
    pytest.skip("the server lists no embedding model")


# vLLM's tests/entrypoints/conftest.py samples for structured outputs.
@pytest.fixture(scope="package")
def sample_json_schema() -> dict:
    return {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "skills": {"type": "array", "items": {"type": "string", "maxLength": 10},
                       "minItems": 3},
            "work_history": {"type": "array", "items": {
                "type": "object",
                "properties": {"company": {"type": "string"}, "duration": {"type": "number"},
                               "position": {"type": "string"}},
                "required": ["company", "position"]}},
        },
        "required": ["name", "age", "skills", "work_history"],
    }


@pytest.fixture(scope="package")
def sample_regex() -> str:
    return r"((25[0-5]|(2[0-4]|1\d|[1-9]|)\d)\.){3}(25[0-5]|(2[0-4]|1\d|[1-9]|)\d)"


@pytest.fixture(scope="package")
def sample_structured_outputs_choices() -> list[str]:
    return ["Python", "Java", "JavaScript", "C++", "C#", "PHP", "TypeScript", "Ruby", "Swift",
            "Kotlin"]
