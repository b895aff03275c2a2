"""Deterministic sequences: the same (data, seq_len, seed, i) gives the same tokens in any process."""

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from aftermath.data import TokenData, TokenStream, step_range
from aftermath.data.batches import WindowPermutation
from aftermath.errors import DataError
from data_helpers import prepared_bytes_dir

CHILD = """
import hashlib, json, sys
from aftermath.data import TokenStream
stream = TokenStream(sys.argv[1], 32, seed=7)
seqs = stream.sequences_numpy(0, 3 * stream.sequences_per_pass + 5)  # more than three passes (no torch: fast)
print(json.dumps({"sha": hashlib.sha256(seqs.tobytes()).hexdigest(), "n": len(seqs)}))
"""


def test_two_processes_produce_identical_sequences(tmp_path):
    data = prepared_bytes_dir(tmp_path, repeats=60)
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(data)], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    local = TokenStream(data, 32, seed=7)
    seqs = local.sequences(0, 3 * local.sequences_per_pass + 5)
    assert outs[0] == outs[1] == {"sha": hashlib.sha256(seqs.numpy().tobytes()).hexdigest(), "n": len(seqs)}


def test_sequences_are_windows_of_the_corpus_each_once_per_pass(tmp_path):
    data_dir = prepared_bytes_dir(tmp_path, repeats=60)
    stream = TokenStream(data_dir, 32, seed=1)
    tokens = TokenData(data_dir).read(0, TokenData(data_dir).num_tokens)
    w = stream.sequences_per_pass
    assert w == (len(tokens) - 1) // 32
    seqs = stream.sequences(0, 2 * w)
    assert seqs.dtype == torch.int64 and seqs.shape == (2 * w, 33)
    first = [stream.window_of(i) for i in range(w)]
    second = [stream.window_of(i) for i in range(w, 2 * w)]
    assert sorted(first) == sorted(second) == list(range(w))  # every window exactly once per pass
    assert first != second and first != list(range(w))  # shuffled, and a new order each pass
    for i in (0, 5, w + 3):
        start = stream.window_of(i) * 32
        assert seqs[i].tolist() == tokens[start : start + 33].tolist()
    # slicing a range is the same as asking for it in pieces (what clients of one step do)
    assert torch.equal(stream.sequences(3, 11), torch.cat([stream.sequences(3, 6), stream.sequences(6, 11)]))
    assert not torch.equal(TokenStream(data_dir, 32, seed=2).sequences(0, 8), stream.sequences(0, 8))
    assert TokenStream(data_dir, 32, shuffle=False).window_of(w + 4) == 4


def test_step_range_and_batch(tmp_path):
    stream = TokenStream(prepared_bytes_dir(tmp_path, repeats=60), 16, seed=0)
    assert step_range(0, 8) == (0, 8) and step_range(3, 8) == (24, 32)
    x, y = stream.batch(3, 8)
    seqs = stream.sequences(24, 32)
    assert torch.equal(x, seqs[:, :-1]) and torch.equal(y, seqs[:, 1:])
    with pytest.raises(DataError):
        step_range(-1, 8)


@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 4097])
def test_window_permutation_is_a_bijection(n):
    perm = WindowPermutation(n, b"k")
    assert sorted(perm(i) for i in range(n)) == list(range(n))


def test_train_and_validation_are_disjoint(tmp_path):
    data_dir = prepared_bytes_dir(tmp_path, repeats=200)
    train, val = TokenData(data_dir, "train"), TokenData(data_dir, "val")
    text = (tmp_path / "book.txt").read_bytes()
    train_bytes = bytes(train.read(0, train.num_tokens).astype(np.uint8))
    val_bytes = bytes(val.read(0, val.num_tokens).astype(np.uint8))
    # one document cut at a line break: train is the head, val the tail (each + the separator), no overlap
    assert train_bytes[:-1] + val_bytes[:-1] == text
    assert 0.03 < len(val_bytes) / len(text) < 0.08
    last_val_line = val_bytes.strip().split(b"\n")[-1]
    assert last_val_line not in train_bytes


def test_bad_inputs_are_refused_at_open(tmp_path):
    data_dir = prepared_bytes_dir(tmp_path, repeats=60)
    stream = TokenStream(data_dir, 32)
    with pytest.raises(DataError, match=r"token id \d+, beyond the model's vocabulary of 64.*--vocab 64"):
        TokenStream(data_dir, 32, vocab_size=64)
    with pytest.raises(DataError, match="sequence length 512 is longer than the model allows.*<= 256"):
        TokenStream(data_dir, 512, max_positions=256)
    with pytest.raises(DataError, match=r"too few for one sequence of 100000"):
        TokenStream(data_dir, 100_000)
    for bad in (0, -3, 2.5):
        with pytest.raises(DataError, match="must be a positive integer"):
            TokenStream(data_dir, bad)
    with pytest.raises(DataError, match=r"\[-1, 4\) starts below 0"):
        stream.sequences(-1, 4)
    with pytest.raises(DataError, match=r"\[5, 2\) ends before it starts"):
        stream.sequences(5, 2)
    with pytest.raises(DataError, match="must be an integer"):
        stream.sequences(0, "4")
    with pytest.raises(DataError, match="unknown split 'test'"):
        TokenStream(data_dir, 32, split="test")
    assert stream.sequences(4, 4).shape == (0, 33)


def test_inconsistent_directory_is_refused(tmp_path):
    data_dir = prepared_bytes_dir(tmp_path, repeats=60)
    meta = json.loads((data_dir / "meta.json").read_text())
    meta["splits"]["train"]["shards"][0]["tokens"] += 5
    (data_dir / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="meta.json says"):
        TokenData(data_dir)
    (data_dir / "train_000000.bin").unlink()
    with pytest.raises(DataError, match="train_000000.bin is missing"):
        TokenData(data_dir)
    (data_dir / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        TokenData(data_dir)


def test_sequences_span_shard_boundaries(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one = prepared_bytes_dir(tmp_path / "a", repeats=60)
    many = prepared_bytes_dir(tmp_path / "b", repeats=60, shard_tokens=500)
    assert len(list(many.glob("train_*.bin"))) > 3
    a, b = TokenStream(one, 64, seed=4), TokenStream(many, 64, seed=4)
    assert torch.equal(a.sequences(0, a.sequences_per_pass), b.sequences(0, b.sequences_per_pass))
