"""prepare-data on the data people have: directories of text, parquet, Hugging Face datasets; several workers
(byte-identical output); uint32 shards for vocabularies above 65536; and the training command it prints."""

import asyncio
import json
import os
import random
import shlex
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aftermath.cli import main as cli_main
from aftermath.data import TokenData, TokenStream, load_tokenizer, prepare_data
from aftermath.data.prepare import _batches
from aftermath.data.shards import HEADER_BYTES, VERSION_UINT32
from aftermath.data.sources import UserCorpus
from aftermath.errors import DataError
from cli_helpers import one_line_error
from data_helpers import write_text


def split_documents(data_dir, split: str) -> list[str]:
    """The documents of a split of a BPE data directory, decoded (they are separated by <|endoftext|>)."""
    tok = load_tokenizer(data_dir)
    tokens = TokenData(data_dir, split).read(0, TokenData(data_dir, split).num_tokens)
    return tok.decode(tokens.tolist(), skip_special_tokens=False).split("<|endoftext|>")[:-1]


def all_bytes(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# ------------------------------------------------------------------------------------------ text directories
def test_a_text_directory_is_read_recursively_in_sorted_order(tmp_path):
    root = tmp_path / "notes"
    (root / "b" / "deep").mkdir(parents=True)
    (root / ".git").mkdir()
    files = {"b/deep/z.md": "# deep\n", "a.txt": "first\n", "b/c.rst": "third\n", "b/B.TXT": "second\n"}
    for name, text in files.items():
        (root / name).write_text(text)
    (root / ".git" / "x.txt").write_text("hidden\n")
    (root / ".hidden.txt").write_text("hidden\n")
    (root / "data.csv").write_text("not,text\n")
    prepared = prepare_data(tmp_path / "out", texts=[root], tokenizer="bytes", val_fraction=0)
    names = [s["name"] for s in prepared.meta["sources"]]
    assert names == [str(root / n) for n in ("a.txt", "b/B.TXT", "b/c.rst", "b/deep/z.md")]
    train = TokenData(prepared.dir, "train")
    text = bytes(train.read(0, train.num_tokens).astype(np.uint8)).decode()
    # the bytes tokenizer separates documents with a newline
    assert text == "first\n\nsecond\n\nthird\n\n# deep\n\n"
    with pytest.raises(DataError, match=r"--text .*empty: the directory holds no \.txt / \.text / \.md"):
        (tmp_path / "empty").mkdir()
        prepare_data(tmp_path / "out2", texts=[tmp_path / "empty"], tokenizer="bytes")


# ------------------------------------------------------------------------------------------ parquet
def write_parquet(path, texts, row_group_size=64, **columns):
    table = pa.table({"body": pa.array(texts, pa.string()), "id": list(range(len(texts))), **columns})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def test_parquet_files_and_directories(tmp_path):
    texts = [f"parquet document {i} " * 3 for i in range(150)]
    texts[5], texts[6] = None, ""  # a null and an empty text are no documents
    (tmp_path / "pq" / "sub").mkdir(parents=True)
    write_parquet(tmp_path / "pq" / "sub" / "b.parquet", texts[100:])
    write_parquet(tmp_path / "pq" / "a.parquet", texts[:100])
    (tmp_path / "pq" / "notes.txt").write_text("not parquet")  # another suffix: not read
    prepared = prepare_data(tmp_path / "out", parquet=[tmp_path / "pq"], text_field="body", tokenizer="bpe",
                            vocab_size=300, val_fraction=0.1)
    wanted = [t for t in texts if t]
    assert prepared.meta["splits"]["train"]["documents"] + prepared.meta["splits"]["val"]["documents"] == 148
    assert [s["documents"] for s in prepared.meta["sources"]] == [98, 50]
    assert prepared.meta["sources"][0]["kind"] == "parquet" and prepared.meta["sources"][0]["sha256"]
    train, val = split_documents(prepared.dir, "train"), split_documents(prepared.dir, "val")
    assert len(val) == 15 and sorted(train + val) == sorted(wanted)
    assert [d for d in wanted if d in set(val)] == val  # whole documents, in corpus order


def test_parquet_is_read_in_record_batches_not_whole(tmp_path):
    """Reading a parquet file holds about one record batch of its text column, not the file."""
    rng = random.Random(0)
    texts = [rng.randbytes(1000).hex() for _ in range(4000)]  # 8 MB of text that compresses little
    path = write_parquet(tmp_path / "big.parquet", texts, row_group_size=256,
                         other=pa.array(texts, pa.string()))  # a second large column that must not be read
    corpus = UserCorpus(parquet=[path], text_field="body", val_fraction=0.05)
    base, peak, count = pa.total_allocated_bytes(), 0, 0
    for _ in corpus.record_sources[0].records():
        count += 1
        if count % 100 == 0:
            peak = max(peak, pa.total_allocated_bytes() - base)
    assert count == 4000 and corpus.num_documents == 4000
    # a batch of 1024 rows of the text column is ~2 MB; the column is 8 MB, the file 16 MB of text
    assert 0 < peak < 4_000_000, peak


def test_parquet_bad_input(tmp_path):
    path = write_parquet(tmp_path / "t.parquet", ["a text"] * 3)
    with pytest.raises(DataError, match=r"has no column 'text' \(columns: \['body', 'id'\]\).*--text-field"):
        prepare_data(tmp_path / "o1", parquet=[path], tokenizer="bytes")
    with pytest.raises(DataError, match=r"column 'id' holds int64, not text.*--text-field"):
        prepare_data(tmp_path / "o2", parquet=[path], text_field="id", tokenizer="bytes")
    (tmp_path / "fake.parquet").write_text("hello")
    with pytest.raises(DataError, match="fake.parquet cannot be read as parquet"):
        prepare_data(tmp_path / "o3", parquet=[tmp_path / "fake.parquet"], tokenizer="bytes")
    assert not (tmp_path / "o1").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------------------ Hugging Face datasets
@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """The datasets library, its cache in the test's directory (load_dataset prepares datasets there)."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    datasets.disable_progress_bars()
    return datasets


def test_a_dataset_saved_to_disk(tmp_path, hf_cache):
    train = [f"train row {i} " * 4 for i in range(60)]
    test = [f"test row {i} " * 4 for i in range(30)]
    hf_cache.DatasetDict({
        "train": hf_cache.Dataset.from_dict({"content": train, "n": list(range(60))}),
        "test": hf_cache.Dataset.from_dict({"content": test, "n": list(range(30))}),
    }).save_to_disk(str(tmp_path / "saved"))
    prepared = prepare_data(tmp_path / "out", hf_dataset=str(tmp_path / "saved"), hf_split="test",
                            text_field="content", tokenizer="bpe", vocab_size=300, val_fraction=0.1)
    assert prepared.meta["sources"] == [{"name": str(tmp_path / "saved"), "kind": "hf", "sha256": None,
                                         "bytes": None, "documents": 30, "split": "test", "config": None}]
    assert sorted(split_documents(prepared.dir, "train") + split_documents(prepared.dir, "val")) == sorted(test)
    with pytest.raises(DataError, match=r"--hf-split validation: .* has the splits \['test', 'train'\]"):
        prepare_data(tmp_path / "o2", hf_dataset=str(tmp_path / "saved"), hf_split="validation",
                     text_field="content", tokenizer="bytes")
    with pytest.raises(DataError, match=r"no text column 'n' \(it holds .*int64.*columns: \['content', 'n'\]\)"):
        prepare_data(tmp_path / "o3", hf_dataset=str(tmp_path / "saved"), text_field="n", tokenizer="bytes")


def test_a_folder_of_json_files_through_the_datasets_library(tmp_path, hf_cache):
    folder = tmp_path / "jsondata"
    folder.mkdir()
    rows = [{"text": f"json row {i} with some words", "label": i} for i in range(40)]
    for part in range(2):
        (folder / f"part-{part}.json").write_text("".join(json.dumps(r) + "\n" for r in rows[part * 20:][:20]))
    prepared = prepare_data(tmp_path / "out", hf_dataset=str(folder), tokenizer="bpe", vocab_size=300,
                            val_fraction=0.1)
    docs = split_documents(prepared.dir, "train") + split_documents(prepared.dir, "val")
    assert sorted(docs) == sorted(r["text"] for r in rows)


def test_an_unknown_hub_dataset_offline_is_one_line(tmp_path, hf_cache):
    env_result = subprocess.run(
        [sys.executable, "-m", "aftermath.cli", "prepare-data", "--hf-dataset", "someone/no-such-dataset",
         "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "c")})
    one_line_error(env_result, "--hf-dataset someone/no-such-dataset", "cannot be loaded from the Hugging Face Hub",
                   "HF_HUB_OFFLINE", "save_to_disk")
    assert not (tmp_path / "out").exists()
    # a path that does not exist fails at once, not after the hub's ~25 s of retries when online
    with pytest.raises(DataError, match=r"--hf-dataset \./nothere: no such directory"):
        prepare_data(tmp_path / "out", hf_dataset="./nothere")


# ------------------------------------------------------------------------------------------ fields and workers
def test_text_field_and_its_old_name(tmp_path, capsys):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": f"record {i}"}) + "\n" for i in range(30)))
    for flag, out in (("--text-field", "a"), ("--jsonl-field", "b")):
        assert cli_main(["prepare-data", "--jsonl", str(path), flag, "body", "--tokenizer", "bytes", "--workers",
                         "1", "--out", str(tmp_path / out)]) == 0
    assert all_bytes(tmp_path / "a") == all_bytes(tmp_path / "b")
    assert cli_main(["prepare-data", "--jsonl", str(path), "--tokenizer", "bytes", "--out", str(tmp_path / "c")]) == 2
    assert "has no string field 'text'" in capsys.readouterr().err and not (tmp_path / "c").exists()


def test_the_output_is_byte_identical_for_any_number_of_workers(tmp_path):
    path = tmp_path / "docs.jsonl"
    rng = random.Random(1)
    words = ["the", "king", "crown", "sword", "river", "night", "ünïcödé", "😀", "of", "and"]
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(8))}) + "\n"
                            for _ in range(10_000)))
    corpus = UserCorpus(jsonl=[path])
    assert len(list(_batches(corpus.pieces("train")))) >= 3  # enough batches that the workers share them
    dirs = []
    for workers in (1, 3):
        dirs.append(prepare_data(tmp_path / f"w{workers}", jsonl=[path], tokenizer="bpe", vocab_size=400,
                                 shard_tokens=20_000, workers=workers).dir)
    one, three = all_bytes(dirs[0]), all_bytes(dirs[1])
    assert len([n for n in one if n.startswith("train_")]) >= 3 and one == three


# ------------------------------------------------------------------------------------------ uint32 shards
def test_a_vocabulary_above_65536_is_stored_as_uint32_and_read_back(tmp_path, one_torch_thread):
    """A real BPE of 70,000 tokens: shards hold uint32 ids, and training (TokenStream, the data server) and
    evaluation read them back exactly."""
    import torch
    from aiohttp import web

    from aftermath.data.server import add_data_routes, fetch_sequences
    from aftermath.evaluate import check_data_fits, evaluate
    from aftermath.model import build_model, preset_config

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(7)) for _ in range(40_000)]
    text = "".join(" ".join(words[i:i + 20]) + "\n" for i in range(0, len(words), 20))
    (tmp_path / "words.txt").write_text(text)
    prepared = prepare_data(tmp_path / "data", texts=[tmp_path / "words.txt"], tokenizer="bpe", vocab_size=70_000,
                            val_fraction=0.1)
    assert prepared.vocab_size == 70_000 and prepared.meta["dtype"] == "uint32"
    shard = prepared.dir / prepared.meta["splits"]["train"]["shards"][0]["file"]
    assert int(np.frombuffer(shard.read_bytes()[4:8], "<i4")[0]) == VERSION_UINT32
    train = TokenData(prepared.dir, "train")
    assert train.dtype == np.uint32 and train.max_token_id > 65_535
    assert shard.stat().st_size == HEADER_BYTES + 4 * train.num_tokens
    tok = load_tokenizer(prepared.dir)
    val = TokenData(prepared.dir, "val")
    decoded = "".join(tok.decode(split.read(0, split.num_tokens).tolist()) for split in (train, val))
    assert decoded == text  # every id came back whole (a uint16 reader would wrap ids above 65535)

    stream = TokenStream(prepared.dir, 32, seed=1, vocab_size=70_000)
    seqs = stream.sequences(0, 64)
    assert int(seqs.max()) > 65_535
    assert seqs[0].tolist() == train.read(stream.window_of(0) * 32, 33).tolist()
    with pytest.raises(DataError, match="beyond the model's vocabulary of 65536"):
        TokenStream(prepared.dir, 32, vocab_size=65_536)

    async def served():
        app = web.Application()
        add_data_routes(app, prepared.dir)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            return await fetch_sequences(f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}", 0, 64, 32,
                                         seed=1)
        finally:
            await runner.cleanup()

    assert torch.equal(asyncio.run(served()), seqs)  # what a client of the coordinator trains on

    model = build_model(preset_config("tiny", vocab_size=70_000), seed=0)
    result = evaluate(model, check_data_fits(model.config, prepared.dir, 32), max_batches=1, batch_size=4)
    assert abs(result.loss - np.log(70_000)) < 1.0  # an untrained model: about uniform over 70,000 tokens


# ------------------------------------------------------------------------------------------ how to train with it
def test_the_closing_line_is_a_working_command(tmp_path, capsys):
    from aftermath.cli import build_parser
    from aftermath.commands.prepare_data import DEFAULT_MODEL_VOCAB
    from aftermath.commands.testnet import options_from_args
    from aftermath.model import PRESETS
    from aftermath.runconfig import load_run_config
    from aftermath.testnet import testnet_config_text

    assert DEFAULT_MODEL_VOCAB == PRESETS[load_run_config().model.preset]["vocab_size"]
    text = write_text(tmp_path / "book.txt", 50)
    assert cli_main(["prepare-data", "--text", str(text), "--tokenizer", "bytes", "--out",
                     str(tmp_path / "my data")]) == 0
    lines = capsys.readouterr().out.splitlines()
    command = next(line for line in lines if line.startswith("train with it: "))
    argv = shlex.split(command.removeprefix("train with it: "))
    assert argv[:2] == ["aftermath", "testnet"]
    args = build_parser().parse_args(argv[1:])
    run_config = testnet_config_text(options_from_args(args))
    assert f'dir = {json.dumps(str((tmp_path / "my data").absolute()))}' in run_config
    assert not any("vocab_size" in line for line in lines)  # 256 byte tokens fit the default model

    from aftermath.commands.prepare_data import training_hint

    hint = training_hint(tmp_path / "gpt2", 50_257)
    assert "add --config run.toml, with vocab_size = 50257 under [model.overrides]" in hint[-1]


def test_training_on_a_directory_that_is_not_prepared_data_is_one_line(tmp_path, capsys):
    for command in ("testnet", "coordinator"):
        assert cli_main([command, "--data", str(tmp_path / "missing"), "--out" if command == "testnet" else
                         "--run-dir", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: data directory {tmp_path / 'missing'} does not exist") and "\n" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_prepare_then_testnet_then_generate(tmp_path, capsys):
    """The whole path a newcomer follows: their text -> `prepare-data` -> the command it prints -> a checkpoint
    that `generate` continues a prompt with."""
    text = write_text(tmp_path / "book.txt", 400)
    assert cli_main(["prepare-data", "--text", str(text), "--tokenizer", "bytes", "--out", str(tmp_path / "d")]) == 0
    command = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("train with it: "))
    (tmp_path / "run.toml").write_text(
        "[schedule]\nrounds_per_epoch = 2\nglobal_batch_size = 4\n[optimizer]\nwarmup_steps = 1\n"
        "[data]\nseq_len = 32\nval_sequences = 4\n[model]\nexport_tiers = [0, 1]\n")
    out = tmp_path / "out"
    argv = shlex.split(command.removeprefix("train with it: "))[1:]
    assert cli_main([*argv, "--clients", "1", "--tiers", "0", "--steps", "2", "--no-live", "--out", str(out),
                     "--config", str(tmp_path / "run.toml"), "--timeout", "240"]) == 0
    model_dir = out / "checkpoint" / "model"
    assert (model_dir / "tokenizer.json").read_bytes() == (tmp_path / "d" / "tokenizer.json").read_bytes()
    capsys.readouterr()
    assert cli_main(["generate", str(model_dir), "--tier", "1", "--prompt", "12 Now", "--max-new-tokens", "10",
                     "--threads", "1"]) == 0
    assert capsys.readouterr().out.startswith("12 Now")
