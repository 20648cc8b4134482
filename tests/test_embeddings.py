"""/v1/embeddings end to end: the official `openai` client against a real wcd
daemon whose one worker serves the pooling model embed-a (`runner: pooling`)
beside the generating small-a, compared with vLLM's own offline
`LLM(..., runner="pooling").embed()` of each input alone.

Tolerance: wcd and vLLM run the same engine and kernels on the same tokens,
and the vectors measured equal to the bit, batched or not (vLLM's offline
batch too). The model computes in bfloat16, so anything that differs in the
computation (tokens, weights, pooling, normalization) moves components of
these unit vectors (256 of them, ~0.06 each) by a bf16 step of the hidden
states, ~1e-4 or more; 1e-6 leaves room for float32 rounding in the pooler
only.
"""

from __future__ import annotations

import array
import base64
import concurrent.futures
import json
import urllib.error
import urllib.request

import pytest

from conftest import DEMO_MODELS, ENGINE_ARGS, GREEDY, PROMPTS, installed_vllm, run_reference
from daemon_harness import openai_client, serving
from wcd.daemon import vllm_dialect

pytestmark = pytest.mark.vllm

EMBED_ARGS = {**ENGINE_ARGS, "runner": "pooling"}
# embed-a's files as a Matryoshka model, which vLLM lets `dimensions` shorten.
MATRYOSHKA_ARGS = {**EMBED_ARGS, "hf_overrides": {"is_matryoshka": True}}
TOLERANCE = 1e-6
# Each a request: its input, PoolingParams fields and tokenization, as vLLM's
# offline embed() takes them (tests/vllm_reference.py).
CASES = [
    {"input": PROMPTS[0]},
    {"input": PROMPTS[1]},
    {"input": PROMPTS[2]},
    {"input": [462, 397, 399, 381]},  # PROMPTS[1]'s tokens: its vector
    {"input": PROMPTS[2], "pooling": {"use_activation": False}},
    {"input": PROMPTS[2], "tokenization": {"truncate_prompt_tokens": 3}},
]
MATRYOSHKA_CASES = [{"input": PROMPTS[0], "pooling": {"dimensions": 32}},
                    {"input": PROMPTS[1], "pooling": {"dimensions": 256}}]


def vllm_embeddings(name: str, path, engine_args: dict, cases: list[dict]) -> list[dict]:
    """vLLM's own {"embedding", "prompt_tokens"} of each case."""
    spec = {"models": {name: {"path": str(path), "engine_args": engine_args}},
            "embeddings": cases}
    return run_reference(spec)[name]["embeddings"]


@pytest.fixture(scope="module")
def expected(embed_model) -> list[dict]:
    return vllm_embeddings("embed-a", embed_model, EMBED_ARGS, CASES)


@pytest.fixture(scope="module")
def expected_matryoshka(embed_model) -> list[dict]:
    return vllm_embeddings("embed-mrl", embed_model, MATRYOSHKA_ARGS, MATRYOSHKA_CASES)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, demo_models, embed_model, expected, expected_matryoshka, reference):
    """After vLLM's reference runs, if they must run: never two vLLM at once."""
    models = {name: {"path": str(demo_models / name)} for name in DEMO_MODELS}
    models["embed-a"] = {"path": str(embed_model), "runner": "pooling"}
    models["embed-mrl"] = {"path": str(embed_model), "runner": "pooling",
                           "hf_overrides": MATRYOSHKA_ARGS["hf_overrides"]}
    with serving(tmp_path_factory.mktemp("wcd-embeddings"), demo_models,
                 models=models) as daemon:
        yield daemon


@pytest.fixture(scope="module")
def client(daemon):
    return openai_client(daemon)


def body(case: dict) -> dict:
    """The request of a case: vLLM's extras go in the body, as extra_body sends them."""
    return {"input": case["input"], **case.get("pooling", {}), **case.get("tokenization", {})}


def embed(client, case: dict, model: str = "embed-a"):
    request = body(case)
    return client.embeddings.create(model=model, input=request.pop("input"), extra_body=request)


def assert_close(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want)
    assert max(abs(a - b) for a, b in zip(got, want)) <= TOLERANCE


def residents(daemon) -> dict[str, str]:
    (worker,) = daemon.json("ps")["workers"]
    return {r["model"]: r["state"] for r in worker["residents"]}


