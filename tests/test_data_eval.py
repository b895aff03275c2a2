"""Validation loss of a checkpoint at a tier, the library function and `aftermath eval`."""

import json
import math

import pytest

from aftermath.checkpoint.hf_dir import save_model_dir
from aftermath.cli import main as cli_main
from aftermath.data import TokenStream, prepare_data
from aftermath.evaluate import check_data_fits, evaluate
from aftermath.errors import DataError
from aftermath.model import build_model, preset_config, tier_spec
from data_helpers import prepared_bytes_dir, write_text


@pytest.fixture
def setup(tmp_path):
    data = prepared_bytes_dir(tmp_path, repeats=300)
    config = preset_config("tiny", vocab_size=256, max_position_embeddings=64)
    model = build_model(config, seed=0)
    ckpt = save_model_dir(model, tmp_path / "ckpt", tokenizer_dir=data)
    return data, model, ckpt


def test_evaluate_library(setup):
    data, model, _ = setup
    stream = check_data_fits(model.config, data, 32)
    result = evaluate(model, stream, tier_spec(model.config, 1), max_batches=3, batch_size=4)
    assert result.sequences == 12 and result.batches == 3 and result.tokens == 12 * 32 and result.spec == "tier1"
    assert abs(result.loss - math.log(256)) < 1.0  # an untrained model is near uniform
    assert math.isclose(result.perplexity, math.exp(result.loss))
    again = evaluate(model, stream, tier_spec(model.config, 1), max_batches=3, batch_size=4)
    assert again.loss == result.loss  # the same sequences every time
    assert evaluate(model, stream, max_batches=3, batch_size=4).spec == "tier0"


def test_eval_command_prints_loss_and_perplexity(setup, capsys):
    data, _, ckpt = setup
    argv = ["eval", str(ckpt), "--data", str(data), "--batches", "2", "--batch-size", "4", "--seq-len", "32"]
    assert cli_main(argv + ["--tier", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["spec"] == "tier1" and result["tokens"] == 2 * 4 * 32 and result["perplexity"] > 1
    assert cli_main(argv + ["--tier", "0"]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_eval_refuses_data_that_does_not_fit(setup, tmp_path, capsys):
    data, model, ckpt = setup
    # a sequence longer than the model allows
    assert cli_main(["eval", str(ckpt), "--data", str(data), "--seq-len", "128"]) == 2
    assert "longer than the model allows (max_position_embeddings 64)" in capsys.readouterr().err
    # data tokenized with another tokenizer than the checkpoint's
    other = prepare_data(tmp_path / "bpe", texts=[write_text(tmp_path / "t.txt", 300)], tokenizer="bpe",
                         vocab_size=300).dir
    assert cli_main(["eval", str(ckpt), "--data", str(other), "--seq-len", "32"]) == 2
    assert "does not match the data's" in capsys.readouterr().err
    # token ids beyond the model's vocabulary (no tokenizer beside this checkpoint to compare)
    small = build_model(preset_config("tiny", vocab_size=64, max_position_embeddings=64), seed=0)
    small_dir = save_model_dir(small, tmp_path / "small")
    assert cli_main(["eval", str(small_dir), "--data", str(data), "--seq-len", "32"]) == 2
    assert "beyond the model's vocabulary of 64" in capsys.readouterr().err
    with pytest.raises(DataError, match="beyond the model's vocabulary of 64"):
        evaluate(small, TokenStream(data, 32, split="val"))
