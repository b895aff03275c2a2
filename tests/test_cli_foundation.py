"""The `aftermath` command: init-model and inspect, as a user runs them."""

import json
import subprocess
import sys

from aftermath.model import parameter_count, preset_config, tier_spec


def aftermath(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "aftermath.cli", *args], capture_output=True, text=True)
    if check and result.returncode:
        raise AssertionError(f"aftermath {args} failed: {result.stderr}")
    return result


def test_init_model_then_inspect(tmp_path):
    out = tmp_path / "m-tiny"
    aftermath("init-model", "--preset", "tiny", "--out", str(out))
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    info = json.loads(aftermath("inspect", str(out), "--json").stdout)
    cfg = preset_config("tiny")
    assert info["universal"] is True
    assert [t["ffn_widths"][0] for t in info["tiers"]] == [512, 256, 128, 64]
    assert [t["q_heads"][0] for t in info["tiers"]] == [8, 4, 2, 2]
    assert [t["parameters"] for t in info["tiers"]] == [parameter_count(cfg, tier_spec(cfg, t)) for t in range(4)]
    table = aftermath("inspect", str(out)).stdout
    assert "FFN width" in table and "1,016,960" in table


def test_init_model_refuses_to_overwrite(tmp_path):
    out = tmp_path / "m"
    aftermath("init-model", "--out", str(out))
    before = (out / "model.safetensors").read_bytes()
    result = aftermath("init-model", "--out", str(out), "--seed", "3", check=False)
    assert result.returncode == 2 and "already exists; pass --force" in result.stderr
    assert (out / "model.safetensors").read_bytes() == before


def test_help_lists_commands():
    text = aftermath("--help").stdout
    for command in ("init-model", "inspect", "demo"):
        assert command in text
