"""The daemon end to end: a real `wcd` with a real worker and vLLM on CPU,
driven by `wcctl` as a subprocess, watched through our own NOTIFY_SOCKET."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from daemon_harness import Daemon, alive, wait_until, write_config

pytestmark = pytest.mark.vllm


@pytest.fixture
def daemon(shared_daemon):
    """conftest's shared daemon (WATCHDOG_USEC=2 s), live and serving."""
    return shared_daemon.get()


def test_ready_status_and_watchdog_are_notified(daemon):
    assert daemon.notify.wait_for("READY=1")
    assert daemon.notify.wait_for("STATUS=workers 1/1 ready; serving small-a")

    def pings() -> int:
        return daemon.notify.messages.count("WATCHDOG=1")

    # WATCHDOG_USEC=2 s: a ping every second while the loop is healthy.
    count = pings()
    wait_until(lambda: pings() >= count + 2, timeout=10, what="two more WATCHDOG=1 pings")


def test_ps_models_and_status(daemon):
    daemon.json("swap", "small-a")
    ps = daemon.wcctl("ps")
    assert ps.returncode == 0, ps.stderr
    assert "small-a" in ps.stdout and "serving" in ps.stdout
    workers = daemon.json("ps")["workers"]
    assert workers[0]["device"] == "cpu" and alive(workers[0]["pid"])
    models = {m["name"]: m for m in daemon.json("models")["models"]}
    assert set(models) >= {"small-a", "small-b", "wide-a"}
    assert models["small-a"]["state"] == "serving" and models["wide-a"]["state"] == "available"
    status = daemon.json("status")
    assert status["state"] == "ready" and status["pid"] == daemon.process.pid


def test_swap_on_both_paths_reports_phases(daemon):
    daemon.json("swap", "small-a")
    done = daemon.wcctl("swap", "small-b")
    assert done.returncode == 0, done.stderr
    assert "small-b" in done.stdout and "same_shape" in done.stdout
    final = daemon.json("swap", "wide-a")
    assert (final["event"], final["model"], final["path"]) == ("done", "wide-a", "rebuild")
    assert set(final["phases"]) >= {"resolve", "drain", "release", "fetch", "build", "warm"}
    again = daemon.json("swap", "wide-a")
    assert again["path"] == "noop"
    assert daemon.json("ps")["workers"][0]["model"] == "wide-a"


def test_ps_shows_models_held_in_host_memory(daemon):
    """After serving small-a then wide-a, the worker holds a snapshot of small-a."""
    daemon.json("swap", "small-a")
    daemon.json("swap", "wide-a")

    def held() -> dict:
        models = {m["name"]: m for m in daemon.json("ps")["models"]}
        return models if models.get("small-a", {}).get("where") == "host" else {}

    held = wait_until(held, timeout=30, what="small-a in host memory", interval=0.3)
    assert held["small-a"]["bytes"] > 1_000_000
    assert held["wide-a"]["where"] == "serving"
    shown = daemon.wcctl("ps").stdout
    assert "WHERE" in shown and "host" in shown
    for name in ("small-a", "wide-a"):
        final = daemon.json("swap", name)
        assert (final["path"], final["weights"]) == ("rebuild", "host_cache")


def test_load_and_unload(daemon):
    daemon.json("swap", "wide-a")
    assert daemon.json("unload", "wide-a")["path"] == "unload"
    assert daemon.json("ps")["workers"][0]["model"] is None
    assert daemon.json("load", "small-a")["model"] == "small-a"
    assert daemon.json("ps")["workers"][0]["model"] == "small-a"


def test_prefetch_reads_the_checkpoint_then_the_swap_serves_it(daemon):
    daemon.json("swap", "small-a")
    final = daemon.json("prefetch", "wide-a")
    assert final["path"] == "prefetch" and final["bytes"] > 1_000_000
    assert daemon.json("ps")["workers"][0]["model"] == "small-a"  # untouched by prefetch
    done = daemon.json("swap", "wide-a")
    assert (done["model"], done["path"]) == ("wide-a", "rebuild")
    assert daemon.json("swap", "small-a")["model"] == "small-a"


@pytest.mark.parametrize("args, code, words", [
    (("swap", "no-such-model"), 4, "no-such-model"),
    (("swap", "../../etc/passwd"), 4, "passwd"),
    (("swap", "small-b", "--worker", "7"), 2, "worker 7"),
])
def test_wcctl_errors_are_one_line_and_non_zero(daemon, args, code, words):
    done = daemon.wcctl(*args)
    assert done.returncode == code, (done.stdout, done.stderr)
    assert words in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert daemon.process.poll() is None


def test_unusable_model_fails_the_swap_and_keeps_serving(daemon, demo_models):
    done = daemon.wcctl("swap", str(demo_models / "small-a" / "tokenizer.json"))
    assert done.returncode == 4  # under a model root, but a file, not a model
    config = yaml.safe_load(daemon.config.read_text())
    config["models"]["bad-args"] = {"path": config["models"]["wide-a"]["path"],
                                    "no_such_engine_arg": 1}
    daemon.config.write_text(yaml.safe_dump(config))
    daemon.process.send_signal(signal.SIGHUP)
    daemon.notify.wait_for("RELOADING=1")
    wait_until(lambda: "bad-args" in daemon.wcctl("models").stdout, timeout=30,
               what="bad-args configured after SIGHUP", interval=0.2)
    serving = daemon.json("ps")["workers"][0]["model"]
    done = daemon.wcctl("swap", "bad-args")
    assert done.returncode == 1, done.stderr  # the operation failed in the worker
    assert "no_such_engine_arg" in done.stderr
    assert daemon.json("ps")["workers"][0]["model"] == serving


