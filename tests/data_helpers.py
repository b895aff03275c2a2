"""Small corpora for the data tests (real files, written fresh in a temporary directory)."""

from pathlib import Path

from aftermath.data import prepare_data

LINES = [
    "Now is the winter of our discontent",
    "Made glorious summer by this sun of York;",
    "And all the clouds that lour'd upon our house",
    "In the deep bosom of the ocean buried.",
]


def write_text(path: Path, repeats: int = 200) -> Path:
    """A text file of numbered lines (so every window of it is distinct)."""
    path.write_text("".join(f"{i} {LINES[i % len(LINES)]}\n" for i in range(repeats)), encoding="utf-8")
    return path


def prepared_bytes_dir(tmp_path: Path, repeats: int = 200, **kwargs) -> Path:
    text = write_text(tmp_path / "book.txt", repeats)
    return prepare_data(tmp_path / "data", texts=[text], tokenizer="bytes", **kwargs).dir
