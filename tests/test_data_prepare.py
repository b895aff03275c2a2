"""prepare-data: user text and JSONL, the embedded Shakespeare (cached, atomic), tokenizers, bad input."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from aftermath.cli import main as cli_main
from aftermath.data import TokenData, TokenStream, ensure_default_data, load_tokenizer, prepare_data
from aftermath.data.corpus import VALIDATION_PLAYS, markdown_to_text
from aftermath.data.tokenizer import bytes_tokenizer, gpt2_files, gpt2_tokenizer, train_bpe
from aftermath.errors import DataError
from data_helpers import write_text


@pytest.fixture(scope="session")
def embedded_bpe(tmp_path_factory):
    """The embedded default with the default BPE tokenizer, prepared once for the whole session."""
    cache = tmp_path_factory.mktemp("aftermath-cache")
    old = os.environ.get("AFTERMATH_CACHE")
    os.environ["AFTERMATH_CACHE"] = str(cache)
    try:
        start = time.perf_counter()
        path = ensure_default_data(progress=None)
        first = time.perf_counter() - start
        start = time.perf_counter()
        again = ensure_default_data(progress=None)
        second = time.perf_counter() - start
    finally:
        if old is None:
            os.environ.pop("AFTERMATH_CACHE")
        else:
            os.environ["AFTERMATH_CACHE"] = old
    return path, again, cache, first, second


def test_embedded_default_is_prepared_once_and_cached(embedded_bpe):
    path, again, cache, first, second = embedded_bpe
    assert path == again and path.is_relative_to(cache)
    assert second < first  # the second call found the cache instead of preparing again
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary directory left
    meta = json.loads((path / "meta.json").read_text())
    assert meta["tokenizer"]["kind"] == "bpe" and meta["tokenizer"]["vocab_size"] == 4096
    assert meta["splits"]["train"]["documents"] == 35 and meta["splits"]["val"]["documents"] == 3
    assert 1_000_000 < meta["splits"]["train"]["tokens"] < 3_000_000
    val_sources = sorted(s["name"].split(":")[1] for s in meta["sources"] if s["split"] == "val")
    assert val_sources == sorted(VALIDATION_PLAYS)
    tok = load_tokenizer(path)
    text = tok.decode(TokenData(path, "val").read(0, 400).tolist())
    assert text.startswith("Twelfth Night")  # the first held-out play, as plain text
    assert "**" not in text and "_" not in text and "#" not in text
    stream = TokenStream(path, 256, seed=0, vocab_size=4096, max_positions=256)
    assert stream.sequences(0, 2).max() < 4096


def test_markdown_conversion():
    md = "# Macbeth\n\n## ACT I\n\n_Thunder. Enter three Witches_\n\n**First Witch**  \nWhen shall we three  \n" \
         "In thunder?\n\n\n\n__\\[Aside]_  \n\\--odours\n"
    assert markdown_to_text(md) == ("Macbeth\n\nACT I\n\nThunder. Enter three Witches\n\nFirst Witch:\n"
                                    "When shall we three\nIn thunder?\n\n[Aside]\n--odours\n")
    assert markdown_to_text(md) == markdown_to_text(md.replace("\n", "\r\n"))


def test_two_processes_preparing_at_once_share_one_cache_entry(tmp_path):
    code = "from aftermath.data import ensure_default_data; print(ensure_default_data('bytes', progress=None))"
    env = {**os.environ, "AFTERMATH_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=180)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs) and outs[0] == outs[1]
    entries = list((tmp_path / "data").iterdir())
    assert [e.name for e in entries] == [os.path.basename(outs[0])]  # one entry, no temporary left over
    data = TokenData(outs[0], "train")
    assert data.num_tokens > 4_000_000 and data.vocab_size == 256


def test_text_file_with_bytes_tokenizer_round_trips(tmp_path):
    text = write_text(tmp_path / "book.txt", 100)
    prepared = prepare_data(tmp_path / "out", texts=[text], tokenizer="bytes", val_fraction=0.1)
    train, val = TokenData(prepared.dir, "train"), TokenData(prepared.dir, "val")
    tok = load_tokenizer(prepared.dir)
    assert tok.decode(train.read(0, train.num_tokens - 1).tolist()) + tok.decode(val.read(0, val.num_tokens - 1).tolist()) \
        == text.read_text()
    assert prepared.meta["sources"][0]["sha256"] and prepared.meta["options"]["split_by"] == "tail of each document"
    assert prepared.tokens("train") == train.num_tokens and prepared.vocab_size == 256


def test_jsonl_whole_documents_go_to_validation(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": f"document number {i} " * 5, "id": i}) + "\n" for i in range(40)))
    prepared = prepare_data(tmp_path / "out", jsonl=[path], text_field="body", tokenizer="bpe", vocab_size=300,
                            val_fraction=0.1)
    meta = prepared.meta
    assert meta["splits"]["val"]["documents"] == 4 and meta["splits"]["train"]["documents"] == 36
    tok = load_tokenizer(prepared.dir)
    eot = meta["tokenizer"]["eot_id"]
    val = TokenData(prepared.dir, "val").read(0, meta["splits"]["val"]["tokens"])
    docs = tok.decode(val.tolist(), skip_special_tokens=False).split("<|endoftext|>")
    assert [d.split()[2] for d in docs if d] == ["9", "19", "29", "39"]  # evenly spread, whole documents
    assert (val == eot).sum() == 4


def test_bpe_training_is_deterministic():
    texts = [f"line {i} of the play, with words and more words\n" * 3 for i in range(200)]
    a, b = train_bpe(texts, 400), train_bpe(texts, 400)
    assert a.to_str() == b.to_str() and a.get_vocab_size() == 400


def test_bytes_tokenizer_is_byte_values():
    s = "héllo\n\n  x😀 To be"
    assert bytes_tokenizer().encode(s).ids == list(s.encode())


def test_gpt2_tokenizer_is_the_real_one():
    try:
        gpt2_files()
    except DataError as exc:
        pytest.skip(str(exc))
    tok = gpt2_tokenizer()
    assert tok.get_vocab_size() == 50257
    assert tok.encode("Hello world").ids == [15496, 995]
    assert tok.token_to_id("<|endoftext|>") == 50256


def test_bad_input(tmp_path):
    text = write_text(tmp_path / "book.txt", 20)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="corpus is empty"):
        prepare_data(tmp_path / "o1", texts=[tmp_path / "empty.txt"], tokenizer="bytes")
    with pytest.raises(DataError, match="does not exist"):
        prepare_data(tmp_path / "o2", texts=[tmp_path / "missing.txt"], tokenizer="bytes")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8.*offset 3.*iconv"):
        prepare_data(tmp_path / "o3", texts=[tmp_path / "latin1.txt"], tokenizer="bytes")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(DataError, match="bad.jsonl:2 is not valid JSON"):
        prepare_data(tmp_path / "o4", jsonl=[tmp_path / "bad.jsonl"], tokenizer="bytes")
    (tmp_path / "field.jsonl").write_text('{"content": "ok"}\n')
    with pytest.raises(DataError, match=r"field.jsonl:1 has no string field 'text' \(found \['content'\]\)"):
        prepare_data(tmp_path / "o5", jsonl=[tmp_path / "field.jsonl"], tokenizer="bytes")
    with pytest.raises(DataError, match="--val-fraction 1.5"):
        prepare_data(tmp_path / "o6", texts=[text], tokenizer="bytes", val_fraction=1.5)
    with pytest.raises(DataError, match="unknown tokenizer 'words'"):
        prepare_data(tmp_path / "o7", texts=[text], tokenizer="words")
    with pytest.raises(DataError, match="vocabulary size 100 is out of range"):
        prepare_data(tmp_path / "o8", texts=[text], tokenizer="bpe", vocab_size=100)
    prepare_data(tmp_path / "done", texts=[text], tokenizer="bytes")
    before = (tmp_path / "done" / "meta.json").read_bytes()
    with pytest.raises(DataError, match="already exists.*--force"):
        prepare_data(tmp_path / "done", texts=[text], tokenizer="bytes", val_fraction=0.2)
    assert (tmp_path / "done" / "meta.json").read_bytes() == before  # nothing lost
    prepare_data(tmp_path / "done", texts=[text], tokenizer="bytes", val_fraction=0.2, overwrite=True)
    assert json.loads((tmp_path / "done" / "meta.json").read_text())["options"]["val_fraction"] == 0.2
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_prepare_data_command(tmp_path, capsys):
    text = write_text(tmp_path / "book.txt", 50)
    assert cli_main(["prepare-data", "--text", str(text), "--tokenizer", "bytes", "--out", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "--data" in out
    assert np.asarray(TokenData(tmp_path / "d").read(0, 5)).tolist() == list(b"0 Now")
    assert cli_main(["prepare-data", "--text", str(text), "--tokenizer", "bytes", "--out", str(tmp_path / "d")]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("text", [
    "short line\n" + "a very long line of text with ünïcödé and 😀 emoji " * 10 + "\nend\n" * 30,
    "no line break at all, ünïcödé 😀 " * 20,  # the validation tail is cut mid-line, on a character boundary
])
def test_files_are_read_in_blocks_without_losing_a_byte(tmp_path, monkeypatch, text):
    from aftermath.data import sources

    monkeypatch.setattr(sources, "BLOCK_BYTES", 37)  # many blocks, lines longer than a block
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    prepared = prepare_data(tmp_path / "out", texts=[path], tokenizer="bytes", val_fraction=0.1)
    train, val = TokenData(prepared.dir, "train"), TokenData(prepared.dir, "val")
    head = bytes(train.read(0, train.num_tokens - 1).astype(np.uint8))
    tail = bytes(val.read(0, val.num_tokens - 1).astype(np.uint8))
    assert (head + tail).decode("utf-8") == text and tail and head
    head.decode("utf-8"), tail.decode("utf-8")  # each split is valid UTF-8 on its own
