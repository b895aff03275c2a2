"""Where text comes from: a user's text / JSONL files, split into train and validation documents.

A *corpus* yields, for a split, text pieces `(text, ends_document)`; a document may arrive in several pieces
(a large file is read in blocks that end at line breaks, so no file is ever read whole).

How a user's corpus is split (`val_fraction` F):
- documents are the text files (one each) and the JSONL records (one per line), in the order given;
- with enough documents (F x count >= 1 after rounding), whole documents go to validation, evenly spread:
  document i is validation when floor((i+1) F') > floor(i F'), with F' = round(F x count) / count;
- with too few (e.g. one text file), every document is cut at a line break: its first 1-F goes to training,
  the rest to validation.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from aftermath.errors import DataError

BLOCK_BYTES = 1 << 22  # text files are read in ~4 MiB blocks, each ending at a line break


@dataclass(frozen=True)
class SourceInfo:
    """What meta.json records of one input file."""

    name: str
    sha256: str
    bytes: int
    documents: int

    def to_json(self) -> dict:
        return {"name": self.name, "sha256": self.sha256, "bytes": self.bytes, "documents": self.documents}


def _decode(data: bytes, path: Path, offset: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (bad byte at offset {offset + exc.start}); convert it, e.g. "
                        f"`iconv -f latin1 -t utf-8 {path} > {path}.utf8`") from exc


def next_line_break(path: Path, offset: int) -> int:
    """The offset just after the first b'\\n' at or after `offset` (the file size if there is none)."""
    with open(path, "rb") as f:
        f.seek(offset)
        pos = offset
        while True:
            block = f.read(1 << 16)
            if not block:
                return pos
            i = block.find(b"\n")
            if i >= 0:
                return pos + i + 1
            pos += len(block)


def read_blocks(path: Path, begin: int, end: int) -> Iterator[str]:
    """Text of bytes [begin, end) of a file, in blocks that end at line breaks (never mid-character)."""
    with open(path, "rb") as f:
        f.seek(begin)
        pos = begin  # file offset of the next byte to read
        carry, carry_at = b"", begin  # bytes read but not yet yielded (an unfinished line), and their offset
        while pos < end:
            block = f.read(min(BLOCK_BYTES, end - pos))
            if not block:
                break
            pos += len(block)
            data = carry + block
            cut = data.rfind(b"\n") + 1 if pos < end else len(data)
            if cut == 0:  # a line longer than a block: keep reading
                carry = data
                continue
            yield _decode(data[:cut], path, carry_at)
            carry, carry_at = data[cut:], carry_at + cut
        if carry:
            yield _decode(carry, path, carry_at)


def char_boundary(path: Path, offset: int) -> int:
    """`offset`, moved back to the start of the UTF-8 character it falls in."""
    base = max(0, offset - 3)
    with open(path, "rb") as f:
        f.seek(base)
        window = f.read(4)
    at = offset - base
    while 0 < at < len(window) and (window[at] & 0xC0) == 0x80:  # a continuation byte: step back
        at -= 1
    return base + at


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """Cut one document at the first line break at or after (1 - F) of its length."""
    at = int(len(text) * (1 - val_fraction))
    nl = text.find("\n", at)
    cut = len(text) if nl < 0 else nl + 1
    if val_fraction > 0 and cut >= len(text):
        cut = at  # no line break in the tail: cut mid-line rather than leave validation empty
    return text[:cut], text[cut:]


@dataclass
class UserCorpus:
    """Text files and JSONL files given on the command line."""

    texts: list[Path] = field(default_factory=list)
    jsonl: list[Path] = field(default_factory=list)
    jsonl_field: str = "text"
    val_fraction: float = 0.05

    def __post_init__(self) -> None:
        self.texts = [Path(p) for p in self.texts]
        self.jsonl = [Path(p) for p in self.jsonl]
        if not 0 <= self.val_fraction < 1:
            raise DataError(f"--val-fraction {self.val_fraction} must be in [0, 1), e.g. 0.05")
        if not self.texts and not self.jsonl:
            raise DataError("no input: give --text FILE or --jsonl FILE (or neither option for the embedded default)")
        for path in self.texts + self.jsonl:
            if not path.is_file():
                raise DataError(f"input file {path} does not exist")
        self.source_infos, self.num_documents = self._scan()
        if self.num_documents == 0:
            raise DataError(f"the corpus is empty: {[str(p) for p in self.texts + self.jsonl]} hold no text")
        self.num_val = round(self.val_fraction * self.num_documents)
        self.whole_documents = self.num_val >= 1 and self.num_val < self.num_documents

    def _scan(self) -> tuple[list[SourceInfo], int]:
        """Hash every input, count documents, and check every JSONL record now, before any slow work."""
        sources, count = [], 0
        for path in self.texts:
            size = path.stat().st_size
            docs = 1 if size else 0
            sources.append(SourceInfo(str(path), _file_sha256(path), size, docs))
            count += docs
        for path in self.jsonl:
            docs = sum(1 for _ in self._records(path))
            sources.append(SourceInfo(str(path), _file_sha256(path), path.stat().st_size, docs))
            count += docs
        return sources, count

    def _records(self, path: Path) -> Iterator[str]:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{number} is not valid JSON ({exc.msg}); each line must be one JSON "
                                    "object") from exc
                if not isinstance(record, dict) or not isinstance(record.get(self.jsonl_field), str):
                    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise DataError(f"{path}:{number} has no string field {self.jsonl_field!r} (found {keys}); "
                                    "pick the field with --jsonl-field NAME")
                if record[self.jsonl_field]:
                    yield record[self.jsonl_field]

    def _is_val(self, index: int) -> bool:
        ratio = self.num_val / self.num_documents
        return int((index + 1) * ratio) > int(index * ratio)

    def pieces(self, split: str) -> Iterator[tuple[str, bool]]:
        """(text, ends_document) pieces of `split`, in corpus order."""
        index = 0
        for path in self.texts:
            size = path.stat().st_size
            if not size:
                continue
            if self.whole_documents:
                if (split == "val") == self._is_val(index):
                    yield from _as_document(read_blocks(path, 0, size))
            else:
                at = int(size * (1 - self.val_fraction))
                cut = next_line_break(path, at) if self.val_fraction else size
                if self.val_fraction and cut >= size:  # no line break in the tail: cut mid-line
                    cut = char_boundary(path, at)
                begin, end = (0, cut) if split == "train" else (cut, size)
                if end > begin:
                    yield from _as_document(read_blocks(path, begin, end))
            index += 1
        for path in self.jsonl:
            for text in self._records(path):
                if self.whole_documents:
                    if (split == "val") == self._is_val(index):
                        yield text, True
                else:
                    part = split_text(text, self.val_fraction)[0 if split == "train" else 1]
                    if part:
                        yield part, True
                index += 1

    @property
    def sources(self) -> list[dict]:
        return [s.to_json() for s in self.source_infos]

    def describe(self) -> dict:
        return {"corpus": "user", "val_fraction": self.val_fraction, "jsonl_field": self.jsonl_field,
                "split_by": "documents" if self.whole_documents else "tail of each document"}


def _as_document(blocks: Iterator[str]) -> Iterator[tuple[str, bool]]:
    """Mark the last block of a document."""
    previous = None
    for block in blocks:
        if previous is not None:
            yield previous, False
        previous = block
    if previous is not None:
        yield previous, True


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()
