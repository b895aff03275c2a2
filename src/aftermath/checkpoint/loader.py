"""Loading a tier: one resolver for local directories and hub repos, three strategies.

- `auto`: the sliced tier if the manifest lists it and every file is present and matches its sha256;
  otherwise the universal checkpoint sliced at run time (the log and `reason` say which, and why).
- `sliced`: the sliced tier or a CheckpointError (missing tier, missing file, hash mismatch).
- `universal`: the full checkpoint, sliced at run time.

A checkpoint that is already a tier is never sliced again: `universal` on it is an error; `auto`/`sliced` use
it as it is when it is the tier asked for. Every file loaded through a manifest is sha256-verified.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from aftermath.checkpoint import hub
from aftermath.checkpoint.export import check_source_weights
from aftermath.checkpoint.manifest import Manifest, TierEntry, read_manifest, resolve_in_root, verify_files
from aftermath.checkpoint.schema import check_geometry, read_config, schema_hash
from aftermath.checkpoint.streaming import PrefixReader, tensor_headers, tensor_locations
from aftermath.errors import CheckpointError
from aftermath.model import MatFormerConfig, MatFormerLM, TierSpec, mix_spec, param_shapes, parse_spec, sliced_config, \
    tier_spec

log = logging.getLogger("aftermath.checkpoint")

STRATEGIES = ("auto", "sliced", "universal")


@dataclass
class ResolvedCheckpoint:
    """What loading `source` at a tier will read, and why."""

    source: str
    requested: str  # the strategy asked for
    strategy: str  # how the weights are obtained: "sliced" (a tier directory) or "universal" (sliced at run time)
    reason: str
    directory: Path  # the directory whose weights are read
    files: list[Path]  # the files read; sha256-verified when `verified`
    verified: bool
    spec: TierSpec  # the geometry of the model that is built
    config: MatFormerConfig  # its config
    universal_config: MatFormerConfig | None  # the base model's config (None when only a tier is at hand)
    schema_hash: str
    manifest: Manifest | None = None
    hub_allow_patterns: list[str] | None = None  # the selection passed to snapshot_download (hub sources)
    hub_ignore_patterns: list[str] | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source, "requested": self.requested, "strategy": self.strategy, "reason": self.reason,
            "directory": str(self.directory), "files": [str(f) for f in self.files], "verified": self.verified,
            "spec": self.spec.to_json(), "schema_hash": self.schema_hash,
            "transformers_compatible": self.config.transformers_compatible,
            "hub_allow_patterns": self.hub_allow_patterns, "hub_ignore_patterns": self.hub_ignore_patterns,
            "notes": self.notes,
        }


# ---------------------------------------------------------------------------------------------- public
def resolve_checkpoint(source: str | Path, tier: int | None = None, spec: str | None = None,
                       strategy: str = "auto", *, revision: str | None = None,
                       cache_dir: str | Path | None = None) -> ResolvedCheckpoint:
    """Decide what to load for `tier` (or Mix'n'Match `spec`: `NAME=w0,...` or a name the manifest lists).

    `source` is a local model directory (a Path, or a string `hub.looks_local` reads as a path) or a hub repo id
    (`OWNER/REPO[/FOLDER]`). With neither tier nor spec, the checkpoint's own geometry is loaded. Files are
    verified here; errors are CheckpointError/TierError.
    """
    if strategy not in STRATEGIES:
        raise CheckpointError(f"strategy {strategy!r} is unknown; use one of {', '.join(STRATEGIES)}")
    if tier is not None and spec is not None:
        raise CheckpointError("give a tier or a spec, not both")
    path = Path(source)
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; give the model directory that holds config.json")
        path = path.absolute()
        return _resolve_dir(str(source), path, path.parent, tier, spec, strategy)
    if isinstance(source, Path) or hub.looks_local(source):  # fail now: the hub would retry a typo for ~25 s
        hint = f"; write hf://{source} to fetch that repo" if hub.parse_source(str(source)) else ""
        raise CheckpointError(f"no such directory: {source}; check the path (it is neither a local directory nor a "
                              f"hub repo id, which looks like owner/name{hint})")
    src = hub.parse_source(str(source))
    if src is None:
        raise CheckpointError(f"{source} is neither a local directory nor a hub repo id (OWNER/REPO[/FOLDER])")
    return _resolve_hub(str(source), src, tier, spec, strategy, revision, cache_dir)


def load_tier_model(source: str | Path, tier: int | None = None, strategy: str = "auto", spec: str | None = None,
                    **kwargs: Any) -> tuple[MatFormerLM, ResolvedCheckpoint]:
    """Build the model of `tier` holding only that tier's weights (read region by region from disk)."""
    resolved = resolve_checkpoint(source, tier=tier, spec=spec, strategy=strategy, **kwargs)
    model = MatFormerLM(resolved.config)
    read_weights_into(model, resolved.directory)
    return model, resolved


