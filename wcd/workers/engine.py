"""vLLM engines inside a warm worker: several resident at once and stepped in
turn; built, swapped in place, parked, suspended and released.

Each engine is vLLM's LLMEngine with its EngineCore in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0, the "uni" executor), so an engine's life is
its model's and the process's life is the worker's. A worker keeps several
*residents* (each its weights, compiled model and KV cache) and steps those
with work, one step per turn. A swap makes a model resident, the residents it
replaces leaving first:

- same shape as a resident it replaces: keep that engine, compiled graph and
  KV cache; reload weights in place, reset the prefix cache, switch the
  frontend (tokenizer, chat template, generation config) only where its files
  differ;
- parked: its engine comes back beside the residents with a new KV cache;
- suspended: its KV cache comes back with the blocks its requests use, and
  they go on where they were;
- else: a new engine is built beside the residents, reusing the compile
  cache (see vllm_seams).

Every failure leaves the worker serving what it served before, or less, and
says which.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from jinja2 import TemplateError
from safetensors import SafetensorError
from vllm.engine.arg_utils import EngineArgs
from vllm.entrypoints.serve.utils.api_utils import get_max_tokens
from vllm.exceptions import VLLMValidationError
from vllm.outputs import PoolingRequestOutput, RequestOutput
from vllm.renderers.params import TokenizeParams
from vllm.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams
from vllm.v1.engine.llm_engine import LLMEngine

from wcd.workers import beam, parsing, pooling
from wcd.workers import protocol as p
from wcd.workers import vllm_seams, weights
from wcd.proc_stats import PhaseClock
from wcd.workers.process import trim_heap
from wcd.workers.checkpoint import Checkpoint, CheckpointError, open_checkpoint
from wcd.workers.watchdog import RenderTimeout
from wcd.workers.weights import HostCache

log = logging.getLogger(__name__)

# Engine args wcd sets itself: the engine lives in this process (with a
# worker group, its other ranks in the group's followers).
FORCED_ENGINE_ARGS = {"distributed_executor_backend": "uni", "disable_log_stats": True}


class ModelError(Exception):
    """A failure to report as data: `kind` is one of protocol.ERROR_KINDS."""

    def __init__(self, kind: str, message: str, param: str | None = None):
        super().__init__(message)
        self.kind = kind
        self.param = param

    def info(self) -> p.ErrorInfo:
        return p.ErrorInfo(self.kind, str(self), self.param)


class SwapFailed(Exception):
    """A swap failed after residents were touched; `residents` names what the
    worker serves now (those that had to leave brought back where possible)."""

    def __init__(self, error: ModelError, residents: list[str]):
        super().__init__(str(error))
        self.error = error
        self.residents = residents


@dataclass
class Plan:
    """A resolved swap target, checked before anything is released."""

    spec: p.ModelSpec
    checkpoint: Checkpoint
    engine_args: dict[str, Any]  # tensor_parallel_size always among them
    shape_key: str

    @property
    def tensor_parallel_size(self) -> int:
        return self.engine_args["tensor_parallel_size"]

    @property
    def cache_key(self) -> str:
        """Snapshots are valid for these files, this config and these engine args."""
        return f"{self.checkpoint.weights_key}-{self.shape_key}"


@dataclass
class Served:
    plan: Plan
    engine: LLMEngine
    frontend_key: str
    sampling_defaults: dict[str, Any]
    requests: _Requests = field(default_factory=lambda: _Requests())
    suspended: bool = False  # not stepped until resumed
    weight_bytes: int = 0
    kv_bytes: int = 0  # while suspended: the blocks kept, where they take the device's memory
    kept_bytes: int = 0  # the KV blocks kept in host memory while suspended
    kv_usage: float = 0.0  # after its last step, published for health reports
    workspace: Any = None  # vLLM's workspace manager made by its build (vllm_seams)
    parsers: parsing.ModelParsers | None = None  # set once its tokenizer is known
    unbuilt_config: Any = None  # its VllmConfig before the build (vllm_seams.unbuilt_copy)
    fingerprint: str | None = None  # vLLM's system_fingerprint, of what it serves now
    rank: int = 0  # a group's: the rank whose device runs it (a TP=1 engine's), else 0
    graphs_deferred: bool = False  # CUDA graphs its build left for idle time (vllm_seams)
    deferred_capture_s: float = 0.0  # spent capturing them so far

    @property
    def name(self) -> str:
        return self.plan.spec.name

    @property
    def has_work(self) -> bool:
        return not self.suspended and self.engine.has_unfinished_requests()

    def resident(self) -> p.Resident:
        return p.Resident(self.name, self.weight_bytes + self.kv_bytes, 0, self.suspended,
                          cache_config=vllm_seams.cache_config_info(self.engine),
                          fingerprint=self.fingerprint, rank=self.rank)


@dataclass(frozen=True)
class Parking:
    """Swapped-out engines kept on the device: at most `max_parked`, and only
    while the device keeps `min_free_bytes` free (the residents' needs come
    first: parked engines are released, oldest first, to keep it)."""

    max_parked: int = 0
    min_free_bytes: int = 0


class EngineHost:
    """Keeps the resident engines, steps them in turn, and keeps parked ones.
    Not thread-safe: the worker's main thread only."""

    def __init__(self, cache: HostCache, group=None, parking: Parking = Parking(),
                 bounded: Callable[[str], contextlib.AbstractContextManager] | None = None
                 ) -> None:
        """`group`: a workers.group.WarmGroup whose warm followers hold the other
        tensor-parallel ranks; None for one process. `bounded(kind)`: the
        worker's watchdog around a render or a step (workers/watchdog.py)."""
        self.residents: dict[str, Served] = {}  # in the order they came in
        self._turn = 0  # the next resident to step, if it has work
        self._bounded = bounded or (lambda kind: contextlib.nullcontext())
        self.parked: OrderedDict[str, Served] = OrderedDict()  # oldest first
        self._arriving: Served | None = None  # a parked engine on its way back
        self.parking = parking
        self.group = group
        self.cache = cache
        weights.set_rank_cache(cache)  # rank 0's, for the functions each rank runs
        self.max_tensor_parallel_size = group.size if group else 1
        self.weights_source: str | None = None  # of the last swap: "host_cache" or "disk"
        self.stats: list[p.EngineStats] = []  # of the steps since take_stats()

    @property
    def models(self) -> list[str]:
        return list(self.residents)

    def report(self) -> list[p.Resident]:
        return [served.resident() for served in self.residents.values()]

    def kv_usage(self, name: str) -> float:
        """Any thread: a resident's KV cache usage after its last step (0
        while suspended, its KV cache released, or gone)."""
        served = self.residents.get(name)
        return 0.0 if served is None or served.suspended else served.kv_usage

    # ---- swap ------------------------------------------------------------------

    def resolve(self, spec: p.ModelSpec) -> Plan:
        try:
            checkpoint = open_checkpoint(spec.path, spec.root)
        except CheckpointError as exc:
            raise ModelError(p.BAD_MODEL, f"{spec.name}: {exc}") from exc
        engine_args = dict(spec.engine_args)
        for key in ("model", "reasoning_parser", *FORCED_ENGINE_ARGS):
            if key in engine_args:
                raise ModelError(p.BAD_ARGS, f"{spec.name}: engine arg {key!r} is set by wcd")
        try:
            parsing.check_names(spec)
        except ValueError as exc:
            raise ModelError(p.BAD_ARGS, str(exc)) from None
        if spec.reasoning_parser:
            # vllm serve's --reasoning-parser is an engine arg too: the engine
            # core holds structured outputs back until the reasoning ends.
            engine_args["reasoning_parser"] = spec.reasoning_parser
        tp = engine_args.setdefault("tensor_parallel_size", 1)
        if not isinstance(tp, int) or not 1 <= tp <= self.max_tensor_parallel_size:
            raise ModelError(p.BAD_ARGS, f"{spec.name}: tensor_parallel_size {tp!r} on a worker "
                                         f"of tensor_parallel_size {self.max_tensor_parallel_size}")
        return Plan(spec, checkpoint, engine_args, checkpoint.shape_key(engine_args))

    def swap(self, spec: p.ModelSpec, replace: list[str], clock: PhaseClock,
             drain: Callable[[list[str]], None]) -> str:
        """Make `spec` resident, the residents named in `replace` leaving first
        (`drain(names)` finishes their requests while the others are stepped);
        returns the path taken. Raises ModelError when nothing was touched,
        SwapFailed when residents had to be brought back."""
        with clock.phase("resolve"):
            plan = self.resolve(spec)
            current = self.residents.get(spec.name)
            stays = current is not None and current.plan.spec == spec and \
                current.plan.cache_key == plan.cache_key
            # A resident of this name with other args or files leaves too; the
            # others named leave whatever path this model takes (a resume too).
            leaving = [name for name in self.residents
                       if (name in replace and name != spec.name)
                       or (name == spec.name and not stays)]
            staying = [self.residents[name] for name in self.residents
                       if name not in leaving and name != spec.name]
            rank = self._free_rank(plan, staying)
            unpark = not stays and self._parked_for(plan, rank) is not None
            in_place = None if stays or unpark else next(
                (name for name in leaving
                 if self.residents[name].plan.shape_key == plan.shape_key), None)
            if in_place is not None:
                rank = self.residents[in_place].rank
            snapshot = None if stays or unpark else self._snapshot_of(plan, rank)
            config = None if stays or unpark or in_place else self._engine_config(
                plan, dummy=bool(snapshot), rank=rank)
            resume = stays and current.suspended
            del current  # engines are looked up by name from here on
        previous = [self.residents[name].plan for name in leaving]
        order = self.models
        with clock.phase("drain"):
            drain(leaving)
        try:
            if stays:
                with clock.phase("release"):
                    self._leave(leaving)
                if resume:
                    with clock.phase("build"):
                        self._resume(spec.name)
                self.weights_source = None
                return "resume" if resume else "noop"
            if unpark:
                # Out of `parked` first: those leaving may park, and push it out.
                self._arriving = self.parked.pop(spec.name)
                with clock.phase("release"):
                    self._leave(leaving)
                with clock.phase("build"):
                    self._unpark(plan)
                self.weights_source = "parked"
                return "unpark"
            self.weights_source = _weights_source(snapshot, self.cache)
            if in_place is not None:
                with clock.phase("release"):
                    self._leave([name for name in leaving if name != in_place])
                    self._wake(self.residents[in_place])
                    self.residents[in_place].engine.reset_prefix_cache()
                self._swap_in_place(in_place, plan, snapshot, clock)
                return "same_shape"
            with clock.phase("release"):
                self._leave(leaving)
            self._build_beside(plan, config, snapshot, clock)
            return "rebuild"
        except Exception as exc:
            error = _as_model_error(plan.spec.name, exc).with_traceback(None)
        # Out of the except block, no traceback holds the failed engine any more:
        # its memory comes back before those that left are brought back.
        if self._arriving is not None:  # a failure before it was unparked: it stays parked
            self.parked[self._arriving.name] = self._arriving
            self._arriving = None
        self._free_memory()
        log.warning("swap to %s failed (%s); bringing back %s", plan.spec.name, error,
                    [prior.spec.name for prior in previous])
        self._bring_back(previous, order)
        raise SwapFailed(error, self.models)

    def unload(self, names: list[str], clock: PhaseClock,
               drain: Callable[[list[str]], None]) -> None:
        """The residents named leave, drained while the others are stepped."""
        leaving = [name for name in self.residents if name in names]
        with clock.phase("drain"):
            drain(leaving)
        with clock.phase("release"):
            self._leave(leaving)

    def snapshot(self, name: str) -> bool:
        """Snapshot a resident's weights into the host cache of each of its
        ranks, unless there already; True when one was taken."""
        served = self.residents.get(name)
        if served is None or not self.cache.enabled or \
                self._snapshot_of(served.plan, served.rank):
            return False
        plan = served.plan
        return all(served.engine.collective_rpc(
            weights.take_rank_snapshot,
            args=(plan.cache_key, name, str(plan.checkpoint.path), plan.checkpoint.root)))

    def _snapshot_of(self, plan: Plan, rank: int = 0) -> str | None:
        """The key of `plan`'s snapshot, if every rank of an engine on ranks
        from `rank` holds one (each rank's cache evicts on its own)."""
        key = plan.cache_key
        followers = range(max(rank, 1), rank + plan.tensor_parallel_size)
        if rank == 0 and self.cache.get(key) is None:
            return None
        if followers and not self.group.holds_snapshot(key, followers):
            return None
        return key

    def _free_rank(self, plan: Plan, staying: list[Served]) -> int:
        """Where an engine of `plan` runs beside `staying`: a group's TP=1
        engine on the first rank none of them runs on; anything else from
        rank 0. A group runs one engine per rank, and an engine of a larger
        size alone (its world is formed at that size)."""
        if self.group is None or not staying:
            return 0
        name = plan.spec.name
        if plan.tensor_parallel_size > 1 or any(
                s.plan.tensor_parallel_size > 1 for s in staying):
            raise ModelError(p.BAD_ARGS, f"{name}: a tensor-parallel group runs an engine of "
                                         f"more than one rank alone (resident: {self.models})")
        taken = {served.rank for served in staying}
        free = [rank for rank in range(self.group.size) if rank not in taken]
        if not free:
            raise ModelError(p.BAD_ARGS, f"{name}: every rank of the group serves a model "
                                         f"(resident: {self.models})")
        return free[0]

    @staticmethod
    def _apply(engine: LLMEngine, snapshot: str) -> None:
        """Each rank of `engine` copies its own snapshot under that key in."""
        engine.collective_rpc(weights.apply_rank_snapshot, args=(snapshot,))

    def _swap_in_place(self, name: str, plan: Plan, snapshot: str | None,
                       clock: PhaseClock) -> None:
        served = self.residents[name]
        previous = served.plan
        vllm_seams.use_workspace(served.workspace)  # weight processing may run its kernels
        try:
            with clock.phase("fetch"):
                # A group's ranks read the files themselves, in build.
                tensors = None if snapshot or plan.tensor_parallel_size > 1 \
                    else list(plan.checkpoint.read_weights())
            with clock.phase("build"):
                if snapshot:
                    self._apply(served.engine, snapshot)
                elif tensors is None:
                    self._load_in_each_rank(served.engine, plan)
                else:
                    self._load_weights(served.engine, tensors)
                    del tensors
                frontend_key = plan.checkpoint.frontend_key()
                if frontend_key != served.frontend_key:
                    vllm_seams.switch_frontend(served.engine, self._engine_config(plan))
                    served.frontend_key = frontend_key
                served.sampling_defaults = served.engine.model_config.get_diff_sampling_param()
                served.parsers = _parsers(plan.spec, served.engine)
                served.plan = plan
        except Exception as exc:
            log.warning("swap to %s failed in place (%s); reloading %s", plan.spec.name,
                        _first_line(exc), previous.spec.name)
            try:
                self._restore_in_place(served, previous)
            except Exception:
                # A reload that failed part-way can leave layers unloaded: only a
                # fresh engine is known good, which the swap's restore builds.
                log.exception("could not reload %s in place", previous.spec.name)
                self._release(name)  # collected once this failure has unwound
            raise
        self.residents = {served.name if key == name else key: engine
                          for key, engine in self.residents.items()}
        self._measure(served)
        served.fingerprint = _fingerprint(served)
        with clock.phase("warm"):
            pass  # graph, caches and kernels are the ones that were serving
        with clock.phase("ready"):
            served.engine.reset_prefix_cache()

    def _restore_in_place(self, served: Served, previous: Plan) -> None:
        snapshot = self._snapshot_of(previous, served.rank)
        if snapshot:
            self._apply(served.engine, snapshot)
        elif previous.tensor_parallel_size > 1:
            self._load_in_each_rank(served.engine, previous)
        else:
            self._load_weights(served.engine, previous.checkpoint.read_weights())
        served.plan = previous

    def _build_beside(self, plan: Plan, config, snapshot: str | None,
                      clock: PhaseClock) -> None:
        with clock.phase("fetch"):
            pass  # from disk, vLLM's loader reads the checkpoint inside build
        self._build_resident(plan, config, snapshot, clock)
        with clock.phase("ready"):
            pass

    def _build_resident(self, plan: Plan, config, snapshot: str | None,
                        clock: PhaseClock) -> None:
        """Build, load and warm an engine, and make it resident; on failure,
        leave nothing of it but garbage for the next collection."""
        served = None
        try:
            with clock.phase("build"):
                # From the cache: vLLM's dummy load format builds the engine
                # without reading the checkpoint, then the snapshot is copied in.
                served = self._build(plan, config)
                served.parsers = _parsers(plan.spec, served.engine)
                if snapshot:
                    self._apply(served.engine, snapshot)
            with clock.phase("warm"):
                self._warm(served.engine)
        except BaseException:
            self._shut_down(served)  # collected once this failure has unwound
            raise
        self._admit(served)

    def _bring_back(self, previous: list[Plan], order: list[str]) -> None:
        """After a failed swap: the residents that left come back (best effort),
        in their places."""
        quiet = PhaseClock(lambda name, seconds: None)
        for plan in previous:
            if plan.spec.name in self.residents:
                continue  # reloaded in place
            try:
                rank = self._free_rank(plan, list(self.residents.values()))
                if self._parked_for(plan, rank) is not None:
                    self._arriving = self.parked.pop(plan.spec.name)
                    self._unpark(plan)
                    continue
                snapshot = self._snapshot_of(plan, rank)
                self._build_resident(plan, self._engine_config(plan, dummy=bool(snapshot),
                                                               rank=rank), snapshot, quiet)
            except Exception:
                log.exception("could not bring %s back", plan.spec.name)
        ranked = {name: i for i, name in enumerate(order)}
        self.residents = dict(sorted(self.residents.items(),
                                     key=lambda item: ranked.get(item[0], len(ranked))))

    def _engine_config(self, plan: Plan, dummy: bool = False, rank: int = 0):
        """`rank`: a group's TP=1 engine on a follower's device."""
        args = {**plan.engine_args, **FORCED_ENGINE_ARGS, "model": str(plan.checkpoint.path)}
        if plan.tensor_parallel_size > 1:
            from wcd.workers.group import GroupExecutor

            args["distributed_executor_backend"] = GroupExecutor
        elif rank > 0:
            from wcd.workers.group import RankExecutor

            args["distributed_executor_backend"] = RankExecutor.on(rank)
        if dummy:
            args["load_format"] = "dummy"
        try:
            return EngineArgs(**args).create_engine_config()
        except TypeError as exc:  # an argument EngineArgs does not have
            raise ModelError(p.BAD_ARGS, f"{plan.spec.name}: {_unknown_arg(exc)}") from exc
        except (ValueError, OSError) as exc:
            # vLLM's checks of the model's config with its engine args (pydantic's
            # ValidationError is a ValueError): an architecture vLLM lacks, a
            # max_model_len past the model's; a config.json transformers cannot read.
            raise ModelError(p.BAD_MODEL, f"{plan.spec.name}: {_first_line(exc)}") from exc
        except Exception as exc:
            raise _internal(f"{plan.spec.name}: the engine config", exc) from exc

    def _build(self, plan: Plan, config) -> Served:
        if self.group is not None:
            self._form_world(plan.tensor_parallel_size)
        unbuilt = vllm_seams.unbuilt_copy(config)
        vllm_seams.allow_graph_capture()
        with vllm_seams.collections_deferred(), vllm_seams.engine_stats_kept() as stats_args:
            engine = LLMEngine.from_vllm_config(config, **stats_args)
        rank = getattr(config.parallel_config.distributed_executor_backend, "rank", 0)
        # A follower's engine has its workspace in the follower: this process's
        # is another engine's.
        return Served(plan, engine, plan.checkpoint.frontend_key(),
                      engine.model_config.get_diff_sampling_param(),
                      workspace=vllm_seams.built_workspace() if rank == 0 else None,
                      unbuilt_config=unbuilt, rank=rank,
                      graphs_deferred=vllm_seams.graphs_deferred(engine))

    def _form_world(self, size: int) -> None:
        """A group's world serves engines of one tensor-parallel size: those
        parked in a world of another size go before it is re-formed."""
        for name in [name for name, served in self.parked.items()
                     if served.plan.tensor_parallel_size != size]:
            self._release_parked(name)
        self.group.form(size)

    @staticmethod
    def _load_weights(engine: LLMEngine, tensors) -> None:
        engine.collective_rpc("reload_weights",
                              kwargs={"weights_iterator": iter(tensors),
                                      "is_checkpoint_format": True})

    @staticmethod
    def _load_in_each_rank(engine: LLMEngine, plan: Plan) -> None:
        """Every rank reads the checkpoint (from the page cache after the
        first) rather than every tensor crossing the leader's pipe to each
        follower: 5 s for 1.43 GB that way on the H100s."""
        engine.collective_rpc(_reload_from_files,
                              args=(str(plan.checkpoint.path), plan.checkpoint.root))

    @staticmethod
    def _warm(engine: LLMEngine) -> None:
        """One greedy token (one pooled input for a pooling model) through the
        new engine: proves it serves before the swap is reported done, and
        pays first-request costs here."""
        engine.add_request("wcd-warm", {"prompt_token_ids": [0]}, pooling.warm_params(engine))
        while engine.has_unfinished_requests():
            engine.step()
        vllm_seams.take_engine_stats(engine, "")  # no model's: not counted

    def _admit(self, served: Served) -> None:
        served.suspended = False
        self._measure(served)
        served.fingerprint = _fingerprint(served)
        self.residents[served.name] = served
        self._keep_headroom()

    def _measure(self, served: Served) -> None:
        """The footprint a Resident reports: parameters (else, where vLLM packed
        them away, the checkpoint's files) and KV cache."""
        parameters = vllm_seams.parameter_bytes(served.engine)
        served.weight_bytes = parameters if parameters is not None else sum(
            f.stat().st_size for f in served.plan.checkpoint.weight_files)
        served.kv_bytes = vllm_seams.kv_cache_bytes(served.engine)

    # ---- leaving and release -------------------------------------------------------

    def _leave(self, names: list[str]) -> None:
        """Residents leave: parked if the policy allows, else released. By name,
        so that no caller's reference keeps a released engine alive."""
        for name in names:
            if self.parking.max_parked and \
                    vllm_seams.free_device_bytes() >= self.parking.min_free_bytes:
                self._park(name)
            else:
                self._release(name)

    def _release(self, name: str) -> None:
        """Drop a resident's engine and give its memory back."""
        served = self.residents.pop(name)
        served.requests.clear()
        self._shut_down(served)
        del served  # the last reference: the collection below must find it garbage
        self._free_memory()

    def release_all(self) -> None:
        for name in self.models:
            self._release(name)
        while self.parked:
            self._release_parked()

    @property
    def _engines_alive(self) -> bool:
        return bool(self.residents or self.parked or self._arriving)

    def _shut_down(self, served: Served | None) -> None:
        """Shut an engine down that is neither resident nor parked any more;
        its memory comes back at _free_memory, once the caller holds no
        reference to it. None: a build that failed half-way."""
        # Other engines in this process still use the distributed groups (a
        # group's world of several ranks is kept by the group itself).
        if self.group is None or self.group.world_size == 1:
            vllm_seams.keep_distributed_state(self._engines_alive)
        if served is None:
            vllm_seams.cleanup_failed_build()
            if self.group is None:
                vllm_seams.unpin_orphaned_models(
                    [s.engine for s in (*self.residents.values(), *self.parked.values(),
                                        self._arriving) if s is not None])
            return
        vllm_seams.unpin_compiled_model(served.engine)
        with vllm_seams.collections_deferred():
            served.engine.engine_core.shutdown()

    def collect_after_build(self) -> None:
        """A build runs with collection off, and it replaces vLLM's per-process
        references (current config, runner globals) that may still have held
        an engine before: collect once the swap is reported, not at the next
        release. (On the H100, the previous engine's weights stayed allocated
        until the next release.)"""
        vllm_seams.release_engine_memory(others_alive=True)

    def _free_memory(self) -> None:
        vllm_seams.release_engine_memory(others_alive=self._engines_alive)
        trim_heap()

    # ---- suspended residents -------------------------------------------------------

    def suspend(self, name: str, clock: PhaseClock) -> list[p.Output | p.Embedding]:
        """At this step boundary, a resident stops being stepped, its engine
        untouched: the KV blocks its requests use are kept in host memory and
        its KV cache is released (where CUDA graphs hold the KV cache's
        addresses, or its layout is one vllm_seams cannot copy, the KV cache
        stays instead). Resumed, it goes on exactly where it was. Returns the
        outputs of the steps that were in flight."""
        served = self.residents.get(name)
        if served is None:
            raise ModelError(p.NOT_LOADED, f"model {name!r} is not resident in this worker "
                                           f"(residents: {self.models})")
        if served.suspended:
            return []
        try:
            with clock.phase("save"):
                vllm_seams.use_workspace(served.workspace)
                with self._bounded("step"):
                    finished = vllm_seams.finish_batches_in_flight(served.engine)
                outputs = [out for ro in finished
                           for out in served.requests.outputs(ro, served.engine)]
                kept = vllm_seams.keep_kv_blocks(served.engine)
                served.suspended = True
            with clock.phase("release"):
                if kept is not None:
                    vllm_seams.release_kv_cache(served.engine)
                    served.kept_bytes = kept
                    served.kv_bytes = kept if vllm_seams.device_is_host() else 0
                    vllm_seams.release_engine_memory(others_alive=True, collect=False)
        except Exception as exc:
            log.exception("suspend of %s failed", name)
            raise ModelError(p.INTERNAL, f"{name}: suspend failed: {_first_line(exc)}") from exc
        return outputs

    def _resume(self, name: str) -> None:
        """A suspended resident gets its KV cache back, with the blocks its
        requests use, and is stepped again."""
        served = self.residents[name]
        self._wake(served)
        self._keep_headroom()

    def _wake(self, served: Served) -> None:
        if served.suspended:
            vllm_seams.restore_kv_cache(served.engine)
            served.kv_bytes = vllm_seams.kv_cache_bytes(served.engine)
            served.kept_bytes = 0
            served.suspended = False

    # ---- parked engines ------------------------------------------------------------

    def _parked_for(self, plan: Plan, rank: int = 0) -> Served | None:
        """The parked engine of this model, if its files and args still match
        and, in a group, its rank is the free one (else it goes)."""
        parked = self.parked.get(plan.spec.name)
        if parked is None or (parked.plan.cache_key == plan.cache_key and parked.rank == rank):
            return parked
        del parked
        self._release_parked(plan.spec.name)
        return None

    def _release_parked(self, name: str | None = None) -> None:
        """Release a parked engine: `name`'s, else the oldest."""
        served = self.parked.pop(name) if name else self.parked.popitem(last=False)[1]
        self._shut_down(served)
        del served
        self._free_memory()

    def _park(self, name: str) -> None:
        """A resident leaves whole (weights and compiled model; KV cache released
        where its addresses are not captured); its requests were drained."""
        served = self.residents.pop(name)
        served.requests.clear()
        if served.suspended:  # its requests were aborted: the blocks kept are nobody's
            vllm_seams.drop_kept_kv_blocks(served.engine)
            served.kept_bytes = 0
        served.engine.reset_prefix_cache()
        served.suspended = False
        stale = self.parked.pop(name, None)  # an engine of other args or files
        self.parked[name] = served
        if stale is not None:
            self._shut_down(stale)
            del stale
            self._free_memory()
        while len(self.parked) > self.parking.max_parked:
            self._release_parked()
        if vllm_seams.release_kv_cache(served.engine):
            served.kv_bytes = 0
            vllm_seams.release_engine_memory(others_alive=True, collect=False)

    def _unpark(self, plan: Plan) -> None:
        """The arriving parked engine becomes resident, serving `plan` (its
        files and engine args the same; its spec, the parsers included, may
        be newer)."""
        parked, self._arriving = self._arriving, None
        try:
            vllm_seams.restore_kv_cache(parked.engine)
            parked.parsers = _parsers(plan.spec, parked.engine)
        except Exception:
            self._shut_down(parked)  # freed at the next collection
            raise
        parked.plan = plan
        parked.engine.reset_prefix_cache()
        self._admit(parked)

    def _keep_headroom(self) -> None:
        """A model came in: parked engines go, oldest first, while the device
        has less than the headroom free."""
        while self.parked and vllm_seams.free_device_bytes() < self.parking.min_free_bytes:
            log.info("releasing parked %s: device below its free-memory headroom",
                     next(iter(self.parked)))
            self._release_parked()

    def parked_contents(self) -> list[p.CachedModel]:
        return [p.CachedModel(name, sum(f.stat().st_size
                                        for f in served.plan.checkpoint.weight_files))
                for name, served in self.parked.items()]

    # ---- requests ----------------------------------------------------------------

    def _resident(self, name: str) -> Served:
        served = self.residents.get(name)
        if served is None:
            raise ModelError(p.NOT_LOADED, f"model {name!r} is not served by this "
                                           f"worker (residents: {self.models})")
        return served

    def add(self, request: p.Generate | p.Embed) -> list[p.Output]:
        """Add every prompt of `request` to its model's engine, or none of them.
        A suspended resident takes them too: they wait for its resume. Returns
        the Outputs ready at once: beam searches with no token to generate."""
        served = self._resident(request.model)
        if not request.prompts and not (isinstance(request, p.Embed) and request.score):
            raise ModelError(p.BAD_ARGS, "a request needs at least one prompt")
        if pooling.task_of(request) not in served.engine.get_supported_tasks():
            raise ModelError(p.UNSUPPORTED, pooling.unsupported(request))
        ready: list[p.Output] = []
        try:
            return_prompt = isinstance(request, p.Generate) and request.return_prompt
            with _request_errors():
                inputs = list(self._inputs(served, request))
                # Every prompt is known before any search can finish: the
                # request's last Output is the one that says so.
                sub_ids = [served.requests.add(request, index, return_prompt, turn)
                           for index, (_, _, turn) in enumerate(inputs)]
                for sub_id, (engine_input, params, turn) in zip(sub_ids, inputs):
                    if isinstance(params, BeamSearchParams):
                        ready += served.requests.search(
                            beam.Search(sub_id, engine_input, params,
                                        served.engine.renderer.get_tokenizer(),
                                        logprobs=request.sampling.get("logprobs") is not None),
                            served.engine)
                        continue
                    reasoning = {} if turn is None else \
                        turn.engine_reasoning(engine_input.get("prompt_token_ids") or [])
                    vllm_seams.add_request(served.engine, sub_id, engine_input, params,
                                           **reasoning)
        except BaseException:
            # Ids the engine never got are ignored there.
            served.engine.abort_request(served.requests.forget(request.request_id))
            raise
        return ready

    def _inputs(self, served: Served, request: p.Generate | p.Embed) -> Iterator[tuple]:
        """(engine input, params, chat turn) per prompt, rendered as vLLM
        renders them; the turn runs the model's parsers on a chat. The params
        of a beam search are its BeamSearchParams, as in vLLM's server."""
        if isinstance(request, p.Embed):
            with self._bounded("render"):
                inputs = pooling.engine_requests(served.engine, request)
            for engine_input, params in inputs:
                yield engine_input, params, None
            return
        sampling = {**served.sampling_defaults, **request.sampling}
        turn = self._chat_turn(served, request, sampling)
        if turn is not None:
            sampling = turn.sampling(sampling)
        if request.beam_search is None:
            params = vllm_seams.sampling_params(sampling)
            params.output_kind = RequestOutputKind.DELTA
        for prompt in request.prompts:
            engine_input = self._render(served.engine, request, prompt)
            max_tokens = _max_tokens(served.engine.model_config, served.sampling_defaults,
                                     engine_input, request.sampling.get("max_tokens"))
            if request.beam_search is not None:
                yield engine_input, beam.params(sampling, request.beam_search, max_tokens), turn
            else:
                yield engine_input, _with_max_tokens(params, max_tokens), turn

    @staticmethod
    def _chat_turn(served: Served, request: p.Generate,
                   sampling: dict[str, Any]) -> parsing.ChatTurn | None:
        """A chat request's turn with the model's parsers; None without any
        (a chat has one prompt, its messages)."""
        if request.chat is None or request.prompts[0].messages is None:
            return None
        return parsing.ChatTurn.start(served.parsers, request, request.prompts[0].messages,
                                      sampling)

    def _render(self, engine: LLMEngine, request: p.Generate, prompt: p.Prompt):
        """The prompt as vLLM's OpenAI server renders it, with the request's
        tokenization and chat options."""
        tok_params = vllm_seams.tokenize_params(engine, request.render,
                                                prompt.messages is not None,
                                                detokenize=request.return_prompt)
        return self._render_with(engine, prompt, request, tok_params)

    def _render_with(self, engine: LLMEngine, prompt: p.Prompt,
                     request: p.Generate | p.Tokenize, tok_params):
        with self._bounded("render"):
            if prompt.messages is not None:
                return vllm_seams.render_chat(engine, prompt.messages,
                                              request.chat_template_kwargs,
                                              request.chat_template, request.render, tok_params)
            text_or_ids = prompt.prompt if prompt.prompt is not None else prompt.prompt_token_ids
            if text_or_ids is not None:
                return vllm_seams.render_completion(engine, text_or_ids, tok_params)
        raise ModelError(p.BAD_ARGS, "one of prompt, prompt_token_ids, messages is required")

    def tokenize(self, command: p.Tokenize) -> p.Tokenized:
        """vLLM's /tokenize: the prompt rendered as for generation, with no
        context limit; a suspended resident answers too (its tokenizer stays)."""
        engine = self._resident(command.model).engine
        tok_params = vllm_seams.tokenize_only_params(command.render,
                                                     command.prompt.messages is not None)
        with _request_errors():
            token_ids = list(self._render_with(engine, command.prompt, command, tok_params)
                             ["prompt_token_ids"])
            strs = engine.renderer.tokenizer.convert_ids_to_tokens(token_ids) \
                if command.return_token_strs else None
        return p.Tokenized(command.op_id, token_ids, engine.model_config.max_model_len, strs)

    def detokenize(self, command: p.Detokenize) -> p.Detokenized:
        engine = self._resident(command.model).engine
        with _request_errors():
            return p.Detokenized(command.op_id, vllm_seams.detokenize(engine, command.token_ids))

    def has_work(self, names: list[str] | None = None) -> bool:
        """Whether a resident (of `names`, if given) has requests to step:
        suspended ones wait."""
        return any(served.has_work for served in self.residents.values()
                   if names is None or served.name in names)

    def unfinished_count(self) -> int:
        return sum(served.engine.get_num_unfinished_requests()
                   for served in self.residents.values())

    def step(self) -> list[p.Output | p.Embedding]:
        """One engine step of the next resident with work, in turn, so one
        model's long generations do not starve another's."""
        residents = list(self.residents.values())
        for i in range(len(residents)):
            served = residents[(self._turn + i) % len(residents)]
            if served.has_work:
                self._turn = (self._turn + i + 1) % len(residents)
                vllm_seams.use_workspace(served.workspace)
                with self._bounded("step"):
                    outputs = served.engine.step()
                served.kv_usage = vllm_seams.kv_cache_usage(served.engine)
                stats = vllm_seams.take_engine_stats(served.engine, served.name)
                if stats is not None:
                    self.stats.append(stats)
                return [out for ro in outputs
                        for out in served.requests.outputs(ro, served.engine)]
        return []

    # ---- CUDA graphs left for idle time --------------------------------------------

    def graphs_deferred(self) -> bool:
        """Whether a resident that is not suspended has CUDA graphs its build
        left for later (vllm_seams seam 22)."""
        return any(self._deferring())

    def capture_deferred_graph(self) -> None:
        """One graph of such a resident, between steps while none has work: a
        command that arrives meanwhile waits for one capture, not for all."""
        served = next(self._deferring())
        started = time.perf_counter()
        vllm_seams.use_workspace(served.workspace)
        try:
            with self._bounded("step"):
                served.graphs_deferred = vllm_seams.capture_deferred_graph(served.engine)
        except Exception:
            # What was captured before stays in use; bigger batches keep
            # running without graphs.
            log.exception("%s: capturing a deferred CUDA graph failed; no more are captured",
                          served.name)
            served.graphs_deferred = False
            return
        served.deferred_capture_s += time.perf_counter() - started
        if not served.graphs_deferred:
            log.info("%s: the CUDA graphs left by its build captured in %.3f s of idle time",
                     served.name, served.deferred_capture_s)

    def _deferring(self) -> Iterator[Served]:
        return (served for served in self.residents.values()
                if served.graphs_deferred and not served.suspended)

    def take_stats(self) -> list[p.EngineStats]:
        """The engine stats of the steps since the last call."""
        stats, self.stats = self.stats, []
        return stats

    def abort(self, request_ids: list[str]) -> None:
        for served in self.residents.values():
            sub_ids = [sub for rid in request_ids for sub in served.requests.forget(rid)]
            if sub_ids:
                served.engine.abort_request(sub_ids)
                # Their blocks are free now, not at the next step, which an
                # idle engine never takes.
                if not served.suspended:
                    served.kv_usage = vllm_seams.kv_cache_usage(served.engine)


