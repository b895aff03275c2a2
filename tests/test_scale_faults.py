"""The reliability scenario at scale (bench/scale.py --faults): 62 simulated clients on a slow, lossy network,
some dying mid-run and some joining late, beside 2 real training clients on a lossy network; the run finishes,
the dead are dropped, and the real replicas match the coordinator's at every epoch end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_64_clients_with_faults_finish_with_consistent_replicas(tmp_path):
    out = tmp_path / "faults.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "scale.py"), "--machine-clients", "4",
                           "--clients", "64", "--rounds", "6", "--preset", "tiny", "--faults", "--timeout", "400",
                           "--out", str(out)], capture_output=True, text=True, timeout=560, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["service"]
    (run,) = row["runs"]
    assert run["finished"] and not run["errors"], run["errors"]
    summary = run["summary"]
    assert summary["steps"] == 6 and summary["epochs"] == 2
    assert summary["replicas_consistent"] and summary["hashes_checked"] >= 4 and not summary["divergences"]
    assert sum(c["status"] == "gone" for c in summary["clients"]) >= 2  # the dead were dropped
    sims = [c for c in summary["clients"] if c["id"].startswith("sim")]
    alive = [c for c in sims if c["status"] == "member"]
    assert len(alive) >= 56 and all(c["rounds_contributed"] >= 3 for c in alive)
    # those that joined at step 1 waited for the next epoch, then trained its rounds
    assert any(c["rounds_contributed"] == 3 for c in alive)
    assert run["sim_dropped_requests"] > 100  # the faults really happened
    real = run["real_clients"]
    assert len(real) == 2 and all(c["step"] == 6 for c in real)
    assert sum(c["faults_dropped"] for c in real) > 0 and sum(c["faults_latency"] for c in real) > 100
