"""The user cache of prepared data: the embedded default is prepared once per machine, then reused at once.

Cache root: `$AFTERMATH_CACHE`, else `$XDG_CACHE_HOME/aftermath`, else `~/.cache/aftermath`. An entry is a
directory named by a hash of everything that determines its content (the plays' sha256, the held-out list, the
converter version, the tokenizer and its options), so changing any of them prepares a new entry instead of
reusing a stale one. Entries are built in a temporary directory and renamed in (see `build_atomically`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

from aftermath.data.corpus import EmbeddedCorpus
from aftermath.data.dataset import META_FILE, META_VERSION
from aftermath.data.prepare import SHARD_TOKENS, Progress, ProgressBar, build_atomically, write_data_dir
from aftermath.data.tokenizer import DEFAULT_BPE_VOCAB, TOKENIZER_VERSION


def cache_root() -> Path:
    if os.environ.get("AFTERMATH_CACHE"):
        return Path(os.environ["AFTERMATH_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "aftermath"
    return Path.home() / ".cache" / "aftermath"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def remove_abandoned_temporaries(directory: Path) -> None:
    """Delete `.NAME.tmp-PID-*` build directories whose process is gone (killed while preparing)."""
    if not directory.is_dir():
        return
    for tmp in directory.glob(".*.tmp-*"):
        try:
            pid = int(tmp.name.rsplit(".tmp-", 1)[1].split("-")[0])
            os.kill(pid, 0)  # raises when no such process exists
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue


def default_cache_key(corpus: EmbeddedCorpus, tokenizer: str, vocab_size: int) -> str:
    options = {"corpus": corpus.fingerprint, "tokenizer": tokenizer,
               "vocab_size": vocab_size if tokenizer == "bpe" else None, "meta_version": META_VERSION,
               "tokenizer_version": TOKENIZER_VERSION,
               "shard_tokens": SHARD_TOKENS}
    return hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:16]


def ensure_default_data(tokenizer: str = "bpe", vocab_size: int = DEFAULT_BPE_VOCAB, *,
                        progress: Progress | None = _stderr, workers: int = 1,
                        bar: ProgressBar | None = None) -> Path:
    """The prepared embedded Shakespeare directory; prepared (with progress) and cached on first use."""
    progress = progress or (lambda _: None)
    corpus = EmbeddedCorpus()
    key = default_cache_key(corpus, tokenizer, vocab_size)
    final = cache_root() / "data" / f"shakespeare-{tokenizer}-{key}"
    if (final / META_FILE).is_file():
        return final
    remove_abandoned_temporaries(final.parent)
    progress(f"preparing the embedded Shakespeare corpus ({len(corpus.plays)} plays, tokenizer {tokenizer}) "
             f"into {final} (once; later runs reuse it)")
    start = time.perf_counter()
    build_atomically(final, lambda tmp: write_data_dir(corpus, tmp, tokenizer=tokenizer, vocab_size=vocab_size,
                                                       workers=workers, progress=progress, bar=bar),
                     keep_existing=True)
    progress(f"prepared in {time.perf_counter() - start:.1f} s")
    return final


def default_data_dir() -> Path:
    """The embedded default with the default tokenizer (byte-level BPE, 4096 tokens)."""
    return ensure_default_data()
