"""Where text comes from: a user's text files (or directories of them), JSONL, parquet files and a Hugging Face
dataset, split into train and validation documents.

A *corpus* yields, for a split, text pieces `(text, ends_document)`; a document may arrive in several pieces
(a large file is read in blocks that end at line breaks, so no file is ever read whole; parquet files and
datasets are read in record batches).

The documents of a user's corpus, in this order:
- every text file (one document each); a directory given to --text contributes each file under it whose suffix
  is in TEXT_SUFFIXES, recursively, sorted by its path inside the directory (hidden files and folders skipped);
- every JSONL record (one per line), then every parquet row, then every row of the Hugging Face dataset; the
  document is the record's `text_field`, records whose text is empty or null are skipped. A directory given
  to --jsonl / --parquet contributes its *.jsonl / *.parquet files the same way.

How a user's corpus is split (`val_fraction` F):
- with enough documents (F x count >= 1 after rounding), whole documents go to validation, evenly spread:
  document i is validation when floor((i+1) F') > floor(i F'), with F' = round(F x count) / count;
- with too few (e.g. one text file), every document is cut at a line break: its first 1-F goes to training,
  the rest to validation.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from aftermath.data.shards import file_sha256
from aftermath.errors import DataError

if TYPE_CHECKING:
    import datasets

BLOCK_BYTES = 1 << 22  # text files are read in ~4 MiB blocks, each ending at a line break
RECORD_BATCH_ROWS = 1024  # parquet / dataset rows read at once
TEXT_SUFFIXES = (".txt", ".text", ".md", ".markdown", ".rst")
JSONL_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet",)
LOCAL_DATASET_HINT = ("a local dataset: a directory written by `Dataset.save_to_disk` or a folder of "
                      "parquet/json/csv/txt files")


@dataclass(frozen=True)
class SourceInfo:
    """What meta.json records of one input: a file (with its sha256 and size) or a Hugging Face dataset."""

    name: str
    kind: str  # text | jsonl | parquet | hf
    documents: int
    sha256: str | None = None
    bytes: int | None = None
    detail: dict = field(default_factory=dict)  # hf: split and config

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "sha256": self.sha256, "bytes": self.bytes,
                "documents": self.documents, **self.detail}


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


def expand_inputs(paths: Iterable[str | Path], suffixes: tuple[str, ...], option: str) -> list[Path]:
    """The files `paths` name: a file as it is, a directory as every file under it whose suffix is in
    `suffixes` (recursively; sorted by the path inside the directory, so the corpus order never depends on the
    file system; hidden files and folders skipped)."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(
                (p for p in path.rglob("*") if p.suffix.lower() in suffixes and p.is_file()
                 and not any(part.startswith(".") for part in p.relative_to(path).parts)),
                key=lambda p: p.relative_to(path).as_posix(),
            )
            if not found:
                raise DataError(f"{option} {path}: the directory holds no {' / '.join(suffixes)} files; give a "
                                "directory that holds some, or the files themselves")
            files.extend(found)
        else:
            raise DataError(f"{option} {path} does not exist; give a file or a directory")
    return files


class RecordSource(Protocol):
    """An input whose documents are records: `records()` yields the non-empty texts, in a fixed order."""

    def records(self) -> Iterator[str]: ...

    def info(self, documents: int) -> SourceInfo: ...


@dataclass(frozen=True)
class JsonlSource:
    path: Path
    text_field: str

    def records(self) -> Iterator[str]:
        with open(self.path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{self.path}:{number} is not valid JSON ({exc.msg}); each line must be one "
                                    "JSON object") from exc
                if not isinstance(record, dict) or not isinstance(record.get(self.text_field), str):
                    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise DataError(f"{self.path}:{number} has no string field {self.text_field!r} (found {keys}); "
                                    "pick the field with --text-field NAME")
                if record[self.text_field]:
                    yield record[self.text_field]

    def info(self, documents: int) -> SourceInfo:
        return SourceInfo(str(self.path), "jsonl", documents, file_sha256(self.path), self.path.stat().st_size)


