"""The status page end to end: a real daemon with a real worker on CPU, one
swap, and the page as headless Chromium renders it (its JavaScript fetching
/status.json and drawing the tables and the swap chart)."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy
import pytest
from matplotlib import image

from daemon_harness import wait_until
from wcd.daemon.status import status_page

pytestmark = pytest.mark.vllm

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser",
                                               "google-chrome"))), None)
# Enough virtual time for the page's first poll and render, and a second one.
HEADLESS = ["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000"]


class Elements(HTMLParser):
    """Every element's attributes, to find what the page's script drew."""

    def __init__(self, html: str):
        super().__init__()
        self.found: list[tuple[str, dict]] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.found.append((tag, dict(attrs)))

    def having(self, **data: str) -> list[dict]:
        wanted = {f"data-{key}": value for key, value in data.items()}
        return [attrs for _, attrs in self.found if wanted.items() <= attrs.items()]


def chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *HEADLESS, *args], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def daemon(shared_daemon):
    """conftest's shared daemon, having served small-a and then small-b: a swap
    to chart and small-a left in host memory."""
    if CHROMIUM is None:
        pytest.skip("no chromium binary (apt-get install chromium)")
    daemon = shared_daemon.get()
    for model in ("small-a", "small-b"):
        swapped = daemon.wcctl("swap", model)
        assert swapped.returncode == 0, swapped.stderr

    def small_a_in_host() -> bool:
        return any(m["name"] == "small-a" and m["where"] == "host"
                   for m in daemon.json("ps")["models"])

    wait_until(small_a_in_host, timeout=30, what="small-a in host memory", interval=0.3)
    return daemon


def test_page_shows_workers_models_and_swaps(daemon):
    done = chromium("--dump-dom", daemon.url + "/")
    assert done.returncode == 0, done.stderr[-3000:]
    dom = Elements(done.stdout)
    assert dom.having(worker="0", state="serving", model="small-b"), done.stdout
    assert dom.having(model="small-b", where="serving")
    assert dom.having(model="small-a", where="host")  # the swap left it in host memory
    bars = dom.having(worker="0", model="small-b")
    assert any("bar" in attrs.get("class", "") for attrs in bars), done.stdout
    assert dom.having(phase="build") and dom.having(phase="resolve")
    assert "0 requests waiting" in done.stdout
    # Drawn from a fetched document, not the "not reachable" of a failed poll.
    assert re.search(r'id="summary" class="muted">[^<]* · ready · pid \d+', done.stdout)


def test_page_screenshot(daemon, tmp_path):
    shot = tmp_path / "status.png"
    done = chromium(f"--screenshot={shot}", "--window-size=1200,900", daemon.url + "/")
    assert done.returncode == 0, done.stderr[-3000:]
    pixels = (image.imread(shot)[..., :3] * 255).round().astype(int)
    assert pixels.shape[:2] == (900, 1200)
    # The swap chart was drawn: a bar of one of its phase colours spans a row.
    colours = re.search(r"const COLORS = \[([^\]]*)\]", status_page().decode()).group(1)
    widest = max(widest_row(pixels, colour) for colour in re.findall(r"#([0-9a-f]{6})", colours))
    assert widest >= 50, widest


def widest_row(pixels: numpy.ndarray, colour: str) -> int:
    """The most pixels of `colour` (rrggbb) that one row of the image holds."""
    rgb = numpy.array([int(colour[i:i + 2], 16) for i in (0, 2, 4)])
    matches = (numpy.abs(pixels - rgb) <= 3).all(axis=-1)
    return int(matches.sum(axis=1).max())
