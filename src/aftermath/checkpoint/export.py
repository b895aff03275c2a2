"""Tier export: sliced sibling directories `DIR-tier1/`, `DIR-NAME/` and `DIR/matformer_manifest.json`.

Each tier directory is written beside its final place and renamed into it once complete, so it appears whole
or not at all; the manifest is written last, atomically. The source is only read (tensor by tensor, prefix
regions only), and nothing is replaced unless `force` is given.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from aftermath.checkpoint.manifest import (
    MANIFEST_NAME,
    Manifest,
    TierEntry,
    read_manifest,
    sha256_file,
    write_manifest,
)
from aftermath.checkpoint.optimizer_state import OPTIMIZER_STATE_FILE, slice_optimizer_state
from aftermath.checkpoint.schema import read_config, schema_hash
from aftermath.checkpoint.streaming import (
    INDEX_FILE,
    SINGLE_FILE,
    PrefixReader,
    TensorEntry,
    parse_size,
    tensor_headers,
    tensor_locations,
    write_weights,
)
from aftermath.errors import CheckpointError
from aftermath.model import MatFormerConfig, TierSpec, param_shapes, parse_spec, sliced_config, tier_spec

log = logging.getLogger("aftermath.checkpoint")

# Files copied from the source into every tier directory (and listed as the manifest's common files).
COMMON_FILE_NAMES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                     "vocab.json", "merges.txt", "generation_config.json")

# progress(tier_name, tensor_name, tensors_done, tensors_total)
Progress = Callable[[str, str, int, int], None]


@dataclass
class _Target:
    spec: TierSpec
    directory: Path

    @property
    def tmp(self) -> Path:
        return self.directory.with_name(f".{self.directory.name}.tmp-{os.getpid()}")


def tier_directory(src: str | Path, name: str) -> Path:
    """Where the tier or spec `name` of the checkpoint `src` is exported: the sibling `SRC-NAME`."""
    src = Path(os.path.abspath(src))
    return src.with_name(f"{src.name}-{name}")


def universal_files(src: Path) -> list[str]:
    """config.json, the weight files (index first when sharded) and the optimizer state, if the directory has
    one, of a model directory: relative names."""
    files = ["config.json"]
    if (src / INDEX_FILE).is_file():
        files.append(INDEX_FILE)
        files.extend(sorted({p.name for p in tensor_locations(src).values()}))
    else:
        files.append(SINGLE_FILE)
    if (src / OPTIMIZER_STATE_FILE).is_file():
        files.append(OPTIMIZER_STATE_FILE)
    return files


def check_source_weights(src: Path, config: MatFormerConfig) -> dict[str, TensorEntry]:
    """The source's tensor headers, after checking they are exactly the universal model's tensors."""
    headers = tensor_headers(src)
    expected = param_shapes(config)
    missing, extra = sorted(set(expected) - set(headers)), sorted(set(headers) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{src}: the weights do not match config.json (missing {missing[:3]}, unexpected {extra[:3]}); "
            f"is config.json from another model?"
        )
    for name, shape in expected.items():
        if headers[name].shape != shape:
            raise CheckpointError(
                f"{src}: tensor {name} has shape {headers[name].shape}, config.json implies {shape}"
            )
    return headers


def _targets(src: Path, config: MatFormerConfig, tiers: Sequence[int], specs: Sequence[str | TierSpec]) -> list[_Target]:
    specs_out: list[TierSpec] = []
    for t in tiers:
        if t == 0:
            continue  # tier 0 is the source itself; the manifest always lists it
        specs_out.append(tier_spec(config, t))
    for s in specs:
        specs_out.append(s if isinstance(s, TierSpec) else parse_spec(config, s))
    names = [s.name for s in specs_out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise CheckpointError(f"tier/spec {dupes} requested twice; list each once")
    return [_Target(spec, tier_directory(src, spec.name)) for spec in specs_out]


def _entry(spec: TierSpec, cfg: MatFormerConfig, files: list[str]) -> TierEntry:
    return TierEntry(name=spec.name, tier=spec.tier, intermediate_size=cfg.intermediate_size, files=files,
                     num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                     layer_intermediate_sizes=list(cfg.matformer_layer_intermediate_sizes)
                     if cfg.matformer_layer_intermediate_sizes else None)


def _write_tier(src: Path, config: MatFormerConfig, headers: dict[str, TensorEntry], target: _Target,
                common: list[str], max_shard_size: int | None, progress: Progress | None) -> list[str]:
    """Write one tier into its temp directory; returns the names of the files written."""
    tmp = target.tmp
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    cfg = sliced_config(config, target.spec)
    cfg.save(tmp)
    for name in common:
        shutil.copyfile(src / name, tmp / name)
    shapes = param_shapes(config, target.spec)
    entries = [TensorEntry(name, headers[name].dtype, shape) for name, shape in shapes.items()]
    done = 0
    with PrefixReader(src) as reader:
        def fetch(e: TensorEntry):
            nonlocal done
            tensor = reader.read(e.name, e.shape)
            done += 1
            if progress is not None:
                progress(target.spec.name, e.name, done, len(entries))
            return tensor

        weights = write_weights(tmp, entries, fetch, max_shard_size)
    if (src / OPTIMIZER_STATE_FILE).is_file():  # the tier's cut of the replica state, beside its weights
        slice_optimizer_state(src / OPTIMIZER_STATE_FILE, tmp / OPTIMIZER_STATE_FILE, config, target.spec)
        weights.append(OPTIMIZER_STATE_FILE)
    # Self-check from the headers we just wrote: the tier's config and its tensors agree.
    written = tensor_headers(tmp)
    if {n: e.shape for n, e in written.items()} != dict(shapes):
        raise CheckpointError(f"internal error: {tmp} does not hold the shapes of {target.spec.name}")
    return ["config.json", *weights, *common]


def export_tiers(src: str | Path, tiers: Sequence[int] = (), specs: Sequence[str | TierSpec] = (),
                 force: bool = False, max_shard_size: int | str | None = None,
                 progress: Progress | None = None) -> Manifest:
    """Export nested tiers and Mix'n'Match specs of the universal checkpoint `src`; return the new manifest.

    Writes `SRC-tier{t}/` and `SRC-{NAME}/` beside `src`, then `src/matformer_manifest.json` (last, atomically).
    Existing tier directories are refused unless `force`. Entries of an older manifest for tiers not re-exported
    are kept only when the universal files are unchanged (otherwise they would describe stale weights).
    """
    src = Path(os.path.abspath(src))
    if not src.is_dir():
        raise CheckpointError(f"source {src} is not a directory; give the universal model's directory")
    config = read_config(src)
    if not config.is_universal:
        own = config.matformer_layer_intermediate_sizes or config.intermediate_size
        raise CheckpointError(
            f"{src} is already sliced (matformer_tier {config.matformer_tier}, FFN {own}, base "
            f"{config.matformer_base_intermediate_size}); slicing it again would compound the cut: export tiers "
            f"from the universal checkpoint"
        )
    shard_bytes = parse_size(max_shard_size)
    headers = check_source_weights(src, config)
    targets = _targets(src, config, tiers, specs)
    existing = [str(t.directory) for t in targets if t.directory.exists()]
    if existing and not force:
        raise CheckpointError(f"destination(s) {existing} already exist; pass --force to replace them")

    common = [name for name in COMMON_FILE_NAMES if (src / name).is_file()]
    base_files = universal_files(src)
    sha = {rel: sha256_file(src / rel) for rel in base_files + common}

    written: dict[str, list[str]] = {}
    try:
        for target in targets:
            log.info("exporting %s to %s", target.spec.name, target.directory)
            written[target.spec.name] = _write_tier(src, config, headers, target, common, shard_bytes, progress)
        for target in targets:  # hash before the rename: what we hash is what we wrote
            for name in written[target.spec.name]:
                sha[f"../{target.directory.name}/{name}"] = sha256_file(target.tmp / name)
    except BaseException:
        for target in targets:
            if target.tmp.exists():
                shutil.rmtree(target.tmp)
        raise

    for target in targets:
        old = target.directory.with_name(f".{target.directory.name}.old-{os.getpid()}")
        if target.directory.exists():
            os.replace(target.directory, old)
        os.replace(target.tmp, target.directory)
        if old.exists():
            shutil.rmtree(old)

    entries = [_entry(tier_spec(config, 0), config, base_files)]
    for target in targets:
        cfg = sliced_config(config, target.spec)
        files = [f"../{target.directory.name}/{name}" for name in written[target.spec.name]]
        entries.append(_entry(target.spec, cfg, files))
    entries.extend(_kept_entries(src, sha, base_files, {e.name for e in entries}))
    manifest = Manifest(base_intermediate_size=config.matformer_base_intermediate_size, tiers=entries,
                        common_files=common, sha256=sha, schema_hash=schema_hash(config))
    write_manifest(src, manifest)
    log.info("wrote %s listing %s", src / MANIFEST_NAME, [e.name for e in entries])
    return manifest


def _kept_entries(src: Path, sha: dict[str, str], base_files: list[str], replaced: set[str]) -> list[TierEntry]:
    """Entries of the previous manifest worth keeping (and their hashes copied into `sha`)."""
    try:
        old = read_manifest(src)
    except CheckpointError as exc:
        log.warning("ignoring the previous manifest: %s", exc)
        return []
    if old is None:
        return []
    if any(old.sha256.get(rel) != sha[rel] for rel in base_files):
        log.info("the universal weights changed since the previous manifest; its other tiers are dropped")
        return []
    kept = [e for e in old.tiers if e.name not in replaced]
    for e in kept:
        for rel in e.files:
            sha[rel] = old.sha256[rel]
    return kept
