"""The daemon's status document, one shape wherever it is served: the control
API's /v1/status (wcctl status) and the HTTP port's /status.json, which the
status page (status_page.html, served at /) polls."""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Literal

import wcd

if TYPE_CHECKING:
    from wcd.daemon.scheduler import Scheduler


@dataclass
class DaemonState:
    """What the daemon is doing: the daemon changes it, the control API and
    the HTTP port show it."""

    phase: Literal["starting", "ready", "reloading", "stopping"] = "starting"


def status_document(scheduler: Scheduler, state: DaemonState) -> dict:
    return {
        "version": wcd.__version__, "pid": os.getpid(),
        "uptime_s": time.time() - scheduler.started, "state": state.phase,
        "workers": scheduler.views(), "models": scheduler.model_views(),
        "queue": {"waiting": scheduler.waiting()},
        "recent_swaps": scheduler.recent_swaps(),
    }


@functools.cache
def status_page() -> bytes:
    return resources.files(__package__).joinpath("status_page.html").read_bytes()
