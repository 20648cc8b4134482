"""The shipped Ray Serve configs: deploy/serve.yaml as `serve run` takes it,
and the KubeRay RayService whose Serve config and wcd.yaml must both load."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import ENGINE_ARGS, ROOT
from daemon_harness import free_port

pytest.importorskip("ray", reason="the ray extra is not installed")
from ray.serve.schema import ServeDeploySchema  # noqa: E402

from wcd.daemon.config import parse_settings  # noqa: E402

SERVE_CONFIG = ROOT / "deploy" / "serve.yaml"
RAYSERVICE = ROOT / "deploy" / "rayservice.yaml"


def test_the_rayservice_carries_a_serve_config_and_a_wcd_config_that_load(tmp_path):
    config_map, service = yaml.safe_load_all(RAYSERVICE.read_text())
    serve_config = ServeDeploySchema.model_validate(
        yaml.safe_load(service["spec"]["serveConfigV2"]))
    assert [app.import_path for app in serve_config.applications] == ["wcd.serve:app"]
    wcd_yaml = tmp_path / "wcd.yaml"
    wcd_yaml.write_text(config_map["data"]["wcd.yaml"])
    settings = parse_settings(yaml.safe_load(wcd_yaml.read_text()), str(wcd_yaml))
    assert settings.workers[0].device == "cuda:0" and settings.models


@pytest.mark.vllm
def test_serve_run_of_the_shipped_config_serves_completions(tmp_path, demo_models, reference):
    """deploy/serve.yaml as it ships, but for this machine: the CPU, the demo
    models, a free port."""
    wcd_yaml = tmp_path / "wcd.yaml"
    wcd_yaml.write_text(yaml.safe_dump({
        "workers": [{"device": "cpu"}], "model_roots": [str(demo_models)],
        "defaults": dict(ENGINE_ARGS),
        "models": {"small-a": {"path": str(demo_models / "small-a")}}}))
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    port = free_port()
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    app = config["applications"][0]
    app["args"]["config"] = str(wcd_yaml)
    for deployment in app["deployments"]:
        deployment["ray_actor_options"]["num_gpus"] = 0
        deployment.pop("autoscaling_config", None)
        deployment["num_replicas"] = 1
        # Serve stops the deployments one after the other when serve run
        # ends, each replica first waiting a loop for its requests (2 s).
        deployment["graceful_shutdown_wait_loop_s"] = 0.1
    ServeDeploySchema.model_validate(config)
    serve_yaml = tmp_path / "serve.yaml"
    serve_yaml.write_text(yaml.safe_dump(config))
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "ray.serve.scripts", "run",
                                   str(serve_yaml)], cwd=ROOT, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True,
                                  env={**os.environ, "RAY_ADDRESS": "local"})
    try:
        answer = _completion(f"http://127.0.0.1:{port}", server, log)
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    assert answer["choices"][0]["text"] == reference["small-a"]["prompts"][0]["text"]


def _completion(url: str, server: subprocess.Popen, log: Path) -> dict:
    body = json.dumps({"model": "small-a", "prompt": "hello world", "max_tokens": 16,
                       "temperature": 0}).encode()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert server.poll() is None, log.read_text()[-4000:]
        request = urllib.request.Request(url + "/v1/completions", body,
                                         {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as answer:
                return json.loads(answer.read())
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    raise AssertionError(f"serve run never answered:\n{log.read_text()[-4000:]}")
