"""POST /score and /rerank (and vLLM's other paths for them, /v1/score,
/v1/rerank, /v2/rerank): vLLM's scoring APIs, as `vllm serve --runner
pooling` serves them for an embedding model, a bi-encoder: each text
embedded alone, a pair's score the cosine similarity of its two vectors.

A request becomes one `Embed` of both sides' items (the worker checks and
truncates them as vLLM does), then one `Similarity` of its pairs in the same
worker, which computes them as vLLM does (torch, float32): the scores are
vLLM's to the bit. Pairs are 1:1, 1:N or N:N, as vLLM pairs them.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import msgspec
from msgspec import UNSET, Meta, Struct

from wcd.daemon import errors
from wcd.daemon import openai_embeddings as emb
from wcd.daemon import openai_types as t
from wcd.daemon.vllm_dialect import VLLM_032, Dialect
from wcd.workers import protocol as p


class ScoreMultiModal(Struct):
    """vLLM's ScoreMultiModalParam: a multi-modal item, which the worker
    refuses for a text-only model in vLLM's words."""

    content: list[dict[str, Any]]


_ScoreInput = str | ScoreMultiModal


class _ScoringRequest(emb.PoolingFields, kw_only=True):
    """vLLM's ScoringRequestMixin."""

    endpoint: ClassVar[str]

    use_activation: bool | None = None
    max_tokens_per_query: int = 0
    max_tokens_per_doc: int = 0
    # vLLM folds these into the chat template's variables, which its
    # bi-encoder scoring renders none of: accepted and ignored.
    instruction: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def sides(self) -> tuple[list[Any], list[Any]]:
        """The two sides' items, each a text or a multi-modal item."""
        raise NotImplementedError

    def command(self, dialect: Dialect) -> p.Embed:
        self.check_cache_salt(dialect)
        self.check_mm_kwargs(dialect)
        data_1, data_2 = self.sides()
        pooling = {} if self.use_activation is None else {"use_activation": self.use_activation}
        render = p.RenderOptions(add_special_tokens=True,
                                 truncate_prompt_tokens=self.truncate_prompt_tokens,
                                 truncation_side=self.truncation_side,
                                 padding=self.padding_for(dialect),
                                 add_generation_prompt=False)
        return p.Embed(f"score-{uuid.uuid4().hex}", self.model, [], pooling, render,
                       endpoint=self.endpoint,
                       score=p.ScoreInputs(data_1, data_2, self.max_tokens_per_query,
                                           self.max_tokens_per_doc))


class ScoreRequest(_ScoringRequest, kw_only=True):
    """vLLM's ScoreRequest: its two sides under any of its four pairs of
    names, taken in vLLM's order; each side one item or a list of them."""

    endpoint: ClassVar[str] = "score"
    _NAMES: ClassVar = (("queries", "documents"), ("queries", "items"), ("data_1", "data_2"),
                        ("text_1", "text_2"))
    # vLLM 0.26's ScoreRequest: a union of one model per pair of names, each
    # merging its instruction into the template's kwargs after validation.
    _MEMBERS: ClassVar = (None,) * len(_NAMES)
    _MEMBER_LOC: ClassVar = ("function-after[_merge_instruction_into_kwargs(), "
                             f"{errors.UNION_MEMBER}]")

    queries: Any = UNSET
    documents: Any = UNSET
    items: Any = UNSET
    data_1: Any = UNSET
    data_2: Any = UNSET
    text_1: Any = UNSET
    text_2: Any = UNSET

    def sides(self) -> tuple[list[Any], list[Any]]:
        for first, second in self._NAMES:
            if getattr(self, first) is not UNSET and getattr(self, second) is not UNSET:
                return _items(self, first, many=True), _items(self, second, many=True)
        raise errors.BadRequest("missing required fields: queries and documents (or items), "
                                "data_1 and data_2, or text_1 and text_2")


