"""The run configuration: one TOML file, validated by pydantic, every field with a documented default.

A run is data. `load_run_config(path)` reads a TOML file (sections as below) on top of the embedded
default run (`aftermath/configs/default.toml`); `RunConfig()` alone is that default. The command line
overrides a few fields (`with_overrides`). Unknown keys are errors, so a typo never goes unnoticed.
"""

from __future__ import annotations

import importlib.resources
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from aftermath.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Section):
    preset: str = Field("tiny", description="model preset of aftermath.model.preset_config: tiny, small, gpt2-124m")
    overrides: dict[str, Any] = Field(default_factory=dict,
                                      description="MatFormerConfig fields replacing the preset's (e.g. num_hidden_layers)")
    init: str = Field("", description="a universal checkpoint directory to start from; empty = initialise from `seed`")
    export_tiers: list[int] = Field(default_factory=lambda: [0, 1, 2],
                                    description="tiers exported beside the universal checkpoint at each epoch end")


class ScheduleSection(_Section):
    """Quorums and timeouts of the state machine (seconds), and the length of the run."""

    min_clients: int = Field(1, ge=1, description="the run goes on while at least this many clients remain")
    init_min_clients: int = Field(1, ge=1, description="clients needed before the first epoch's warmup starts")
    waiting_for_members_extra_time: float = Field(
        1.0, ge=0, description="after the quorum is reached, wait this long for more clients before warmup")
    warmup_time: float = Field(120.0, gt=0, description="longest warmup (clients download the model); "
                               "ends early when every member is ready")
    max_round_train_time: float = Field(60.0, gt=0, description="a round's training ends at this timeout even if "
                                        "results are missing (missing results are skipped by everyone)")
    round_witness_time: float = Field(60.0, gt=0, description="longest time for every member to apply the round's "
                                      "accepted set; a member that has not applied by then leaves the epoch and "
                                      "reloads the checkpoint at the next one")
    cooldown_time: float = Field(60.0, gt=0, description="longest wait at an epoch end for the replica hash reports")
    rounds_per_epoch: int = Field(20, ge=1, description="rounds (optimizer steps) per epoch; a checkpoint ends each")
    epoch_time: float = Field(0.0, ge=0, description="if > 0, an epoch also ends after this many seconds")
    global_batch_size: int = Field(32, ge=1, description="sequences per optimizer step, split among the round's "
                                   "clients (with optimizer.local_steps H: per inner step; a round carries H x it)")
    total_steps: int = Field(40, ge=1, description="optimizer steps of the whole run")
    heartbeat_interval: float = Field(1.0, gt=0, description="how often clients send a heartbeat")
    heartbeat_timeout: float = Field(15.0, gt=0, description="a client silent this long is dropped")
    overlap: bool = Field(True, description=(
        "overlapped rounds: step t+1 opens as soon as step t's accepted set is fixed, and each client trains t+1 "
        "while it downloads and applies t (its weights are still before t: it takes the gradient at them moved by "
        "its own payload of t, Psyche's look-ahead); false: every member applies step t before step t+1 opens"))

    @model_validator(mode="after")
    def _check(self) -> "ScheduleSection":
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise ValueError(f"heartbeat_timeout {self.heartbeat_timeout} must exceed heartbeat_interval "
                             f"{self.heartbeat_interval}")
        return self


