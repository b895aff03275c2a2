"""The run config: the embedded default, a run.toml laid over it, clear errors, and the docs' sample."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from aftermath.round.replica import optimizer_config
from aftermath.errors import ConfigError
from aftermath.optim import DenseConfig, DistroConfig
from aftermath.runconfig import RunConfig, default_config_text, load_run_config
from aftermath.testnet import _to_toml

DOCS = Path(__file__).resolve().parents[1] / "docs" / "running.md"


def test_embedded_default_equals_the_model_defaults():
    assert load_run_config() == RunConfig()


def test_run_toml_is_laid_over_the_default(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('run_id = "x"\n[schedule]\ntotal_steps = 7\n[optimizer.distro]\ntopk = 8\n')
    run = load_run_config(path)
    assert run.run_id == "x" and run.schedule.total_steps == 7 and run.schedule.rounds_per_epoch == 20
    opt = optimizer_config(run)
    assert isinstance(opt, DistroConfig) and opt.topk == 8 and opt.total_steps == 7
    assert isinstance(optimizer_config(run.with_overrides({"optimizer.name": "adamw"})), DenseConfig)


@pytest.mark.parametrize("text, words", [
    ("[schedule]\ntotal_step = 7\n", "total_step"),
    ("[schedule]\nmin_clients = 0\n", "min_clients"),
    ("[schedule]\nmin_clients = 3\ninit_min_clients = 2\n", "init_min_clients"),
    ("[optimizer]\nname = \"sgd\"\n", "optimizer.name"),
    ("run_id = \"a b\"\n", "run_id"),
    ("not toml [", "not valid TOML"),
])
def test_bad_run_toml_names_the_field(tmp_path, text, words):
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(words)):
        load_run_config(path)


def test_missing_file_and_unknown_override(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="unknown run config key"):
        RunConfig().with_overrides({"schedule.nothing": 1})
    with pytest.raises(ConfigError, match="DistroConfig|distro"):
        optimizer_config(RunConfig().with_overrides({"optimizer.distro.bogus": 1}))


def test_generated_toml_round_trips(tmp_path):
    run = RunConfig().with_overrides({"schedule.total_steps": 3, "model.overrides.num_hidden_layers": 2})
    path = tmp_path / "run.toml"
    path.write_text(_to_toml(run.model_dump()))
    assert load_run_config(path) == run


def test_docs_list_every_field_of_the_default_and_the_sample_parses(tmp_path):
    text = DOCS.read_text()
    assert default_config_text().split("\n\n", 1)[1].strip() in text  # the embedded default, verbatim
    sample = text.split("```toml\n")[1].split("```")[0]
    path = tmp_path / "run.toml"
    path.write_text(sample)
    run = load_run_config(path)
    assert run.model.preset == "small" and run.optimizer.distro["one_bit"] is True