class _Requests:
    """The daemon's requests and their prompts' engine requests: a request's
    prompts share its sampling and are one stream to the daemon."""

    def __init__(self) -> None:
        self._prompt_of: dict[str, tuple[str, int]] = {}  # engine id -> (request, index)
        self._open: dict[str, set[str]] = {}  # request -> its unfinished engine ids
        self._prompt_owed: set[str] = set()  # engine ids whose PromptInfo is not sent yet
        self._turns: dict[str, parsing.ChatTurn] = {}  # engine id -> its chat's parsing
        self._embeds: dict[str, p.Embed] = {}  # engine id -> its Embed, which says the encoding
        # A beam-searched prompt's id stands for its search, whose rounds are
        # engine requests of their own.
        self._searches: dict[str, beam.Search] = {}
        self._round_of: dict[str, str] = {}  # a round's engine id -> its prompt's id

    def add(self, request: p.Generate | p.Embed, index: int, return_prompt: bool = False,
            turn: parsing.ChatTurn | None = None) -> str:
        request_id = request.request_id
        sub_id = f"{request_id}-{index}"
        self._prompt_of[sub_id] = (request_id, index)
        self._open.setdefault(request_id, set()).add(sub_id)
        if return_prompt:
            self._prompt_owed.add(sub_id)
        if turn is not None:
            self._turns[sub_id] = turn
        if isinstance(request, p.Embed):
            self._embeds[sub_id] = request
        return sub_id

    def search(self, search: beam.Search, engine: LLMEngine) -> list[p.Output]:
        """Start a prompt's beam search (its id: the prompt's); returns its
        Outputs where it has nothing to generate."""
        self._searches[search.id] = search
        return list(self._next_round(search.id, engine))

    def _next_round(self, sub_id: str, engine: LLMEngine) -> Iterator[p.Output]:
        """A search's next round into the engine, or once it is done, its
        completions."""
        search = self._searches[sub_id]
        if search.done:
            del self._searches[sub_id]
            yield from self.outputs(search.result(), engine)
            return
        for engine_id, prompt, params in search.round():
            self._round_of[engine_id] = sub_id
            engine.add_request(engine_id, prompt, params)

    def forget(self, request_id: str) -> list[str]:
        """Drop a request; returns its unfinished engine ids."""
        engine_ids = []
        for sub in sorted(self._open.pop(request_id, ())):
            self._prompt_of.pop(sub, None)
            self._prompt_owed.discard(sub)
            self._turns.pop(sub, None)
            self._embeds.pop(sub, None)
            search = self._searches.pop(sub, None)
            if search is None:
                engine_ids.append(sub)
                continue
            for engine_id in search.pending:
                del self._round_of[engine_id]
            engine_ids += search.pending
        return engine_ids

    def clear(self) -> None:
        self._prompt_of.clear()
        self._open.clear()
        self._prompt_owed.clear()
        self._turns.clear()
        self._embeds.clear()
        self._searches.clear()
        self._round_of.clear()

    def outputs(self, ro: RequestOutput | PoolingRequestOutput,
                engine: LLMEngine) -> Iterator[p.Output | p.Embedding]:
        """One Output per completion with news; only the request's very last
        one says finished, so the daemon stops reading exactly there. A beam
        search's round output goes to its search."""
        search_of = self._round_of.pop(ro.request_id, None)
        if search_of is not None:
            if self._searches[search_of].take(ro):
                yield from self._next_round(search_of, engine)
            return
        owner = self._prompt_of.get(ro.request_id)
        if owner is None:
            return  # aborted meanwhile, or wcd's own warm-up request
        request_id, index = owner
        prompt = None
        if ro.request_id in self._prompt_owed:
            self._prompt_owed.discard(ro.request_id)
            prompt = _prompt_info(ro, engine)
        turn = self._turns.get(ro.request_id)
        last_of_request = False
        if ro.finished:
            self._prompt_of.pop(ro.request_id)
            self._turns.pop(ro.request_id, None)
            remaining = self._open[request_id]
            remaining.discard(ro.request_id)
            if not remaining:
                del self._open[request_id]
                last_of_request = True
        if isinstance(ro, PoolingRequestOutput):
            yield pooling.embedding(ro, request_id, index, last_of_request,
                                    self._embeds.pop(ro.request_id), engine)
        else:
            yield from _outputs(ro, request_id, index, last_of_request, prompt, turn)


