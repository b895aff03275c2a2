"""The .bin shard format: header, uint16/uint32, headerless files, and every way a shard can be damaged."""

import numpy as np
import pytest

from aftermath.data import TokenData, TokenStream, open_shard, write_shard
from aftermath.data.shards import HEADER_BYTES, MAGIC, VERSION_UINT16, VERSION_UINT32, dtype_for_vocab
from aftermath.errors import DataError


def test_header_is_the_modded_nanogpt_layout(tmp_path):
    tokens = np.arange(1000, dtype=np.int64) % 4096
    info = write_shard(tmp_path / "train_000000.bin", tokens, vocab_size=4096)
    raw = (tmp_path / "train_000000.bin").read_bytes()
    header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
    assert header.size == 256
    assert (header[0], header[1], header[2]) == (MAGIC, VERSION_UINT16, 1000) == (20240520, 1, 1000)
    assert not header[3:].any()
    assert len(raw) == HEADER_BYTES + 2 * 1000
    # exactly how modded-nanogpt reads a shard
    assert np.array_equal(np.frombuffer(raw[HEADER_BYTES:], dtype=np.uint16), tokens)
    assert np.array_equal(open_shard(tmp_path / "train_000000.bin"), tokens)
    assert isinstance(open_shard(tmp_path / "train_000000.bin"), np.memmap)
    assert info.tokens == 1000 and info.max_token_id == 999


def test_large_vocabulary_uses_uint32_version_2(tmp_path):
    assert dtype_for_vocab(65536) == np.uint16 and dtype_for_vocab(65537) == np.uint32
    tokens = np.array([0, 65535, 70000, 100_000], dtype=np.int64)
    write_shard(tmp_path / "s.bin", tokens, vocab_size=100_001)
    raw = (tmp_path / "s.bin").read_bytes()
    assert int(np.frombuffer(raw[4:8], dtype="<i4")[0]) == VERSION_UINT32 == 2
    assert len(raw) == HEADER_BYTES + 4 * 4
    assert open_shard(tmp_path / "s.bin").tolist() == tokens.tolist()


def test_headerless_nanogpt_directory_is_read(tmp_path):
    train = (np.arange(5000) % 300).astype(np.uint16)
    train.tofile(tmp_path / "train.bin")
    (np.arange(700) % 300).astype(np.uint16).tofile(tmp_path / "val.bin")
    data = TokenData(tmp_path, "train")
    assert data.num_tokens == 5000 and data.max_token_id == 299 and data.meta is None
    stream = TokenStream(tmp_path, 16, seed=3)
    seqs = stream.sequences(0, 4).numpy()
    for row, i in zip(seqs, range(4)):
        w = stream.window_of(i)
        assert row.tolist() == train[w * 16 : w * 16 + 17].tolist()
    with pytest.raises(DataError, match="token id 299, beyond the model's vocabulary of 256"):
        TokenData(tmp_path, "train", vocab_size=256)
    assert len(data.data_id()) == 64


def test_truncated_shard(tmp_path):
    write_shard(tmp_path / "train_0.bin", np.arange(100), vocab_size=256)
    raw = (tmp_path / "train_0.bin").read_bytes()
    (tmp_path / "train_0.bin").write_bytes(raw[:-10])
    with pytest.raises(DataError, match=r"header says 100 tokens .* \(truncated\).*prepare-data"):
        open_shard(tmp_path / "train_0.bin")
    (tmp_path / "train_0.bin").write_bytes(raw[:500])  # not even a whole header
    with pytest.raises(DataError, match="truncated shard, only 500 bytes"):
        open_shard(tmp_path / "train_0.bin")


def test_header_that_lies_about_its_length(tmp_path):
    write_shard(tmp_path / "train_0.bin", np.arange(100), vocab_size=256)
    raw = bytearray((tmp_path / "train_0.bin").read_bytes())
    raw[8:12] = np.array([40], dtype="<i4").tobytes()  # claims 40 tokens, holds 100
    (tmp_path / "train_0.bin").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="header says 40 tokens.*longer than its header says"):
        open_shard(tmp_path / "train_0.bin")
    raw[4:8] = np.array([7], dtype="<i4").tobytes()
    (tmp_path / "train_0.bin").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="version 7"):
        open_shard(tmp_path / "train_0.bin")


def test_bad_headerless_and_missing_shards(tmp_path):
    (tmp_path / "train.bin").write_bytes(b"\x01\x00\x02")  # 3 bytes: not whole uint16 tokens
    with pytest.raises(DataError, match="not a whole number of uint16 tokens"):
        open_shard(tmp_path / "train.bin")
    (tmp_path / "train.bin").write_bytes(b"")
    with pytest.raises(DataError, match="is empty"):
        open_shard(tmp_path / "train.bin")
    with pytest.raises(DataError, match="missing"):
        open_shard(tmp_path / "nope.bin")
    with pytest.raises(DataError, match="does not exist.*prepare-data"):
        TokenData(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no val shards"):
        TokenData(tmp_path, "val")
