"""POST /v1/embeddings and POST /pooling: OpenAI's embeddings API and vLLM's
generic pooling API, as `vllm serve --runner pooling` serves them for an
embedding model, for the pooling models among the configured ones.

A request becomes one `Embed`, its inputs sharing one set of pooling
parameters; the worker answers one `Embedding` per input (its vector's bytes,
float32 for JSON floats, else in the request's embed_dtype and endianness,
which only the worker's vLLM can encode), and the response is assembled here
in vLLM's shape (`id` "embd-..." or "pooling-...", `data` in input order,
`usage` with prompt and total tokens), or as vLLM's bytes encodings send it.
Checking values is vLLM's business, in the worker (dimensions against the
model's Matryoshka support, lengths, token ids, /pooling's task); shapes are
checked here, as openai_types does for the generation endpoints.
"""

from __future__ import annotations

import array
import base64
import itertools
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from wcd.daemon import errors
from wcd.daemon import openai_types as t
from wcd.daemon.vllm_dialect import VLLM_032, Dialect
from wcd.workers import protocol as p

class PoolingFields(Struct, kw_only=True):
    """vLLM's PoolingBasicRequestMixin: the fields of every pooling request.
    Without `model`, wcd's default model (openai_api). Unknown fields are
    ignored, as vLLM ignores them."""

    model: str | None = None
    # Accepted and ignored: it changes nothing about the vectors.
    user: str | None = None
    # vLLM's fields, honoured.
    truncate_prompt_tokens: Annotated[int, Meta(ge=-1)] | None = None
    truncation_side: Literal["left", "right"] | None = None
    # vLLM's fields that only tag the request (wcd has no priority scheduling,
    # and a salt only keys the prefix cache): accepted and ignored.
    request_id: str | None = None
    priority: Annotated[int, Meta(ge=-(2 ** 63), le=2 ** 63 - 1)] = 0
    cache_salt: str | None = None
    # vLLM's, honoured as the worker's vLLM takes it (Dialect.pooling_padding).
    padding: Literal["max_length", "do_not_pad"] | None = None
    # vLLM's, which its server refuses but empty without
    # --trust-request-mm-kwargs (Dialect.refuses_request_mm_kwargs); its
    # chat requests declare media_io_kwargs, and the others keep it as an
    # extra field, which it checks as well.
    mm_processor_kwargs: dict[str, Any] | None = None
    media_io_kwargs: dict[str, dict[str, Any]] | None = None
    # vLLM's request union this request's endpoint takes (none: one model):
    # each member, the required field it misses or None; where pydantic
    # locates a member's errors.
    _MEMBERS: ClassVar[tuple[str | None, ...]] = ()
    _MEMBER_LOC: ClassVar[str] = errors.UNION_MEMBER

    def check_mm_kwargs(self, dialect: Dialect) -> None:
        t.check_mm_kwargs(dialect, self.mm_processor_kwargs, self.media_io_kwargs)

    def check_cache_salt(self, dialect: Dialect) -> None:
        """vLLM's check_cache_salt_support, every pooling request's validator,
        which every member of its request union runs before its fields'."""
        t.check_cache_salt(self.cache_salt, dialect, members=(None,) * len(self._MEMBERS),
                           member=self._MEMBER_LOC)

    def padding_for(self, dialect: Dialect) -> str | None:
        return self.padding if dialect.pooling_padding else None