def _outputs(ro: RequestOutput, request_id: str, prompt_index: int,
             last_of_request: bool, prompt: p.PromptInfo | None,
             turn: parsing.ChatTurn | None) -> Iterator[p.Output]:
    prompt_tokens = len(ro.prompt_token_ids or ())
    last = len(ro.outputs) - 1
    for i, completion in enumerate(ro.outputs):
        yield p.Output(
            request_id=request_id,
            index=completion.index,
            text=completion.text,
            token_ids=list(completion.token_ids),
            prompt_tokens=prompt_tokens,
            finish_reason=completion.finish_reason,
            stop_reason=completion.stop_reason,
            finished=last_of_request and i == last,
            logprobs=_logprobs(completion),
            prompt_index=prompt_index,
            prompt=prompt,
            parsed=turn.parse(completion, ro.prompt_token_ids or ()) if turn else None,
        )


def _fingerprint(served: Served) -> str | None:
    return vllm_seams.system_fingerprint(served.unbuilt_config,
                                         str(served.plan.checkpoint.path))


def _prompt_info(ro: RequestOutput, engine: LLMEngine) -> p.PromptInfo:
    """The prompt as rendered (its text detokenized where the request asked
    for it), and its logprobs in vLLM's order: the prompt's token, then the top."""
    token_ids = list(ro.prompt_token_ids or ())
    if ro.prompt_logprobs is None:
        return p.PromptInfo(token_ids, ro.prompt or "")
    logprobs = [None if position is None else
                [(token_id, lp.decoded_token, lp.logprob, lp.rank)
                 for token_id, lp in position.items()]
                for position in ro.prompt_logprobs]
    tokenizer = engine.renderer.tokenizer
    first = tokenizer.decode(token_ids[0]) if token_ids and tokenizer is not None else ""
    return p.PromptInfo(token_ids, ro.prompt or "", logprobs, first)


