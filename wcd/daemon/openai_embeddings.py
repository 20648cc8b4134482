"""POST /v1/embeddings: OpenAI's embeddings API, as `vllm serve --runner
pooling` serves it, for the pooling models among the configured ones.

A request becomes one `Embed`, its inputs sharing one set of pooling
parameters; the worker answers one `Embedding` per input (float32 bytes),
and the response is assembled here in vLLM's shape (`id` "embd-...", `data`
in input order, `usage` with prompt and total tokens). Checking values is
vLLM's business, in the worker (dimensions against the model's Matryoshka
support, lengths, token ids); shapes and the fields wcd does not implement
are checked here, as openai_types does for the generation endpoints.
"""

from __future__ import annotations

import array
import base64
import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from wcd.daemon import errors
from wcd.daemon import openai_types as t
from wcd.workers import protocol as p

# vLLM's fields wcd does not implement: accepted at their defaults only (as
# the struct declares them, vLLM's), never silently ignored.
_UNIMPLEMENTED = ("padding", "embed_dtype", "endianness", "mm_processor_kwargs")


class EmbeddingRequest(Struct, kw_only=True):
    """vLLM's EmbeddingCompletionRequest; without `model`, wcd's default model
    (openai_api). Unknown fields are ignored, as vLLM ignores them; chat-style
    inputs (`messages`) are not served, and refused by name."""

    model: str | None = None
    # One text, one list of token ids, or a batch of either; checked in prompts().
    # (UNSET only where `messages` stands instead, refused by check())
    input: str | list[str | int | list[int]] | UnsetType = UNSET
    encoding_format: Literal["float", "base64", "bytes", "bytes_only"] = "float"
    dimensions: int | None = None
    # Accepted and ignored: it changes nothing about the vectors.
    user: str | None = None
    # vLLM's fields, honoured.
    truncate_prompt_tokens: Annotated[int, Meta(ge=-1)] | None = None
    truncation_side: Literal["left", "right"] | None = None
    add_special_tokens: bool = True
    use_activation: bool | None = None
    # vLLM's fields that only tag the request (wcd has no priority scheduling,
    # and a salt only keys the prefix cache): accepted and ignored.
    request_id: str | None = None
    priority: Annotated[int, Meta(ge=-(2 ** 63), le=2 ** 63 - 1)] = 0
    cache_salt: str | None = None
    # vLLM's, accepted only at their defaults (_UNIMPLEMENTED).
    padding: Literal["max_length", "do_not_pad"] | None = None
    embed_dtype: Literal["float32", "float16", "bfloat16", "fp8_e4m3", "fp8_e5m2"] = "float32"
    endianness: Literal["native", "big", "little"] = "native"
    mm_processor_kwargs: dict[str, Any] | None = None
    # Removed from vLLM, which refuses it by name (reject_removed_pooling_parameters).
    normalize: bool | None | UnsetType = UNSET
    # vLLM's chat-style embedding input, which wcd does not serve.
    messages: Any = UNSET

    def check(self) -> None:
        if self.normalize is not UNSET:
            raise errors.VllmBadRequest("Parameter `normalize` was removed; use "
                                        "`use_activation` instead. (parameter=normalize)",
                                        param="normalize")
        if self.messages is not UNSET:
            raise errors.BadRequest("chat-style embedding input (`messages`) is not supported",
                                    param="messages")
        if self.input is UNSET:
            raise errors.BadRequest("missing required field `input`", param="input")
        if self.encoding_format not in ("float", "base64"):
            raise errors.BadRequest(f"encoding_format {self.encoding_format!r} is not "
                                    "supported (only 'float' and 'base64')",
                                    param="encoding_format")
        defaults = {f.name: f.default for f in msgspec.structs.fields(self)}
        for name in _UNIMPLEMENTED:
            if getattr(self, name) != (default := defaults[name]):
                raise errors.BadRequest(f"{name} is not supported (only its default "
                                        f"{default!r})", param=name)

    def prompt_count(self) -> int:
        return len(self._inputs())

    def prompts(self) -> list[p.Prompt]:
        return [p.Prompt(prompt=item) if isinstance(item, str) else p.Prompt(prompt_token_ids=item)
                for item in self._inputs()]

    def _inputs(self) -> list[str | list[int]]:
        """As vLLM's prompt_to_seq: a list of ints is one input; an empty list
        is no input at all, refused in vLLM's words."""
        given = self.input
        if isinstance(given, str) or (given and all(isinstance(item, int) for item in given)):
            return [given]
        if not given:
            raise errors.VllmBadRequest("You must pass at least one prompt", param="input")
        if all(isinstance(item, str) for item in given) or \
                all(isinstance(item, list) for item in given):
            return given
        raise errors.BadRequest("input must be a string, a list of token ids, or a list of "
                                "either (a batch)", param="input")

    def pooling(self) -> dict[str, Any]:
        """vLLM PoolingParams fields for what the client set, and only that."""
        return {name: value for name in ("dimensions", "use_activation")
                if (value := getattr(self, name)) is not None}


# ---- responses ------------------------------------------------------------------


class EmbeddingData(Struct, kw_only=True):
    index: int
    object: Literal["embedding"] = "embedding"
    # The vector, or with encoding_format base64 its float32 bytes in base64.
    embedding: list[float] | str


class EmbeddingList(Struct, kw_only=True):
    """vLLM's EmbeddingResponse."""

    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[EmbeddingData]
    usage: t.Usage


@dataclass(frozen=True)
class EmbedJob:
    """A checked request, ready to send once a worker serves its model."""

    command: p.Embed  # its model is the client's name until a worker serves it
    base64: bool
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def of(cls, body: EmbeddingRequest) -> EmbedJob:
        body.check()
        command = p.Embed(f"embd-{uuid.uuid4().hex}", body.model, body.prompts(),
                          body.pooling(), body.truncate_prompt_tokens, body.truncation_side,
                          body.add_special_tokens)
        return cls(command, body.encoding_format == "base64")

    @property
    def model(self) -> str:
        return self.command.model

    def request(self, served: str) -> p.Embed:
        return msgspec.structs.replace(self.command, model=served)

    def response(self, items: list[p.Embedding]) -> EmbeddingList:
        items = sorted(items, key=lambda item: item.prompt_index)
        tokens = sum(item.prompt_tokens for item in items)
        return EmbeddingList(
            id=self.command.request_id, created=self.created, model=self.model,
            data=[EmbeddingData(index=item.prompt_index, embedding=self._vector(item.data))
                  for item in items],
            usage=t.Usage(prompt_tokens=tokens, completion_tokens=0, total_tokens=tokens))

    def _vector(self, data: bytes) -> list[float] | str:
        if self.base64:
            return base64.b64encode(data).decode("ascii")
        return array.array("f", data).tolist()
