"""wcd on a Ray cluster (wcd.serve): real Ray, a local cluster of two nodes,
real Serve, and a real wcd daemon with a vLLM CPU worker in each replica.

One cluster for the module; each test deploys the application as it needs
it (two replicas, or Serve's autoscaling from one), on the replicas of the
test before where it needs the same.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import time
from pathlib import Path

import openai
import pytest
import yaml

from conftest import ENGINE_ARGS, GREEDY, PROMPTS
from daemon_harness import free_port

ray = pytest.importorskip("ray", reason="the ray extra is not installed")
serve = pytest.importorskip("ray.serve")

from wcd.serve.deployments import ACTOR_OPTIONS, ModelReplica, OpenAIIngress  # noqa: E402

pytestmark = pytest.mark.vllm
MODELS = ("small-a", "small-b", "wide-a")
NAMESPACE = "serve"
# Long enough that a stream is still running when its replica is killed.
STREAM_TOKENS = 400
APP = "default"


@pytest.fixture(scope="module")
def config(tmp_path_factory, demo_models) -> str:
    path = tmp_path_factory.mktemp("serve") / "wcd.yaml"
    path.write_text(yaml.safe_dump({
        "workers": [{"device": "cpu"}],
        "model_roots": [str(demo_models)],
        "defaults": dict(ENGINE_ARGS),
        "models": {name: {"path": str(demo_models / name)} for name in MODELS},
        # Two residents a replica: two replicas hold all three models.
        "policy": {"max_resident": 2, "host_cache_bytes": 64 << 20, "min_resident": 0,
                   "queue_wait": "120s"},
    }))
    return str(path)


@pytest.fixture(scope="module")
def cluster():
    """A head node and a second node, one replica of wcd's each at most."""
    from ray.cluster_utils import Cluster

    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 2,
                                                           "include_dashboard": False})
    nodes.add_node(num_cpus=2)
    ray.init(address=nodes.address, namespace=NAMESPACE, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        _deployed.clear()
        serve.shutdown()
        ray.shutdown()
        nodes.shutdown()


# The config and replica options of the application the module's cluster runs.
_deployed: list[tuple[str, dict]] = []
# A stopping replica first waits this long for its requests (Serve's default
# 2 s), and each deploy here stops the replicas of the one before.
SHUTDOWN_WAIT_LOOP_S = 0.1


def deploy(config: str, **replica_options) -> None:
    """The application with these replica options, on replicas of its own.
    Deployed already and running: kept as it is. Otherwise deleted first: a
    redeploy over running replicas replaces them one at a time (a new code
    version each serve.run), and an autoscaling one keeps their number where
    it should start from its minimum."""
    app = serve.status().applications.get(APP)
    if _deployed == [(config, replica_options)] and app and app.status == "RUNNING":
        return
    _deployed.clear()
    serve.delete(APP)
    replicas = ModelReplica.options(max_replicas_per_node=1, health_check_period_s=1,
                                    graceful_shutdown_wait_loop_s=SHUTDOWN_WAIT_LOOP_S,
                                    ray_actor_options={**ACTOR_OPTIONS, "num_cpus": 1},
                                    **replica_options)
    ingress = OpenAIIngress.options(graceful_shutdown_wait_loop_s=SHUTDOWN_WAIT_LOOP_S)
    serve.run(ingress.bind(replicas.bind(config), config), name=APP, route_prefix="/")
    _deployed.append((config, replica_options))


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)


def complete(url: str, model: str, prompt: str = PROMPTS[0], **extra) -> tuple[str, str, int]:
    """(text, replica, that replica's loads so far)."""
    raw = client(url).completions.with_raw_response.create(
        model=model, prompt=prompt, **{**GREEDY, **extra})
    return (raw.parse().choices[0].text, raw.headers["x-wcd-replica"],
            int(raw.headers["x-wcd-replica-loads"]))


