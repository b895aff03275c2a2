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
        [sys.executable, str(ROOT / "bench" / "cotrain.py"), "--quick",
         "--arms", "L+S,L-own,S-own,L-all,S-distill,L+S-help", "--steps", "6", "--jobs", "1", "--helper-share", "1.0", "--teacher-dir", str(tmp_path / "teachers"),
         "--out", str(out)],
        capture_output=True, text=True, timeout=240, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Held-out loss after 6 steps" in proc.stdout

    data = json.loads(out.read_text())
    assert data["benchmark"] == "cotrain" and data["complete"] is True
    assert data["settings"]["preset"] == "tiny" and data["settings"]["steps"] == 6
    rows = {r["arm"]: r for r in data["rows"]}
    assert set(rows) == {"L+S", "L-own", "S-own", "L-all", "S-distill", "L+S-help"}
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
    # S-distill learnt from L-all's saved final model; helper mode (every step a helper step here) trained
    # another region than L+S and still kept the replicas bit-identical
    assert list((tmp_path / "teachers").glob("L-all-*-seed0.pt"))
    assert runs["S-distill"]["tier1_loss"] != runs["S-own"]["tier1_loss"]
    assert runs["L+S-help"]["replicas_max_abs_diff"] == 0.0
    assert runs["L+S-help"]["tier0_loss"] != runs["L+S"]["tier0_loss"]
    claims = {(c["arm"], c["tier"], c["versus"]) for c in data["claims"]}
    assert claims == {("L+S", "0", "L-own"), ("L+S", "1", "S-own"), ("L+S", "1", "S-distill"),
                      ("L+S-help", "0", "L+S"), ("L+S-help", "1", "L+S")}
    assert "| arm |" in data["markdown"]["table"]


def test_helper_window_swap_keeps_the_function() -> None:
    """Helper mode's frame change swaps FFN neurons of the suffix: the model computes the same logits (up to the
    order of a float sum), the swap is its own inverse bit for bit, and a window that cuts DCT chunks is refused."""
    import pytest
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from cotrain import SuffixWindows

    from aftermath.model import build_model, preset_config, tier_spec

    cfg = preset_config("tiny")
    model = build_model(cfg, seed=3)
    windows = SuffixWindows(cfg, tier_spec(cfg, 1), width=64, share=1.0, seed=0, chunk=64)
    assert windows.spec.ffn_widths == (256 + 64,) * cfg.num_hidden_layers
    starts = next(s for s in map(windows.starts, range(50)) if len(set(s)) > 1)  # layers with different windows
    assert all(256 <= a < 512 and a % 64 == 0 for a in starts)
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        logits = model(ids)
        windows.swap(dict(model.named_parameters()), starts)
        moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
        assert moved and all(".mlp." in n for n in moved)
        assert torch.allclose(model(ids), logits, atol=1e-5)
        windows.swap(dict(model.named_parameters()), starts)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="--helper-window 48"):
        SuffixWindows(cfg, tier_spec(cfg, 1), width=48, share=1.0, seed=0, chunk=64)
