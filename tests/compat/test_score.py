"""Ports vLLM's tests/entrypoints/openai/test_score.py and test_rerank.py for
whatever embedding model the server lists (a bi-encoder: vLLM's own cases
include one, BAAI/bge-base-en-v1.5). vLLM's compare each score with the
cosine similarity of Hugging Face's embeddings of the pair; here, with that
of the server's own /v1/embeddings vectors, which is what a bi-encoder's
score is. The cross-encoder and template cases need a reranker: not ported."""

from __future__ import annotations

import numpy as np
import pytest

QUERY = "What is the capital of France?"
DOCUMENTS = ["The capital of Brazil is Brasilia.", "The capital of France is Paris."]


def _embeddings(http, model: str, texts: list[str]) -> list[np.ndarray]:
    response = http.post("/v1/embeddings", json={"model": model, "input": texts,
                                                 "encoding_format": "float"})
    response.raise_for_status()
    return [np.array(item["embedding"]) for item in response.json()["data"]]


def _cosines(http, model: str, pairs: list[tuple[str, str]]) -> list[float]:
    def cosine(a: np.ndarray, b: np.ndarray) -> float:
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    return [cosine(*_embeddings(http, model, list(pair))) for pair in pairs]


def _score(http, model: str, text_1, text_2, **extra):
    return http.post("/score", json={"model": model, "text_1": text_1, "text_2": text_2,
                                     **extra})


@pytest.mark.parametrize("text_1, text_2, pairs", [
    (QUERY, DOCUMENTS, [(QUERY, DOCUMENTS[0]), (QUERY, DOCUMENTS[1])]),
    (["What is the capital of the United States?", QUERY], DOCUMENTS,
     [("What is the capital of the United States?", DOCUMENTS[0]), (QUERY, DOCUMENTS[1])]),
    (QUERY, DOCUMENTS[1], [(QUERY, DOCUMENTS[1])]),
], ids=["text_1_str_text_2_list", "text_1_list_text_2_list", "text_1_str_text_2_str"])
def test_score(http, embedding_model, text_1, text_2, pairs):
    response = _score(http, embedding_model, text_1, text_2)
    response.raise_for_status()
    score = response.json()
    assert score["id"] is not None
    assert [item["index"] for item in score["data"]] == list(range(len(pairs)))
    assert [item["score"] for item in score["data"]] == \
        pytest.approx(_cosines(http, embedding_model, pairs), rel=0.01)


def test_score_max_model_len(http, embedding_model):
    card = next(card for card in http.get("/v1/models").json()["data"]
                if card["id"] == embedding_model)
    too_long = QUERY * card["max_model_len"]
    response = _score(http, embedding_model, too_long, DOCUMENTS)
    assert response.status_code == 400
    assert "Please reduce the length of the input" in response.text
    response = _score(http, embedding_model, QUERY, DOCUMENTS,
                      truncate_prompt_tokens=card["max_model_len"] + 1)
    assert response.status_code == 400
    assert "Please request a smaller truncation size." in response.text


def _rerank(http, model: str, **body):
    return http.post("/rerank", json={"model": model, "query": QUERY, "documents": DOCUMENTS,
                                      **body})


def test_rerank_texts(http, embedding_model):
    response = _rerank(http, embedding_model)
    response.raise_for_status()
    rerank = response.json()
    assert rerank["id"] is not None
    assert len(rerank["results"]) == 2
    expected = _cosines(http, embedding_model, [(QUERY, d) for d in DOCUMENTS])
    scores = [result["relevance_score"] for result in rerank["results"]]
    assert scores == sorted(scores, reverse=True)
    for result in rerank["results"]:
        assert result["document"]["text"] == DOCUMENTS[result["index"]]
        assert result["relevance_score"] == pytest.approx(expected[result["index"]], rel=0.01)


def test_top_n(http, embedding_model):
    response = _rerank(http, embedding_model, top_n=1,
                       documents=[*DOCUMENTS, "Cross-encoder models are neat"])
    response.raise_for_status()
    rerank = response.json()
    assert len(rerank["results"]) == 1
    usage = rerank["usage"]
    assert usage["prompt_tokens"] == usage["total_tokens"] > 0


def test_rerank_max_model_len(http, embedding_model):
    card = next(card for card in http.get("/v1/models").json()["data"]
                if card["id"] == embedding_model)
    response = http.post("/rerank", json={"model": embedding_model,
                                          "query": QUERY * card["max_model_len"],
                                          "documents": DOCUMENTS})
    assert response.status_code == 400
    assert "Please reduce the length of the input" in response.text