def test_stopped_worker_is_detected_and_replaced(daemon):
    """A worker that stops answering pings (SIGSTOP) is killed and restarted."""
    before = daemon.json("ps")["workers"][0]
    os.kill(before["pid"], signal.SIGSTOP)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        worker = daemon.json("ps")["workers"][0]
        if worker["pid"] not in (None, before["pid"]) and worker["state"] == "serving":
            break
        time.sleep(0.5)
    else:
        raise AssertionError(daemon.log_text())
    assert worker["model"] == before["model"]
    assert worker["restarts"] == before["restarts"] + 1


@pytest.mark.stops_shared_daemon
def test_sigterm_drains_and_leaves_no_orphans(daemon):
    workers = daemon.worker_pids()
    assert workers
    code = daemon.stop(timeout=90)
    assert code == 0, daemon.log_text()
    assert "STOPPING=1" in daemon.notify.messages
    for pid in workers:
        assert not alive(pid)


def test_wcctl_says_when_the_daemon_is_down(tmp_path):
    done = subprocess.run([sys.executable, "-m", "wcd.cli", "--socket",
                           str(tmp_path / "none.sock"), "ps"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 3
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("mutate, words", [
    (lambda c: c.update(unknown_key=1), "unknown_key"),
    (lambda c: c["http"].update(port="eighty"), "http.port"),
])
def test_bad_config_is_one_clear_error_and_exit_2(tmp_path, demo_models, mutate, words):
    config = write_config(tmp_path, demo_models)
    data = yaml.safe_load(config.read_text())
    mutate(data)
    config.write_text(yaml.safe_dump(data))
    for extra in ([], ["--check-config"]):
        done = subprocess.run([sys.executable, "-m", "wcd.daemon.main", "--config",
                               str(config), *extra], capture_output=True, text=True, cwd=ROOT)
        assert done.returncode == 2
        assert words in done.stderr and str(config) in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1


def test_check_config_accepts_the_shipped_config(demo_models):
    done = subprocess.run([sys.executable, "-m", "wcd.daemon.main", "--config",
                           str(ROOT / "etc" / "wcd.yaml"), "--check-config"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr


def test_socket_activation_passes_the_control_socket(tmp_path, demo_models):
    """systemd-socket-activate hands wcd a listening control socket (LISTEN_FDS)."""
    activator = "systemd-socket-activate"
    if subprocess.run(["which", activator], capture_output=True).returncode:
        pytest.skip("systemd-socket-activate is not installed")
    path = tmp_path / "activated.sock"
    config = write_config(tmp_path, demo_models, preload=[])
    data = yaml.safe_load(config.read_text())
    data["control"]["socket"] = str(tmp_path / "unused.sock")
    config.write_text(yaml.safe_dump(data))
    daemon = Daemon(config, argv_prefix=[activator, "-l", str(path)], notify=False)
    daemon.socket = str(path)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            done = daemon.wcctl("status", "--json")
            if done.returncode == 0:
                break
            time.sleep(0.5)
        assert done.returncode == 0, daemon.log_text()
        assert json.loads(done.stdout)["pid"] == daemon.process.pid  # exec'd in place
        assert not (tmp_path / "unused.sock").exists()
        # The worker is most likely still warming: the swap waits for it.
        swapped = daemon.wcctl("swap", "small-b", "--json")
        assert swapped.returncode == 0, swapped.stderr
        assert json.loads(swapped.stdout)["model"] == "small-b"
    finally:
        assert daemon.stop() == 0


def _status_line_as(uid: int, path: str) -> str:
    """GET /v1/status over the control socket from a child that dropped to
    `uid` before connecting: SO_PEERCRED reports the connecting process."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(path)
            sock.sendall(b"GET /v1/status HTTP/1.0\r\nHost: wcd\r\n\r\n")
            os.write(write, sock.makefile("rb").readline())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        line = pipe.read().decode()
    os.waitpid(child, 0)
    return line


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
def test_control_socket_refuses_peers_outside_the_allow_list(demo_models):
    # Under /tmp itself, so the other user can reach the socket: the
    # allow-list, not the path, is what must refuse it.
    directory = Path(tempfile.mkdtemp(prefix="wcd-peers-"))
    directory.chmod(0o755)
    config = write_config(directory, demo_models, preload=[])
    data = yaml.safe_load(config.read_text())
    data["control"]["allow_gids"] = [0]
    config.write_text(yaml.safe_dump(data))
    daemon = Daemon(config, notify=False)
    try:
        deadline = time.monotonic() + 60
        while daemon.wcctl("status").returncode and time.monotonic() < deadline:
            time.sleep(0.2)
        os.chmod(daemon.socket, 0o666)  # past the file mode, to the peer check
        assert " 403 " in _status_line_as(65534, daemon.socket)
        assert " 200 " in _status_line_as(0, daemon.socket)
        assert "refused GET /v1/status from pid" in daemon.log_text()
    finally:
        code = daemon.stop()
        shutil.rmtree(directory, ignore_errors=True)
    assert code == 0
