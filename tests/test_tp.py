"""Tensor-parallel worker groups (wcd/workers/group.py) against vLLM's own TP=2.

Two views of one mechanism, both real vLLM on CPU with TP=2:
- the leader alone, as a script in its own process: one warm follower started
  before any model, a host cache on each rank and parking on, then wcd's
  EngineHost swaps small-a -> small-b (in place) -> wide-a (small-b parked) ->
  small-b (unparked) -> small-a (in place, each rank from its own snapshot);
  the torch.distributed default group and vLLM's world and TP groups must be
  the very objects of the first build, on both ranks. Then the group
  re-partitions TP=2 -> TP=1 -> TP=2 -> TP=1 in the same two processes, every
  world named as a fresh process names its first (what compiled collectives
  call on CUDA), TP=2 coming back from the ranks' snapshots;
- the daemon with a `tensor_parallel_size: 2` worker, driven by wcctl and the
  OpenAI endpoint: outputs equal vLLM's own TP=2 run, both PIDs survive swaps,
  a model of a TP size the worker is not configured for is refused, one it is
  configured for re-partitions the group, a follower's death restarts the group.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import pytest

from conftest import ENGINE_ARGS, GREEDY, MODELS, PROMPTS, ROOT, run_reference
from daemon_harness import alive, openai_client, serving

pytestmark = pytest.mark.vllm

TP_ARGS = {**ENGINE_ARGS, "tensor_parallel_size": 2}
TP_PROMPTS = PROMPTS[:2]
# (model, tensor_parallel_size, path the swap takes, where the weights came from);
# every swap is followed by a snapshot on each rank, as the worker takes one.
SEQUENCE = [("small-a", 2, "rebuild", "disk"), ("small-b", 2, "same_shape", "disk"),
            ("wide-a", 2, "rebuild", "disk"), ("small-b", 2, "unpark", "parked"),
            ("small-a", 2, "same_shape", "host_cache"), ("small-a", 1, "rebuild", "disk"),
            ("small-b", 1, "same_shape", "disk"), ("small-a", 2, "rebuild", "host_cache"),
            ("small-b", 1, "rebuild", "host_cache")]
KEPT_WORLD = 5  # the first steps, in one world
FAILED_RE_PARTITION_AFTER = 7  # the step (TP=2) after which a TP=1 build fails
# 2 cores: one OpenMP thread per rank. vLLM's automatic binding wants a NUMA
# node per rank, so its own run binds rank r to core r (VLLM_CPU_OMP_THREADS_BIND
# is a compile-cache factor, so wcd's ranks run without it).
THREADS = {"OMP_NUM_THREADS": "1"}
REFERENCE_THREADS = {**THREADS, "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
CACHE_BYTES = 256 << 20  # each rank's; the demo checkpoints are a few MB


@pytest.fixture(scope="module")
def tp_reference(demo_models) -> dict:
    spec = {"models": {name: {"path": str(demo_models / name), "engine_args": TP_ARGS}
                       for name in ("small-a", "small-b", "wide-a")},
            "prompts": TP_PROMPTS, "sampling": GREEDY}
    with mock.patch.dict(os.environ, REFERENCE_THREADS):
        return run_reference(spec)


@pytest.fixture(scope="module")
def tp1_reference(demo_models) -> dict:
    """vLLM's TP=1 run with the one thread a group's rank has."""
    spec = {"models": {name: {"path": str(demo_models / name), "engine_args": ENGINE_ARGS}
                       for name in ("small-a", "small-b")},
            "prompts": TP_PROMPTS, "sampling": GREEDY}
    with mock.patch.dict(os.environ, THREADS):
        return run_reference(spec)


# ---- the leader alone -------------------------------------------------------------


@pytest.fixture(scope="module")
def leader_run(demo_models) -> dict:
    env = {**os.environ, **THREADS}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    done = subprocess.run([sys.executable, __file__, str(demo_models)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=900)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("WCD-TP ")), None)
    assert line, f"leader failed (rc {done.returncode}):\n{done.stderr[-6000:]}"
    return json.loads(line.split(" ", 1)[1])


def test_group_outputs_equal_vllm_at_each_tensor_parallel_size(leader_run, tp_reference,
                                                                tp1_reference):
    for step, (model, tp, path, source) in zip(leader_run["steps"], SEQUENCE, strict=True):
        reference = tp_reference if tp == 2 else tp1_reference
        expected = [r["token_ids"] for r in reference[model]["prompts"]]
        assert step["token_ids"] == expected, (model, tp)
        assert (step["path"], step["weights_source"]) == (path, source), (model, tp)


def test_each_rank_keeps_a_snapshot_of_its_own(leader_run):
    """After each swap both ranks hold the model's snapshot, in their own caches."""
    for step, (model, tp, _, _) in zip(leader_run["steps"], SEQUENCE):
        assert step["snapshot_held"] == [True] * tp, (model, tp)


