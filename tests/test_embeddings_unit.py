"""Unit tests of /v1/embeddings' request mapping and response shape, and of the
endpoint against the FakeScheduler of test_openai_unit: no worker process, no
vLLM (but vLLM's request type, for its field list)."""

from __future__ import annotations

import array
import base64
import json

import aiohttp
import msgspec
import pytest

from test_openai_unit import FakeScheduler, FakeWorker, on_vllm_026, post, run_async, serve
from wcd.daemon import errors
from wcd.daemon.openai_embeddings import EmbeddingRequest, EmbedJob, PoolingRequest
from wcd.daemon.vllm_dialect import VLLM_026
from wcd.daemon.worker_process import WorkerError
from wcd.workers import protocol as p

VECTORS = [[0.5, -0.25, 1.0], [0.125, 2.0, -3.5]]


def request(**body) -> EmbeddingRequest:
    return msgspec.json.decode(msgspec.json.encode({"model": "demo", **body}),
                               type=EmbeddingRequest)


def embedded(vector: list[float], index: int, tokens: int, finished: bool = False):
    return p.Embedding("r", index, array.array("f", vector).tobytes(), tokens, finished)


def two_vectors(request: p.Embed) -> list[p.Embedding]:
    """One vector per input, the last one first (a batch finishes in any
    order): VECTORS[i] for input i."""
    items = [embedded(VECTORS[i % 2], i, 3 + i) for i in range(len(request.prompts))]
    return [msgspec.structs.replace(item, request_id=request.request_id, finished=i == 0)
            for i, item in enumerate(reversed(items))]


@pytest.mark.parametrize("given, prompts", [
    ("hi", [p.Prompt(prompt="hi")]),
    (["a", "b"], [p.Prompt(prompt="a"), p.Prompt(prompt="b")]),
    ([1, 2, 3], [p.Prompt(prompt_token_ids=[1, 2, 3])]),
    ([[1, 2], [3]], [p.Prompt(prompt_token_ids=[1, 2]), p.Prompt(prompt_token_ids=[3])]),
])
def test_every_input_form_becomes_its_prompts(given, prompts):
    assert request(input=given).prompts() == prompts


HI = [{"role": "user", "content": "hi"}]
YO = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "yo"}]


@pytest.mark.parametrize("body, chats", [
    ({"messages": HI}, [HI]),
    ({"messages": [HI, YO]}, [HI, YO]),
    ({"input": HI}, [HI]),  # vLLM's EmbeddingChatInputRequest
    ({"input": [HI, YO]}, [HI, YO]),
    ({"input": "ignored", "messages": HI}, [HI]),  # as vLLM, the chat form wins
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
     [[{"role": "user", "content": [{"type": "text", "text": "hi"}]}]]),
])
def test_every_chat_form_becomes_one_prompt_per_chat(body, chats):
    job = EmbedJob.of(request(**body))
    assert job.command.prompts == [p.Prompt(messages=chat) for chat in chats]
    # vLLM's chat defaults: no special tokens of its own, no generation prompt.
    assert job.command.render == p.RenderOptions(add_special_tokens=False,
                                                 add_generation_prompt=False)


def test_a_chats_own_fields_travel():
    job = EmbedJob.of(request(messages=HI, add_special_tokens=True,
                              continue_final_message=True, truncate_prompt_tokens=2,
                              chat_template_kwargs={"flag": 1}))
    assert job.command.render == p.RenderOptions(
        add_special_tokens=True, truncate_prompt_tokens=2, add_generation_prompt=False,
        continue_final_message=True)
    assert job.command.chat_template_kwargs == {"flag": 1}
    assert job.command.chat_template is None
    trusted = EmbedJob.of(request(messages=HI, chat_template="{{ 1 }}"), trust_templates=True)
    assert trusted.command.chat_template == "{{ 1 }}"


