"""Checkpoints: HF-format model directories, tier export, manifests, loading strategies."""
