"""Where the control socket is when nobody says: the one place the daemon
listens (unless control.socket is set), and the places wcctl looks for a
daemon (unless --socket or $WCD_SOCKET names one).

Standard library only: wcctl imports it and must start fast.
"""

from __future__ import annotations

import os

# systemd's: wcd.service's RuntimeDirectory=wcd, and wcd.socket's ListenStream.
SYSTEM = "/run/wcd/control.sock"
_NAME = "control.sock"


def daemon_default() -> str:
    """Under systemd, in the unit's runtime directory; else per user."""
    # systemd's RuntimeDirectory= may list several directories; ours is the first.
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime:
        return os.path.join(runtime, _NAME)
    return _per_user()[0]


def candidates() -> list[str]:
    """Every place a daemon listens by default, systemd's first."""
    return [SYSTEM, *_per_user()]


def _per_user() -> list[str]:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    mine = [os.path.join(runtime, "wcd", _NAME)] if runtime else []
    return [*mine, f"/tmp/wcd-{os.getuid()}/{_NAME}"]
