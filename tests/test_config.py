"""wcd/daemon/config.py: the shipped file loads; every mistake is one line
naming the file and the key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from wcd import control_socket
from wcd.daemon import config
from wcd.daemon.config import ConfigError, load_settings, parse_duration, parse_settings

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "etc" / "wcd.yaml"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ("WCD_API_KEYS", "WCD_CONFIG", "RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def tree(tmp_path):
    """A config directory beside a model root holding one model."""
    (tmp_path / "models" / "m1").mkdir(parents=True)
    (tmp_path / "etc").mkdir()
    return tmp_path


def write(tree: Path, text: str) -> str:
    path = tree / "etc" / "wcd.yaml"
    path.write_text(text)
    return str(path)


def valid(**overrides) -> dict:
    data = {"model_roots": ["../models"], "models": {"m1": {"path": "m1"}}}
    data.update(overrides)
    return data


def error_of(tree: Path, data: object) -> str:
    path = write(tree, yaml.safe_dump(data))
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    return message


# ---- the shipped file -------------------------------------------------------------


def test_shipped_config_loads():
    settings = load_settings(str(SHIPPED))
    assert settings.source == str(SHIPPED)
    assert settings.model_roots == (str(REPO / "models"),)
    assert set(settings.models) == {"small-a", "small-b", "wide-a", "embed-a"}
    assert settings.models["embed-a"].engine_args == {"runner": "pooling"}
    assert settings.models["wide-a"].path == str(REPO / "models" / "wide-a")
    assert settings.preload == ("small-a",)
    assert [w.device for w in settings.workers] == ["cpu"]
    assert settings.policy == config.PolicySettings(host_cache_bytes=256 << 20)
    assert (settings.http.host, settings.http.port) == ("127.0.0.1", 8000)
    assert settings.engine_args(settings.models["small-a"]) == {
        "dtype": "bfloat16",
        "max_model_len": 512,
        "max_num_batched_tokens": 512,
        "kv_cache_memory_bytes": 64 * 1024 * 1024,
        "seed": 0,
    }


def test_builtin_defaults():
    settings = load_settings(None)
    assert settings.source is None
    assert settings.models == {} and settings.model_roots == ()
    assert settings.workers == (config.WorkerSettings("cpu"),)
    assert settings.log_level == "info"
    assert settings.control.socket == control_socket.daemon_default()


# ---- errors name file and key -------------------------------------------------------


@pytest.mark.parametrize(
    "data, key",
    [
        (valid(htp={"port": 1}), "htp: unknown key"),
        (valid(http={"prot": 1}), "http.prot: unknown key"),
        (valid(policy={"keep_alive_s": 1}), "policy.keep_alive_s: unknown key"),
        (valid(workers=[{"device": "cpu", "gpus": 2}]), "workers[0].gpus: unknown key"),
    ],
)
def test_unknown_key(tree, data, key):
    assert key in error_of(tree, data)


@pytest.mark.parametrize(
    "data, expected",
    [
        (valid(http={"port": "8000"}), "http.port: expected int, got str"),
        (valid(http={"port": True}), "http.port: expected int, got bool"),
        (valid(http={"port": 70000}), "http.port: expected int <= 65535"),
        (valid(http={"api_keys": ["k", 3]}), "http.api_keys[1]: expected str | mapping, got int"),
        (valid(workers=[{"device": "gpu0"}]), "workers[0].device: expected str matching regex '^(cpu|cuda:[0-9]+)$'"),
        (valid(workers={"device": "cpu"}), "workers: expected list, got mapping"),
        (valid(workers=[]), "workers: expected list of length >= 1"),
        (valid(workers=[{"device": "cuda:0"}, {"device": "cuda:0"}]), "workers[1].device: cuda:0 is given"),
        (valid(models={"m1": {"path": "m1", "keep_alive": "soon"}}), "models.m1.keep_alive: expected a duration"),
        (valid(models={"m1": {"keep_alive": 5}}), "models.m1.path: required"),
        (valid(models={"m1": {"path": "m1", "model": "x"}}), "models.m1.model: set by wcd"),
        (valid(models={"m1": "m1"}), "models.m1: expected mapping, got str"),
        (valid(defaults={"keep_alive": 5}), "defaults.keep_alive: a model's own key"),
        (valid(policy={"queue_max": -1}), "policy.queue_max: expected int >= 0"),
        (valid(policy={"health_interval": 0}), "policy.health_interval: expected a duration > 0"),
        (valid(policy={"restart_backoff_min": "2m"}), "policy.restart_backoff_min: must not exceed"),
        (valid(control={"allow_gids": ["no-such-group-wcd-test"]}), "control.allow_gids[0]: no such group"),
        (valid(log_level="loud"), "log_level: expected one of"),
        (["a", "list"], "expected mapping, got list"),
    ],
)
def test_ill_typed_key(tree, data, expected):
    assert expected in error_of(tree, data)


def test_bad_yaml_names_line(tree):
    path = write(tree, "http:\n  host: 127.0.0.1\n  port: [8000\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: line 4, column 1: invalid YAML:")
    assert "\n" not in message


def test_duplicate_key_is_an_error(tree):
    path = write(tree, "http:\n  port: 1\n  port: 2\n")
    with pytest.raises(ConfigError, match=r"line 3, column 3: invalid YAML: duplicate key 'port'"):
        load_settings(path)


def test_merge_keys_are_not_duplicates(tree):
    path = write(
        tree,
        "model_roots: [../models]\n"
        "models:\n"
        "  m1: &base {path: m1, dtype: float32}\n"
        "  m2: {<<: *base, dtype: bfloat16}\n",
    )
    assert load_settings(path).models["m2"].engine_args == {"dtype": "bfloat16"}


def test_missing_file():
    with pytest.raises(ConfigError, match=r"^/nonexistent/wcd.yaml: cannot read: No such file"):
        load_settings("/nonexistent/wcd.yaml")


def test_model_outside_roots(tree, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    message = error_of(tree, valid(models={"m1": {"path": str(tmp_path / "elsewhere")}}))
    assert "models.m1.path:" in message and "outside every model root" in message


def test_symlink_out_of_a_root_is_outside(tree, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tree / "models" / "link").symlink_to(tmp_path / "elsewhere")
    assert "models.m1.path:" in error_of(tree, valid(models={"m1": {"path": "link"}}))


def test_model_without_roots(tree):
    message = error_of(tree, {"models": {"m1": {"path": "/models/m1"}}})
    assert "models.m1.path: no model_roots are configured" in message


def test_unknown_preload_alias(tree):
    message = error_of(tree, valid(preload=["m1", "m2"]))
    assert "preload[1]: unknown model 'm2'" in message


def test_preload_listed_twice(tree):
    assert "preload[1]: 'm1' is listed twice" in error_of(tree, valid(preload=["m1", "m1"]))


def test_str_is_one_line_without_source_or_key():
    assert str(ConfigError("bad\n  thing")) == "bad thing"


# ---- paths ------------------------------------------------------------------------


def test_model_path_rules(tree):
    (tree / "etc" / "local").mkdir()
    settings = load_settings(
        write(
            tree,
            yaml.safe_dump(
                {
                    "model_roots": ["../models", "."],
                    "models": {
                        "by_root": {"path": "m1"},  # not beside the file: first root
                        "by_config_dir": {"path": "local"},  # beside the file: wins
                        "explicit": {"path": "../models/m1"},
                        "not_yet_written": {"path": "later"},
                    },
                }
            ),
        )
    )
    models, etc = settings.models, tree / "etc"
    assert models["by_root"].path == str(tree / "models" / "m1")
    assert models["by_config_dir"].path == str(etc / "local")
    assert models["explicit"].path == str(tree / "models" / "m1")
    # Neither reading exists; the config-dir one lies inside the "." root.
    assert models["not_yet_written"].path == str(etc / "later")
    assert settings.in_model_roots(str(tree / "models" / "m1" / "x"))
    assert not settings.in_model_roots(str(tree))


def test_relative_socket_resolves_against_config_dir(tree):
    settings = load_settings(write(tree, "control: {socket: run/ctl.sock, allow_uids: [0, root]}\n"))
    assert settings.control.socket == str(tree / "etc" / "run" / "ctl.sock")
    assert settings.control.allow_uids == (0, 0)


def test_engine_args_pass_through_and_override(tree):
    settings = parse_settings(
        {
            "model_roots": [str(tree / "models")],
            "defaults": {"dtype": "bfloat16", "enforce_eager": True},
            "models": {"m1": {"path": "m1", "dtype": "float32", "max_model_len": 128, "keep_alive": "90s"}},
        },
        str(tree / "etc" / "wcd.yaml"),
    )
    model = settings.models["m1"]
    assert model.engine_args == {"dtype": "float32", "max_model_len": 128}
    assert model.keep_alive_s == 90
    assert settings.engine_args(model) == {"dtype": "float32", "enforce_eager": True, "max_model_len": 128}


def test_null_takes_the_default(tree):
    settings = load_settings(write(tree, "http:\n  port:\npolicy:\nworkers:\nlog_level: ~\n"))
    assert settings.http.port == 8000
    assert settings.policy == config.PolicySettings()
    assert len(settings.workers) == 1 and settings.log_level == "info"


def test_the_disk_tier_lives_in_systemds_cache_directory_unless_set(tree, monkeypatch):
    monkeypatch.delenv("CACHE_DIRECTORY", raising=False)
    assert load_settings(write(tree, "log_level: info\n")).policy.disk_cache_dir is None
    monkeypatch.setenv("CACHE_DIRECTORY", "/var/cache/wcd")
    policy = load_settings(write(tree, "log_level: info\n")).policy
    assert (policy.disk_cache_dir, policy.disk_cache_bytes) == ("/var/cache/wcd/snapshots",
                                                                64 << 30)
    policy = load_settings(write(tree, "policy:\n  disk_cache_dir: snaps\n")).policy
    assert policy.disk_cache_dir == str(tree / "etc" / "snaps")  # beside the config file


def test_workers_are_forked_by_systemds_forkserver_unless_set(tree, monkeypatch):
    assert load_settings(write(tree, "log_level: info\n")).forkserver is None
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/wcd")
    assert load_settings(write(tree, "log_level: info\n")).forkserver == \
        "/run/wcd/forkserver.sock"
    assert load_settings(write(tree, "forkserver: fs.sock\n")).forkserver == \
        str(tree / "etc" / "fs.sock")  # beside the config file


def test_log_level_in_capitals_is_read_as_logging_spells_it(tree):
    assert load_settings(write(tree, "log_level: WARNING\n")).log_level == "warning"


# ---- durations --------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, seconds",
    [(0, 0.0), (90, 90.0), (1.5, 1.5), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0),
     ("1h30m", 5400.0), ("1.5h", 5400.0), ("250ms", 0.25), ("2d", 172800.0), (" 5 M ", 300.0)],
)
def test_durations_parse(value, seconds):
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "5", "5x", "m", "-5s", "5s5", -1, True, None, [5], float("inf")])
def test_bad_durations(value):
    with pytest.raises(ValueError):
        parse_duration(value)


def test_policy_durations(tree):
    settings = load_settings(
        write(tree, "policy: {keep_alive: 5m, queue_wait: 2.5, drain_timeout: 1m30s, worker_ready_timeout: 1h}\n")
    )
    policy = settings.policy
    assert (policy.keep_alive_s, policy.queue_wait_s) == (300.0, 2.5)
    assert (policy.drain_timeout_s, policy.worker_ready_timeout_s) == (90.0, 3600.0)


# ---- environment ------------------------------------------------------------------


def test_env_api_keys_merge(tree, monkeypatch):
    monkeypatch.setenv("WCD_API_KEYS", " k2 ,k3,, k1")
    settings = load_settings(write(tree, "http: {api_keys: [k1, k2]}\n"))
    assert settings.http.api_keys == ("k1", "k2", "k3")


def test_env_api_keys_without_file(monkeypatch):
    monkeypatch.setenv("WCD_API_KEYS", "secret")
    assert load_settings(None).http.api_keys == ("secret",)


def test_socket_under_systemd(monkeypatch):
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/wcd:/run/wcd-other")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert control_socket.daemon_default() == "/run/wcd/control.sock"


def test_socket_under_xdg(monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert control_socket.daemon_default() == "/run/user/1000/wcd/control.sock"


def test_socket_fallback(monkeypatch):
    monkeypatch.setenv("RUNTIME_DIRECTORY", "")
    assert control_socket.daemon_default() == f"/tmp/wcd-{os.getuid()}/control.sock"


def test_find_config_order(tmp_path, monkeypatch):
    system = tmp_path / "system.yaml"
    monkeypatch.setattr(config, "SYSTEM_CONFIG", str(system))
    assert config.find_config(None) is None
    system.write_text("{}\n")
    assert config.find_config(None) == str(system)
    monkeypatch.setenv("WCD_CONFIG", "/env.yaml")
    assert config.find_config(None) == "/env.yaml"
    assert config.find_config("/explicit.yaml") == "/explicit.yaml"


# ---- workers ----------------------------------------------------------------------


def test_worker_helpers(tree):
    settings = load_settings(write(tree, "workers: [{device: cpu}, {device: 'cuda:1'}, {device: cuda:0}]\n"))
    cpu, gpu1, gpu0 = settings.workers
    assert (cpu.kind, cpu.cuda_indices) == ("cpu", ())
    assert (gpu1.kind, gpu1.cuda_indices) == ("cuda", (1,))
    assert gpu0.cuda_indices == (0,)


def test_a_tensor_parallel_group_takes_consecutive_devices(tree):
    settings = load_settings(write(tree, "workers:\n  - {device: 'cuda:0', tensor_parallel_size: 2}\n"
                                         "  - {device: 'cuda:2'}\n  - {device: cpu, tensor_parallel_size: 2}\n"))
    group, single, cpu_group = settings.workers
    assert group.cuda_indices == (0, 1) and single.cuda_indices == (2,)
    assert cpu_group.tensor_parallel_size == 2 and cpu_group.cuda_indices == ()
    assert group.serves == (2,) and single.serves == (1,)


def test_a_group_may_serve_smaller_tensor_parallel_sizes(tree):
    settings = load_settings(write(tree, "workers:\n  - {device: 'cuda:0', tensor_parallel_size: 4,"
                                         " serves_tensor_parallel_sizes: [4, 1, 2]}\n"))
    assert settings.workers[0].serves == (1, 2, 4)


@pytest.mark.parametrize("workers, message", [
    ("[{device: 'cuda:0', tensor_parallel_size: 2}, {device: 'cuda:1'}]",
     "cuda:1 is given to another worker already"),
    ("[{device: cpu, tensor_parallel_size: 0}]", "workers[0].tensor_parallel_size: expected int >= 1"),
    ("[{device: cpu, tensor_parallel_size: 2, serves_tensor_parallel_sizes: [1, 4]}]",
     "workers[0].serves_tensor_parallel_sizes: sizes above the worker's tensor_parallel_size 2: [4]"),
    ("[{device: cpu, serves_tensor_parallel_sizes: 1}]", "workers[0].serves_tensor_parallel_sizes: expected list, got int"),
])
def test_bad_tensor_parallel_groups_are_refused(tree, workers, message):
    with pytest.raises(config.ConfigError) as raised:
        load_settings(write(tree, f"workers: {workers}\n"))
    assert message in str(raised.value)


def test_parking_policy(tmp_path):
    path = tmp_path / "wcd.yaml"
    path.write_text("policy:\n  max_parked: 2\n  park_min_free_bytes: 1024\n")
    policy = config.load_settings(str(path)).policy
    assert (policy.max_parked, policy.park_min_free_bytes) == (2, 1024)
    path.write_text("policy:\n  max_parked: -1\n")
    with pytest.raises(config.ConfigError) as raised:
        config.load_settings(str(path))
    assert "max_parked" in str(raised.value)


def test_the_daemon_imports_no_torch_or_vllm():
    """Heavy imports live in workers only: the daemon starts in well under a
    second and stays up when a worker's stack breaks."""
    code = ("import sys, wcd.daemon.main; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'torch', 'vllm', 'transformers', 'numpy'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"
