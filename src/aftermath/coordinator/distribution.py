"""How a round's accepted set reaches the clients: decided once, when the set is fixed. Pure: no sockets, no files.

Data planes (network.data_plane):
- "payloads": every client downloads the N - 1 other accepted payloads and aggregates them itself.
- "update": the coordinator aggregates once and publishes the round's update as one blob (aftermath.optim.update);
  every client downloads that blob alone. Which bits it holds is checked by `witnesses` members, chosen by a hash
  of (run, step, client) among the accepted: they download the payloads, verify every signature, recompute the
  update on their region and attest whether its bits agree.
- "auto": "update" when the accepted payloads together are larger than the update blob, else "payloads".

Trust: a client applies what the coordinator's state names (the update's sha256 is in its view, so a blob from
object storage or any mirror is checked against it). The coordinator already decides the accepted set; the
witnesses make a wrong aggregate (a bug, a corrupted store, a tampering coordinator) visible: a disagreement is
logged, counted in the summary, and the witness applies its own computation (its replica then differs from the
coordinator's, which the epoch's hash check reports).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from aftermath.round.protocol import UpdateView


@dataclass
class RoundDistribution:
    step: int
    plane: str  # "payloads" | "update"
    accepted: int  # results in the set
    payload_bytes: int  # their payloads together
    accepted_digest: str  # aftermath.optim.update.accepted_digest of the set
    witnesses: list[str]
    update: UpdateView | None = None  # once published
    signature: str = ""  # the coordinator's signature of (accepted set, update blob): aftermath.crypto.round_message
    attestations: dict[str, bool] = field(default_factory=dict)  # witness -> agrees


def choose_plane(configured: str, payload_bytes: int, update_bytes: int) -> str:
    if configured != "auto":
        return configured
    return "update" if payload_bytes > update_bytes else "payloads"


def choose_witnesses(run_id: str, step: int, accepted: list[str], count: int) -> list[str]:
    """`count` of the accepted clients, by a hash of (run, step, client): each round its own, spread evenly."""
    ranked = sorted(accepted, key=lambda cid: hashlib.sha256(f"{run_id}:{step}:{cid}".encode()).hexdigest())
    return sorted(ranked[:count])


def distribute(run_id: str, step: int, accepted: list[tuple[str, str, int]], configured: str, update_bytes: int,
               witnesses: int, digest: str) -> RoundDistribution:
    """The distribution of `step`'s accepted set, given as (client id, blob, payload bytes)."""
    payload_bytes = sum(size for _, _, size in accepted)
    plane = choose_plane(configured, payload_bytes, update_bytes) if accepted else "payloads"
    chosen = choose_witnesses(run_id, step, [cid for cid, _, _ in accepted], witnesses) if plane == "update" else []
    return RoundDistribution(step=step, plane=plane, accepted=len(accepted), payload_bytes=payload_bytes,
                             accepted_digest=digest, witnesses=chosen)
