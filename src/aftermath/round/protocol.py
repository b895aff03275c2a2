"""The protocol of a run: every message between the coordinator and its clients, as pydantic models defined
once. Requests are validated by the coordinator (extra keys refused; `/openapi.json` is generated from these
models); answers and the state snapshot are built by the coordinator and parsed by the client, the testnet,
the dashboard and the tests. `RoundRecord` is the client's per-round metrics line.
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

MAX_STATS = 32
Phase = Literal["WaitingForMembers", "Warmup", "RoundTrain", "RoundWitness", "Cooldown", "Finished"]
MemberStatus = Literal["pending", "member", "gone"]
SHA256 = r"^[0-9a-f]{64}$"


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")


def check_stats(stats: dict[str, Any]) -> dict[str, Any]:
    """A client's self-reported stats: a few flat, finite, short values (never nested: bounded memory)."""
    if len(stats) > MAX_STATS:
        raise ValueError(f"at most {MAX_STATS} stats, got {len(stats)}")
    for key, value in stats.items():
        if len(key) > 64 or not isinstance(value, (int, float, str, type(None))) or isinstance(value, bool):
            raise ValueError(f"stat {key[:64]!r} must be a number, a short string or null")
        if isinstance(value, str) and len(value) > 256:
            raise ValueError(f"stat {key!r} is longer than 256 characters")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"stat {key!r} is not finite")
    return stats


class WithStats(Message):
    stats: dict[str, Any] = Field(default_factory=dict, description="the client's loss, bytes, tokens/s, memory")
    _stats = field_validator("stats")(check_stats)


# ------------------------------------------------------------------------------------------ requests
class JoinRequest(Message):
    token: str = Field(max_length=256)
    name: str = Field("", max_length=48, pattern=r"^[A-Za-z0-9_.-]*$")
    tier: StrictInt | None = Field(None, ge=0, le=64)
    spec: str | None = Field(None, max_length=1024)
    device: str = Field("cpu", max_length=64)
    memory_bytes: StrictInt = Field(0, ge=0, le=2**60)
    throughput: float = Field(1.0, gt=0, le=1e9)
    schema_hash: str = Field(max_length=128)
    public_key: str | None = Field(None, pattern=r"^[0-9a-f]{64}$",
                                   description="the client's ed25519 public key (hex); commits must be signed with it")


class HeartbeatRequest(WithStats):
    pass


class ReadyRequest(Message):
    epoch: StrictInt = Field(ge=0)


class CommitRequest(WithStats):
    step: StrictInt = Field(ge=0)
    blob: str = Field(pattern=SHA256)
    sequences: StrictInt = Field(gt=0)
    train_seconds: float = Field(ge=0, le=1e6)
    overhead_seconds: float = Field(0.0, ge=0, le=1e6, description=(
        "its last round's time outside training on its critical path (data, encode, upload, apply): the batch "
        "split balances round times with it"))
    loss: float
    signature: str | None = Field(None, pattern=r"^[0-9a-f]{128}$",
                                  description="ed25519 signature of the commitment (aftermath.crypto)")

    @field_validator("loss")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("loss must be finite")
        return value


# A commit with its payload in one request (POST /commit): a little-endian uint32 length, the CommitRequest's
# JSON, then the payload bytes, whose sha256 must be the request's `blob`.
COMMIT_WITH_BLOB = "application/x-aftermath-commit"


def pack_commit(request: CommitRequest, blob: bytes) -> bytes:
    text = request.model_dump_json().encode()
    return len(text).to_bytes(4, "little") + text + blob


def unpack_commit(body: bytes, max_json: int) -> tuple[Any, bytes]:
    """(the request's parsed JSON, the payload bytes) of a packed commit; ValueError naming what is wrong."""
    if len(body) < 4:
        raise ValueError(f"a {COMMIT_WITH_BLOB} body starts with a 4-byte length; this one has {len(body)} bytes")
    size = int.from_bytes(body[:4], "little")
    if size > max_json or 4 + size > len(body):
        raise ValueError(f"the commit's JSON length {size} does not fit the body of {len(body)} bytes (at most "
                         f"{max_json})")
    try:
        return json.loads(body[4:4 + size]), body[4 + size:]
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"the commit's JSON is not valid: {exc}") from exc


class AppliedRequest(Message):
    step: StrictInt = Field(ge=0)


