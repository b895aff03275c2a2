"""bench/memory.py --quick runs end to end and its JSON holds sane numbers.

Three measurement processes (small preset, seq 64 x batch 2): tier 0, tier 1 sliced, tier 1 runtime. --quick
forks them from one server process that imported torch once (~15 s of CPU in all instead of ~26).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_memory_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "memory.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "memory.py"), "--quick", "--settings", "ffn+heads,runtime",
         "--out", str(out)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Peak of tier t / peak of tier 0" in proc.stdout

    data = json.loads(out.read_text())
    assert data["complete"] is True and data["benchmark"] == "memory"
    assert data["machine"]["torch"]
    rows = {(r["setting"], r["tier"]): r for r in data["rows"]}
    assert set(rows) == {("ffn+heads", 0), ("ffn+heads", 1), ("runtime", 0), ("runtime", 1)}
    for r in rows.values():
        for field in ("peak_bytes", "peak_above_import_bytes", "weights_bytes", "grads_bytes", "optimizer_bytes",
                      "params_held", "params_tier", "ratio_vs_tier0", "step_seconds"):
            assert field in r, field
        assert r["peak_reliable"] and r["loss_finite"]
        # The step holds at least weights, gradients and AdamW's two states, and the run stays below 4 GiB.
        assert r["weights_bytes"] + r["grads_bytes"] + r["optimizer_bytes"] < r["peak_bytes"] < 4 * 2**30
        assert r["optimizer_bytes"] == 2 * r["weights_bytes"]  # AdamW
        assert r["peak_above_import_bytes"] > r["peak_bytes"]

    t0, t1, rt1 = rows[("ffn+heads", 0)], rows[("ffn+heads", 1)], rows[("runtime", 1)]
    assert t0["params_held"] == t0["params_tier"] == rt1["params_held"]  # runtime holds the universal weights
    assert t1["params_held"] == t1["params_tier"] < t0["params_held"]
    # A sliced tier 1 needs clearly less than tier 0; runtime slicing saves far less than slicing the weights.
    assert 0.3 < t1["ratio_vs_tier0"] < 0.9
    assert t1["ratio_vs_tier0"] < rt1["ratio_vs_tier0"] <= 1.05
    line = {(l["setting"]): l for l in data["ratios"]}
    assert abs(line["ffn+heads"]["tier1_over_tier0"] - t1["ratio_vs_tier0"]) < 1e-12
    assert "| preset |" in data["markdown"]["ratios"]
