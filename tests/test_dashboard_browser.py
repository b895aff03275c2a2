"""The dashboard in a real headless Chromium, on a running testnet (3 clients at tiers 0, 1, 2).

Chromium renders the page twice a few rounds apart (`--dump-dom` after a virtual-time budget that lets the page
poll /api/dashboard); the test reads the rendered DOM: the charts hold data, the peers table has one row per
client with its tier, and the step counter and the loss chart advance. It also reads what a person reads: distinct
y-axis labels, one legend entry and marker shape per validation tier (the tiers' losses coincide on a fresh run),
rounded numbers in the events, and each client's own peak memory. A screenshot is kept in test-artifacts/.
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
        self.markers: dict[str, dict[str, set[str]]] = {}  # chart id -> series label -> marker shapes drawn
        self._series: str | None = None
        self.y_ticks: dict[str, list[str]] = {}  # chart id -> y-axis labels
        self.legend: dict[str, list[tuple[str, str]]] = {}  # chart id -> (label, marker) per legend entry
        self.peer_headers: list[str] = []
        self.peer_memory: list[str] = []  # the memory cell of each row of self.peers
        self.events: list[str] = []
        self._within: str | None = None  # "peers-head" or "events" while inside that part of the page
        self._sink: tuple[str, list[str]] | None = None  # (closing tag, list whose last text grows) while reading

    def _read(self, tag: str, into: list[str]) -> None:
        into.append("")
        self._sink = (tag, into)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = a.get("class", "").split()
        if a.get("id") in ("step", "phase", "epoch", "r-in", "r-total"):
            self._capture = a["id"]
            self.ids[self._capture] = ""
        if a.get("id", "").startswith("chart-"):
            self._chart = a["id"]
        if tag == "svg" and self._chart and "data-points" in a:  # the chart itself, not a legend swatch
            self.charts[self._chart] = int(a["data-points"])
        if tag == "g" and a.get("class") == "series" and self._chart:
            self._series = a.get("data-label", "")
            self.series.setdefault(self._chart, []).append(self._series)
            self.markers.setdefault(self._chart, {})[self._series] = set()
        if self._series is not None and "marker" in classes:
            self.markers[self._chart][self._series].add(a.get("data-shape", ""))
        if self._chart and "legend-item" in classes:
            self.legend.setdefault(self._chart, []).append((a.get("data-label", ""), a.get("data-marker", "")))
        if tag == "text" and self._chart and "y-tick" in classes:
            self._read(tag, self.y_ticks.setdefault(self._chart, []))
        if tag == "tr" and "data-peer-id" in a:
            self.peers.append({"id": a["data-peer-id"], "tier": a.get("data-tier", "")})
        if tag == "td" and "peak-memory" in classes:
            self._read(tag, self.peer_memory)
        if tag == "table" and a.get("id") == "peers":
            self._within = "peers-head"
        if tag == "th" and self._within == "peers-head":
            self._read(tag, self.peer_headers)
        if tag == "ul" and a.get("id") == "events":
            self._within = "events"
        if tag == "li" and self._within == "events":
            self._read(tag, self.events)

    def handle_endtag(self, tag):
        if self._capture and tag in ("b", "td", "span"):
            self._capture = None
        if tag == "section":
            self._chart = None
        if tag == "g":
            self._series = None
        if self._sink and tag == self._sink[0]:
            self._sink = None
        if (tag, self._within) in (("thead", "peers-head"), ("ul", "events")):
            self._within = None

    def handle_data(self, data):
        if self._capture:
            self.ids[self._capture] += data
        if self._sink:
            self._sink[1][-1] += data


def snapshot(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/api/dashboard", timeout=10) as r:
        return json.loads(r.read())


def shown_bytes(text: str) -> float:
    """'12.3 MiB' / '1.25 GiB' as bytes."""
    value, unit = text.split()
    return float(value) * {"MiB": 2**20, "GiB": 2**30}[unit]


def check_readable(page: DomReader) -> None:
    """What a person reads on the page: y-axis labels that differ, validation tiers told apart by marker and
    legend, numbers in the events rounded."""
    drawn = [c for c in ("chart-loss", "chart-val", "chart-bandwidth") if page.charts.get(c, 0) > 0]
    assert {"chart-loss", "chart-val"} <= set(drawn), page.charts  # the initial checkpoint has a validation loss
    for chart in drawn:
        ticks = page.y_ticks.get(chart, [])
        assert len(ticks) >= 3 and len(set(ticks)) == len(ticks), (chart, ticks)
    val = sorted(label for label in page.series["chart-val"])
    # evaluated at every tier width and at the Mix'n'Match specs between adjacent tiers
    assert val == ["mid0-1", "mid1-2", "mix0-1", "mix1-2", "tier0", "tier1", "tier2"], page.series
    shapes = {label: page.markers["chart-val"][label] for label in val}
    assert all(len(s) == 1 for s in shapes.values()), shapes  # one marker shape per line ...
    tiers = ["tier0", "tier1", "tier2"]
    assert len({next(iter(shapes[t])) for t in tiers}) == 3, shapes  # ... a different one for each tier
    assert sorted(page.legend["chart-val"]) == sorted((label, next(iter(shapes[label]))) for label in val)
    val_in_loss = [f"{t} validation" for t in tiers]
    assert set(val_in_loss) <= set(page.series["chart-loss"]), page.series
    assert len({next(iter(page.markers["chart-loss"][label])) for label in val_in_loss}) == 3, page.markers
    assert page.events, page.events
    long_numbers = [e for e in page.events if re.search(r"\d\.\d{7}", e)]
    assert not long_numbers, long_numbers


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

    check_readable(first)

    wait_for_step(url, step1 + 2, timeout=120)
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    chromium(["--virtual-time-budget=4000", "--window-size=1400,1800", f"--screenshot={shot}", url + "/"])
    before = {p["id"]: p for p in snapshot(url)["peers"]}
    second = render(url)
    after = {p["id"]: p for p in snapshot(url)["peers"]}
    step2 = int(second.ids["step"])
    assert step2 >= step1 + 2, (step1, step2)
    assert second.charts["chart-loss"] > first.charts["chart-loss"], (first.charts, second.charts)
    assert second.charts["chart-bandwidth"] > first.charts["chart-bandwidth"]
    assert {"tier0 train", "tier1 train", "tier2 train"} <= set(second.series["chart-loss"])
    assert sorted(p["tier"] for p in second.peers) == ["0", "1", "2"]
    check_readable(second)
    # The memory column is the client's own peak memory (it only grows, so the value the page got lies between
    # the snapshots taken before and after), not the free RAM it declared at join.
    assert "peak memory" in second.peer_headers, second.peer_headers
    assert len(second.peer_memory) == len(second.peers), second.peer_memory
    for cid, text in zip((p["id"] for p in second.peers), second.peer_memory):
        low, high = before[cid]["peak_memory"], after[cid]["peak_memory"]
        if high is None:
            assert text == "—", (cid, text)
            continue
        assert re.fullmatch(r"\d+\.\d+ (MiB|GiB)", text), (cid, text)
        tolerance = 0.05 * 2**20 if text.endswith("MiB") else 0.005 * 2**30  # the page rounds to its last digit
        assert (low or 0) - tolerance <= shown_bytes(text) <= high + tolerance, (cid, text, low, high)
    assert any(text != "—" for text in second.peer_memory), second.peer_memory  # heartbeats carry it
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