def test_group_keeps_processes_and_distributed_groups_across_swaps(leader_run):
    before = leader_run["before_first_build"]
    assert before["leader"]["dist_initialized"] is False
    first = leader_run["steps"][0]["state"]
    for step in leader_run["steps"][:KEPT_WORLD]:
        state = step["state"]
        assert state["pids"] == before["pids"], "a rank was restarted"
        for now, then in zip([state["leader"], *state["followers"]],
                             [first["leader"], *first["followers"]]):
            for key in ("default_pg_id", "world_group_id", "tp_group_id", "tp_cpu_group_id"):
                assert now[key] == then[key] is not None, (step["model"], key)


def test_group_re_partitions_in_the_same_processes(leader_run):
    """TP=1: the leader alone in a world of its own, the follower out of any;
    TP=2 again: one world of both, in the same two processes."""
    pids = leader_run["before_first_build"]["pids"]
    for step, (model, tp, _, _) in zip(leader_run["steps"][KEPT_WORLD:], SEQUENCE[KEPT_WORLD:]):
        state = step["state"]
        assert state["pids"] == pids, "a rank was restarted"
        assert state["leader"]["world_size"] == tp, (model, tp)
        follower = state["followers"][0]
        assert follower["world_size"] == (2 if tp == 2 else None), (model, tp)


def test_every_world_has_the_group_names_of_a_fresh_process(leader_run):
    """A graph compiled by a fresh process (and loaded from the compile cache)
    calls its collectives by group name: tp:0 in every world formed."""
    for step, (model, tp, _, _) in zip(leader_run["steps"], SEQUENCE):
        members = [step["state"]["leader"], *step["state"]["followers"][:tp - 1]]
        assert [(m["world_group_name"], m["tp_group_name"]) for m in members] == \
            [("world:0", "tp:0")] * tp, (model, tp)


def test_a_failed_re_partition_brings_the_tp2_model_back(leader_run, tp_reference):
    failed = leader_run["failed_re_partition"]
    assert (failed["kind"], failed["residents"]) == ("out_of_memory", ["small-a"])
    assert failed["state"]["pids"] == leader_run["before_first_build"]["pids"]
    assert [s["world_size"] for s in (failed["state"]["leader"], *failed["state"]["followers"])] \
        == [2, 2]
    assert failed["token_ids"] == [r["token_ids"] for r in tp_reference["small-a"]["prompts"]]


def test_a_group_serves_two_tp1_models_at_once_one_per_rank(leader_run, tp1_reference):
    beside = leader_run["side_by_side"]["beside"]
    assert beside["path"] == "rebuild"
    assert beside["ranks"] == {"small-b": 0, "small-a": 1}
    for model, tokens in beside["token_ids"].items():
        assert tokens == [r["token_ids"] for r in tp1_reference[model]["prompts"]], model
    state = beside["state"]
    assert state["pids"] == leader_run["before_first_build"]["pids"]
    # Each rank in a one-rank world of its own, named as a fresh process names it.
    assert [(m["world_size"], m["tp_group_name"]) for m in
            (state["leader"], *state["followers"])] == [(1, "tp:0"), (1, "tp:0")]


