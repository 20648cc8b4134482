"""A start-up that fails part-way (issue 19, item 6): what had started stops
again, in reverse order, and the daemon exits with one line saying why. No
vLLM worker is needed: the failure comes before workers would start."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import yaml

from conftest import ROOT


def processes_carrying(variable: str) -> list[int]:
    """Our processes whose environment holds `variable` (NAME=value): the
    daemon's workers and their followers inherit the daemon's."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            environ = (entry / "environ").read_bytes() if entry.name.isdigit() else b""
        except OSError:  # gone, or another user's
            continue
        if variable.encode() in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def test_a_port_already_taken_leaves_no_socket_and_no_worker(tmp_path):
    control = tmp_path / "run" / "control.sock"
    run = uuid.uuid4().hex
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "wcd.yaml"
        config.write_text(yaml.safe_dump({"control": {"socket": str(control)},
                                          "http": {"host": "127.0.0.1", "port": port},
                                          "workers": [{"device": "cpu"}]}))
        done = subprocess.run([sys.executable, "-m", "wcd.daemon.main", "--config", str(config)],
                              capture_output=True, text=True, cwd=ROOT, timeout=60,
                              env={**os.environ, "WCD_TEST_RUN": run})
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == \
        f"wcd: cannot listen on 127.0.0.1:{port}: Address already in use"
    # The control socket listened before the port failed: it is gone again.
    assert control.parent.is_dir() and not control.exists()
    assert processes_carrying(f"WCD_TEST_RUN={run}") == []