class EmbeddingRequest(PoolingFields, kw_only=True):
    """vLLM's EmbeddingRequest, each of its forms: inputs (EmbeddingCompletion-
    Request), or chats (EmbeddingChatRequest and its batch, in `messages` or
    in `input`)."""

    endpoint: ClassVar[str] = "embeddings"
    # vLLM's request union, each member the field it requires of a chat in
    # `messages`, or None (the chat members): EmbeddingCompletionRequest,
    # then its four chat requests.
    _MEMBERS: ClassVar[tuple[str | None, ...]] = ("input", None, None, None, None)

    # A text, a list of token ids, a batch of either, or a chat's messages or
    # a batch of chats (vLLM's *ChatInputRequest); checked in prompts().
    input: str | list[Any] | UnsetType = UNSET
    # A chat's messages, or a batch of chats; where set, `input` is not read.
    messages: list[Any] | UnsetType = UNSET
    encoding_format: Literal["float", "base64", "bytes", "bytes_only"] = "float"
    dimensions: int | None = None
    # Unset: vLLM's default for the form, True for inputs, False for chats
    # (whose template writes its own).
    add_special_tokens: bool | None = None
    use_activation: bool | None = None
    # vLLM's chat fields (ChatRequestOptionsMixin), honoured; a request's own
    # template only where the operator trusts them.
    add_generation_prompt: bool = False
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # The base64 and bytes encodings' (a float is sent as vLLM's float32).
    embed_dtype: p.EmbedDType = "float32"
    endianness: p.Endianness = "native"
    # Removed from vLLM, which refuses it by name (reject_removed_pooling_parameters).
    normalize: bool | None | UnsetType = UNSET

    def check(self, dialect: Dialect) -> None:
        """vLLM's request validators first, then what its server checks."""
        self.check_removed()
        self.check_cache_salt(dialect)
        if self.continue_final_message and self.add_generation_prompt:
            # Each chat member's validator refuses it, and the other members
            # miss their fields where this body lacks them too (else vLLM
            # 0.26 takes it as one of those, or lists their own errors, which
            # wcd does not word).
            missed = all(getattr(self, name) is UNSET for name in self._MEMBERS if name)
            raise errors.ValidatorRefusal("Cannot set both `continue_final_message` and "
                                          "`add_generation_prompt` to True.",
                                          members=self._MEMBERS if missed else ())
        self.check_fields(dialect)

    def check_removed(self) -> None:
        """vLLM's reject_removed_pooling_parameters, the request union's own
        validator: before its members'."""
        if self.normalize is not UNSET:
            raise errors.ValidatorRefusal("Parameter `normalize` was removed; use "
                                          "`use_activation` instead.", "normalize")

    def check_fields(self, dialect: Dialect) -> None:
        if self.input is UNSET and self.messages is UNSET:
            raise errors.BadRequest("missing required field `input`", param="input")
        t.check_template_kwargs(self.chat_template_kwargs)
        self.check_mm_kwargs(dialect)

    def prompts(self) -> list[p.Prompt]:
        chats = self._chats()
        if chats is not None:
            return [p.Prompt(messages=messages) for messages in chats]
        return [p.Prompt(prompt=item) if isinstance(item, str) else p.Prompt(prompt_token_ids=item)
                for item in self._inputs()]

    def is_chat(self) -> bool:
        return self._chats() is not None

    def _chats(self) -> list[list[dict[str, Any]]] | None:
        """The chats to embed, as vLLM's request forms read them: `messages`
        is one chat or a batch of them; `input` is only where every item is
        a message (or every item a list of them); None: no chat."""
        if self.messages is not UNSET:
            given = self.messages
            if given and all(isinstance(item, list) for item in given):
                return [_messages(chat, "messages") for chat in given]
            return [_messages(given, "messages")]
        given = self.input
        if isinstance(given, list) and given and all(map(_is_message, given)):
            return [_messages(given, "input")]
        if isinstance(given, list) and given and all(
                isinstance(item, list) and item and all(map(_is_message, item))
                for item in given):
            return [_messages(chat, "input") for chat in given]
        return None

    def _inputs(self) -> list[str | list[int]]:
        """As vLLM's prompt_to_seq: a list of ints is one input; an empty list
        is no input at all, refused in vLLM's words."""
        given = self.input
        if isinstance(given, str) or (given and all(_is_int(item) for item in given)):
            return [given]
        if not given:
            raise errors.VllmBadRequest("You must pass at least one prompt", param="input")
        if all(isinstance(item, str) for item in given) or all(
                isinstance(item, list) and all(map(_is_int, item)) for item in given):
            return given
        raise errors.BadRequest("input must be a string, a list of token ids, a list of "
                                "either (a batch), or chat messages", param="input")

    def render(self, dialect: Dialect) -> p.RenderOptions:
        """How the inputs become tokens; add_special_tokens at its form's default."""
        add_special = self.add_special_tokens
        return p.RenderOptions(
            add_special_tokens=(not self.is_chat()) if add_special is None else add_special,
            truncate_prompt_tokens=self.truncate_prompt_tokens,
            truncation_side=self.truncation_side,
            padding=self.padding_for(dialect),
            add_generation_prompt=self.add_generation_prompt,
            continue_final_message=self.continue_final_message)

    def template(self, trusted: bool) -> str | None:
        return t.request_template(self.chat_template, self.chat_template_kwargs, trusted)

    def template_kwargs(self) -> dict[str, Any]:
        return {key: value for key, value in (self.chat_template_kwargs or {}).items()
                if key != "chat_template"}

    def pooling(self) -> dict[str, Any]:
        """vLLM PoolingParams fields for what the client set, and only that."""
        return {name: value for name in ("dimensions", "use_activation")
                if (value := getattr(self, name)) is not None}

    def command(self, trust_templates: bool, dialect: Dialect) -> p.Embed:
        """The checked request as the worker takes it (its model the client's
        name until a worker serves it)."""
        self.check(dialect)
        binary = {} if self.encoding_format == "float" else {
            "embed_dtype": self.embed_dtype, "endianness": self.endianness}
        return p.Embed(f"{_ID_PREFIXES[self.endpoint]}-{uuid.uuid4().hex}", self.model,
                       self.prompts(), self.pooling(), self.render(dialect),
                       self.template_kwargs(), self.template(trust_templates), self.endpoint,
                       self._task(), **binary)

    def _task(self) -> str | None:
        return None


