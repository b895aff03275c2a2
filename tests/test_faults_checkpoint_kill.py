"""A process killed (SIGKILL) while it writes checkpoints leaves the previous checkpoint valid and loadable, and a
restarted coordinator resumes from a consistent (checkpoint, state.json) pair."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

from aftermath.checkpoint.hf_dir import load_model_dir
from aftermath.checkpoint.manifest import read_manifest, verify_files
from aftermath.coordinator.keeper import CHECKPOINT_DIR, INFO_FILE, MODEL_DIR, ModelKeeper
from aftermath.runconfig import load_run_config

WRITER = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from aftermath.coordinator.keeper import ModelKeeper
    from aftermath.runconfig import load_run_config
    keeper = ModelKeeper(load_run_config(), sys.argv[1])
    keeper.start(None)
    print("ready", flush=True)
    for epoch in range(10**6):
        for p in keeper.replica.model.parameters():  # a different model every time
            p.data.add_(0.001)
        keeper.write_checkpoint(epoch, epoch)
        print("wrote", epoch, flush=True)
""")


def check_valid(run_dir) -> int:
    keeper = ModelKeeper(load_run_config(), run_dir)
    keeper.recover()
    ckpt = run_dir / CHECKPOINT_DIR
    info = json.loads((ckpt / INFO_FILE).read_text())
    manifest = read_manifest(ckpt / MODEL_DIR)
    verify_files(manifest, ckpt / MODEL_DIR, ckpt, manifest.all_files())  # every file whole, sha256 as listed
    load_model_dir(ckpt / MODEL_DIR)
    load_model_dir(ckpt / "model-tier2")
    assert not (run_dir / ".checkpoint-tmp").exists() and not (run_dir / ".checkpoint-old").exists()
    return info["step"]


def test_kill_while_writing_checkpoints_leaves_a_valid_one(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(run_dir)], stdout=subprocess.PIPE, text=True, env=env)
    tmp = run_dir / ".checkpoint-tmp" / MODEL_DIR
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert proc.stdout.readline().startswith("wrote 0")
        # strike while the next checkpoint is half written: its weights are on disk, its manifest is not yet
        deadline = time.monotonic() + 60
        while not (tmp.is_dir() and any(tmp.glob("model.safetensors")) and not (tmp / "matformer_manifest.json").exists()):
            assert time.monotonic() < deadline, "the writer never got inside a write"
            time.sleep(0.001)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (run_dir / ".checkpoint-tmp").exists() or (run_dir / ".checkpoint-old").exists()  # the kill hit a write
    step = check_valid(run_dir)
    assert step >= 0


def test_an_interrupted_swap_is_repaired_and_the_newer_checkpoint_wins(tmp_path):
    run_dir = tmp_path / "run"
    keeper = ModelKeeper(load_run_config(), run_dir)
    keeper.start(None)
    keeper.write_checkpoint(0, 5)
    # the moment between the swap's two renames: checkpoint/ gone, the old one in .checkpoint-old, a new tmp
    os.replace(run_dir / CHECKPOINT_DIR, run_dir / ".checkpoint-old")
    (run_dir / ".checkpoint-tmp" / MODEL_DIR).mkdir(parents=True)
    (run_dir / ".checkpoint-tmp" / MODEL_DIR / "model.safetensors").write_bytes(b"half")
    assert check_valid(run_dir) == 5

    # killed after the swap but before state.json: the coordinator resumes from the (complete) newer checkpoint
    from aftermath.coordinator.persist import save_state
    from aftermath.coordinator.service import CoordinatorService

    save_state(run_dir, {"run_id": "aftermath-run", "epoch": -1, "step": 0, "finished": False})
    service = CoordinatorService(load_run_config(), run_dir, token="t")
    assert service.machine.step == 5 and service.machine.epoch == 1
    shutil.rmtree(run_dir)