def test_only_what_the_client_set_travels():
    job = EmbedJob.of(request(input="hi", dimensions=8, truncate_prompt_tokens=3,
                              truncation_side="left", add_special_tokens=False, user="u",
                              priority=2, request_id="mine", cache_salt="salt"))
    assert job.command.pooling == {"dimensions": 8}
    assert job.command.render == p.RenderOptions(
        add_special_tokens=False, truncate_prompt_tokens=3, truncation_side="left",
        add_generation_prompt=False)
    assert EmbedJob.of(request(input="hi")).command.pooling == {}
    assert EmbedJob.of(request(input="hi", use_activation=False)).command.pooling == \
        {"use_activation": False}
    served = job.request("canonical")
    assert (served.model, served.request_id) == ("canonical", job.command.request_id)


@pytest.mark.parametrize("body, error, param", [
    ({"input": []}, "You must pass at least one prompt", "input"),
    ({"input": ["a", [1]]}, "input must be", "input"),
    ({"input": "hi", "normalize": True},
     "Parameter `normalize` was removed; use `use_activation` instead.", "normalize"),
    ({"input": "hi", "normalize": None}, "Parameter `normalize` was removed", "normalize"),
    ({"input": "hi", "mm_processor_kwargs": {"a": 1}}, "Per-request mm_processor_kwargs are "
     "disabled by default", "mm_processor_kwargs"),
    # vLLM keeps it as an extra field of a text request, and checks it too.
    ({"input": "hi", "media_io_kwargs": {"image": {}}}, "Per-request media_io_kwargs are "
     "disabled by default", "media_io_kwargs"),
    ({"messages": HI, "chat_template": "{{ 1 }}"}, "a chat template was passed with the "
     "request, but http.trust_request_chat_template is not set", "chat_template"),
    ({"messages": HI, "chat_template_kwargs": {"tools": []}},
     "chat_template_kwargs may not set 'tools'", "chat_template_kwargs.tools"),
    ({"messages": HI, "add_generation_prompt": True, "continue_final_message": True},
     "Cannot set both `continue_final_message` and `add_generation_prompt` to True.", None),
    ({"messages": [{"content": "no role"}]}, "messages: Object missing required field "
     "`role`", "messages"),
])
def test_what_wcd_cannot_honour_is_refused(body, error, param):
    with pytest.raises(errors.BadRequest) as refused:
        EmbedJob.of(request(**body))
    assert str(refused.value).startswith(error)
    assert (refused.value.status, refused.value.param) == (400, param)


def pooling(**body) -> PoolingRequest:
    return msgspec.json.decode(msgspec.json.encode({"model": "demo", **body}),
                               type=PoolingRequest)


def test_a_pooling_request_is_an_embed_for_the_pooling_endpoint():
    job = EmbedJob.of(pooling(input=["a", "b"], task="embed", use_activation=False))
    assert job.command.endpoint == "pooling" and job.command.task == "embed"
    assert job.command.prompts == [p.Prompt(prompt="a"), p.Prompt(prompt="b")]
    assert job.command.pooling == {"use_activation": False}
    chat = EmbedJob.of(pooling(messages=HI)).command
    assert (chat.prompts, chat.task) == ([p.Prompt(messages=HI)], None)
    assert chat.render.add_special_tokens is False
    assert EmbedJob.of(request(input="a")).command.endpoint == "embeddings"


@pytest.mark.parametrize("body, error, param", [
    ({"input": "hi", "dimensions": 8},
     "dimensions is currently not supported (parameter=dimensions)", "dimensions"),
    ({"input": "hi", "task": "encode"}, "`encode` task was removed; use `token_embed` or "
     "`token_classify` instead. (parameter=task)", "task"),
    ({"input": "hi", "task": "nonsense"}, "task must be one of", "task"),
    ({"data": {"x": 1}}, "No IOProcessor plugin installed.", "task"),
    ({"input": "hi", "task": "plugin"}, "No IOProcessor plugin installed.", "task"),
    ({"messages": [HI, YO]}, "messages: Expected `object`, got `array`", "messages"),
])
def test_pooling_refusals_are_vllms(body, error, param):
    with pytest.raises(errors.BadRequest) as refused:
        EmbedJob.of(pooling(**body))
    assert str(refused.value).startswith(error)
    assert (refused.value.status, refused.value.param) == (400, param)


@pytest.mark.parametrize("body, error, param", [
    ({"input": "hi", "dimensions": 8}, "dimensions is currently not supported", None),
    ({"data": {"x": 1}}, "No IOProcessor plugin installed. Please refer to the documentation "
     "and to the 'prithvi_geospatial_mae_io_processor' offline inference example for more "
     "details.", None),
])
def test_vllm_026s_pooling_refusals_name_no_parameter(body, error, param):
    """Its ServingPooling raises them as plain ValueErrors."""
    with pytest.raises(errors.BadRequest) as refused:
        EmbedJob.of(pooling(**body), dialect=VLLM_026)
    assert (str(refused.value), refused.value.param) == (error, param)


@pytest.mark.parametrize("on_026, message, param", [
    (False, "Try switching the model's pooling_task via --pooler-config.task token_embed. "
     "(parameter=task)", "task"),
    (True, "Try switching the model's pooling_task via --pooler-config.task token_embed.",
     None),
])
@run_async
async def test_a_workers_refusal_names_its_parameter_as_its_vllm_does(on_026, message, param):
    refusal = WorkerError(p.ErrorInfo(p.BAD_ARGS, "Try switching the model's pooling_task via "
                                                  "--pooler-config.task token_embed.", "task"))
    scheduler = FakeScheduler(FakeWorker(lambda request: [refusal]))
    async with serve(on_vllm_026(scheduler) if on_026 else scheduler) as url:
        status, _, answer = await post(url, "/pooling", {"model": "demo", "input": "hi",
                                                         "task": "token_embed"})
    assert (status, answer["error"]["message"], answer["error"]["param"]) == \
        (400, message, param)


@run_async
async def test_vllm_026_wraps_its_removed_tasks_refusal_as_pydantic_does():
    body = {"model": "embed-a", "input": "hi", "task": "encode"}
    async with serve(on_vllm_026(FakeScheduler())) as url:
        status, _, answer = await post(url, "/pooling", body)
    assert (status, answer["error"]["param"]) == (400, "task")
    assert answer["error"]["message"] == (
        "1 validation error:\n  {'type': 'value_error', 'loc': ('body',), 'msg': 'Value error, "
        "`encode` task was removed; use `token_embed` or `token_classify` instead. "
        "(parameter=task)', 'input': {'model': 'embed-a', 'input': 'hi', 'task': 'encode'}, "
        "'ctx': {'error': VLLMValidationError('`encode` task was removed; use `token_embed` or "
        "`token_classify` instead.')}}")


BOTH = "Cannot set both `continue_final_message` and `add_generation_prompt` to True."


@pytest.mark.parametrize("path, members", [
    ("/v1/embeddings", ["input", None, None, None, None]),
    ("/pooling", ["input", None, "data"]),
])
@run_async
async def test_vllm_026_lists_its_request_unions_errors_for_both_prompts(path, members):
    """Each member of its request union fails: the chat ones by their
    validator, the others missing their fields (vLLM 0.26's own words)."""
    body = {"model": "embed-a", "messages": HI, "add_generation_prompt": True,
            "continue_final_message": True}
    async with serve(on_vllm_026(FakeScheduler())) as url:
        status, _, answer = await post(url, path, body)
    member = "('body', 'function-wrap[__log_extra_fields__()]'"
    listed = [f"{{'type': 'missing', 'loc': {member}, {missing!r}), 'msg': 'Field required', "
              f"'input': {body!r}}}" if missing else
              f"{{'type': 'value_error', 'loc': {member}), 'msg': {'Value error, ' + BOTH!r}, "
              f"'input': {body!r}, 'ctx': {{'error': VLLMValidationError({BOTH!r})}}}}"
              for missing in members]
    assert (status, answer["error"]["param"]) == (400, "body.input")
    assert answer["error"]["message"] == \
        f"{len(members)} validation errors:\n" + "\n".join(f"  {error}" for error in listed)


