"""`aftermath report RUN_DIR` on a real testnet's output (the testnet shared with the browser test)."""

from __future__ import annotations

import base64
import re

import pytest

from aftermath.cli import main
from aftermath.report import PLOTS, write_report
from support.dashboard_run import STEPS, shared_testnet

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run():
    return shared_testnet().wait()


def test_testnet_writes_a_self_contained_report(finished_run):
    out, summary = finished_run
    html = (out / "report.html").read_text()  # written by the testnet at its end
    assert "<script" not in html and "http://" not in html and "https://" not in html  # nothing to fetch
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)
    assert len(images) == len(PLOTS)
    for data in images:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    for name in PLOTS.values():
        assert (out / name).stat().st_size > 10_000
    for client in summary["clients"]:
        assert client["id"] in html
    assert "tier2" in html and "Samples from the last checkpoint" in html


def test_report_numbers_match_the_run(finished_run, tmp_path):
    out, summary = finished_run
    rep = write_report(out, samples=False)
    h = rep.history
    assert [b["step"] for b in h.bandwidth] == list(range(STEPS))
    for b in h.bandwidth:
        assert b["accepted"] == 3 and b["payload_bytes"] > 0
        assert b["ratio"] > 5  # DisTrO payloads are much smaller than dense fp32 updates
    assert set(h.train_series()) == {"tier0", "tier1", "tier2"}
    val = h.val_series()
    # every tier width, and the Mix'n'Match specs between adjacent tiers, is evaluated at every epoch end
    assert list(val) == ["tier0", "tier1", "tier2", "mid0-1", "mid1-2", "mix0-1", "mix1-2"]
    for label, points in val.items():
        assert [p[0] for p in points] == [0, 4, 8]  # initial model, then each epoch's checkpoint
        key = label[4:] if label.startswith("tier") else label
        assert points[-1][1] == pytest.approx(summary["tiers"][key]["val_loss"])
        if label.startswith("tier"):
            assert points[-1][1] < points[0][1]
    assert [e["kind"] for e in h.events].count("joined") == 3


def test_report_command_and_its_errors(finished_run, tmp_path, capsys):
    out, _ = finished_run
    assert main(["report", str(out), "--no-samples"]) == 0
    assert "report.html" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "no metrics/coordinator.jsonl" in capsys.readouterr().err
