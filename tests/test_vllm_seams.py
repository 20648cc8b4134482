"""Every vLLM seam has its check (unit test, reads wcd/workers/vllm_seams.py).

The seams are where wcd reaches into vLLM internals; check() is what fails
loudly when vLLM moves under one. A seam added without a check would let a
vLLM upgrade degrade swaps silently, so the module's seam headers and the
checks check() runs must name the same seams, in order.
"""

from __future__ import annotations

import inspect
import re

from wcd.workers import vllm_seams


def test_every_seam_has_a_check_that_check_runs():
    source = inspect.getsource(vllm_seams)
    seams = [int(n) for n in re.findall(r"^# ---- seam (\d+):", source, re.M)]
    assert seams == list(range(1, len(seams) + 1)), "seams out of order or missing"
    checks = dict(re.findall(r"^def (_check_\w+)\(\) -> None:  # seam (\d+)$", source, re.M))
    run = re.findall(r"_check_\w+", inspect.getsource(vllm_seams.check))
    assert set(run) == set(checks), "a seam check check() does not run, or one unlabelled"
    assert sorted({int(checks[name]) for name in run}) == seams, "a seam without a check"
    assert [int(checks[name]) for name in run] == sorted(int(checks[name]) for name in run), \
        "check() runs the seams out of order"