EMPTY_SALT = "Parameter 'cache_salt' must be a non-empty string if provided."
SCORE_MEMBER = ("function-after[_merge_instruction_into_kwargs(), "
                "function-wrap[__log_extra_fields__()]]")


@pytest.mark.parametrize("path, body, locs", [
    ("/v1/embeddings", {"input": "hi"}, [("body", "function-wrap[__log_extra_fields__()]")] * 5),
    ("/pooling", {"input": "hi"}, [("body", "function-wrap[__log_extra_fields__()]")] * 3),
    ("/score", {"text_1": "hi", "text_2": "yo"}, [("body", SCORE_MEMBER)] * 4),
    ("/rerank", {"query": "hi", "documents": ["yo"]}, [("body",)]),
])
@run_async
async def test_vllm_026_refuses_an_empty_cache_salt_once_per_member_of_its_union(
        path, body, locs):
    """Every member of vLLM 0.26's request union runs its cache_salt
    validator before its fields' (its own models' words, checked against
    them): one error each; rerank's request is no union."""
    body = {"model": "embed-a", **body, "cache_salt": ""}
    async with serve(on_vllm_026(FakeScheduler())) as url:
        status, _, answer = await post(url, path, body)
    listed = [f"{{'type': 'value_error', 'loc': {loc!r}, 'msg': "
              f"{'Value error, ' + EMPTY_SALT + ' (parameter=cache_salt)'!r}, 'input': {body!r}, "
              f"'ctx': {{'error': VLLMValidationError({EMPTY_SALT!r})}}}}" for loc in locs]
    label = "error" if len(locs) == 1 else "errors"
    assert (status, answer["error"]["param"]) == (400, "cache_salt")
    assert answer["error"]["message"] == \
        f"{len(locs)} validation {label}:\n" + "\n".join(f"  {error}" for error in listed)


def test_a_pooling_response_is_vllms_shape():
    job = EmbedJob.of(pooling(input=["a", "b"]))
    answer = msgspec.to_builtins(job.response([embedded(VECTORS[1], 1, 4),
                                               embedded(VECTORS[0], 0, 3)]))
    assert list(answer) == ["id", "object", "created", "model", "data", "usage"]
    assert answer["id"].startswith("pooling-") and answer["object"] == "list"
    assert answer["data"] == [{"index": i, "object": "pooling", "data": VECTORS[i]}
                              for i in (0, 1)]


def test_the_response_is_vllms_shape_in_input_order():
    job = EmbedJob.of(request(input=["a", "b"]))
    answer = msgspec.to_builtins(job.response([embedded(VECTORS[1], 1, 4),
                                               embedded(VECTORS[0], 0, 3)]))
    assert list(answer) == ["id", "object", "created", "model", "data", "usage"]
    assert answer["id"].startswith("embd-") and answer["object"] == "list"
    assert answer["model"] == "demo"
    assert answer["data"] == [{"index": i, "object": "embedding", "embedding": VECTORS[i]}
                              for i in (0, 1)]
    assert answer["usage"] == {"prompt_tokens": 7, "completion_tokens": 0, "total_tokens": 7,
                               "prompt_tokens_details": None,
                               "completion_tokens_details": None}


def test_vllm_026s_usage_has_no_completion_tokens_details():
    job = EmbedJob.of(pooling(input="a"), dialect=VLLM_026)
    answer = msgspec.to_builtins(job.response([embedded(VECTORS[0], 0, 3)]))
    assert answer["usage"] == {"prompt_tokens": 3, "completion_tokens": 0, "total_tokens": 3,
                               "prompt_tokens_details": None}


def test_base64_is_the_float32_bytes():
    job = EmbedJob.of(request(input="a", encoding_format="base64"))
    (data,) = job.response([embedded(VECTORS[0], 0, 3)]).data
    assert array.array("f", base64.b64decode(data.embedding)).tolist() == VECTORS[0]


