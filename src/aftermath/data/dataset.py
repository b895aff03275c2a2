"""An opened data directory: one split's shards, memory-mapped and checked, read as one long token array.

A data directory holds `meta.json`, `tokenizer.json` and `train_*.bin` / `val_*.bin` shards (what
`aftermath prepare-data` writes). A directory without `meta.json` is read too: every `*.bin` whose name
contains `train` or `val` (nanoGPT's headerless `train.bin`/`val.bin`, modded-nanogpt's `fineweb_train_*.bin`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from aftermath.data.shards import file_sha256, max_token, open_shard
from aftermath.data.tokenizer import TOKENIZER_FILE
from aftermath.errors import DataError

META_FILE = "meta.json"
META_FORMAT = "aftermath-tokens"
META_VERSION = 1
SPLITS = ("train", "val")


def read_meta(data_dir: str | Path) -> dict | None:
    """`meta.json` of a data directory, or None when it has none (a foreign directory of raw shards)."""
    path = Path(data_dir) / META_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); re-run `aftermath prepare-data`") from exc
    if meta.get("format") != META_FORMAT or meta.get("format_version") != META_VERSION:
        raise DataError(f"{path} is not an Aftermath {META_FORMAT} v{META_VERSION} file (format "
                        f"{meta.get('format')!r} v{meta.get('format_version')!r}); re-run `aftermath prepare-data`")
    return meta


def data_id_of(tokenizer_sha256: str | None, splits: dict[str, list[dict]]) -> str:
    """Identity of a data directory's content: its tokenizer and every shard's name, size and hash."""
    body = {"tokenizer": tokenizer_sha256,
            "splits": {s: [[x["file"], x["tokens"], x["sha256"]] for x in shards] for s, shards in splits.items()}}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class TokenData:
    """The tokens of one split of a data directory, as one virtual array over memory-mapped shards.

    `vocab_size`, when given, is the model's vocabulary: a token id >= it is an error here, at open, not an
    index error in the middle of training.
    """

    def __init__(self, data_dir: str | Path, split: str = "train", *, vocab_size: int | None = None,
                 raw_dtype: str = "<u2") -> None:
        self.dir = Path(data_dir)
        self.split = split
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        if not self.dir.is_dir():
            raise DataError(f"data directory {self.dir} does not exist; create it with "
                            f"`aftermath prepare-data --out {self.dir}` (or omit --data for the embedded default)")
        self.meta = read_meta(self.dir)
        if self.meta is not None:
            self.files = self._files_from_meta()
        else:
            self.files = self._files_by_name(raw_dtype)
        self.shards = [open_shard(self.dir / info["file"], raw_dtype) for info in self.files]
        for info, tokens in zip(self.files, self.shards):
            if info.get("tokens") is not None and info["tokens"] != len(tokens):
                raise DataError(f"{self.dir / info['file']} holds {len(tokens)} tokens but meta.json says "
                                f"{info['tokens']}; the directory is inconsistent: re-run `aftermath prepare-data`")
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.num_tokens = int(self.starts[-1])
        if self.meta is not None:
            self.max_token_id = max(int(info["max_token_id"]) for info in self.files)
        else:  # no record: read every token once (block by block, memory-mapped)
            self.max_token_id = max(max_token(s) for s in self.shards)
        self.vocab_size = int(self.meta["tokenizer"]["vocab_size"]) if self.meta else self.max_token_id + 1
        if vocab_size is not None:
            self.check_vocab(vocab_size)

    # ------------------------------------------------------------------------------------------ opening
    def _files_from_meta(self) -> list[dict]:
        split = self.meta.get("splits", {}).get(self.split)
        if not split or not split.get("shards"):
            raise DataError(f"{self.dir / META_FILE} lists no {self.split} shards; the corpus is empty for this "
                            "split: re-run `aftermath prepare-data` with more text (or a different --val-fraction)")
        return [dict(info) for info in split["shards"]]

    def _files_by_name(self, raw_dtype: str) -> list[dict]:
        names = sorted(p.name for p in self.dir.glob("*.bin") if self.split in p.name)
        if not names:
            raise DataError(f"no {self.split} shards in {self.dir}: expected meta.json from `aftermath prepare-data`"
                            f", or `*.bin` files whose names contain '{self.split}'")
        return [{"file": n, "tokens": None} for n in names]

    def check_vocab(self, vocab_size: int) -> None:
        """Raise unless every token id of this split is below the model's `vocab_size`."""
        if self.max_token_id >= vocab_size:
            raise DataError(
                f"{self.dir} ({self.split}) holds token id {self.max_token_id}, beyond the model's vocabulary of "
                f"{vocab_size} (data vocabulary {self.vocab_size}). Prepare the data with a tokenizer of at most "
                f"{vocab_size} tokens (`aftermath prepare-data --vocab {vocab_size}`), or use a model whose "
                f"vocab_size >= {self.max_token_id + 1}"
            )

    # ------------------------------------------------------------------------------------------ reading
    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) of the split (across shard boundaries) as int64."""
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise DataError(f"token range [{start}, {start + length}) is outside {self.dir} ({self.split}, "
                            f"{self.num_tokens} tokens)")
        out = np.empty(length, dtype=np.int64)
        filled = 0
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while filled < length:
            begin = start + filled - int(self.starts[shard])
            take = min(length - filled, len(self.shards[shard]) - begin)
            out[filled : filled + take] = self.shards[shard][begin : begin + take]
            filled += take
            shard += 1
        return out

    @property
    def dtype(self) -> np.dtype:
        return self.shards[0].dtype

    @property
    def tokenizer_path(self) -> Path | None:
        path = self.dir / TOKENIZER_FILE
        return path if path.is_file() else None

    def data_id(self) -> str:
        """Content identity of the whole directory (all splits): from meta.json, or by hashing the shards."""
        if self.meta is not None and self.meta.get("data_id"):
            return str(self.meta["data_id"])
        splits = {}
        for split in SPLITS:
            names = sorted(p.name for p in self.dir.glob("*.bin") if split in p.name)
            splits[split] = [{"file": n, "tokens": (self.dir / n).stat().st_size, "sha256": file_sha256(self.dir / n)}
                             for n in names]
        tok = self.tokenizer_path
        return data_id_of(file_sha256(tok) if tok else None, splits)
