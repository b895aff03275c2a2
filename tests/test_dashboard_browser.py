"""The dashboard in a real headless Chromium, on a running testnet (3 clients at tiers 0, 1, 2).

Chromium renders the page twice a few rounds apart (`--dump-dom` after a virtual-time budget that lets the page
poll /api/dashboard); the test reads the rendered DOM: the charts hold data, the peers table has one row per
client with its tier, and the step counter and the loss chart advance. A screenshot is kept in test-artifacts/.
Set-up installs chromium when missing (tests/support/ensure_chromium.sh); without it the test skips.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest

from support.dashboard_run import shared_testnet

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
         "--hide-scrollbars"]

pytestmark = pytest.mark.slow


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(args: list[str], timeout: float = 60) -> str:
    binary = chromium_binary()
    with tempfile.TemporaryDirectory(prefix="aftermath-chromium-") as profile:
        proc = subprocess.run([binary, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                              timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"chromium exited {proc.returncode}: {proc.stderr[-2000:]}")
    return proc.stdout


def health(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
        return json.loads(r.read())


def wait_for_step(url: str, step: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            h = health(url) if url else None
            if h and (h["step"] >= step or h["phase"] == "Finished"):
                return h["step"]
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"the testnet did not reach step {step} within {timeout} s")


class DomReader(HTMLParser):
    """The bits of the rendered page the test checks."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: dict[str, str] = {}
        self._capture: str | None = None
        self.peers: list[dict[str, str]] = []
        self.charts: dict[str, int] = {}  # chart id -> data points drawn
        self._chart: str | None = None
        self.series: dict[str, list[str]] = {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id") in ("step", "phase", "epoch", "r-in", "r-total"):
            self._capture = a["id"]
            self.ids[self._capture] = ""
        if a.get("id", "").startswith("chart-"):
            self._chart = a["id"]
        if tag == "svg" and self._chart:
            self.charts[self._chart] = int(a.get("data-points", 0))
        if tag == "g" and a.get("class") == "series" and self._chart:
            self.series.setdefault(self._chart, []).append(a.get("data-label", ""))
        if tag == "tr" and "data-peer-id" in a:
            self.peers.append({"id": a["data-peer-id"], "tier": a.get("data-tier", "")})

    def handle_endtag(self, tag):
        if self._capture and tag in ("b", "td", "span"):
            self._capture = None
        if tag == "section":
            self._chart = None

    def handle_data(self, data):
        if self._capture:
            self.ids[self._capture] += data


def render(url: str) -> DomReader:
    dom = chromium(["--virtual-time-budget=4000", "--window-size=1400,1800", "--dump-dom", url + "/"])
    reader = DomReader()
    reader.feed(dom)
    return reader


@pytest.fixture(scope="module")
def browser():
    if chromium_binary() is None:
        pytest.skip("chromium is not installed: run tests/support/ensure_chromium.sh (apt-get install chromium)")


@pytest.fixture(scope="module")
def running(browser):
    net = shared_testnet()
    deadline = time.monotonic() + 120
    while not net.url and time.monotonic() < deadline:
        time.sleep(0.1)
    return net


def test_dashboard_renders_and_advances(running):
    url = running.url
    first_step = wait_for_step(url, 1, timeout=240)
    first = render(url)
    assert first.ids.get("step", "").strip().isdigit(), first.ids
    step1 = int(first.ids["step"])
    assert step1 >= first_step
    assert sorted(p["tier"] for p in first.peers) == ["0", "1", "2"], first.peers
    assert len({p["id"] for p in first.peers}) == 3
    assert first.charts.get("chart-loss", 0) > 0, first.charts
    assert "chart-bandwidth" in first.charts and "chart-val" in first.charts

    wait_for_step(url, step1 + 2, timeout=120)
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    chromium(["--virtual-time-budget=4000", "--window-size=1400,1800", f"--screenshot={shot}", url + "/"])
    second = render(url)
    step2 = int(second.ids["step"])
    assert step2 >= step1 + 2, (step1, step2)
    assert second.charts["chart-loss"] > first.charts["chart-loss"], (first.charts, second.charts)
    assert second.charts["chart-bandwidth"] > first.charts["chart-bandwidth"]
    assert {"tier0 train", "tier1 train", "tier2 train"} <= set(second.series["chart-loss"])
    assert sorted(p["tier"] for p in second.peers) == ["0", "1", "2"]
    assert shot.stat().st_size > 20_000


def test_unreachable_coordinator_shows_a_banner(browser):
    """When /api/dashboard does not answer, the page says so in a banner (the page is served by a stand-in)."""
    import http.server
    import threading

    from aftermath.dashboard.server import static_file

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # the page and its files; /api/dashboard fails as if the coordinator were down
            name = {"/": "dashboard.html"}.get(self.path, self.path.rsplit("/", 1)[-1])
            if self.path.startswith("/api/") or name not in ("dashboard.html", "dashboard.js", "dashboard.css"):
                self.send_response(502)
                self.end_headers()
                return
            body = static_file(name)
            self.send_response(200)
            self.send_header("Content-Type", {"html": "text/html", "js": "application/javascript",
                                              "css": "text/css"}[name.rsplit(".", 1)[1]])
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        dom = chromium(["--virtual-time-budget=3000", "--dump-dom", f"http://127.0.0.1:{server.server_port}/"])
    finally:
        server.shutdown()
    banner = re.search(r'<div id="banner" class="([^"]*)"[^>]*>(.*?)</div>', dom, re.S)
    assert banner, dom[:500]
    assert "hidden" not in banner.group(1) and "unreachable" in banner.group(2)