class PoolingRequest(EmbeddingRequest, kw_only=True):
    """vLLM's PoolingRequest as its server takes it for an embedding model:
    PoolingCompletionRequest (`input`) or PoolingChatRequest (`messages`,
    one chat); its IOProcessorRequest (`data`) needs an IO processor plugin,
    which wcd has none of, and is refused in vLLM's words."""

    endpoint: ClassVar[str] = "pooling"
    # PoolingCompletionRequest, PoolingChatRequest, IOProcessorRequest.
    _MEMBERS: ClassVar[tuple[str | None, ...]] = ("input", None, "data")

    task: str | None = None
    data: Any = UNSET

    def check_removed(self) -> None:
        super().check_removed()
        if self.task in _REMOVED_TASKS:
            raise errors.ValidatorRefusal(_REMOVED_TASKS[self.task], "task")

    def check_fields(self, dialect: Dialect) -> None:
        if self.task is not None and self.task not in _POOLING_TASKS:
            raise errors.BadRequest(f"task must be one of {list(_POOLING_TASKS)}", param="task")
        # ServingPooling._verify_pooling_task's, the model's task aside (the
        # worker's, which knows it).
        named = dialect.serving_refusals_name_parameter
        if self.dimensions is not None:
            raise errors.serving_refusal("dimensions is currently not supported",
                                         "dimensions", named)
        if self.task == "plugin" or (self.data is not UNSET and self.input is UNSET
                                     and self.messages is UNSET):
            raise errors.serving_refusal(
                "No IOProcessor plugin installed. Please refer to the documentation and to "
                "the 'prithvi_geospatial_mae_io_processor' offline inference example for "
                "more details.", "task", named)
        super().check_fields(dialect)

    def _chats(self) -> list[list[dict[str, Any]]] | None:
        """One chat, in `messages` only (PoolingChatRequest)."""
        if self.messages is UNSET:
            return None
        return [_messages(self.messages, "messages")]

    def _task(self) -> str | None:
        return self.task


_ID_PREFIXES = {"embeddings": "embd", "pooling": "pooling"}
# vLLM's PoolingTask values, and the removed ones it refuses by name.
_POOLING_TASKS = ("embed", "classify", "token_embed", "token_classify", "plugin",
                  "embed&token_classify")
_REMOVED_TASKS = {"score": "`score` task was removed; use `classify` instead.",
                  "encode": "`encode` task was removed; use `token_embed` or "
                            "`token_classify` instead."}


def _is_int(item: Any) -> bool:
    return isinstance(item, int) and not isinstance(item, bool)


def _is_message(item: Any) -> bool:
    """vLLM's _is_chat_message: what makes an input a chat's."""
    return isinstance(item, dict) and isinstance(item.get("role"), str)