class WitnessRequest(Message):
    step: StrictInt = Field(ge=0)
    update: str = Field(pattern=SHA256, description="the update blob the witness checked")
    agrees: bool = Field(description="the update recomputed from the accepted payloads has the same bits on the "
                                     "witness's region")


class HashRequest(WithStats):
    epoch: StrictInt = Field(ge=0)
    step: StrictInt = Field(ge=0)
    weights_sha256: str = Field(pattern=SHA256)


REQUESTS: dict[str, type[Message]] = {m.__name__: m for m in (
    JoinRequest, HeartbeatRequest, ReadyRequest, CommitRequest, AppliedRequest, WitnessRequest, HashRequest)}


# ------------------------------------------------------------------------------------------ the state
class MemberView(Message):
    id: str
    tier: int | None
    spec: str
    device: str
    memory_bytes: int
    status: MemberStatus
    throughput: float
    ready_epoch: int
    rounds_contributed: int
    last_seen: float
    stats: dict[str, Any]
    public_key: str
    resync_epoch: int = Field(description="the epoch at whose end its replica was found to differ (-1: never)")
    excluded: str = Field("", description="why the coordinator's screen excluded it from the run (then it is gone "
                          "and may not join again); empty: not excluded")
    strikes: int = Field(0, description="its results the screen left out within the last trust.strike_rounds rounds")


class CommitView(Message):
    blob: str
    tier: int | None
    spec: str
    signature: str


class AcceptedResult(Message):
    """One result of a round's accepted set: every replica applies exactly these, sorted by client id."""

    client_id: str
    step: int
    blob: str
    tier: int | None
    spec: str
    sequences: int
    train_seconds: float
    loss: float
    signature: str


class RoundView(Message):
    step: int
    epoch: int
    started_at: float
    assignments: dict[str, tuple[int, int]] = Field(description="client id -> global sequences [start, end)")
    committed: list[str]
    commits: dict[str, CommitView]
    accepted: list[AcceptedResult] | None = Field(description="published when the round's training ends")
    screened: dict[str, str] = Field(default_factory=dict, description=(
        "client id -> why the coordinator's screen left its result out of the accepted set (aftermath.coordinator."
        "trust)"))
    applied: list[str]


class CheckpointPointer(Message):
    epoch: int = Field(description="the last epoch whose checkpoint is written (-1: the initial model)")
    step: int


class StateSnapshot(Message):
    """GET /state: the run as the state machine sees it (the round shown is the current or the last one)."""

    version: int
    run_id: str
    phase: Phase
    paused: bool
    phase_started: float
    deadline: float | None
    seconds_left: float | None
    epoch: int
    step: int
    total_steps: int
    rounds_per_epoch: int
    global_batch_size: int
    sequences_per_round: int = Field(description="a round's sequences: global_batch_size x optimizer.local_steps")
    round: RoundView | None
    previous_round: RoundView | None = Field(None, description=(
        "overlapped rounds: the round before `round`, whose accepted set the members apply while they train"))
    checkpoint: CheckpointPointer
    members: list[MemberView]
    finished: bool = Field(False, description="the summary is written")

    def member(self, client_id: str) -> MemberView | None:
        return next((m for m in self.members if m.id == client_id), None)


# ------------------------------------------------------------------------------------------ a client's view
class UpdateView(Message):
    blob: str = Field(description="sha256 of the round's update blob (aftermath.optim.update)")
    bytes: int
    url: str | None = Field(None, description="where to download it without the coordinator (object storage)")


class ResultView(Message):
    """A round's accepted set, as one client needs it: how big it is and where its update is."""

    accepted: int = Field(description="results in the accepted set")
    payload_bytes: int = Field(description="their payloads' bytes together")
    plane: Literal["payloads", "update"] = Field(description=(
        "payloads: fetch the accepted payloads (GET /rounds/{step}) and aggregate them; update: apply the "
        "published update blob (a witness also checks it against the payloads)"))
    update: UpdateView | None = Field(description="published once the coordinator has computed it (data planes "
                                                  "'update' and 'auto')")
    witness: bool = Field(description="this client recomputes the update from the payloads and attests it")
    accepted_digest: str = Field(description="sha256 of the accepted set (aftermath.optim.update.accepted_digest)")
    signature: str | None = Field(None, description=(
        "the coordinator's signature of the round's decision: accepted set and update blob "
        "(aftermath.crypto.round_message)"))


