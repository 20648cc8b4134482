"""Bounds on what a worker's main thread does between commands.

The reader thread answers pings whatever the main thread does, so a main
thread stuck in a chat template render or an engine step would look healthy
to the daemon forever. The watchdog thread looks at what the main thread is
in: a render past its limit is interrupted (the request fails with a 400 and
the worker serves on); a step past its limit ends the process, and the
daemon restarts the worker and restores its model. A step runs in C++
kernels, where an interruption would land at an arbitrary point of vLLM's
bookkeeping; a render is Python (Jinja) and unwinds cleanly.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
import time
from collections.abc import Iterator

log = logging.getLogger(__name__)

EXIT_STUCK = 3  # the worker's exit code when a step overran
_POLL_S = 0.1


class RenderTimeout(BaseException):
    """Raised inside the main thread's render. A BaseException, so vLLM's and
    Jinja's `except Exception` handlers do not swallow it."""


class Watchdog:
    def __init__(self, render_timeout_s: float, step_timeout_s: float):
        self.limits = {"render": render_timeout_s, "step": step_timeout_s}
        self._main = threading.main_thread().ident
        self._lock = threading.Lock()
        self._current: tuple[str, float, int] | None = None  # kind, started, token
        self._tokens = 0
        self._interrupted: int | None = None  # the token a RenderTimeout was sent to
        threading.Thread(target=self._watch, name="wcd-watchdog", daemon=True).start()

    @contextlib.contextmanager
    def bounded(self, kind: str) -> Iterator[None]:
        """Run the body under `kind`'s limit. Main thread only."""
        with self._lock:
            self._tokens += 1
            token = self._tokens
            self._current = (kind, time.monotonic(), token)
        try:
            yield
        except BaseException:
            # Interrupted: the bare RenderTimeout sent, or whatever a handler on
            # the way made of it, becomes one that says why.
            if self._leave(token):
                raise self._timeout() from None
            raise
        else:
            if self._leave(token):
                raise self._timeout()  # the render ended just as the limit passed

    def _leave(self, token: int) -> bool:
        """Leave the bounded section; True if it was interrupted. Under the
        lock the watchdog sends nothing more, and a RenderTimeout sent but not
        yet raised is withdrawn, so none can land after the section."""
        with self._lock:
            self._current = None
            interrupted = self._interrupted == token
            if interrupted:
                _set_async_exc(self._main, None)
                self._interrupted = None
            return interrupted

    def _timeout(self) -> RenderTimeout:
        return RenderTimeout(f"rendering the prompt took longer than "
                             f"{self.limits['render']:g} s (policy.render_timeout): refused")

    def _watch(self) -> None:
        while True:
            time.sleep(_POLL_S)
            with self._lock:
                if self._current is None:
                    continue
                kind, started, token = self._current
                overran = time.monotonic() - started
                if overran <= self.limits[kind]:
                    continue
                if kind == "step":
                    log.error("an engine step has run for %.1f s (policy.step_timeout %g s); "
                              "exiting so that the daemon restarts this worker", overran,
                              self.limits["step"])
                    os._exit(EXIT_STUCK)
                if self._interrupted != token:
                    log.warning("a render has run for %.1f s (policy.render_timeout %g s); "
                                "interrupting it", overran, self.limits["render"])
                # Sent again at every poll until the render unwinds: code that
                # catches everything may swallow one.
                self._interrupted = token
                _set_async_exc(self._main, RenderTimeout)


def _set_async_exc(thread_id: int, exc: type[BaseException] | None) -> None:
    """CPython's way to raise in another thread, at its next bytecode; None
    withdraws one not raised yet."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id),
                                               ctypes.py_object(exc) if exc else None)