def _logprobs(completion) -> list[dict[str, Any]] | None:
    if completion.logprobs is None:
        return None
    entries = []
    for token_id, top in zip(completion.token_ids, completion.logprobs):
        chosen = top[token_id]
        entries.append({
            "token_id": token_id,
            "token": chosen.decoded_token,
            "logprob": chosen.logprob,
            # In vLLM's order (the sampled token first), from which its server
            # lists the first few.
            "top": [[tid, lp.decoded_token, lp.logprob] for tid, lp in top.items()],
        })
    return entries


# What vLLM's server answers 400 for (its create_error_response): its validation
# errors, the raw types it has not typed yet, a template's error; and a request
# nested deeper than a renderer recurses.
_CLIENT_ERRORS = (VLLMValidationError, ValueError, TypeError, OverflowError, TemplateError,
                  RecursionError)


@contextlib.contextmanager
def _request_errors() -> Iterator[None]:
    """A request vLLM's renderer, tokenizer or engine refuses is the client's
    error; any other failure is the worker's own."""
    try:
        yield
    except RenderTimeout as exc:
        raise ModelError(p.BAD_ARGS, str(exc)) from None
    except ModelError:
        raise
    except pooling.Refused as exc:
        raise ModelError(p.BAD_ARGS, str(exc), exc.param) from None
    except _CLIENT_ERRORS as exc:
        raise ModelError(p.BAD_ARGS, _first_line(exc)) from exc
    except Exception as exc:
        raise _internal("a request", exc) from exc


