"""The worker's main-thread watchdog (wcd/workers/watchdog.py), in processes
of its own: a render past its limit is interrupted and the process goes on; a
step past its limit ends the process; nothing lands after a section ends."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

from conftest import ROOT


def run(body: str, timeout: float = 30) -> subprocess.CompletedProcess:
    script = textwrap.dedent("""
        import time
        from wcd.workers.watchdog import RenderTimeout, Watchdog
        watchdog = Watchdog(render_timeout_s=0.3, step_timeout_s=0.5)
    """) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_a_render_past_its_limit_is_interrupted_and_the_process_goes_on():
    done = run("""
        started = time.monotonic()
        try:
            with watchdog.bounded("render"):
                while True:  # a template's loop: Python bytecode, interruptible
                    pass
        except RenderTimeout as exc:
            print("interrupted after", round(time.monotonic() - started, 1), exc)
        with watchdog.bounded("render"):
            total = sum(range(1000))  # the next render is not hit by the last one's signal
        time.sleep(1)
        print("still running", total)
    """)
    assert done.returncode == 0, done.stderr
    interrupted, still = done.stdout.splitlines()
    assert interrupted.startswith("interrupted after") and "render_timeout" in interrupted
    assert float(interrupted.split()[2]) < 2
    assert still == "still running 499500"


def test_a_render_that_swallows_the_interruption_is_interrupted_again():
    done = run("""
        try:
            with watchdog.bounded("render"):
                while True:
                    try:
                        while True:
                            pass
                    except BaseException:
                        print("swallowed once")
                        break
                while True:
                    pass
        except RenderTimeout:
            print("interrupted")
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["swallowed", "once", "interrupted"]


def test_a_step_past_its_limit_ends_the_process():
    started = time.monotonic()
    done = run("""
        with watchdog.bounded("step"):
            time.sleep(30)  # a step stuck in native code
        print("not reached")
    """)
    assert done.returncode == 3, (done.returncode, done.stderr)
    assert "not reached" not in done.stdout
    assert time.monotonic() - started < 10
    assert "step_timeout" in done.stderr


def test_sections_within_their_limits_are_left_alone():
    done = run("""
        for _ in range(20):
            with watchdog.bounded("render"):
                time.sleep(0.05)
            with watchdog.bounded("step"):
                time.sleep(0.05)
        time.sleep(1)
        print("ok")
    """)
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr
