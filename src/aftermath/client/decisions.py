"""A client acts only on decisions the coordinator signed (aftermath.crypto): the accepted set of a round (its
digest, and the update blob computed from it), this client's assignment, and the checkpoint it loads.

The coordinator's key is pinned (`--coordinator-key`, printed by the coordinator) or, when not given, taken from
the run info at the first contact; either way every later decision is checked against it, so a proxy or a cache
between the two (a TLS-terminating reverse proxy, an object store) cannot make this replica apply a set the other
replicas do not.
"""

from __future__ import annotations

from dataclasses import dataclass

from aftermath.crypto import (SignatureError, assignment_message, checkpoint_message, round_message,
                              verify_decision)
from aftermath.optim.update import RoundUpdate, accepted_digest
from aftermath.round.protocol import CheckpointAnswer, ClientRoundView, ResultView, RoundDetail


@dataclass(frozen=True)
class DecisionCheck:
    coordinator_key: str
    run_id: str

    def result(self, step: int, result: ResultView) -> None:
        """A round's published result: its accepted-set digest, and the update blob once there is one."""
        blob = result.update.blob if result.update is not None else None
        verify_decision(self.coordinator_key, result.signature,
                        round_message(self.run_id, step, result.accepted_digest, blob),
                        f"the accepted set of step {step}")

    def assignment(self, client_id: str, rnd: ClientRoundView) -> None:
        start, end = rnd.assignment
        verify_decision(self.coordinator_key, rnd.assignment_signature,
                        assignment_message(self.run_id, rnd.step, client_id, start, end),
                        f"this client's assignment of step {rnd.step} (sequences {start}-{end})")

    def detail(self, detail: RoundDetail) -> None:
        """The accepted set as listed must be the one the coordinator signed."""
        verify_decision(self.coordinator_key, detail.signature,
                        round_message(self.run_id, detail.step, detail.accepted_digest,
                                      detail.update.blob if detail.update is not None else None),
                        f"the accepted set of step {detail.step}")
        listed = accepted_digest((c.client_id, c.blob) for c in detail.accepted)
        if listed != detail.accepted_digest:
            raise SignatureError(f"the accepted set of step {detail.step} as served ({len(detail.accepted)} results) "
                                 f"is not the one the coordinator signed: it was altered on the way (a proxy or "
                                 f"cache)")

    def update(self, step: int, result: ResultView, update: RoundUpdate) -> None:
        """An update blob must have been computed from the signed accepted set."""
        if update.accepted != result.accepted_digest:
            raise SignatureError(f"the update blob of step {step} was computed from another accepted set than the "
                                 f"one the coordinator signed")

    def checkpoint(self, answer: CheckpointAnswer) -> None:
        verify_decision(self.coordinator_key, answer.signature,
                        checkpoint_message(self.run_id, answer.info.model_dump(mode="json"), answer.manifest),
                        f"the checkpoint of step {answer.info.step}")
