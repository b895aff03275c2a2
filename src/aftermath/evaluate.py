"""Validation loss of a model at a tier: the number every experiment reports.

`evaluate(model, stream, spec, max_batches, batch_size)` averages the next-token cross-entropy over the
first `max_batches * batch_size` sequences of `stream` (at most one pass), weighting every token equally.
`check_data_fits(...)` says, before any work, whether a data directory can feed a model at all.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from aftermath.data.batches import TokenStream
from aftermath.data.tokenizer import TOKENIZER_FILE, load_tokenizer, tokenizer_difference
from aftermath.errors import DataError
from aftermath.model import MatFormerConfig, MatFormerLM, TierSpec


@dataclass(frozen=True)
class EvalResult:
    """Mean validation loss (nats per token) and its perplexity over `tokens` predicted tokens."""

    loss: float
    perplexity: float
    tokens: int
    sequences: int
    batches: int
    seq_len: int
    spec: str
    seconds: float

    def to_json(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate(model: MatFormerLM, stream: TokenStream, spec: TierSpec | None = None, max_batches: int = 20,
             batch_size: int = 8) -> EvalResult:
    """Loss of `model` at `spec` (default: its own geometry) on the first sequences of `stream`."""
    if max_batches < 1 or batch_size < 1:
        raise DataError(f"max_batches {max_batches} and batch_size {batch_size} must both be >= 1")
    spec = model.check_spec(spec)
    stream.data.check_vocab(model.config.vocab_size)
    if stream.seq_len > model.config.max_position_embeddings:
        raise DataError(f"sequence length {stream.seq_len} is longer than the model allows "
                        f"(max_position_embeddings {model.config.max_position_embeddings})")
    total = min(max_batches * batch_size, stream.sequences_per_pass)
    was_training = model.training
    model.eval()
    start_time = time.perf_counter()
    loss_sum, tokens, batches = 0.0, 0, 0
    try:
        for start in range(0, total, batch_size):
            seqs = stream.sequences(start, min(start + batch_size, total))
            inputs, targets = seqs[:, :-1], seqs[:, 1:]
            loss = model.loss(inputs, targets, spec)
            loss_sum += float(loss) * targets.numel()
            tokens += targets.numel()
            batches += 1
    finally:
        model.train(was_training)
    mean = loss_sum / tokens
    return EvalResult(loss=mean, perplexity=math.exp(min(mean, 700.0)), tokens=tokens, sequences=total,
                      batches=batches, seq_len=stream.seq_len, spec=spec.name,
                      seconds=time.perf_counter() - start_time)


def check_tokenizers_match(model_dir: str | Path, data_dir: str | Path) -> None:
    """Raise when the checkpoint carries a tokenizer.json that turns text into other ids than the data's."""
    model_tok, data_tok = Path(model_dir) / TOKENIZER_FILE, Path(data_dir) / TOKENIZER_FILE
    if not model_tok.is_file() or not data_tok.is_file():
        return  # nothing to compare: the vocabulary check still guards the ids
    difference = tokenizer_difference(load_tokenizer(model_tok), load_tokenizer(data_tok))
    if difference:
        raise DataError(f"the checkpoint's tokenizer ({model_tok}) does not match the data's ({data_tok}): "
                        f"{difference}. Evaluate on data prepared with the checkpoint's tokenizer, or train the "
                        "model on this data")


def check_data_fits(config: MatFormerConfig, data_dir: str | Path, seq_len: int, model_dir: str | Path | None = None,
                    split: str = "val", seed: int = 0) -> TokenStream:
    """Open `split` of `data_dir` for a model: vocabulary, sequence length and tokenizer checked now."""
    if model_dir is not None:
        check_tokenizers_match(model_dir, data_dir)
    return TokenStream(data_dir, seq_len, seed, split, vocab_size=config.vocab_size,
                       max_positions=config.max_position_embeddings)
