"""wcd's warm workers as a Ray Serve application, for more models or traffic
than one host's GPUs hold (the `wcd[ray]` extra).

Two deployments, both read the one wcd.yaml a daemon reads:

- `ModelReplica`: each replica runs one wcd daemon with one warm worker (the
  replica's GPU, its TP group's GPUs, or the CPU), started as its child
  (replica_daemon). Serve's model multiplexing is the cluster's scheduler: a
  request for a model goes to a replica that has it loaded; elsewhere the
  replica's multiplexed loader loads it through its daemon (`wcctl load`: a
  swap from the host cache or a parked engine where the replica had it
  before), and Serve's LRU eviction past `max_num_models_per_replica` (the
  file's policy.max_resident) unloads through it too.
- `OpenAIIngress`: the OpenAI-compatible endpoint. It reads each request's
  `model`, resolves it with wcd's catalog (aliases and paths name one model,
  so one multiplexed id), checks the API key as the daemon would, and calls
  the model deployment with `multiplexed_model_id` set; the replica forwards
  the body to its daemon, whose answer (vLLM's JSON, or SSE) streams back
  through unchanged.

`app(args)` builds the application: `serve run wcd.serve:app config=...`, or
deploy/serve.yaml. Autoscaling and replica resources are Serve's own config.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from wcd.daemon import errors
from wcd.daemon.catalog import Catalog
from wcd.daemon.config import Settings, load_settings
from wcd.daemon.openai_api import bearer_key, permitted_names
from wcd.serve.replica_daemon import ReplicaDaemon

log = logging.getLogger("wcd.serve")

# Request headers a daemon reads, and response headers a client reads.
_FORWARDED = ("authorization", "content-type", "accept")
_RETURNED = ("content-type", "retry-after", "cache-control")
# Paths that name no model: any replica's daemon answers them alike.
_ANY_REPLICA = ("/v1/models", "/version", "/openapi.json")
_RETRY_AFTER_S = 5
# A stream's bytes travel in items at most this often after the first.
COALESCE_S = 0.02
# Serve runs a replica's code, and a caller's handle router, on event loops
# of their own by default; each crossing costs a request milliseconds (half
# of Serve's ~33 ms on 2 busy cores, measured). wcd's code never blocks its
# loop, so both run on the replica's main loop.
SERVE_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
             "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}
# Both deployments' actor options unless Serve's config gives its own (it then
# replaces them: deploy/serve.yaml sets SERVE_ENV for the application).
ACTOR_OPTIONS = {"runtime_env": {"env_vars": SERVE_ENV}}


@dataclass(frozen=True)
class Head:
    """The first item of a replica's answer, with the body's first bytes (one
    Ray item fewer a request); the rest of the body follows."""

    status: int
    headers: dict[str, str]
    body: bytes = b""


class _Loaded:
    """A model multiplexing holds on a replica; Serve's eviction unloads it
    through the daemon (into its host cache or a parked engine)."""

    def __init__(self, daemon: ReplicaDaemon, model: str):
        self.daemon, self.model = daemon, model

    async def __del__(self) -> None:
        await self.daemon.operate("unload", self.model)


@serve.deployment(name="wcd-models", max_ongoing_requests=64, ray_actor_options=ACTOR_OPTIONS)
class ModelReplica:
    async def __init__(self, config: str):
        settings = load_settings(config)
        worker = settings.workers[0]
        # Ray gives the replica its GPUs as cuda:0...; the file's first
        # worker says which kind and how many (ray_actor_options must match).
        device = "cpu" if worker.device == "cpu" else "cuda:0"
        self.daemon = ReplicaDaemon(config, device, worker.tensor_parallel_size)
        await self.daemon.start()
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.loads = 0

        async def load(model: str) -> _Loaded:
            await self.daemon.operate("load", model)
            self.loads += 1
            return _Loaded(self.daemon, model)

        # A function, not a bound method: the multiplexer keeps its LRU on it.
        self.loaded = serve.multiplexed(
            max_num_models_per_replica=settings.policy.max_resident)(load)

    async def forward(self, method: str, path: str, headers: dict[str, str],
                      body: bytes) -> AsyncIterator[Head | bytes]:
        """The daemon's answer to the request: its Head, then its body as it
        comes (a stream chunk by chunk)."""
        model = serve.get_multiplexed_model_id()
        if model:
            await self.loaded(model)
        async with self.daemon.session.request(method, self.daemon.url + path, data=body,
                                               headers=headers) as answer:
            # Which replica answered, and how many loads it has made: what
            # tests and bench/cluster.py see of the routing.
            head: Head | None = Head(answer.status, {
                **{k: v for k, v in answer.headers.items() if k.lower() in _RETURNED},
                "X-WCD-Replica": self.replica, "X-WCD-Replica-Loads": str(self.loads)})
            async for chunk in _coalesced(answer.content):
                if head is None:
                    yield chunk
                else:
                    yield replace(head, body=chunk)
                    head = None
            if head is not None:  # no body
                yield head

    async def check_health(self) -> None:
        """A daemon that died takes its replica with it: Serve starts another."""
        if not self.daemon.running():
            raise RuntimeError(f"the replica's daemon exited: {self.daemon.log_tail(1000)}")

    async def __del__(self) -> None:
        await self.daemon.stop()


async def _coalesced(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """The body as it arrives: the first bytes at once (time to first token),
    then what arrives within COALESCE_S of the last item sent as one item,
    sent no later than that. Every item costs Ray a message on each of two
    hops (replica to ingress to proxy), which a stream of one token an item
    pays per token."""
    pending, sent_at = b"", 0.0
    while True:
        try:
            wait = COALESCE_S - (time.monotonic() - sent_at) if pending else None
            chunk = await asyncio.wait_for(content.readany(), wait)
        except asyncio.TimeoutError:
            chunk = None
        if chunk == b"":  # the end of the body
            break
        pending += chunk or b""
        if chunk is None or time.monotonic() - sent_at >= COALESCE_S:
            yield pending
            pending, sent_at = b"", time.monotonic()
    if pending:
        yield pending


# Each streamed answer holds its slot to the end: a request past the limit
# waits in the proxy, its time to first token too.
@serve.deployment(name="wcd-openai", max_ongoing_requests=1024,
                  ray_actor_options=ACTOR_OPTIONS)
class OpenAIIngress:
    def __init__(self, models: DeploymentHandle, config: str):
        self.models = models
        self.settings: Settings = load_settings(config)
        self.catalog = Catalog(self.settings)

    async def __call__(self, request: Request) -> Response:
        try:
            return await self._answer(request)
        except errors.WcdError as exc:
            return _error(exc)

    async def _answer(self, request: Request) -> Response:
        path = request.url.path
        if path == "/health":
            return Response(b"{}", media_type="application/json")
        key = self._key(request)
        body = await request.body()
        model = None
        if request.method == "POST" and path not in _ANY_REPLICA:
            model = self._model(body, key)
        headers = {k: v for k, v in request.headers.items() if k.lower() in _FORWARDED}
        handle = self.models.options(stream=True, multiplexed_model_id=model or "")
        return await _relayed(handle.forward.remote(request.method, path, headers, body))

    def _key(self, request: Request) -> str | None:
        keys = self.settings.http.tokens
        if not keys:
            return None
        key = bearer_key(request.headers.get("authorization", ""), keys)
        if key is None:
            raise errors.Unauthorized("missing or invalid API key; send "
                                      "`Authorization: Bearer KEY`")
        return key

    def _model(self, body: bytes, key: str | None) -> str | None:
        """The canonical name of the body's model; None where it names none
        (the replica's daemon answers that, and a body that is not JSON, in
        vLLM's words)."""
        try:
            asked = json.loads(body).get("model")
        except (ValueError, AttributeError):
            return None
        if not isinstance(asked, str):
            return None
        allowed = permitted_names(self.settings.http.key_models, key, self._resolve)
        try:
            name = self._resolve(asked)
        except errors.ModelNotFound:
            name = None
        if name is None or (allowed is not None and name not in allowed):
            raise errors.VllmModelNotFound(asked)
        return name

    def _resolve(self, name: str) -> str:
        return self.catalog.resolve(name).name


async def _relayed(answer: Any) -> Response:
    """A replica's streamed answer as the client's response. A replica that
    fails before its answer began gets a 503 with Retry-After; one that fails
    mid-stream ends the stream with an error event, as vLLM's server does."""
    try:
        head = await answer.__anext__()
    except Exception as exc:  # noqa: BLE001 - a dead replica raises Ray's errors
        log.warning("a replica failed before answering: %s", exc)
        return _error(errors.Unavailable("the model's replica failed; retry",
                                         retry_after_s=_RETRY_AFTER_S))
    streamed = head.headers.get("Content-Type", "").startswith("text/event-stream")
    return StreamingResponse(_rest(head.body, answer, streamed), status_code=head.status,
                             headers=head.headers)


async def _rest(first: bytes, answer: Any, streamed: bool) -> AsyncIterator[bytes]:
    yield first
    try:
        async for chunk in answer:
            yield chunk
    except Exception as exc:  # noqa: BLE001
        log.warning("a replica failed mid-answer: %s", exc)
        if not streamed:
            raise  # the connection closes short of the body's length
        failure = errors.Unavailable("the model's replica failed mid-answer; retry")
        yield b"data: " + json.dumps(failure.body()).encode() + b"\n\ndata: [DONE]\n\n"


def _error(exc: errors.WcdError) -> Response:
    headers = {}
    if isinstance(exc, errors.Unavailable):
        headers["Retry-After"] = str(exc.retry_after_s)
    return Response(json.dumps(exc.body()).encode(), status_code=exc.status,
                    media_type="application/json", headers=headers)


def app(args: dict[str, str]) -> serve.Application:
    """`serve run wcd.serve:app config=/etc/wcd/wcd.yaml`: the ingress bound to
    the model deployment, both reading `config`."""
    config = args["config"]
    return OpenAIIngress.bind(ModelReplica.bind(config), config)
