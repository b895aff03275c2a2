"""`aftermath generate`: a real checkpoint (init-model + export-tiers), loaded through the loader's strategies,
sampled with the dashboard's sampler, and checked against transformers on an exported tier directory."""

from __future__ import annotations

import pytest
import torch

from aftermath.checkpoint.loader import load_tier_model
from aftermath.cli import build_parser
from aftermath.cli import main as cli_main
from aftermath.dashboard.samples import sample_texts
from aftermath.data import load_tokenizer, prepare_data
from aftermath.errors import ConfigError
from aftermath.evaluate import sample_tokens
from data_helpers import prepared_bytes_dir, write_text

PROMPT = "12 Now is"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny universal model with the bytes tokenizer of a prepared data directory, and its tiers 1 and 2."""
    root = tmp_path_factory.mktemp("generate")
    data = prepared_bytes_dir(root)
    assert cli_main(["init-model", "--preset", "tiny", "--tokenizer", str(data), "--seed", "3",
                     "--out", str(root / "m")]) == 0
    assert cli_main(["export-tiers", "--src", str(root / "m"), "--tiers", "1", "2"]) == 0
    return root


def generate(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli_main(["generate", *args, "--threads", "1"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_generate_continues_the_prompt(checkpoint, capsys, one_torch_thread):
    m = str(checkpoint / "m")
    code, out, err = generate(capsys, m, "--prompt", PROMPT, "--max-new-tokens", "24")
    assert code == 0 and out.startswith(PROMPT)
    assert "at tier0 (universal" in err and "24 new tokens" in err and "seed 0" in err
    assert generate(capsys, m, "--prompt", PROMPT, "--max-new-tokens", "24")[1] == out  # the same seed, the same text
    assert generate(capsys, m, "--prompt", PROMPT, "--max-new-tokens", "24", "--seed", "1")[1] != out
    # it is the dashboard's sampler: the same settings give the dashboard's text sample
    samples = sample_texts(checkpoint / "m", [0], prompt=PROMPT, new_tokens=24, seed=0)
    assert out == samples["tier0"] + "\n"


def test_sliced_tier_and_universal_slicing_give_the_same_text(checkpoint, capsys, one_torch_thread):
    m = str(checkpoint / "m")
    args = ["--tier", "1", "--prompt", PROMPT, "--max-new-tokens", "16", "--seed", "5"]
    code, sliced, err = generate(capsys, m, *args)
    assert code == 0 and "at tier1 (sliced: sliced tier1 listed in the manifest, all files verified)" in err
    code, universal, err = generate(capsys, m, *args, "--strategy", "universal")
    assert code == 0 and "at tier1 (universal" in err and universal == sliced
    code, direct, err = generate(capsys, str(checkpoint / "m-tier1"), *args[2:])  # the tier directory itself
    assert code == 0 and direct == sliced and "already tier 1" in err
    assert generate(capsys, m, *args[:1], "2", *args[2:])[1] != sliced


def test_greedy_matches_transformers_on_a_tier_directory(checkpoint, capsys, one_torch_thread):
    transformers = pytest.importorskip("transformers")
    tier_dir = checkpoint / "m-tier2"
    code, out, _ = generate(capsys, str(tier_dir), "--prompt", PROMPT, "--max-new-tokens", "20",
                            "--temperature", "0")
    assert code == 0
    tok = load_tokenizer(tier_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tier_dir, torch_dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # the bytes tokenizer has no end-of-text token
    ids = torch.tensor([tok.encode(PROMPT).ids])
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, min_new_tokens=20,
                               do_sample=False, pad_token_id=0)
    assert out == tok.decode(expected[0].tolist()) + "\n"


def test_sampling_rules(checkpoint, one_torch_thread):
    model = load_tier_model(checkpoint / "m", tier=1)[0]
    prompt = load_tokenizer(checkpoint / "m").encode(PROMPT).ids
    greedy = sample_tokens(model, prompt, 12, temperature=0)
    assert sample_tokens(model, prompt, 12, temperature=1.5, top_k=1, seed=9) == greedy  # top-1 is greedy
    assert greedy[:len(prompt)] == prompt and len(greedy) == len(prompt) + 12
    stop = greedy[len(prompt) + 2]
    first_stop = greedy.index(stop, len(prompt))
    assert sample_tokens(model, prompt, 12, temperature=0, stop_id=stop) == greedy[:first_stop + 1]
    drawn = sample_tokens(model, prompt, 40, temperature=5.0, top_k=0, vocab_size=100, seed=2)[len(prompt):]
    assert max(drawn) < 100  # ids past the tokenizer's vocabulary are never drawn
    for bad, match in ((dict(temperature=-0.5), "temperature -0.5 must be a number >= 0"),
                       (dict(temperature=float("nan")), "temperature nan"), (dict(top_k=-1), "top-k -1")):
        with pytest.raises(ConfigError, match=match):
            sample_tokens(model, prompt, 4, **bad)


def test_bad_input_is_one_line(checkpoint, tmp_path, capsys):
    m = str(checkpoint / "m")
    cases = [
        ([str(tmp_path / "missing"), "--prompt", "x"], "no such directory"),
        ([m, "--tier", "9", "--prompt", "x"], "tier 9"),
        ([m, "--prompt", "x", "--temperature", "-1"], "temperature -1.0 must be a number >= 0"),
        ([m, "--prompt", "x", "--temperature", "inf"], "temperature inf"),
        ([m, "--prompt", ""], "--prompt '' encodes to no tokens"),
        ([m, "--prompt", "x", "--spec", "nosuch"], "spec 'nosuch' is not in the manifest"),
        ([m, "--prompt", "x", "--tokenizer", str(tmp_path)], f"--tokenizer {tmp_path}: no tokenizer.json"),
    ]
    for args, needle in cases:
        code, out, err = generate(capsys, *args)
        assert code == 2 and out == "", (args, out)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (args, err)
    assert cli_main(["init-model", "--preset", "tiny", "--out", str(tmp_path / "bare")]) == 0
    code, _, err = generate(capsys, str(tmp_path / "bare"), "--prompt", "x")
    assert code == 2 and "has no tokenizer.json beside its weights" in err and "--tokenizer" in err
    big = prepare_data(tmp_path / "big", texts=[write_text(tmp_path / "t.txt", 100)], tokenizer="bpe",
                       vocab_size=300).dir
    code, _, err = generate(capsys, m, "--prompt", "x", "--tokenizer", str(big))
    assert code == 2 and "has 300 tokens but the model only 256" in err


def test_help_explains_with_examples(capsys):
    with pytest.raises(SystemExit) as exited:
        cli_main(["generate", "--help"])
    assert exited.value.code == 0
    helped = capsys.readouterr().out
    for needle in ("examples:", "--temperature", "--top-k", "aftermath generate out/checkpoint/model --prompt",
                   "model-tier1", "strategies"):
        assert needle in helped, needle
    top = build_parser().format_help()
    assert top.index("eval") < top.index("generate") < top.index("data-server")