class RerankRequest(_ScoringRequest, kw_only=True):
    """vLLM's RerankRequest: one query, its documents ranked."""

    endpoint: ClassVar[str] = "rerank"

    query: Any = UNSET
    documents: Any = UNSET
    top_n: Annotated[int, Meta(ge=0)] = 0

    def sides(self) -> tuple[list[Any], list[Any]]:
        for name in ("query", "documents"):
            if getattr(self, name) is UNSET:
                raise errors.BadRequest(f"missing required field `{name}`", param=name)
        return _items(self, "query", many=False), _items(self, "documents", many=True)


def _items(body: Struct, name: str, many: bool) -> list[Any]:
    """A side as a list of texts and multi-modal items (as JSON)."""
    shape = _ScoreInput | list[_ScoreInput] if many else _ScoreInput
    try:
        given = msgspec.convert(getattr(body, name), shape)
    except msgspec.ValidationError as exc:
        raise errors.BadRequest(f"{name}: {exc}", param=name) from None
    return msgspec.to_builtins(given if isinstance(given, list) else [given])


# ---- responses ------------------------------------------------------------------


class ScoreData(Struct, kw_only=True):
    index: int
    object: str = "score"
    score: float


class ScoreList(Struct, kw_only=True):
    """vLLM's ScoreResponse."""

    id: str
    object: str = "list"
    created: int
    model: str
    data: list[ScoreData]
    usage: t.Usage


class RerankDocument(Struct, kw_only=True):
    text: str | None = None
    multi_modal: list[dict[str, Any]] | None = None


class RerankResult(Struct, kw_only=True):
    index: int
    document: RerankDocument
    relevance_score: float


class RerankUsage(Struct, kw_only=True):
    prompt_tokens: int
    total_tokens: int


class RerankList(Struct, kw_only=True):
    """vLLM's RerankResponse."""

    id: str
    model: str
    usage: RerankUsage
    results: list[RerankResult]


@dataclass(frozen=True)
class ScoreJob(emb.PoolingJob):
    top_n: int = 0  # a rerank's; 0: every document

    @classmethod
    def of(cls, body: ScoreRequest | RerankRequest, dialect: Dialect = VLLM_032) -> ScoreJob:
        return cls(body.command(dialect), dialect, top_n=getattr(body, "top_n", 0))

    @property
    def input_count(self) -> int:
        score = self.command.score
        return len(score.data_1) + len(score.data_2)

    def pairs(self, items: list[p.Embedding]) -> list[tuple[bytes, bytes]]:
        return [(query.data, document.data) for query, document in self._paired(items)]

    def _paired(self, items: list[p.Embedding]) -> list[tuple[p.Embedding, p.Embedding]]:
        """The inputs paired as vLLM pairs them: one query with each
        document, else each query with its document."""
        items = sorted(items, key=lambda item: item.prompt_index)
        count = len(self.command.score.data_1)
        queries, documents = items[:count], items[count:]
        if len(queries) == 1:
            queries = queries * len(documents)
        return list(zip(queries, documents))

    def _usage_tokens(self, items: list[p.Embedding]) -> int:
        if self.dialect.score_usage_of_inputs:
            return sum(item.prompt_tokens for item in items)
        return sum(query.prompt_tokens + query.pad_token + document.prompt_tokens
                   for query, document in self._paired(items))

    def response(self, items: list[p.Embedding], scores: list[float]) -> ScoreList | RerankList:
        tokens = self._usage_tokens(items)
        if self.command.endpoint == "score":
            return ScoreList(id=self.command.request_id, created=self.created, model=self.model,
                             data=[ScoreData(index=i, score=score)
                                   for i, score in enumerate(scores)],
                             usage=emb.pooling_usage(tokens, self.dialect))
        documents = self.command.score.data_2
        results = sorted((RerankResult(index=i, document=_document(documents[i]),
                                       relevance_score=score)
                          for i, score in enumerate(scores)),
                         key=lambda result: result.relevance_score, reverse=True)
        return RerankList(id=self.command.request_id, model=self.model,
                          usage=RerankUsage(prompt_tokens=tokens, total_tokens=tokens),
                          results=results[:self.top_n or len(results)])


def _document(item: Any) -> RerankDocument:
    if isinstance(item, str):
        return RerankDocument(text=item)
    return RerankDocument(multi_modal=item.get("content", []))
