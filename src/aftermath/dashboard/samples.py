"""Short text samples from a checkpoint, one per tier: what the model says after some training.

Kept cheap: one prompt, ~40 new tokens, seeded sampling (temperature 0.8, top-k 40) with no KV cache; on the
tiny preset that is well under a second for three tiers.
"""

from __future__ import annotations

from pathlib import Path

PROMPT = "ROMEO:"
NEW_TOKENS = 40


def sample_texts(model_dir: str | Path, tiers: list[int] | None = None, *, prompt: str = PROMPT,
                 new_tokens: int = NEW_TOKENS, seed: int = 0) -> dict[str, str]:
    """{tier name: prompt + sampled continuation} for each tier of the universal checkpoint in `model_dir`
    (default: the tiers its manifest lists). Empty when the checkpoint has no tokenizer.json."""
    import torch
    from tokenizers import Tokenizer

    from aftermath.checkpoint.hf_dir import load_model_dir
    from aftermath.checkpoint.manifest import read_manifest
    from aftermath.model import tier_spec

    model_dir = Path(model_dir)
    tokenizer_file = model_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        return {}
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    model = load_model_dir(model_dir)
    model.eval()
    if tiers is None:
        manifest = read_manifest(model_dir)
        tiers = sorted({0} | {e.tier for e in (manifest.tiers if manifest else []) if e.tier is not None})
    ids = tokenizer.encode(prompt).ids or [0]
    limit = model.config.max_position_embeddings
    out: dict[str, str] = {}
    with torch.no_grad():
        for tier in tiers:
            spec = tier_spec(model.config, tier)
            gen = torch.Generator().manual_seed(seed)
            seq = list(ids)
            for _ in range(new_tokens):
                window = torch.tensor([seq[-limit:]])
                logits = model(window, spec)[0, -1].float() / 0.8
                top = torch.topk(logits, min(40, logits.numel()))
                probs = torch.softmax(top.values, dim=-1)
                seq.append(int(top.indices[torch.multinomial(probs, 1, generator=gen)]))
            out[spec.name] = tokenizer.decode(seq)
    return out