class ClientRoundView(Message):
    step: int
    epoch: int
    started_at: float
    assignment: tuple[int, int] | None = Field(description="this client's global sequences [start, end)")
    assignment_signature: str | None = Field(None, description=(
        "the coordinator's signature of the assignment (aftermath.crypto.assignment_message)"))
    first: int = Field(description="the step's first global sequence")
    committed: bool = Field(description="this client's result is in")
    result: ResultView | None = Field(description="published when the round's training ends")


class ClientView(Message):
    """GET /view: what one client needs of the run, the same size whatever the number of clients. Its version
    changes only with what a client acts on (phases, rounds, accepted sets, updates, member status), not with
    every commit, applied call or heartbeat."""

    version: int
    run_id: str
    phase: Phase
    paused: bool
    deadline: float | None
    seconds_left: float | None
    epoch: int
    step: int
    total_steps: int
    data_plane: Literal["payloads", "update", "auto"]
    checkpoint: CheckpointPointer
    me: MemberView
    round: ClientRoundView | None
    previous_round: ClientRoundView | None = Field(description=(
        "overlapped rounds: the round before `round`, whose accepted set the members apply while they train"))
    catch_up: ClientRoundView | None = Field(None, description=(
        "a round older than `previous_round` this client has not applied yet (it fell behind): apply it first"))
    finished: bool = Field(False, description="the summary is written")


class RoundDetail(Message):
    """GET /rounds/{step}: a round's whole accepted set, for the clients that apply it from the payloads and
    for its witnesses (O(N): fetched once per round by those that need it)."""

    step: int
    epoch: int
    accepted: list[AcceptedResult]
    assignments: dict[str, tuple[int, int]] = Field(description="the accepted clients' ranges (signed)")
    public_keys: dict[str, str] = Field(description="the accepted clients' ed25519 keys")
    update: UpdateView | None
    accepted_digest: str = Field(description="sha256 of the accepted set (aftermath.optim.update.accepted_digest)")
    witnesses: list[str]
    urls: dict[str, str] = Field(default_factory=dict, description=(
        "blob sha256 -> where to download it without the coordinator (object storage); the others: GET /blobs"))
    signature: str | None = Field(None, description="the coordinator's signature of the round's decision, as in "
                                                    "ResultView")


# ------------------------------------------------------------------------------------------ answers
class OkAnswer(Message):
    ok: bool = True


class HeartbeatAnswer(OkAnswer):
    version: int


class HashAnswer(OkAnswer):
    match: bool | None = Field(description="equal to the coordinator's reference; None: not computed yet")
    resync: bool = Field(description="the replica differs: reload the checkpoint at the next warmup")


class RunInfo(Message):
    run: dict[str, Any] = Field(description="the run config without the token (aftermath.runconfig.RunConfig)")
    model_config_: dict[str, Any] = Field(alias="model_config", description="the universal MatFormerConfig")
    schema_hash: str
    coordinator_key: str = Field(description=(
        "the coordinator's ed25519 public key (hex): it signs accepted sets, assignments and checkpoints; pin it "
        "with `aftermath client --coordinator-key`"))

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class JoinAnswer(RunInfo):
    client_id: str
    session: str = Field(description="send as 'Authorization: Bearer SESSION' on every later call")
    spec: dict[str, Any]
    status: MemberStatus
    view: ClientView


class HealthAnswer(OkAnswer):
    run_id: str
    phase: Phase
    step: int
    epoch: int


class CheckpointInfo(Message):
    """checkpoint.json of the current checkpoint."""

    run_id: str
    epoch: int
    step: int
    schema_hash: str
    optimizer: str
    weights_sha256: dict[str, str] = Field(description="spec name -> replica hash")
    val_loss: dict[str, float]
    written_at: float


class CheckpointAnswer(Message):
    info: CheckpointInfo
    model_dir: str
    manifest: dict[str, Any] | None = Field(description="matformer_manifest.json of the universal model")
    signature: str | None = Field(None, description=(
        "the coordinator's signature of info and manifest (aftermath.crypto.checkpoint_message)"))


class ErrorAnswer(Message):
    error: str


# ------------------------------------------------------------------------------------------ the summary
class ClientSummary(Message):
    id: str
    tier: int | None
    spec: str
    status: MemberStatus
    final_loss: float | None
    weights_sha256: str | None = Field(description="its last reported replica hash")
    bytes_up: int
    bytes_down: int
    rounds_contributed: int
    tokens: int
    tokens_per_s: float | None


