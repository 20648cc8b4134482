"""Pooling models in a warm worker: embeddings and bi-encoder scores as `vllm
serve --runner pooling` makes them.

A resident built with vLLM's pooling runner is stepped like any other; its
requests carry PoolingParams instead of SamplingParams, and each input's
PoolingRequestOutput becomes one protocol Embedding. A request for a task
its model does not do is refused in vLLM's words: vLLM's server has no such
route for that model (404).
"""

from __future__ import annotations

from vllm.outputs import PoolingRequestOutput
from vllm.pooling_params import PoolingParams
from vllm.sampling_params import SamplingParams
from vllm.tasks import POOLING_TASKS

from wcd.workers import protocol as p
from wcd.workers import vllm_seams

EMBED = "embed"
GENERATE = "generate"


def task_of(request: p.Generate | p.Embed) -> str:
    return EMBED if isinstance(request, p.Embed) else GENERATE


def unsupported(request: p.Generate | p.Embed) -> str:
    """vLLM's refusal of the API a request came through, had the server
    routed it to a model without its task (vllm/entrypoints/*/api_router.py)."""
    if isinstance(request, p.Embed):
        api = p.EMBED_ENDPOINTS[request.endpoint]
    elif request.prompts and request.prompts[0].messages is not None:
        api = "Chat Completions API"
    else:
        api = "Completions API"
    return f"The model does not support {api}"


def engine_requests(engine, request: p.Embed) -> list[tuple[dict, PoolingParams]]:
    """Each input rendered as vLLM's embeddings server renders it, with its own
    copy of the request's PoolingParams (the engine fills in its defaults)."""
    if request.task is not None:
        _check_task(engine, request.task)
    params = PoolingParams(task=EMBED, **request.pooling)
    inputs = vllm_seams.render_pooled(engine, request)
    vllm_seams.verify_pooling(engine, params, request.model)
    return [(engine_input, params.clone()) for engine_input in inputs]


class Refused(ValueError):
    """A request vLLM's server refuses about one of its fields, `param`,
    which the daemon names (or not) as the workers' vLLM does."""

    def __init__(self, reason: str, param: str):
        super().__init__(reason)
        self.param = param


def _check_task(engine, task: str) -> None:
    """/pooling's task against the model's, in vLLM's words
    (ServingPooling._verify_pooling_task): the model's pooling task, which
    for a model wcd embeds with is EMBED, is the one it serves."""
    if task == EMBED:
        return
    tasks = list(engine.get_supported_tasks())
    if task in tasks:
        raise Refused(f"Try switching the model's pooling_task via --pooler-config.task "
                      f"{task}.", "task")
    raise Refused(f"Unsupported task: {task!r} Supported tasks: {tasks}", "task")


def similarities(command: p.Similarity) -> p.Similarities:
    return p.Similarities(command.op_id, [vllm_seams.cosine_similarity(vector_1, vector_2)
                                          for vector_1, vector_2 in command.pairs])


def warm_params(engine) -> SamplingParams | PoolingParams:
    """The warm-up request's: one greedy token, or one input pooled for the
    model's first pooling task."""
    tasks = engine.get_supported_tasks()
    if GENERATE in tasks:
        return SamplingParams(max_tokens=1, temperature=0.0)
    return PoolingParams(task=next(task for task in tasks if task in POOLING_TASKS))


def embedding(ro: PoolingRequestOutput, request_id: str, prompt_index: int,
              last_of_request: bool, request: p.Embed, engine) -> p.Embedding:
    data = ro.outputs.data
    pad_token = request.score is not None and \
        getattr(engine.renderer.get_tokenizer(), "pad_token_id", None) is not None
    return p.Embedding(request_id, prompt_index,
                       vllm_seams.vector_bytes(data, request.embed_dtype, request.endianness),
                       len(ro.prompt_token_ids or ()), last_of_request, tuple(data.shape),
                       pad_token)