def test_a_tp2_model_replaces_the_side_by_side_models_in_one_world(leader_run, tp_reference):
    back = leader_run["side_by_side"]["back"]
    assert (back["path"], back["residents"]) == ("rebuild", ["small-a"])
    assert back["token_ids"]["small-a"] == [r["token_ids"]
                                            for r in tp_reference["small-a"]["prompts"]]
    state = back["state"]
    assert state["pids"] == leader_run["before_first_build"]["pids"]
    assert [m["world_size"] for m in (state["leader"], *state["followers"])] == [2, 2]


def leader(models: str) -> dict:
    """Runs as a script: a wcd worker's engine side, with a TP=2 group."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from wcd.workers import protocol as p
    from wcd.workers import vllm_seams
    from wcd.workers.engine import EngineHost, Parking, PhaseClock
    from wcd.workers.group import WarmGroup
    from wcd.workers.weights import HostCache

    vllm_seams.apply()
    vllm_seams.freeze_import_heap()
    group = WarmGroup(2, host_cache_bytes=CACHE_BYTES)
    host = EngineHost(HostCache(CACHE_BYTES, pinned=False), group, Parking(max_parked=2))
    result = {"before_first_build": group.state(), "steps": []}
    try:
        for i, (name, tp, _, _) in enumerate(SEQUENCE):
            spec = p.ModelSpec(name, f"{models}/{name}",
                               {**ENGINE_ARGS, "tensor_parallel_size": tp})
            path = host.swap(spec, host.models, PhaseClock(lambda phase, s: None),
                             lambda names: None)
            source = host.weights_source
            host.snapshot(name)
            plan = host.residents[name].plan
            held = [plan.cache_key in host.cache,
                    *([group.holds_snapshot(plan.cache_key, range(1, tp))] if tp > 1 else [])]
            result["steps"].append({
                "model": name, "path": path, "weights_source": source, "state": group.state(),
                "snapshot_held": held,
                "token_ids": [_generate(host, name, prompt) for prompt in TP_PROMPTS]})
            if i == FAILED_RE_PARTITION_AFTER:
                result["failed_re_partition"] = _fail_a_re_partition(host, group, models)
        result["side_by_side"] = _side_by_side(host, group, models)
        host.release_all()
    finally:
        group.close()
    return result


def _fail_a_re_partition(host, group, models: str) -> dict:
    """A TP=1 build that runs out of memory after the TP=2 engine was released
    and its world destroyed: the TP=2 model must come back in a new world."""
    from wcd.workers import protocol as p
    from wcd.workers.engine import PhaseClock, SwapFailed

    spec = p.ModelSpec("small-a-oom", f"{models}/small-a",
                       {**ENGINE_ARGS, "tensor_parallel_size": 1,
                        "kv_cache_memory_bytes": 1 << 45})
    try:
        host.swap(spec, host.models, PhaseClock(lambda phase, s: None), lambda names: None)
    except SwapFailed as failed:
        return {"kind": failed.error.kind, "residents": failed.residents,
                "state": group.state(),
                "token_ids": [_generate(host, "small-a", prompt) for prompt in TP_PROMPTS]}
    return {"kind": None}


def _side_by_side(host, group, models: str) -> dict:
    """small-b at TP=1 on rank 0 (the last step), small-a at TP=1 loaded
    beside it on rank 1, both generating at once; then small-a at TP=2
    replaces both."""
    from wcd.workers import protocol as p
    from wcd.workers.engine import PhaseClock

    def swap(tp: int, replace: list[str]) -> str:
        spec = p.ModelSpec("small-a", f"{models}/small-a",
                           {**ENGINE_ARGS, "tensor_parallel_size": tp})
        return host.swap(spec, replace, PhaseClock(lambda phase, s: None), lambda names: None)

    beside = {"path": swap(1, []), "ranks": {n: s.rank for n, s in host.residents.items()},
              "state": group.state(), "token_ids": _generate_at_once(host, host.models)}
    back = {"path": swap(2, host.models), "residents": host.models, "state": group.state(),
            "token_ids": {"small-a": [_generate(host, "small-a", prompt)
                                      for prompt in TP_PROMPTS]}}
    return {"beside": beside, "back": back}


def _generate_at_once(host, models: list[str]) -> dict[str, list[list[int]]]:
    """Every prompt to every model, stepped together."""
    from wcd.workers import protocol as p

    ids = {}
    for model in models:
        for i, prompt in enumerate(TP_PROMPTS):
            request_id = f"r-{model}-{i}-{time.monotonic_ns()}"
            ids[request_id] = (model, i)
            host.add(p.Generate(request_id, model, [p.Prompt(prompt=prompt)], dict(GREEDY)))
    tokens = {model: [[] for _ in TP_PROMPTS] for model in models}
    while host.has_work():
        for out in host.step():
            model, i = ids[out.request_id]
            tokens[model][i] += out.token_ids
    return tokens


def _generate(host, model: str, prompt: str) -> list[int]:
    from wcd.workers import protocol as p

    host.add(p.Generate(f"r-{time.monotonic_ns()}", model, [p.Prompt(prompt=prompt)],
                        dict(GREEDY)))
    tokens: list[int] = []
    while host.has_work():
        for out in host.step():
            tokens += out.token_ids
    return tokens


# ---- the daemon -------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, demo_models, tp_reference):
    models = {name: {"path": str(demo_models / name)} for name in ("small-a", "small-b", "wide-a")}
    models["small-a-tp1"] = {"path": str(demo_models / "small-a"), "tensor_parallel_size": 1}
    models["small-b-tp1"] = {"path": str(demo_models / "small-b"), "tensor_parallel_size": 1}
    models["small-a-tp4"] = {"path": str(demo_models / "small-a"), "tensor_parallel_size": 4}
    with serving(tmp_path_factory.mktemp("wcd-tp"), demo_models,
                 workers=[{"device": "cpu", "tensor_parallel_size": 2,
                           "serves_tensor_parallel_sizes": [1, 2]}],
                 defaults=TP_ARGS, models=models) as daemon:
        yield daemon


def group_pids(daemon) -> list[int]:
    worker = daemon.json("ps")["workers"][0]
    return [worker["pid"], *worker["group_pids"]]


def completions(daemon, model: str) -> list[str]:
    client = openai_client(daemon)
    return [client.completions.create(model=model, prompt=prompt, **GREEDY).choices[0].text
            for prompt in TP_PROMPTS]


def test_daemon_group_swaps_keep_pids_and_match_vllm(daemon, tp_reference):
    pids = group_pids(daemon)
    assert len(pids) == 2 and all(alive(pid) for pid in pids)
    assert "cpu tp=2" in daemon.wcctl("ps").stdout
    for model, path in (("small-a", None), ("small-b", "same_shape"), ("wide-a", "rebuild")):
        if path:
            done = daemon.json("swap", model)
            assert (done["model"], done["path"]) == (model, path)
        expected = [r["text"] for r in tp_reference[model]["prompts"]]
        assert completions(daemon, model) == expected, model
        assert group_pids(daemon) == pids


def test_model_of_a_tensor_parallel_size_no_worker_serves_is_refused(daemon):
    client = openai_client(daemon)
    import openai

    with pytest.raises(openai.UnprocessableEntityError) as refused:
        client.completions.create(model="small-a-tp4", prompt="hi", max_tokens=2)
    assert "tensor_parallel_size 4; the workers serve [1, 2]" in str(refused.value)
    done = daemon.wcctl("swap", "small-a-tp4")
    assert done.returncode != 0 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "tensor_parallel_size" in done.stderr


def test_a_tp1_model_re_partitions_the_group_in_its_processes(daemon, tp_reference,
                                                              tp1_reference):
    """`serves_tensor_parallel_sizes: [1, 2]`: a request for a TP=1 model is
    served by the group's leader alone, and a TP=2 model by both again, with
    no process restarted."""
    pids = group_pids(daemon)
    expected = [r["text"] for r in tp1_reference["small-a"]["prompts"]]
    assert completions(daemon, "small-a-tp1") == expected
    assert "cpu tp=2 (model tp=1)" in daemon.wcctl("ps").stdout
    done = daemon.json("swap", "wide-a")
    assert (done["model"], done["path"]) == ("wide-a", "rebuild")
    assert completions(daemon, "wide-a") == [r["text"] for r in tp_reference["wide-a"]["prompts"]]
    assert group_pids(daemon) == pids


def test_the_daemon_runs_two_tp1_models_on_the_group_at_once(daemon, tp_reference,
                                                           tp1_reference):
    """Requests for two TP=1 models: each runs on a rank of its own, both
    resident and answering at once; a TP=2 model then takes the group back."""
    pids = group_pids(daemon)
    daemon.json("swap", "small-a-tp1")
    with ThreadPoolExecutor(2) as pool:
        answers = dict(zip(("small-a-tp1", "small-b-tp1"),
                           pool.map(lambda model: completions(daemon, model),
                                    ("small-a-tp1", "small-b-tp1"))))
    for model, texts in answers.items():
        assert texts == [r["text"] for r in tp1_reference[model[:-4]]["prompts"]], model
    worker = daemon.json("ps")["workers"][0]
    assert {r["model"]: r["rank"] for r in worker["residents"]} == {"small-a-tp1": 0,
                                                                   "small-b-tp1": 1}
    assert "small-a-tp1@rank0, small-b-tp1@rank1" in daemon.wcctl("ps").stdout
    assert group_pids(daemon) == pids
    assert completions(daemon, "small-a") == [r["text"] for r in tp_reference["small-a"]["prompts"]]
    assert [r["model"] for r in daemon.json("ps")["workers"][0]["residents"]] == ["small-a"]
    assert group_pids(daemon) == pids


def test_a_follower_dead_mid_stream_ends_the_stream_and_restarts_the_group(daemon,
                                                                          tp_reference):
    """Killed while the group generates, so the leader may be inside a
    collective with it: the stream ends with an error, never a hang."""
    import openai

    leader_pid, follower_pid = group_pids(daemon)
    stream = openai_client(daemon, timeout=60).completions.create(
        model="wide-a", prompt="hello", max_tokens=400, stream=True,
        extra_body={"ignore_eos": True})
    chunks = iter(stream)
    next(chunks)
    # The leader stopped first, so the stream is in flight on any machine.
    os.kill(leader_pid, signal.SIGSTOP)
    os.kill(follower_pid, signal.SIGKILL)
    os.kill(leader_pid, signal.SIGCONT)
    started = time.monotonic()
    with pytest.raises(openai.APIError):
        for _ in chunks:
            pass
    assert time.monotonic() - started < 30
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and alive(leader_pid):
        time.sleep(0.2)
    assert not alive(leader_pid), "the leader outlived its follower"
    worker = daemon.wait_serving("wide-a", timeout=300)
    assert worker["restarts"] == 1
    new = group_pids(daemon)
    assert len(new) == 2 and not set(new) & {leader_pid, follower_pid}
    assert completions(daemon, "wide-a") == [r["text"] for r in tp_reference["wide-a"]["prompts"]]


if __name__ == "__main__":
    print("WCD-TP " + json.dumps(leader(sys.argv[1] if len(sys.argv) > 1 else str(MODELS))),
          flush=True)