class OptimizerSection(_Section):
    name: Literal["distro", "adamw", "muon"] = Field(
        "distro", description="distro: compressed DisTrO updates (sign-applied); adamw / muon: dense gradients "
        "averaged by region, the same step applied by every replica")
    lr: float = Field(3e-3, gt=0, description="peak learning rate")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="LR shape after the linear warmup")
    warmup_steps: int = Field(5, ge=0, description="linear LR warmup steps")
    final_lr_fraction: float = Field(0.1, ge=0, le=1, description="cosine: final LR as a fraction of `lr`")
    weight_decay: float = Field(0.0, ge=0, description="decoupled weight decay (matrices only)")
    distro: dict[str, Any] = Field(default_factory=dict, description=(
        "further aftermath.optim.DistroConfig fields: momentum_decay, chunk, min_chunk, topk, one_bit, "
        "value_dtype, apply_mode, average_over; empty = their defaults"))
    dense: dict[str, Any] = Field(default_factory=dict, description=(
        "further aftermath.optim.DenseConfig fields (adamw / muon): beta1, beta2, eps, muon_lr, muon_momentum, "
        "orthogonalizer, ortho_steps, ortho_dtype, muon_bands, value_dtype; empty = their defaults"))
    local_steps: int = Field(1, ge=1, le=1000, description=(
        "distro only: inner optimizer steps per round (SparseLoCo/DiLoCo outer rounds). 1: DisTrO, one exchange "
        "per step. H > 1: each client runs H local AdamW steps on its share (H inner batches of its range), then "
        "sends the compressed pseudo-gradient (weights at the round's start minus after the H steps) of its "
        "region; `lr` is then the outer (sign-apply) learning rate. A round carries H x global_batch_size "
        "sequences (docs/distro.md \"Local steps\")"))
    inner_lr: float = Field(1e-3, gt=0, description=(
        "local_steps > 1: peak learning rate of the inner AdamW (its state stays on the client; it follows the "
        "same warmup and schedule shape as `lr`)"))

    @model_validator(mode="after")
    def _check(self) -> "OptimizerSection":
        if self.local_steps > 1 and self.name != "distro":
            raise ValueError(f"local_steps {self.local_steps} needs optimizer.name = \"distro\" (the outer "
                             f"round's pseudo-gradient is DisTrO-compressed); set local_steps = 1 for {self.name}")
        return self