def read_weights_into(model: MatFormerLM, directory: Path) -> None:
    """Fill `model` with the prefix regions of the tensors in `directory` (its own size or the universal one)."""
    state = model.state_dict()
    with PrefixReader(directory) as reader:
        missing = sorted(set(state) - set(reader.locations))
        extra = sorted(set(reader.locations) - set(state))
        if missing or extra:
            raise CheckpointError(f"{directory}: weights do not match the model (missing {missing[:3]}, "
                                  f"unexpected {extra[:3]})")
        with torch.no_grad():
            for name, tensor in state.items():
                tensor.copy_(reader.read(name, tuple(tensor.shape)).to(tensor.dtype))


# ---------------------------------------------------------------------------------------------- local
def _target_spec(base: MatFormerConfig, manifest: Manifest | None, tier: int | None, spec: str | None,
                 own: TierSpec) -> TierSpec:
    if spec is not None:
        if "=" in spec:
            return parse_spec(base, spec)
        entry = manifest.entry(name=spec) if manifest else None
        if entry is None or entry.tier is not None:
            listed = [e.name for e in manifest.tiers if e.tier is None] if manifest else []
            raise CheckpointError(f"spec {spec!r} is not in the manifest (specs listed: {listed}); give it as "
                                  f"NAME=w0,w1,... to slice the universal model at run time")
        return _entry_spec(base, entry)
    if tier is not None:
        return tier_spec(base, tier)
    return own


def _entry_spec(base: MatFormerConfig, entry: TierEntry) -> TierSpec:
    """The geometry a manifest entry describes (checked against the geometry rules for a nested tier)."""
    if entry.tier is not None:
        spec = tier_spec(base, entry.tier)
        layer = spec.layers[0]
        heads = entry.num_attention_heads or layer.q_heads
        if entry.layer_intermediate_sizes or (entry.intermediate_size, heads) != (layer.ffn_width, layer.q_heads):
            raise CheckpointError(
                f"the manifest's {entry.name} says FFN {entry.intermediate_size} / {heads} heads; tier {entry.tier} "
                f"of this model has FFN {layer.ffn_width} / {layer.q_heads} heads; re-export the tiers")
        return spec
    widths = entry.layer_intermediate_sizes or [entry.intermediate_size] * base.num_hidden_layers
    heads = [entry.num_attention_heads or base.matformer_base_num_attention_heads] * base.num_hidden_layers
    return mix_spec(base, entry.name, widths, heads)