class HashMismatch(Message):
    epoch: int
    client_id: str
    spec: str
    reported: str
    expected: str


class UpdateDispute(Message):
    step: int
    witness: str
    update: str = Field(description="the published update blob it found wrong")


class ScreenedResult(Message):
    step: int
    client_id: str
    reason: str = Field(description="why the coordinator's screen left its result out of the accepted set")


class Exclusion(Message):
    client_id: str
    step: int = Field(description="the step of its last flagged result")
    reason: str


class TierResult(Message):
    """Held-out loss of an exported tier or an evaluated Mix'n'Match spec over the run's checkpoints."""

    val_loss: float | None
    initial_val_loss: float | None
    best_val_loss: float | None = None
    regressed: bool = Field(False, description=(
        "the last checkpoint's loss is above the best earlier one by more than aftermath.round.objective."
        "REGRESSION_MARGIN: the run exports a model that got worse"))


class RunSummary(Message):
    """summary.json. `replicas_consistent` is true only when at least one replica hash was compared with the
    coordinator's reference and every member's LAST compared hash matched: a replica that diverged and
    recovered (a later hash matched) does not make it false; one that diverged and never matched again does,
    and is listed in `unrecovered`."""

    run_id: str
    steps: int = Field(description="rounds completed (optimizer steps; with local steps, outer rounds)")
    local_steps: int = Field(1, description="optimizer.local_steps: inner steps per round (per-inner-step bytes "
                             "are a client's bytes_up / rounds_contributed / local_steps)")
    epochs: int
    replicas_consistent: bool
    hashes_checked: int
    divergences: list[HashMismatch] = Field(description="every hash that differed from the reference")
    unrecovered: list[HashMismatch] = Field(description="clients whose last compared hash differed")
    clients: list[ClientSummary]
    tiers: dict[str, TierResult]
    rejected: int
    rate_limited: int
    updates_published: int = Field(0, description="rounds sent to the clients as one update blob (data plane)")
    updates_witnessed: int = Field(0, description="witness verdicts that a published update is the payloads' own")
    update_disputes: list[UpdateDispute] = Field(default_factory=list, description=(
        "witnesses that recomputed a published update from the accepted payloads and got other bits"))
    screened: list[ScreenedResult] = Field(default_factory=list, description=(
        "results the coordinator's screen left out of their round's accepted set ([trust]), with the reason"))
    excluded: list[Exclusion] = Field(default_factory=list, description=(
        "members excluded from the run for their flagged results, with the reason"))
    val_history: list[dict[str, Any]]
    checkpoint: str


# ------------------------------------------------------------------------------------------ metrics
class RoundRecord(Message):
    """The client's metrics line for one applied round (`event` = "round"), seconds and bytes."""

    event: Literal["round"] = "round"
    time: float | None = None
    client_id: str
    tier: int | None
    spec: str
    step: int
    phase: Phase = "RoundWitness"
    loss: float | None = Field(description="its training loss this round (None: it trained nothing)")
    tokens: int
    sequences: int
    tokens_per_s: float | None
    bytes_up: int
    bytes_down: int
    peak_memory: int
    payload_bytes: int | None
    accepted: int = Field(description="results in the accepted set it applied")
    t_data: float | None = Field(description="fetching its batch's tokens")
    batch_ahead: bool = Field(False, description="its batch came from the window fetched during the previous step")
    t_train: float | None = Field(description="forward/backward")
    t_encode: float | None = Field(description="encoding its payload")
    t_upload: float | None = Field(description="blob upload and commit")
    t_prefetch: float = Field(description="fetching and decoding the round's results while it trained the next step")
    prefetched: int
    t_download: float = Field(description="fetching the rest of the accepted set")
    t_decode: float
    t_aggregate: float = Field(description="aggregate + apply")
    data_plane: Literal["payloads", "update"] = Field("payloads", description=(
        "how it got the round: every accepted payload, or the coordinator's update blob"))
    witness: bool = Field(False, description="it recomputed the published update from the payloads and attested it")
    retries: int = Field(0, description="fp16: micro-batches computed again at a lower loss scale (overflow)")
    processes: int = Field(1, description="processes that computed the step (a data-parallel client's --nproc)")
    inner_steps: int = Field(1, description="optimizer.local_steps: the inner steps it took this round")
    faults: dict[str, int]