def test_outputs_equal_vllms_and_each_model_stays_where_it_loaded(cluster, config, reference):
    deploy(config, num_replicas=2)
    for model in MODELS:
        for index, prompt in enumerate(PROMPTS):
            text, _, _ = complete(cluster, model, prompt)
            assert text == reference[model]["prompts"][index]["text"], (model, prompt)
    time.sleep(2)  # the replicas report their models to Serve's routers
    loads = {}
    for _ in range(3):
        for model in MODELS:
            _, replica, count = complete(cluster, model)
            loads[replica] = count
    # Two replicas of two residents hold three models: routed by model,
    # the second round loads nothing more.
    settled = dict(loads)
    holders = {model: set() for model in MODELS}
    for _ in range(3):
        for model in MODELS:
            _, replica, count = complete(cluster, model)
            holders[model].add(replica)
            loads[replica] = count
    assert loads == settled
    assert all(len(replicas) == 1 for replicas in holders.values()), holders


def test_an_unknown_model_is_vllms_404(cluster, config):
    deploy(config, num_replicas=2)
    with pytest.raises(openai.NotFoundError, match="The model `nope` does not exist"):
        client(cluster).completions.create(model="nope", prompt="hi")


def _stream(url: str, model: str, started: threading.Event) -> str:
    """One streamed completion to its end: what it became. `started` is set
    at its first chunk."""
    try:
        stream = client(url).completions.create(model=model, prompt=PROMPTS[0], stream=True,
                                                max_tokens=STREAM_TOKENS, temperature=0,
                                                extra_body={"ignore_eos": True})
        for _ in stream:
            started.set()
        outcome = "complete"
    except openai.APIStatusError as exc:
        outcome = f"status {exc.status_code}"
    except openai.APIConnectionError:
        outcome = "connection closed"
    except openai.APIError:  # the stream's error event, as vLLM's server sends one
        outcome = "error event"
    started.set()
    return outcome


def test_a_killed_replica_is_replaced_and_traffic_goes_on(cluster, config):
    deploy(config, num_replicas=2)
    _, victim, _ = complete(cluster, "small-a")
    started = [threading.Event() for _ in range(4)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        streams = [pool.submit(_stream, cluster, "small-a", event) for event in started]
        # each in flight on the replica that holds small-a, far from its end
        assert all(event.wait(120) for event in started)
        ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP}#wcd-models#{victim}"), no_restart=True)
        # None hangs: each ends, well before its own 300 s timeout.
        done, pending = concurrent.futures.wait(streams, timeout=120)
    assert not pending
    results = [stream.result() for stream in streams]
    assert all(outcome in ("error event", "status 503", "connection closed")
               for outcome in results), results
    # Serve replaces the replica; requests keep being answered meanwhile.
    deadline = time.monotonic() + 240
    replicas = set()
    while time.monotonic() < deadline and len(replicas - {victim}) < 2:
        for model in MODELS:
            _, replica, _ = complete(cluster, model)
            replicas.add(replica)
    assert victim not in replicas and len(replicas) == 2, replicas
    # The dead replica's daemon went with it (and its worker with the daemon).
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(_replica_daemons()) > 2:
        time.sleep(0.5)
    assert len(_replica_daemons()) == 2


def _replica_daemons() -> list[int]:
    """The pids of the replicas' wcd daemons on this machine (both nodes)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if b"wcd.serve.replica_daemon" in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
    return pids


def test_autoscaling_goes_from_one_replica_to_two_under_load(cluster, config):
    deploy(config, autoscaling_config={
        "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
        "upscale_delay_s": 1, "downscale_delay_s": 600, "metrics_interval_s": 0.5,
        "look_back_period_s": 2})
    assert _replica_states() == {"RUNNING": 1}
    failures, seen = [], set()
    stop = threading.Event()

    def load(model: str) -> None:
        while not stop.is_set():
            try:
                _, replica, _ = complete(cluster, model, max_tokens=32,
                                                extra_body={"ignore_eos": True})
                seen.add(replica)
            except openai.OpenAIError as exc:
                failures.append(repr(exc))

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        workers = [pool.submit(load, model) for model in (*MODELS, "small-a")]
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and len(seen) < 2:
            time.sleep(0.1)
        stop.set()
        concurrent.futures.wait(workers)
    assert len(seen) == 2, "Serve never added the second replica"
    assert failures == []


def _replica_states() -> dict[str, int]:
    """How many of wcd's model replicas are in each state, as Serve sees them."""
    return serve.status().applications[APP].deployments["wcd-models"].replica_states