def _resolve_dir(label: str, model_dir: Path, root: Path, tier: int | None, spec: str | None, strategy: str,
                 on_fallback: Callable[[], None] | None = None) -> ResolvedCheckpoint:
    manifest = read_manifest(model_dir)
    if manifest is not None:
        for rel in manifest.all_files():  # reject absolute or escaping paths before anything is read
            resolve_in_root(model_dir, rel, root)
        base_entry = manifest.entry(tier=0)
        if base_entry is not None and "config.json" in base_entry.files:  # the config we are about to trust
            verify_files(manifest, model_dir, root, ["config.json"])
    config = read_config(model_dir, manifest.base_intermediate_size if manifest else None)
    own = check_geometry(config, where=str(model_dir / "config.json"))
    base = config.base()
    digest = schema_hash(config)
    target = _target_spec(base, manifest, tier, spec, own)

    def result(**kw: Any) -> ResolvedCheckpoint:
        return ResolvedCheckpoint(source=label, requested=strategy, schema_hash=digest, manifest=manifest,
                                  universal_config=base if config.is_universal else None, **kw)

    # The source is itself a tier: never slice it again.
    if not config.is_universal:
        kind = f"tier {config.matformer_tier}" if config.matformer_tier >= 0 else f"spec {own.name!r}"
        hint = (f"load the tier from the universal checkpoint's directory (the one holding "
                f"matformer_manifest.json), or use --strategy auto to load this {kind} as it is")
        if strategy == "universal":
            raise CheckpointError(f"{model_dir} is already sliced ({kind}); --strategy universal needs the full "
                                  f"checkpoint and a tier is never sliced twice: {hint}")
        if target.layers != own.layers:
            raise CheckpointError(f"{model_dir} is already sliced ({kind}) and cannot give {target.name}: a tier "
                                  f"is never sliced twice; {hint}")
        files = _check_weights(model_dir, config)
        return result(strategy="sliced", reason=f"the source is already {kind}; used as it is", directory=model_dir,
                      files=files, verified=False, spec=own, config=config)

    if manifest is not None:
        _check_manifest_matches(manifest, config, digest, model_dir)

    def universal(reason: str) -> ResolvedCheckpoint:
        files, verified = _verify_universal(manifest, model_dir, root, config)
        model_config = base if target.layers == own.layers else sliced_config(base, target)
        return result(strategy="universal", reason=reason, directory=model_dir, files=files, verified=verified,
                      spec=target if target.layers != own.layers else own, config=model_config)

    if target.layers == own.layers:
        return universal("tier 0 is the universal checkpoint itself")
    if strategy == "universal":
        return universal(f"--strategy universal: the full checkpoint, sliced to {target.name} at run time")
    try:
        return _sliced(result, manifest, model_dir, root, target, base, digest)
    except CheckpointError as exc:
        if strategy == "sliced":
            raise
        if on_fallback is not None:
            on_fallback()
        log.warning("%s: using the universal checkpoint sliced at run time, because %s", target.name, exc)
        return universal(f"sliced {target.name} not usable ({exc}); the universal checkpoint is sliced at run time")


def _sliced(result: Callable[..., ResolvedCheckpoint], manifest: Manifest | None, model_dir: Path, root: Path,
            target: TierSpec, base: MatFormerConfig, digest: str) -> ResolvedCheckpoint:
    if manifest is None:
        raise CheckpointError(f"{model_dir} has no matformer_manifest.json, so no verified sliced {target.name}; "
                              f"export it with `aftermath export-tiers --src {model_dir} ...`")
    entry = manifest.entry(tier=target.tier) if target.tier is not None else manifest.entry(name=target.name)
    if entry is None:
        raise CheckpointError(f"the manifest of {model_dir} lists no {target.name} (it lists "
                              f"{[e.name for e in manifest.tiers]}); export it with `aftermath export-tiers`")
    if _entry_spec(base, entry).layers != target.layers:
        raise CheckpointError(f"the manifest's {entry.name} has other widths than {target.name} "
                              f"{list(target.ffn_widths)}; re-export it or give the spec by name")
    configs = [f for f in entry.files if posixpath.basename(f) == "config.json"]
    if len(configs) != 1:
        raise CheckpointError(f"the manifest's {entry.name} must list exactly one config.json, lists {configs}")
    files = verify_files(manifest, model_dir, root, [*entry.files, *manifest.common_files])
    tier_dir = resolve_in_root(model_dir, configs[0], root).parent
    tier_config = read_config(tier_dir, manifest.base_intermediate_size)
    tier_own = check_geometry(tier_config, where=str(tier_dir / "config.json"))
    if tier_own.layers != target.layers or schema_hash(tier_config) != digest:
        raise CheckpointError(f"{tier_dir}/config.json does not describe {target.name} of this model; re-export it")
    weight_files = {p.resolve() for p in tensor_locations(tier_dir).values()}
    unlisted = sorted(str(p) for p in weight_files - {f.resolve() for f in files})
    if unlisted:
        raise CheckpointError(f"{tier_dir} reads weight files the manifest does not list: {unlisted}; re-export it")
    _check_weights(tier_dir, tier_config)
    return result(strategy="sliced", reason=f"sliced {entry.name} listed in the manifest, all files verified",
                  directory=tier_dir, files=files, verified=True, spec=tier_own, config=tier_config)


