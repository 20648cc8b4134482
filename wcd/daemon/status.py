"""The daemon's status document, one shape wherever it is served: the control
API's /v1/status (wcctl status) and the HTTP port's /status.json, which the
status page (status_page.html, served at /) polls."""

from __future__ import annotations

import functools
import os
import time
from importlib import resources
from typing import TYPE_CHECKING

import wcd

if TYPE_CHECKING:
    from wcd.daemon.scheduler import Scheduler


def status_document(scheduler: Scheduler, state: str) -> dict:
    """`state` is the daemon's: starting, ready, reloading or stopping."""
    return {
        "version": wcd.__version__, "pid": os.getpid(),
        "uptime_s": time.time() - scheduler.started, "state": state,
        "workers": scheduler.views(), "models": scheduler.model_views(),
        "queue": {"waiting": scheduler.waiting()},
        "recent_swaps": scheduler.recent_swaps(),
    }


@functools.cache
def status_page() -> bytes:
    return resources.files(__package__).joinpath("status_page.html").read_bytes()