def _messages(chat: Any, field: str) -> list[dict[str, Any]]:
    """A chat's messages as wcd's chat completions take them (their fields
    vLLM's; others dropped)."""
    try:
        return msgspec.to_builtins(msgspec.convert(chat, list[t.Message]))
    except msgspec.ValidationError as exc:
        raise errors.BadRequest(f"{field}: {exc}", param=field) from None


# ---- responses ------------------------------------------------------------------


class EmbeddingData(Struct, kw_only=True):
    index: int
    object: Literal["embedding"] = "embedding"
    # The vector, or with encoding_format base64 its bytes (embed_dtype,
    # endianness) in base64.
    embedding: list[float] | str


class EmbeddingList(Struct, kw_only=True):
    """vLLM's EmbeddingResponse."""

    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[EmbeddingData]
    usage: t.Usage


class PoolingData(Struct, kw_only=True):
    index: int
    object: Literal["pooling"] = "pooling"
    # As EmbeddingData's embedding.
    data: list[float] | str


class PoolingList(Struct, kw_only=True):
    """vLLM's PoolingResponse."""

    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[PoolingData]
    usage: t.Usage


def pooling_usage(tokens: int, dialect: Dialect) -> t.Usage:
    """vLLM's pooling endpoints' usage: their details null, not absent
    (completion_tokens_details where its UsageInfo has them)."""
    usage = t.Usage(prompt_tokens=tokens, completion_tokens=0, total_tokens=tokens,
                    prompt_tokens_details=None)
    if dialect.completion_tokens_details:
        usage.completion_tokens_details = None
    return usage


@dataclass(frozen=True)
class PoolingJob:
    """A checked request, ready to send once a worker serves its model."""

    command: p.Embed  # its model is the client's name until a worker serves it
    dialect: Dialect = VLLM_032
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def model(self) -> str:
        return self.command.model

    def request(self, served: str) -> p.Embed:
        return msgspec.structs.replace(self.command, model=served)


@dataclass(frozen=True)
class VectorBytes:
    """vLLM's bytes and bytes_only answers (build_pooling_bytes_streaming_
    response): the vectors' bytes end to end, application/octet-stream, and
    for bytes a `metadata` header saying where each lies, JSON as vLLM's
    json.dumps writes it."""

    body: bytes
    metadata: str | None


@dataclass(frozen=True)
class EmbedJob(PoolingJob):
    encoding_format: str = "float"

    @classmethod
    def of(cls, body: EmbeddingRequest, trust_templates: bool = False,
           dialect: Dialect = VLLM_032) -> EmbedJob:
        return cls(body.command(trust_templates, dialect), dialect,
                   encoding_format=body.encoding_format)

    def response(self, items: list[p.Embedding]) -> EmbeddingList | PoolingList | VectorBytes:
        items = sorted(items, key=lambda item: item.prompt_index)
        tokens = sum(item.prompt_tokens for item in items)
        if self.encoding_format in ("bytes", "bytes_only"):
            return self._bytes(items, tokens)
        head = {"id": self.command.request_id, "created": self.created, "model": self.model,
                "usage": pooling_usage(tokens, self.dialect)}
        if self.command.endpoint == "pooling":
            return PoolingList(**head, data=[
                PoolingData(index=item.prompt_index, data=self._vector(item.data))
                for item in items])
        return EmbeddingList(**head, data=[
            EmbeddingData(index=item.prompt_index, embedding=self._vector(item.data))
            for item in items])

    def _vector(self, data: bytes) -> list[float] | str:
        if self.encoding_format == "base64":
            return base64.b64encode(data).decode("ascii")
        return array.array("f", data).tolist()

    def _bytes(self, items: list[p.Embedding], tokens: int) -> VectorBytes:
        """As encode_pooling_bytes lays them out, in input order."""
        body = b"".join(item.data for item in items)
        if self.encoding_format == "bytes_only":
            return VectorBytes(body, None)
        starts = itertools.accumulate((len(item.data) for item in items), initial=0)
        data = [{"index": item.prompt_index, "embed_dtype": self.command.embed_dtype,
                 "endianness": self.command.endianness, "start": start,
                 "end": start + len(item.data), "shape": list(item.shape)}
                for item, start in zip(items, starts)]
        metadata = {"id": self.command.request_id, "created": self.created, "model": self.model,
                    "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        return VectorBytes(body, json.dumps(metadata))
