"""What a model does at a tier: its validation loss (the number every experiment reports) and its text.

`evaluate(model, stream, spec, max_batches, batch_size)` averages the next-token cross-entropy over the
first `max_batches * batch_size` sequences of `stream` (at most one pass), weighting every token equally.
`check_data_fits(...)` says, before any work, whether a data directory can feed a model at all.
`sample_tokens(model, prompt_ids, new_tokens, ...)` continues a prompt (what `aftermath generate` and the
dashboard's text samples print).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from aftermath.data.batches import TokenStream
from aftermath.data.tokenizer import TOKENIZER_FILE, load_tokenizer, tokenizer_difference
from aftermath.errors import ConfigError, DataError
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


def check_sampling(temperature: float, top_k: int) -> None:
    """Raise unless temperature >= 0 (finite) and top_k >= 0."""
    if not math.isfinite(temperature) or temperature < 0:
        raise ConfigError(f"temperature {temperature} must be a number >= 0 (0 = always the most likely token), "
                          "e.g. --temperature 0.8")
    if top_k < 0:
        raise ConfigError(f"top-k {top_k} must be >= 0 (0 = no limit), e.g. --top-k 40")


@torch.no_grad()
def sample_tokens(model: MatFormerLM, prompt_ids: list[int], new_tokens: int, *, spec: TierSpec | None = None,
                  temperature: float = 0.8, top_k: int = 40, seed: int = 0, stop_id: int | None = None,
                  vocab_size: int | None = None) -> list[int]:
    """`prompt_ids` and up to `new_tokens` tokens sampled after them by `model` at `spec` (default: its own).

    Each token is drawn from softmax(logits / temperature) over the `top_k` most likely tokens (0 = all of them)
    with a generator seeded by `seed`, so a seed always gives the same tokens; temperature 0 takes the most
    likely token (greedy). Only ids below `vocab_size` (the tokenizer's; a model's embedding may be padded past
    it) are drawn. Sampling stops after `stop_id` (e.g. <|endoftext|>). No KV cache: each step runs the last
    max_position_embeddings tokens through the model, which is plenty for short samples.
    """
    check_sampling(temperature, top_k)
    if not prompt_ids:
        raise ConfigError("the prompt is empty: it encodes to no tokens; give some text to continue")
    spec = model.check_spec(spec)
    allowed = min(vocab_size or model.config.vocab_size, model.config.vocab_size)
    limit = model.config.max_position_embeddings
    generator = torch.Generator().manual_seed(seed)
    seq = list(prompt_ids)
    was_training = model.training
    model.eval()
    try:
        for _ in range(new_tokens):
            logits = model(torch.tensor([seq[-limit:]]), spec)[0, -1, :allowed].float()
            if temperature == 0:
                token = int(logits.argmax())
            else:
                top = torch.topk(logits / temperature, min(top_k or allowed, allowed))
                probs = torch.softmax(top.values, dim=-1)
                token = int(top.indices[torch.multinomial(probs, 1, generator=generator)])
            seq.append(token)
            if token == stop_id:
                break
    finally:
        model.train(was_training)
    return seq
