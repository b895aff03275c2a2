"""End to end with real processes: a coordinator and 3 clients at tiers 0, 1, 2 on 127.0.0.1."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from rich.console import Console

from aftermath.checkpoint.hf_dir import load_model_dir
from aftermath.checkpoint.manifest import read_manifest, verify_files
from aftermath.round.replica import weights_sha256
from aftermath.data import TokenStream, default_data_dir
from aftermath.metrics import read_metrics
from aftermath.testnet import Testnet, TestnetOptions


@pytest.fixture(scope="module")
def testnet_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("testnet") / "out"
    options = TestnetOptions(clients=3, tiers=[0, 1, 2], steps=6, out=out, live=False, timeout=240,
                             extra_overrides={"schedule.rounds_per_epoch": 3, "schedule.global_batch_size": 12,
                                              "optimizer.warmup_steps": 1, "data.val_sequences": 16})
    summary = Testnet(options, Console(quiet=True)).run()
    return out, summary


def test_replicas_agree_and_match_the_checkpoint(testnet_run):
    out, summary = testnet_run
    assert summary["steps"] == 6 and summary["epochs"] == 2
    assert summary["replicas_consistent"] is True, summary["unrecovered"]
    clients = {c["id"]: c for c in summary["clients"]}
    assert sorted((c["tier"] for c in clients.values())) == [0, 1, 2]
    ckpt = out / "checkpoint"
    for c in clients.values():
        # anyone can recompute a client's replica hash from the exported tier directory
        tier_dir = ckpt / ("model" if c["tier"] == 0 else f"model-tier{c['tier']}")
        model = load_model_dir(tier_dir)
        assert weights_sha256(dict(model.named_parameters())) == c["weights_sha256"]
        assert c["bytes_up"] > 0 and c["bytes_down"] > 0 and c["final_loss"] is not None
    info = json.loads((ckpt / "checkpoint.json").read_text())
    assert info["step"] == 6


def test_loss_falls_and_the_checkpoint_evaluates(testnet_run):
    out, summary = testnet_run
    for tier in ("0", "1", "2"):
        v = summary["tiers"][tier]
        assert v["val_loss"] < v["initial_val_loss"] - 0.2, (tier, v)
    manifest = read_manifest(out / "checkpoint" / "model")
    assert [e.name for e in manifest.tiers][:3] == ["tier0", "tier1", "tier2"]
    verify_files(manifest, out / "checkpoint" / "model", out / "checkpoint", manifest.all_files())
    stream = TokenStream(default_data_dir(), 128, seed=0, split="val")
    batch = stream.sequences(0, 8)
    for name in ("model", "model-tier1", "model-tier2"):
        model = load_model_dir(out / "checkpoint" / name)
        with torch.no_grad():
            loss = model.loss(batch[:, :-1], batch[:, 1:]).item()
        assert loss < 8.0, (name, loss)  # the initial model is at ~8.3 = ln(4096)


def test_outputs_metrics_and_plot(testnet_run):
    out, summary = testnet_run
    assert (out / "loss.png").stat().st_size > 10_000
    assert (out / "summary.json").is_file() and (out / "metrics" / "coordinator.jsonl").is_file()
    for i in range(3):
        rounds = [r for r in read_metrics(out / "metrics" / f"client-{i}.jsonl") if r.get("event") == "round"]
        assert [r["step"] for r in rounds] == list(range(6))
        for key in ("loss", "tokens", "tokens_per_s", "bytes_up", "bytes_down", "peak_memory", "t_train",
                    "t_upload", "t_download", "t_decode", "t_aggregate"):
            assert rounds[-1][key] is not None, key
        losses = [r["loss"] for r in rounds]
        assert losses[-1] < losses[0]


def test_out_that_is_not_empty_is_refused_without_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text("{}")  # an earlier run's result
    result = subprocess.run([sys.executable, "-m", "aftermath.cli", "testnet", "--out", str(out), "--no-live"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(out) in lines[0] and "--force" in lines[0]
    assert (out / "summary.json").read_text() == "{}"


def test_sigterm_stops_the_coordinator_and_the_clients(tmp_path):
    out = tmp_path / "out"
    testnet = subprocess.Popen([sys.executable, "-m", "aftermath.cli", "testnet", "--clients", "2", "--tiers", "0,1",
                                "--steps", "40", "--out", str(out), "--no-live", "--timeout", "120"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    parent = psutil.Process(testnet.pid)
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 90
        while not (out / "coordinator.json").is_file():  # the coordinator listens; the clients are started
            assert testnet.poll() is None, testnet.stderr.read()
            assert time.monotonic() < deadline, "the testnet's coordinator did not come up"
            time.sleep(0.2)
        children = parent.children(recursive=True)
        assert len(children) >= 3  # the coordinator and two clients
        testnet.send_signal(signal.SIGTERM)
        code = testnet.wait(timeout=20)
        stderr = testnet.stderr.read()
        _, alive = psutil.wait_procs(children, timeout=5)
        assert not alive, f"orphaned: {[p.cmdline() for p in alive]}"
        assert code != 0 and "Traceback" not in stderr
        assert stderr.strip().splitlines()[-1] == "interrupted"
    finally:
        for proc in [*children, parent]:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