@dataclass(frozen=True)
class ParquetSource:
    """A parquet file's `text_field` column, read in record batches of that column only (never whole)."""

    path: Path
    text_field: str

    def records(self) -> Iterator[str]:
        import pyarrow as pa  # here, not at the top: only parquet input needs pyarrow
        import pyarrow.parquet as pq

        try:
            # pre_buffer (pyarrow's default) reads whole column chunks ahead; a 4 MiB read buffer holds far less
            with pq.ParquetFile(self.path, pre_buffer=False, buffer_size=1 << 22) as parquet:
                self._check_column(parquet.schema_arrow)
                for batch in parquet.iter_batches(batch_size=RECORD_BATCH_ROWS, columns=[self.text_field]):
                    for text in batch.column(0).to_pylist():
                        if text:
                            yield text
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"--parquet {self.path} cannot be read as parquet ({exc}); give a parquet file (or "
                            "use --text / --jsonl for other formats)") from exc

    def _check_column(self, schema) -> None:
        import pyarrow as pa

        if self.text_field not in schema.names:
            raise DataError(f"--parquet {self.path} has no column {self.text_field!r} (columns: {schema.names}); "
                            "pick the text column with --text-field NAME")
        kind = schema.field(self.text_field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise DataError(f"--parquet {self.path}: column {self.text_field!r} holds {kind}, not text; pick the "
                            f"text column with --text-field NAME (columns: {schema.names})")

    def info(self, documents: int) -> SourceInfo:
        return SourceInfo(str(self.path), "parquet", documents, file_sha256(self.path), self.path.stat().st_size)


def _looks_like_path(name: str) -> bool:
    """Whether `name` can only be a local path (a hub dataset id is NAME or OWNER/NAME)."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or Path(name.split("/")[0]).is_dir()


class HFDataset:
    """One split of a Hugging Face dataset, through the `datasets` library (imported only here: it is slow).

    `name` is a directory written by `save_to_disk` (read with `load_from_disk`), another local directory (a
    folder of parquet/json/csv/txt files) or a hub dataset id (both read with `load_dataset`, which prepares
    the dataset once into the datasets cache). Either way the rows are memory-mapped Arrow, read in batches.
    """

    def __init__(self, name: str, split: str = "train", config: str | None = None, text_field: str = "text") -> None:
        self.name, self.split, self.config, self.text_field = name, split, config, text_field
        self.dataset = self._open()
        column = self.dataset.features.get(text_field)
        if getattr(column, "dtype", None) not in ("string", "large_string"):
            found = "no such column" if column is None else f"it holds {column}"
            raise DataError(f"--hf-dataset {name} has no text column {text_field!r} ({found}; columns: "
                            f"{self.dataset.column_names}); pick the text column with --text-field NAME")

    def _open(self) -> "datasets.Dataset":
        import datasets

        path = Path(self.name).expanduser()
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            if self.config is not None:
                raise DataError(f"--hf-config {self.config} does not apply to {self.name}, a dataset written by "
                                "save_to_disk (it has no configurations); drop --hf-config")
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if self.split not in loaded:
                    raise DataError(f"--hf-split {self.split}: {self.name} has the splits {sorted(loaded)}; pick "
                                    "one with --hf-split NAME")
                return loaded[self.split]
            return loaded  # a single saved split
        if not path.is_dir() and _looks_like_path(self.name):  # a typo, not a hub id to retry for ~25 s
            raise DataError(f"--hf-dataset {self.name}: no such directory; give {LOCAL_DATASET_HINT}, or a hub "
                            "dataset id such as OWNER/NAME")
        try:
            return datasets.load_dataset(str(path) if path.is_dir() else self.name, name=self.config,
                                         split=self.split)
        except Exception as exc:  # datasets raises many types (ConnectionError, ValueError, FileNotFoundError, ...)
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if path.is_dir():
                raise DataError(f"--hf-dataset {self.name}: the datasets library cannot read this directory "
                                f"({reason}); give {LOCAL_DATASET_HINT}") from exc
            raise DataError(f"--hf-dataset {self.name} is not a local directory and cannot be loaded from the "
                            f"Hugging Face Hub ({reason}); check the name, --hf-config and --hf-split, go online "
                            f"(and unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), or give {LOCAL_DATASET_HINT}") \
                from exc

    def records(self) -> Iterator[str]:
        for batch in self.dataset.select_columns([self.text_field]).iter(batch_size=RECORD_BATCH_ROWS):
            for text in batch[self.text_field]:
                if text:
                    yield text

    def info(self, documents: int) -> SourceInfo:
        return SourceInfo(self.name, "hf", documents, detail={"split": self.split, "config": self.config})


@dataclass
class UserCorpus:
    """Text, JSONL and parquet files (or directories of them) and a Hugging Face dataset, given on the command
    line. Every input is read now, once, to count its documents and check it, before any slow work."""

    texts: list[Path] = field(default_factory=list)
    jsonl: list[Path] = field(default_factory=list)
    parquet: list[Path] = field(default_factory=list)
    hf_dataset: str | None = None
    hf_split: str = "train"
    hf_config: str | None = None
    text_field: str = "text"
    val_fraction: float = 0.05

    def __post_init__(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise DataError(f"--val-fraction {self.val_fraction} must be in [0, 1), e.g. 0.05")
        if not (self.texts or self.jsonl or self.parquet or self.hf_dataset):
            raise DataError("no input: give --text, --jsonl, --parquet or --hf-dataset (or none of them for the "
                            "embedded default)")
        self.text_files = expand_inputs(self.texts, TEXT_SUFFIXES, "--text")
        self.record_sources: list[RecordSource] = [
            *(JsonlSource(p, self.text_field) for p in expand_inputs(self.jsonl, JSONL_SUFFIXES, "--jsonl")),
            *(ParquetSource(p, self.text_field) for p in expand_inputs(self.parquet, PARQUET_SUFFIXES, "--parquet")),
        ]
        if self.hf_dataset:
            self.record_sources.append(HFDataset(self.hf_dataset, self.hf_split, self.hf_config, self.text_field))
        self.source_infos = self._scan()
        self.num_documents = sum(s.documents for s in self.source_infos)
        if self.num_documents == 0:
            raise DataError(f"the corpus is empty: {[s.name for s in self.source_infos]} hold no text")
        self.num_val = round(self.val_fraction * self.num_documents)
        self.whole_documents = self.num_val >= 1 and self.num_val < self.num_documents

    def _scan(self) -> list[SourceInfo]:
        """Hash every file, count documents, and check every record now, before any slow work."""
        sources = []
        for path in self.text_files:
            size = path.stat().st_size
            sources.append(SourceInfo(str(path), "text", 1 if size else 0, file_sha256(path), size))
        for source in self.record_sources:
            sources.append(source.info(sum(1 for _ in source.records())))
        return sources

    def _is_val(self, index: int) -> bool:
        ratio = self.num_val / self.num_documents
        return int((index + 1) * ratio) > int(index * ratio)

    def documents(self, split: str) -> int:
        """How many documents end in `split` (what a progress bar counts to)."""
        if self.whole_documents:
            return self.num_val if split == "val" else self.num_documents - self.num_val
        return 0 if split == "val" and self.val_fraction == 0 else self.num_documents

    def pieces(self, split: str) -> Iterator[tuple[str, bool]]:
        """(text, ends_document) pieces of `split`, in corpus order."""
        index = 0
        for path in self.text_files:
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
        for source in self.record_sources:
            for text in source.records():
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
        return {"corpus": "user", "val_fraction": self.val_fraction, "text_field": self.text_field,
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