def post(daemon, path: str, data: dict) -> tuple[int, dict]:
    request = urllib.request.Request(daemon.url + path, data=json.dumps(data).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def test_loads_on_demand_beside_a_generating_model_and_equals_vllm_offline(
        daemon, client, expected):
    assert "embed-a" not in residents(daemon)
    for case, want in zip(CASES, expected):
        reply = embed(client, case)
        (data,) = reply.data
        assert_close(data.embedding, want["embedding"])
        assert (reply.usage.prompt_tokens, reply.usage.total_tokens) == \
            (want["prompt_tokens"], want["prompt_tokens"]), case
        assert reply.model == "embed-a" and data.index == 0
    assert residents(daemon) == {"small-a": "serving", "embed-a": "serving"}


def test_dimensions_shorten_a_matryoshka_models_vectors(expected_matryoshka, client):
    for case, want in zip(MATRYOSHKA_CASES, expected_matryoshka):
        (data,) = embed(client, case, model="embed-mrl").data
        assert len(data.embedding) == case["pooling"]["dimensions"]
        assert_close(data.embedding, want["embedding"])


def test_a_batch_equals_each_input_alone(client, expected):
    reply = client.embeddings.create(model="embed-a", input=[c["input"] for c in CASES[:3]])
    assert [d.index for d in reply.data] == [0, 1, 2]
    for data, want in zip(reply.data, expected):
        assert_close(data.embedding, want["embedding"])
    assert reply.usage.prompt_tokens == sum(want["prompt_tokens"] for want in expected[:3])
    ids = client.embeddings.create(model="embed-a", input=[[462], CASES[3]["input"]])
    assert [d.index for d in ids.data] == [0, 1]
    assert_close(ids.data[1].embedding, expected[3]["embedding"])
    assert ids.usage.prompt_tokens == 1 + expected[3]["prompt_tokens"]


def test_base64_decodes_to_the_same_floats(daemon):
    inputs = [CASES[0]["input"], CASES[1]["input"]]
    status, floats = post(daemon, "/v1/embeddings", {"model": "embed-a", "input": inputs})
    assert status == 200
    status, encoded = post(daemon, "/v1/embeddings", {"model": "embed-a", "input": inputs,
                                                      "encoding_format": "base64"})
    assert status == 200
    for plain, packed in zip(floats["data"], encoded["data"]):
        assert array.array("f", base64.b64decode(packed["embedding"])).tolist() == \
            plain["embedding"]


def test_bytes_in_bfloat16_are_the_floats_rounded(daemon):
    """bfloat16 is float32's upper half: each vector widened back is its
    floats to half a bf16 step (2**-8 relative), where the metadata says."""
    inputs = [CASES[0]["input"], CASES[1]["input"]]
    status, floats = post(daemon, "/v1/embeddings", {"model": "embed-a", "input": inputs})
    assert status == 200
    asked = {"model": "embed-a", "input": inputs, "encoding_format": "bytes",
             "embed_dtype": "bfloat16", "endianness": "little"}
    request = urllib.request.Request(daemon.url + "/v1/embeddings",
                                     data=json.dumps(asked).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        metadata, packed = json.loads(response.headers["metadata"]), response.read()
    for item, plain in zip(metadata["data"], floats["data"]):
        halves = packed[item["start"]:item["end"]]
        widened = array.array("f", b"".join(b"\0\0" + halves[i:i + 2]
                                            for i in range(0, len(halves), 2)))
        assert item["shape"] == [len(plain["embedding"])]
        assert all(abs(got - want) <= abs(want) * 2 ** -8
                   for got, want in zip(widened, plain["embedding"]))


def test_padding_pads_to_the_models_length(daemon):
    status, answer = post(daemon, "/v1/embeddings",
                          {"model": "embed-a", "input": "hi", "padding": "max_length"})
    assert status == 200, answer
    # vLLM 0.26 has no padding, and ignores it
    padded = vllm_dialect.of(installed_vllm()).pooling_padding
    assert answer["usage"]["prompt_tokens"] == (ENGINE_ARGS["max_model_len"] if padded else 1)


def test_the_response_has_vllms_fields(daemon):
    """As vLLM 0.32's api_server answered for embed-a (--runner pooling): the
    same keys, usage with its details null."""
    status, answer = post(daemon, "/v1/embeddings", {"model": "embed-a", "input": "hi"})
    assert status == 200
    assert list(answer) == ["id", "object", "created", "model", "data", "usage"]
    assert answer["id"].startswith("embd-") and answer["object"] == "list"
    assert list(answer["data"][0]) == ["index", "object", "embedding"]
    assert answer["data"][0]["object"] == "embedding"
    assert answer["usage"] == {"prompt_tokens": 1, "completion_tokens": 0, "total_tokens": 1,
                               "prompt_tokens_details": None,
                               "completion_tokens_details": None}


def test_both_models_answer_at_once_from_one_worker(daemon, client, expected, reference):
    def complete(i: int) -> str:
        return client.completions.create(model="small-a", prompt=PROMPTS[i % 3],
                                         **GREEDY).choices[0].text

    def vector(i: int) -> list[float]:
        return embed(client, CASES[i % 3]).data[0].embedding

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        texts = pool.map(complete, range(6))
        vectors = pool.map(vector, range(6))
        for i, (text, got) in enumerate(zip(texts, vectors)):
            assert text == reference["small-a"]["prompts"][i % 3]["text"]
            assert_close(got, expected[i % 3]["embedding"])
    assert residents(daemon).items() >= {("small-a", "serving"), ("embed-a", "serving")}


def test_the_models_list_has_the_embedding_model(client):
    assert {"small-a", "embed-a", "embed-mrl"} <= {m.id for m in client.models.list().data}


@pytest.mark.parametrize("path, request_body, status, message", [
    # vLLM has no route for a task its model does not do: 404, its handlers' words.
    ("/v1/embeddings", {"model": "small-a", "input": "hi"}, 404,
     "The model does not support Embeddings API"),
    ("/pooling", {"model": "small-a", "input": "hi"}, 404,
     "The model does not support Pooling API"),
    ("/score", {"model": "small-a", "text_1": "hi", "text_2": "yo"}, 404,
     "The model does not support Score API"),
    ("/rerank", {"model": "small-a", "query": "hi", "documents": ["yo"]}, 404,
     "The model does not support Rerank (Score) API"),
    ("/v1/completions", {"model": "embed-a", "prompt": "hi"}, 404,
     "The model does not support Completions API"),
    ("/v1/chat/completions", {"model": "embed-a", "messages": [{"role": "user", "content": "hi"}]},
     404, "The model does not support Chat Completions API"),
    # vLLM's refusals, in its words.
    ("/v1/embeddings", {"model": "embed-a", "input": "hi", "dimensions": 8}, 400,
     "Model 'embed-a' does not support Matryoshka embeddings; dimensions must be unset (received "
     "dimensions=8)."),
    ("/v1/embeddings", {"model": "embed-mrl", "input": "hi", "dimensions": 300}, 400,
     "only supports dimensions in range [1, 256], got 300."),
    ("/v1/embeddings", {"model": "embed-a", "input": "hi", "normalize": True}, 400,
     "Parameter `normalize` was removed; use `use_activation` instead. (parameter=normalize)"),
    ("/v1/embeddings", {"model": "embed-a", "input": ""}, 400,
     "The decoder prompt cannot be empty"),
    ("/v1/embeddings", {"model": "embed-a", "input": []}, 400,
     "You must pass at least one prompt"),
    # What both vLLMs' renderers say (0.26 names the 0 output tokens between).
    ("/v1/embeddings", {"model": "embed-a", "input": list(range(600))}, 400,
     "your prompt contains 600 input tokens"),
    ("/v1/embeddings", {"model": "embed-a", "input": [99999]}, 400,
     "Token id 99999 is out of vocabulary"),
    ("/v1/embeddings", {"model": "embed-a", "input": "hi", "truncate_prompt_tokens": 600}, 400,
     "truncate_prompt_tokens value is greater than max_model_len."),
    ("/v1/embeddings", {"model": "nope", "input": "hi"}, 404,
     "The model `nope` does not exist."),
])
def test_refusals(daemon, path, request_body, status, message):
    got, answer = post(daemon, path, request_body)
    assert got == status, answer
    assert message in answer["error"]["message"], answer
