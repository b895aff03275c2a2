"""Short text samples from a checkpoint, one per tier: what the model says after some training.

Kept cheap: one prompt, ~40 new tokens, seeded sampling (temperature 0.8, top-k 40; `evaluate.sample_tokens`, what
`aftermath generate` runs too) with no KV cache; on the tiny preset that is well under a second for three tiers.
"""

from __future__ import annotations

from pathlib import Path

PROMPT = "ROMEO:"
NEW_TOKENS = 40
TEMPERATURE = 0.8
TOP_K = 40


def sample_texts(model_dir: str | Path, tiers: list[int] | None = None, *, prompt: str = PROMPT,
                 new_tokens: int = NEW_TOKENS, seed: int = 0) -> dict[str, str]:
    """{tier name: prompt + sampled continuation} for each tier of the universal checkpoint in `model_dir`
    (default: the tiers its manifest lists). Empty when the checkpoint has no tokenizer.json."""
    from tokenizers import Tokenizer

    from aftermath.checkpoint.hf_dir import load_model_dir
    from aftermath.checkpoint.manifest import read_manifest
    from aftermath.evaluate import sample_tokens
    from aftermath.model import tier_spec

    model_dir = Path(model_dir)
    tokenizer_file = model_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        return {}
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    model = load_model_dir(model_dir)
    if tiers is None:
        manifest = read_manifest(model_dir)
        tiers = sorted({0} | {e.tier for e in (manifest.tiers if manifest else []) if e.tier is not None})
    ids = tokenizer.encode(prompt).ids or [0]
    out: dict[str, str] = {}
    for tier in tiers:
        spec = tier_spec(model.config, tier)
        seq = sample_tokens(model, ids, new_tokens, spec=spec, temperature=TEMPERATURE, top_k=TOP_K, seed=seed)
        out[spec.name] = tokenizer.decode(seq)
    return out