@pytest.mark.parametrize("encoding", ["base64", "bytes", "bytes_only"])
def test_a_binary_encoding_asks_the_worker_for_its_dtype_and_byte_order(encoding):
    command = EmbedJob.of(request(input="a", encoding_format=encoding, embed_dtype="bfloat16",
                                  endianness="big")).command
    assert (command.embed_dtype, command.endianness) == ("bfloat16", "big")


def test_floats_are_float32_whatever_the_dtype_asked():
    """vLLM's float encoding reads neither embed_dtype nor endianness."""
    command = EmbedJob.of(request(input="a", embed_dtype="fp8_e4m3", endianness="big")).command
    assert (command.embed_dtype, command.endianness) == ("float32", "native")


def encoded(data: bytes, index: int, tokens: int) -> p.Embedding:
    return p.Embedding("r", index, data, tokens, shape=(len(data) // 2,))


def test_bytes_are_the_vectors_end_to_end_and_the_metadata_says_where():
    job = EmbedJob.of(request(input=["a", "b"], encoding_format="bytes",
                              embed_dtype="float16", endianness="little"))
    answer = job.response([encoded(b"\x03\x04", 1, 2), encoded(b"\x01\x02" * 2, 0, 3)])
    assert answer.body == b"\x01\x02\x01\x02\x03\x04"
    # vLLM's json.dumps, key order and separators as its server writes them
    assert answer.metadata == json.dumps({
        "id": job.command.request_id, "created": job.created, "model": "demo",
        "data": [{"index": 0, "embed_dtype": "float16", "endianness": "little", "start": 0,
                  "end": 4, "shape": [2]},
                 {"index": 1, "embed_dtype": "float16", "endianness": "little", "start": 4,
                  "end": 6, "shape": [1]}],
        "usage": {"prompt_tokens": 5, "total_tokens": 5}})


def test_bytes_only_are_the_vectors_alone():
    job = EmbedJob.of(pooling(input="a", encoding_format="bytes_only"))
    answer = job.response([encoded(b"\x01\x02", 0, 3)])
    assert (answer.body, answer.metadata) == (b"\x01\x02", None)


def test_padding_travels_where_the_workers_vllm_takes_it():
    body = request(input="a", padding="max_length")
    assert EmbedJob.of(body).command.render.padding == "max_length"
    # vLLM 0.26 has no such field, and ignores it
    assert EmbedJob.of(body, dialect=VLLM_026).command.render.padding is None


def test_vllm_026_takes_a_requests_mm_kwargs():
    body = request(input="a", mm_processor_kwargs={"a": 1}, media_io_kwargs={"image": {}})
    assert EmbedJob.of(body, dialect=VLLM_026).command.prompts == [p.Prompt(prompt="a")]


def test_every_vllm_request_field_is_known_with_vllms_default():
    """Clients written for `vllm serve --runner pooling` send any of vLLM's
    fields, of either request form: wcd knows them all (refusing some at
    other values)."""
    from vllm.entrypoints.pooling.embed.protocol import (
        EmbeddingChatRequest,
        EmbeddingCompletionRequest,
    )

    ours = {f.name: f.default for f in msgspec.structs.fields(EmbeddingRequest)}
    for form in (EmbeddingCompletionRequest, EmbeddingChatRequest):
        for name, info in form.model_fields.items():
            assert name in ours, f"EmbeddingRequest.{name} is missing"
            # wcd requires model; ids are its own; input or messages is required by
            # check(); add_special_tokens' default is the form's (None: either)
            if ours[name] not in (None, msgspec.NODEFAULT, msgspec.UNSET):
                assert ours[name] == info.default, name


@run_async
async def test_the_endpoint_sends_one_embed_and_answers_in_input_order():
    scheduler = FakeScheduler(FakeWorker(two_vectors))
    async with serve(scheduler) as url:
        status, _, answer = await post(url, "/v1/embeddings",
                                       {"model": "alias", "input": [[1, 2], [3]]})
    assert status == 200, answer
    (sent,) = scheduler.worker.requests
    assert isinstance(sent, p.Embed) and sent.model == "demo"
    assert answer["model"] == "alias"  # as the client named it
    assert [d["embedding"] for d in answer["data"]] == VECTORS
    assert answer["usage"]["prompt_tokens"] == 7
    assert scheduler.released == 1


@run_async
async def test_bytes_are_answered_as_octets_with_their_metadata_header():
    scheduler = FakeScheduler(FakeWorker(two_vectors))
    async with serve(scheduler) as url, aiohttp.ClientSession() as session:
        for encoding, has_metadata in (("bytes", True), ("bytes_only", False)):
            body = {"model": "alias", "input": ["a", "b"], "encoding_format": encoding}
            async with session.post(url + "/v1/embeddings", json=body) as response:
                assert response.status == 200
                assert response.headers["Content-Type"] == "application/octet-stream"
                assert ("metadata" in response.headers) is has_metadata
                data = await response.read()
            assert array.array("f", data).tolist() == VECTORS[0] + VECTORS[1]
            if has_metadata:
                metadata = json.loads(response.headers["metadata"])
                assert metadata["model"] == "alias"
                assert [item["start"] for item in metadata["data"]] == [0, 12]


@run_async
async def test_a_model_without_the_task_is_a_404_in_vllms_words():
    refusal = WorkerError(p.ErrorInfo(p.UNSUPPORTED, "The model does not support Embeddings API"))
    async with serve(FakeScheduler(FakeWorker(lambda request: [refusal]))) as url:
        status, _, answer = await post(url, "/v1/embeddings", {"model": "demo", "input": "hi"})
    assert status == 404
    assert answer["error"]["message"] == "The model does not support Embeddings API"
    assert answer["error"]["type"] == "NotFoundError"


@run_async
async def test_batches_are_bounded_before_they_are_decoded():
    async with serve(FakeScheduler(FakeWorker(two_vectors)), max_prompts=2) as url:
        status, _, answer = await post(url, "/v1/embeddings",
                                       {"model": "demo", "input": [[1], [2], [3]]})
        assert (status, answer["error"]["param"]) == (400, "input"), answer
        # A field wcd does not know is ignored, as vLLM ignores it.
        status, _, answer = await post(url, "/v1/embeddings",
                                       {"model": "demo", "input": "hi", "bogus": 1})
        assert status == 200 and len(answer["data"]) == 1, answer


def test_a_pooling_config_of_its_own_keeps_a_checkpoint_off_the_same_shape_path(tmp_path):
    """vLLM builds the pooler from the sentence-transformers files, which a
    same-shape swap does not reload: two checkpoints that differ only there
    get different shape keys."""
    from wcd.workers.checkpoint import open_checkpoint

    def checkpoint(name: str, pooling: dict):
        directory = tmp_path / name
        (directory / "1_Pooling").mkdir(parents=True)
        (directory / "config.json").write_text('{"architectures": ["LlamaModel"]}')
        (directory / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
        (directory / "modules.json").write_text(json.dumps(
            [{"idx": 1, "name": "1", "path": "1_Pooling",
              "type": "sentence_transformers.models.Pooling"}]))
        (directory / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
        return open_checkpoint(directory, str(tmp_path))

    mean = checkpoint("mean", {"pooling_mode_mean_tokens": True})
    same = checkpoint("same", {"pooling_mode_mean_tokens": True})
    last = checkpoint("last", {"pooling_mode_lasttoken": True})
    args = {"runner": "pooling"}
    assert mean.shape_key(args) == same.shape_key(args) != last.shape_key(args)


@run_async
async def test_an_embedding_request_without_input_is_refused():
    async with serve(FakeScheduler(FakeWorker(two_vectors))) as url:
        status, _, answer = await post(url, "/v1/embeddings", {"model": "demo"})
    assert (status, answer["error"]["param"]) == (400, "input"), answer
    assert answer["error"]["message"] == "missing required field `input`"