def _check_manifest_matches(manifest: Manifest, config: MatFormerConfig, digest: str, model_dir: Path) -> None:
    if manifest.base_intermediate_size != config.matformer_base_intermediate_size:
        raise CheckpointError(
            f"{model_dir}/matformer_manifest.json is for base width {manifest.base_intermediate_size}, the model has "
            f"{config.matformer_base_intermediate_size}: the manifest belongs to another model; re-export the tiers")
    if manifest.schema_hash is not None and manifest.schema_hash != digest:
        raise CheckpointError(
            f"{model_dir}/matformer_manifest.json has schema hash {manifest.schema_hash[:12]}..., the model's config "
            f"{digest[:12]}...: the manifest belongs to another architecture; re-export the tiers")


def _verify_universal(manifest: Manifest | None, model_dir: Path, root: Path,
                      config: MatFormerConfig) -> tuple[list[Path], bool]:
    entry = manifest.entry(tier=0) if manifest else None
    if entry is None:
        return _check_weights(model_dir, config), False
    files = verify_files(manifest, model_dir, root, [*entry.files, *manifest.common_files])
    _check_weights(model_dir, config)
    return files, True


def _check_weights(directory: Path, config: MatFormerConfig) -> list[Path]:
    """The weight files of `directory`, after checking their headers hold exactly `config`'s tensors."""
    if config.is_universal:
        check_source_weights(directory, config)
    else:
        headers = tensor_headers(directory)
        shapes = param_shapes(config)
        if {n: e.shape for n, e in headers.items()} != dict(shapes):
            bad = sorted(n for n in set(shapes) | set(headers)
                         if n not in headers or n not in shapes or headers[n].shape != shapes[n])
            raise CheckpointError(f"{directory}: weights do not match config.json (e.g. {bad[:3]})")
    return sorted(set(tensor_locations(directory).values()))


# ---------------------------------------------------------------------------------------------- hub
def _resolve_hub(label: str, src: hub.HubSource, tier: int | None, spec: str | None, strategy: str,
                 revision: str | None, cache_dir: str | Path | None) -> ResolvedCheckpoint:
    manifest_path, commit = hub.fetch_manifest(src, revision, cache_dir)
    manifest = None
    if manifest_path is not None:
        manifest = read_manifest(manifest_path.parent)
    allow, ignore = hub.universal_patterns(src, manifest)
    wants_tier = strategy != "universal" and (spec is not None or tier not in (None, 0))
    if manifest is not None and wants_tier:
        name = spec.partition("=")[0] if spec is not None else f"tier{tier}"
        entry = manifest.entry(name=name)
        if entry is not None:
            allow, ignore = hub.tier_patterns(src, manifest, entry), None
        elif strategy == "sliced":
            raise CheckpointError(f"the manifest of {label} lists no {name} (it lists "
                                  f"{[e.name for e in manifest.tiers]})")
    root = hub.download(src, allow, ignore, commit, cache_dir)
    model_dir = root / src.subfolder if src.subfolder else root
    selection = {"allow": allow, "ignore": ignore}

    def fetch_universal() -> None:
        selection["allow"], selection["ignore"] = hub.universal_patterns(src, manifest)
        hub.download(src, selection["allow"], selection["ignore"], commit, cache_dir)

    resolved = _resolve_dir(label, model_dir, root, tier, spec, strategy, on_fallback=fetch_universal)
    resolved.hub_allow_patterns = selection["allow"]
    resolved.hub_ignore_patterns = selection["ignore"]
    return resolved
