"""Data: tokenizers, prepared token shards, the embedded Shakespeare default, deterministic batches, a server.

The public surface:
- `prepare_data(out_dir, texts=..., jsonl=..., parquet=..., hf_dataset=..., tokenizer=..., workers=...)`
  -> PreparedData
- `default_data_dir()` / `ensure_default_data(tokenizer, vocab_size)` -> Path of the cached embedded corpus
- `TokenStream(data_dir, seq_len, seed, split, vocab_size=, max_positions=)` with `.sequences(start, end)`
- `step_range(step, batch_size)` -> the global sequence range of a step
- `TokenData(data_dir, split)`: an opened split (memory-mapped shards, checked)
- the server side lives in `aftermath.data.server` (aiohttp): `add_data_routes`, `fetch_sequences`
"""

from aftermath.data.batches import TokenStream, step_range
from aftermath.data.cache import cache_root, default_data_dir, ensure_default_data
from aftermath.data.dataset import TokenData, read_meta
from aftermath.data.prepare import PreparedData, prepare_data
from aftermath.data.shards import open_shard, write_shard
from aftermath.data.tokenizer import load_tokenizer, tokenizer_difference

__all__ = [
    "TokenStream", "step_range", "cache_root", "default_data_dir", "ensure_default_data", "TokenData", "read_meta",
    "PreparedData", "prepare_data", "open_shard", "write_shard", "load_tokenizer", "tokenizer_difference",
]
