"""Checkpoints: HF-format model directories, tier export, manifests, loading strategies."""

from aftermath.checkpoint.export import export_tiers, tier_directory
from aftermath.checkpoint.loader import ResolvedCheckpoint, load_tier_model, resolve_checkpoint
from aftermath.checkpoint.manifest import MANIFEST_NAME, Manifest, TierEntry, read_manifest
from aftermath.checkpoint.schema import read_config, schema_hash

__all__ = [
    "export_tiers", "tier_directory", "ResolvedCheckpoint", "load_tier_model", "resolve_checkpoint",
    "MANIFEST_NAME", "Manifest", "TierEntry", "read_manifest", "read_config", "schema_hash",
]