class TrainSection(_Section):
    micro_batch_size: int | Literal["auto"] = Field("auto", description=(
        "sequences per forward/backward on a client (gradients accumulate over micro-batches, so the client's "
        "batch and its gradient do not depend on it); auto: each client takes the largest power of two whose "
        "estimated peak fits its device's free memory (or --memory-limit) with headroom, and turns on activation "
        "checkpointing when not even 1 fits"))
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field("auto", description=(
        "the number format of a client's forward/backward (torch.autocast; the weights, the update rule and every "
        "replica stay fp32, so replicas stay bit-identical whatever each client uses). auto: bf16 on a CUDA GPU "
        "that has it, fp16 (with a dynamic loss scale) on an older one, fp32 on the CPU"))
    threads: int = Field(1, ge=1, description="torch threads per client process")
    objective: Literal["own", "sampled", "sum"] = Field("sampled", description=(
        "what a client wider than the narrowest exported tier trains. own: every sequence at its own tier. "
        "sampled (MatFormer's recipe): a share `own_share` of its sequences at its own tier, the rest spread "
        "over the exported tiers inside it, chosen per sequence from (seed, run, step, client), so every "
        "exported tier is trained as a model even when no client holds it. sum: every sequence at its own "
        "tier (weight own_share) and at each of those tiers (the rest, evenly): a forward and backward more "
        "per narrower tier (aftermath.round.objective). sampled is the default: measured in docs/results.md, it "
        "keeps every exported tier improving and costs the wider tiers nothing"))
    own_share: float = Field(0.5, gt=0, le=1, description=(
        "objective sampled: the share of a client's sequences trained at its own tier; sum: its loss's weight"))

    @field_validator("micro_batch_size", mode="before")
    @classmethod
    def _micro_batch(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError(f"{value!r} is neither a number of sequences (1 or more) nor \"auto\"")


class DataSection(_Section):
    dir: str = Field("", description="prepared token data directory; empty = the embedded Shakespeare corpus")
    seq_len: int = Field(128, ge=2, description="tokens per training sequence")
    source: Literal["coordinator", "local"] = Field(
        "coordinator", description="coordinator: clients fetch token batches from the coordinator; "
        "local: clients read the same data directory on their own disk")
    val_sequences: int = Field(32, ge=1, description="held-out sequences the coordinator evaluates per tier at each epoch end")


class NetworkSection(_Section):
    host: str = Field("127.0.0.1", description="address the coordinator listens on (0.0.0.0 for every interface)")
    port: int = Field(8700, ge=0, le=65535, description="coordinator port (0 = any free port)")
    token: str = Field("", description="run token a client must present to join; empty = a random one is "
                       "generated and printed at start")
    max_blob_bytes: int = Field(64 * 2**20, ge=1024, description="largest payload blob accepted")
    max_blob_storage_bytes: int = Field(2**30, ge=2**16, description="the coordinator keeps at most this many "
                                        "bytes of blobs; an upload beyond it is refused (507) until old rounds "
                                        "are collected (blobs of rounds older than 2 steps are deleted)")
    rate_limit: float = Field(50.0, ge=0, description="requests per second allowed per client (per address before "
                              "it joins), as a token bucket; 0 = no limit. Beyond it: 429 with Retry-After")
    rate_burst: int = Field(400, ge=1, description="token bucket size: requests a client may make at once")
    public_url: str = Field("", description="URL clients use to reach the coordinator, if not http://host:port")
    tls_cert: str = Field("", description="PEM certificate (chain) the coordinator serves https with; empty = no "
                          "TLS (--tls-cert and --tls self-signed win over it)")
    tls_key: str = Field("", description="PEM private key of tls_cert (--tls-key wins over it)")
    data_plane: Literal["auto", "payloads", "update"] = Field("auto", description=(
        "how a round's accepted set reaches the clients. payloads: every client downloads every accepted "
        "payload and aggregates them itself (N - 1 blobs per client). update: the coordinator aggregates once "
        "and publishes the round's update as one blob (about 1 bit per parameter for DisTrO), which every client "
        "applies; `witnesses` clients recompute it from the payloads and attest it. auto: update when the "
        "round's payloads together are larger than the update, else payloads. Every plane gives the same bits"))
    witnesses: int = Field(1, ge=0, le=16, description=(
        "members per round (data plane 'update') that download the accepted payloads, recompute the update and "
        "attest that its bits are theirs; a disagreement is logged, counted in the summary, and the witness "
        "applies its own computation"))


class StorageSection(_Section):
    """Where the coordinator keeps the clients' payload blobs (the `[storage]` section of a run config).

    No credentials here: the run config is served to clients. The coordinator reads them from its environment
    (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) or boto3's other usual sources."""

    backend: Literal["coordinator", "s3"] = Field(
        "coordinator", description="coordinator: the embedded disk store, blobs served by the coordinator; "
        "s3: an S3-compatible bucket (AWS S3, Cloudflare R2, MinIO), clients download from it directly")
    endpoint_url: str = Field("", description="the S3 API endpoint; empty = AWS's default endpoint for `region` "
                              "(e.g. https://<account>.r2.cloudflarestorage.com or http://minio:9000)")
    bucket: str = Field("", description="the bucket holding the blobs (must exist); required for backend s3")
    prefix: str = Field("", description="key prefix, e.g. \"runs/my-run/\" (empty or ending in '/'); keys are "
                        "{prefix}blobs/{sha[:2]}/{sha}")
    region: str = Field("us-east-1", description="the bucket's region (R2: \"auto\"; MinIO: its configured region)")
    presign_seconds: int = Field(900, ge=1, le=7 * 24 * 3600,
                                 description="lifetime of the presigned download URLs clients are redirected to")
    public_base_url: str = Field("", description="optional: when the bucket is publicly readable or behind a CDN, "
                                 "clients get {public_base_url}/{key} instead of a presigned URL")

    @model_validator(mode="after")
    def _check(self) -> "StorageSection":
        if self.backend == "s3" and not self.bucket:
            raise ValueError("storage.backend = \"s3\" needs storage.bucket, the name of an existing bucket")
        if self.prefix and (not self.prefix.endswith("/") or self.prefix.startswith("/")):
            raise ValueError(f"storage.prefix {self.prefix!r} must not start with '/' and must end with '/' "
                             f"(e.g. \"runs/my-run/\"), or be empty")
        for name in ("endpoint_url", "public_base_url"):
            value = getattr(self, name)
            if value and not re.match(r"https?://[^/]", value):
                raise ValueError(f"storage.{name} {value!r} must be an http:// or https:// URL, or empty")
        return self


class TrustSection(_Section):
    """How the coordinator screens a round's payloads before it accepts them, and when it excludes a member
    (the `[trust]` section; docs/reliability.md "Poisoned updates" says how each threshold was chosen)."""

    screen: bool = Field(True, description="screen every round's payloads (duplicates, norms, sign agreement, "
                         "reported loss); a flagged payload is left out of the accepted set and is a strike")
    min_agreement: float = Field(0.0, ge=-1, le=1, description=(
        "a payload whose sign agreement with the round's other payloads (on the coefficients they share; 1 = all "
        "agree, 0 = a coin, -1 = all disagree) is below this is flagged"))
    min_param_agreement: float = Field(-0.2, ge=-1, le=1, description=(
        "the same, for its worst parameter: an attack on one region (the embedding) is flagged there"))
    min_consensus: float = Field(0.2, ge=-1, le=1, description=(
        "agreement flags only in a round whose median agreement is at least this: honest payloads of tiny "
        "batches are mostly noise and agree with nobody"))
    min_shared_ratio: float = Field(0.25, ge=0, lt=1, description=(
        "a payload that shares (selects the same coefficients as another payload, where another covers the "
        "chunk) less than this times the round's median share is flagged: random indices share at chance level"))
    max_norm_ratio: float = Field(10.0, gt=1, description=(
        "a payload whose norm is above this many times the median of the round's payloads is flagged (raw-value "
        "wires only: a one-bit payload's norm is fixed)"))
    max_loss_ratio: float = Field(1.5, gt=1, description=(
        "a reported training loss above this many times the median the round's other clients reported, or below "
        "its inverse, is flagged"))
    duplicate_rounds: int = Field(8, ge=0, description=(
        "a payload with the body of one seen in the last this many rounds (any client's: a copy, a replay, the "
        "same payload again) is flagged"))
    strikes: int = Field(2, ge=1, description="flagged payloads within `strike_rounds` rounds that exclude a member "
                         "from the run")
    strike_rounds: int = Field(10, ge=1, description="the window, in rounds, in which strikes count")


class RunConfig(_Section):
    run_id: str = Field("aftermath-run", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$",
                        description="name of the run; mixed into seeds and payloads")
    seed: int = Field(0, ge=0, description="seed of the model initialisation and of every round")
    model: ModelSection = Field(default_factory=ModelSection)
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection)
    train: TrainSection = Field(default_factory=TrainSection)
    data: DataSection = Field(default_factory=DataSection)
    network: NetworkSection = Field(default_factory=NetworkSection)
    storage: StorageSection = Field(default_factory=StorageSection)
    trust: TrustSection = Field(default_factory=TrustSection)

    @model_validator(mode="after")
    def _check(self) -> "RunConfig":
        if self.schedule.init_min_clients < self.schedule.min_clients:
            raise ValueError(f"schedule.init_min_clients {self.schedule.init_min_clients} is below "
                             f"schedule.min_clients {self.schedule.min_clients}")
        return self

    @property
    def sequences_per_round(self) -> int:
        """Sequences one round trains, split among its clients: a global batch per inner step."""
        return self.schedule.global_batch_size * self.optimizer.local_steps

    def with_overrides(self, overrides: dict[str, Any]) -> "RunConfig":
        """A copy with dotted-key overrides applied, e.g. {"schedule.total_steps": 10}. None values are skipped."""
        data = self.model_dump()
        for key, value in overrides.items():
            if value is None:
                continue
            parts = key.split(".")
            node = data
            for part in parts[:-1]:
                if part not in node or not isinstance(node[part], dict):
                    raise ConfigError(f"unknown run config key {key!r}")
                node = node[part]
            if parts[-1] not in node and not (len(parts) >= 2 and parts[-2] in ("overrides", "distro", "dense")):
                raise ConfigError(f"unknown run config key {key!r}")
            node[parts[-1]] = value
        return parse_run_config(data, source="command-line overrides")

    def public(self) -> dict[str, Any]:
        """What a client may see (everything but the token and where the TLS key lives)."""
        data = self.model_dump()
        data["network"]["token"] = ""
        data["network"]["tls_cert"] = data["network"]["tls_key"] = ""
        return data


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("overrides", "distro", "dense"):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_run_config(data: dict[str, Any], source: str = "run config") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{source} is invalid: {problems}") from exc


def default_config_text() -> str:
    return importlib.resources.files("aftermath").joinpath("configs", "default.toml").read_text()


def load_run_config(path: str | Path | None = None) -> RunConfig:
    """The embedded default run, with the TOML file at `path` (if any) laid over it."""
    base = tomllib.loads(default_config_text())
    if path is None:
        return parse_run_config(base, source="the embedded default run")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"run config {path} does not exist; pass a TOML file (see docs/running.md)")
    try:
        top = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    return parse_run_config(_merge(base, top), source=str(path))