def _parsers(spec: p.ModelSpec, engine: LLMEngine) -> parsing.ModelParsers:
    try:
        return parsing.model_parsers(spec, engine)
    except ValueError as exc:
        raise ModelError(p.BAD_ARGS, f"{spec.name}: {exc}") from None


def _weights_source(snapshot: str | None, cache: HostCache) -> str:
    """Where a swap's weights come from: the checkpoint ("disk"), the host
    cache, or the cache's disk tier (a snapshot file read back)."""
    if snapshot is None:
        return "disk"
    return "snapshot_file" if cache.came_from_disk(snapshot) else "host_cache"


def _reload_from_files(worker, path: str, root: str) -> None:
    """Runs in each rank of a group (sent by reference: every rank imports
    this module)."""
    worker.reload_weights(weights_iterator=open_checkpoint(path, root).read_weights(),
                          is_checkpoint_format=True)


def _as_model_error(name: str, exc: Exception) -> ModelError:
    """A failed swap's error, by the type of what failed it: memory; a model
    vLLM's loader cannot use (its ValueError and KeyError for weights and
    config that do not fit the architecture, a file unreadable or corrupt);
    else the worker's own failure."""
    if isinstance(exc, ModelError):
        return exc
    if vllm_seams.out_of_memory(exc):
        return ModelError(p.OUT_OF_MEMORY, f"{name}: out of memory: {_first_line(exc)}")
    if isinstance(exc, (ValueError, KeyError, OSError, SafetensorError)):
        return ModelError(p.BAD_MODEL, f"{name}: {type(exc).__name__}: {_first_line(exc)}")
    return _internal(name, exc)


