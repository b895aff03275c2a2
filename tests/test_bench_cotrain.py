"""bench/cotrain.py --quick runs end to end: real simulated clients, faithful replicas, sane held-out losses."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cotrain_quick(tmp_path: Path) -> None:
    out = tmp_path / "cotrain.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "cotrain.py"), "--quick", "--arms", "L+S,L-own,S-own", "--steps", "6",
         "--jobs", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=240, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Held-out loss after 6 steps" in proc.stdout

    data = json.loads(out.read_text())
    assert data["benchmark"] == "cotrain" and data["complete"] is True
    assert data["settings"]["preset"] == "tiny" and data["settings"]["steps"] == 6
    rows = {r["arm"]: r for r in data["rows"]}
    assert set(rows) == {"L+S", "L-own", "S-own"}
    # the replicas of a co-trained arm agree bit for bit on the region they share
    assert all(r["replicas_agree"] for r in rows.values())
    runs = {r["arm"]: r for r in data["runs"]}
    assert runs["L+S"]["replicas_max_abs_diff"] == 0.0
    # each client trains its own share: 4 sequences of 32 tokens per step in quick mode
    assert runs["L+S"]["tokens_per_step"] == {"tier0": 4 * 32, "tier1": 4 * 32}
    assert runs["S-own"]["tier0_loss"] is None  # a tier-1-width model has no tier 0
    untrained = math.log(4096)
    for r in data["runs"]:
        for key in ("tier0_loss", "tier1_loss"):
            if r[key] is not None:
                assert math.isfinite(r[key]) and r[key] < untrained + 0.5, (r["arm"], key, r[key])
    # L+S and S-own hold the same tier-1 starting weights and data share; training moved the loss
    assert runs["L+S"]["train_losses"][0][1] != runs["L+S"]["train_losses"][-1][1]
    claims = {(c["arm"], c["tier"]) for c in data["claims"]}
    assert claims == {("L+S", "0"), ("L+S", "1")}
    assert "| arm |" in data["markdown"]["table"]
