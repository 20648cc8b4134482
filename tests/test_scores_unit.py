"""Unit tests of /score's and /rerank's request mapping, pairing and response
shapes: no worker process, no vLLM (the scores are made up)."""

from __future__ import annotations

import array

import msgspec
import pytest

from wcd.daemon import errors
from wcd.daemon.openai_scores import RerankRequest, ScoreJob, ScoreRequest
from wcd.daemon.vllm_dialect import VLLM_026, VLLM_032, Dialect
from wcd.workers import protocol as p


def score(dialect: Dialect = VLLM_032, **body) -> ScoreJob:
    return ScoreJob.of(msgspec.json.decode(msgspec.json.encode({"model": "demo", **body}),
                                           type=ScoreRequest), dialect)


def rerank(dialect: Dialect = VLLM_032, **body) -> ScoreJob:
    return ScoreJob.of(msgspec.json.decode(msgspec.json.encode({"model": "demo", **body}),
                                           type=RerankRequest), dialect)


def embedded(index: int, tokens: int, pad_token: bool = False) -> p.Embedding:
    return p.Embedding("r", index, array.array("f", [float(index)]).tobytes(), tokens,
                       pad_token=pad_token)


@pytest.mark.parametrize("body, sides", [
    ({"text_1": "a", "text_2": "b"}, (["a"], ["b"])),
    ({"queries": "a", "documents": ["b", "c"]}, (["a"], ["b", "c"])),
    ({"queries": ["a", "b"], "items": ["c", "d"]}, (["a", "b"], ["c", "d"])),
    ({"data_1": ["a"], "data_2": ["b"], "text_1": "x", "text_2": "y"}, (["a"], ["b"])),
    ({"text_1": {"content": [{"type": "text", "text": "a"}]}, "text_2": "b"},
     ([{"content": [{"type": "text", "text": "a"}]}], ["b"])),
])
def test_a_scores_sides_are_read_in_vllms_order(body, sides):
    command = score(**body).command
    assert (command.score.data_1, command.score.data_2) == sides
    assert (command.endpoint, command.prompts) == ("score", [])


def test_a_scores_fields_travel():
    command = score(text_1="a", text_2="b", max_tokens_per_query=2, max_tokens_per_doc=3,
                    truncate_prompt_tokens=4, use_activation=False).command
    assert (command.score.max_tokens_per_query, command.score.max_tokens_per_doc) == (2, 3)
    assert command.render == p.RenderOptions(add_special_tokens=True, truncate_prompt_tokens=4,
                                             add_generation_prompt=False)
    assert command.pooling == {"use_activation": False}
    assert score(text_1="a", text_2="b", padding="max_length").command.render.padding == \
        "max_length"


@pytest.mark.parametrize("make, body, param", [
    (score, {"text_1": "a"}, None),
    (score, {"text_1": 1, "text_2": "b"}, "text_1"),
    (rerank, {"query": "a"}, "documents"),
    (rerank, {"query": ["a"], "documents": ["b"]}, "query"),
    (score, {"text_1": "a", "text_2": "b", "mm_processor_kwargs": {"a": 1}},
     "mm_processor_kwargs"),
])
def test_malformed_sides_are_refused(make, body, param):
    with pytest.raises(errors.BadRequest) as refused:
        make(**body)
    assert (refused.value.status, refused.value.param) == (400, param)


def test_one_query_pairs_with_every_document_and_many_pair_in_order():
    one = score(queries="q", documents=["a", "b"])
    items = [embedded(2, 1), embedded(0, 1), embedded(1, 1)]  # any order
    vector = [item.data for item in sorted(items, key=lambda item: item.prompt_index)]
    assert one.pairs(items) == [(vector[0], vector[1]), (vector[0], vector[2])]
    many = score(queries=["q", "r"], documents=["a", "b"])
    items.append(embedded(3, 1))
    vector.append(items[-1].data)
    assert many.pairs(items) == [(vector[0], vector[2]), (vector[1], vector[3])]


def test_a_score_response_is_vllms_shape():
    answer = msgspec.to_builtins(score(queries="q", documents=["a", "b"]).response(
        [embedded(0, 1), embedded(1, 2), embedded(2, 3)], [0.5, -0.25]))
    assert list(answer) == ["id", "object", "created", "model", "data", "usage"]
    assert answer["id"].startswith("score-") and answer["object"] == "list"
    assert answer["data"] == [{"index": 0, "object": "score", "score": 0.5},
                              {"index": 1, "object": "score", "score": -0.25}]
    assert answer["usage"] == {"prompt_tokens": 6, "completion_tokens": 0, "total_tokens": 6,
                               "prompt_tokens_details": None, "completion_tokens_details": None}


@pytest.mark.parametrize("pad_token, tokens", [(True, 2 * (1 + 1) + 2 + 3),
                                               (False, 2 * 1 + 2 + 3)])
def test_vllm_026_counts_each_pairs_prompt_joined_by_the_pad_token(pad_token, tokens):
    """Its bi-encoder's usage: each pair's query, pad token and document."""
    items = [embedded(0, 1, pad_token), embedded(1, 2, pad_token), embedded(2, 3, pad_token)]
    answer = msgspec.to_builtins(score(VLLM_026, queries="q", documents=["a", "b"]).response(
        items, [0.5, -0.25]))
    assert answer["usage"] == {"prompt_tokens": tokens, "completion_tokens": 0,
                               "total_tokens": tokens, "prompt_tokens_details": None}
    answer = msgspec.to_builtins(rerank(VLLM_026, query="q", documents=["a", "b"]).response(
        items, [0.5, -0.25]))
    assert answer["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


@pytest.mark.parametrize("top_n, indices", [(0, [1, 2, 0]), (2, [1, 2]), (9, [1, 2, 0])])
def test_a_rerank_ranks_by_score_and_keeps_the_top_n(top_n, indices):
    job = rerank(query="q", documents=["a", "b", "c"], top_n=top_n)
    answer = msgspec.to_builtins(job.response(
        [embedded(i, 1) for i in range(4)], [0.1, 0.9, 0.5]))
    assert list(answer) == ["id", "model", "usage", "results"]
    assert answer["usage"] == {"prompt_tokens": 4, "total_tokens": 4}
    assert [result["index"] for result in answer["results"]] == indices
    assert answer["results"][0] == {"index": 1, "document": {"text": "b", "multi_modal": None},
                                    "relevance_score": 0.9}


def test_every_vllm_request_field_is_known():
    from vllm.entrypoints.pooling.scoring.protocol import (
        RerankRequest as VllmRerank,
        ScoreDataRequest,
        ScoreQueriesDocumentsRequest,
        ScoreQueriesItemsRequest,
        ScoreTextRequest,
    )

    for ours, theirs in ((ScoreRequest, (ScoreDataRequest, ScoreQueriesDocumentsRequest,
                                         ScoreQueriesItemsRequest, ScoreTextRequest)),
                         (RerankRequest, (VllmRerank,))):
        known = {f.name for f in msgspec.structs.fields(ours)}
        for form in theirs:
            assert set(form.model_fields) <= known, (ours, set(form.model_fields) - known)