def _internal(what: str, exc: BaseException) -> ModelError:
    """A failure that is no request's or model's fault: logged here with its
    traceback; whoever asked gets a 500 that names its type, not its words."""
    log.error("%s failed in the worker", what, exc_info=exc)
    return ModelError(p.INTERNAL, f"{what}: internal error ({type(exc).__name__}); see the "
                                  "worker's log")


def _unknown_arg(exc: TypeError) -> str:
    message = str(exc)
    if "unexpected keyword argument" in message:
        arg = message.rsplit("argument", 1)[1].strip()
        return f"{arg} is not a vLLM engine argument"
    return message


def _max_tokens(model_config, defaults: dict[str, Any], engine_input,
                requested: int | None) -> int | None:
    """max_tokens as vLLM's OpenAI server sets it (completion/chat serving):
    max_tokens over max_model_len and a prompt past the context are refused,
    anything else is trimmed to the rest of the context (vLLM's offline engine
    would default to 16 instead). vLLM's own functions, for its outcomes and
    messages; the refusals are VLLMValidationErrors, so BAD_ARGS. None: an
    input without token ids, whose params keep their own."""
    max_model_len = model_config.max_model_len
    limits = TokenizeParams(max_total_tokens=max_model_len, max_output_tokens=requested or 0,
                            max_total_tokens_param="max_model_len",
                            max_output_tokens_param="max_tokens")
    prompt = engine_input.get("prompt_token_ids") if isinstance(engine_input, dict) else None
    if prompt is None:
        return None
    limits.apply_post_tokenization(None, {"prompt_token_ids": prompt})
    return get_max_tokens(max_model_len, requested, len(prompt), defaults,
                          _override_max_tokens(model_config, defaults))


def _with_max_tokens(params: SamplingParams, max_tokens: int | None) -> SamplingParams:
    prompt_params = params.clone()
    if max_tokens is not None:
        prompt_params.max_tokens = max_tokens
        # A prompt of exactly max_model_len leaves 0: the server's SamplingParams
        # refuses that with its own message, so does this one (a beam search
        # takes 0, and generates nothing).
        SamplingParams(max_tokens=max_tokens)
    return prompt_params


def _override_max_tokens(model_config, defaults: dict[str, Any]) -> int | None:
    """The server's cap from the generation config (OpenAIServingCompletion /
    OpenAIServingChat __init__)."""
    if model_config.generation_config not in ("auto", "vllm"):
        return defaults.get("max_tokens")
    return (getattr(model_config, "override_generation_config", None) or {}).get("max_new_tokens")


def _first_line(exc: BaseException) -> str:
    """One line for a log or a client. pydantic errors (vLLM's configs) put the
    useful part after a header line, so their messages are used instead."""
    details = getattr(exc, "errors", None)
    if callable(details):
        try:
            text = "; ".join(_pydantic_line(e) for e in details())
        except Exception:  # not pydantic after all
            text = str(exc)
    else:
        text = str(exc)
    text = " ".join(text.split()) or type(exc).__name__
    return text[:500]


def _pydantic_line(error: dict) -> str:
    where = ".".join(str(part) for part in error.get("loc", ()) if part)
    message = error.get("msg", "")
    return f"{where}: {message}" if where else message
