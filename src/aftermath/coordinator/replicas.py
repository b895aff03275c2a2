"""Replica checks: every member's replica hash, reported at an epoch end, against the coordinator's reference
for the same region (computed from its own universal replica when the checkpoint is written).

A differing replica is a divergence: the member is told to reload the checkpoint (it leaves the epoch). It has
recovered when a later report of the same client matches. `replicas_consistent` (RunSummary) holds only when
at least one hash was compared and every client's last compared hash matched.
"""

from __future__ import annotations

from typing import Any

from aftermath.round.protocol import HashMismatch


class ReplicaChecks:
    def __init__(self) -> None:
        self.reference: dict[int, dict[str, str]] = {}  # epoch -> spec name -> the coordinator's replica hash
        self.divergences: list[HashMismatch] = []
        self._last: dict[str, tuple[int, bool]] = {}  # client -> (epoch, matched) of its latest compared report
        self.checked = 0

    def restore(self, reference: dict[int, dict[str, str]], divergences: list[dict[str, Any]],
                reports: list[dict[str, Any]]) -> None:
        """The checks of a run before a coordinator restart (from state.json)."""
        self.reference = dict(reference)
        self.divergences = [HashMismatch.model_validate(d) for d in divergences]
        for r in sorted(reports, key=lambda r: r["epoch"]):
            self.check(r["client_id"], r["epoch"], r["spec"], r["weights_sha256"])

    def set_reference(self, epoch: int, hashes: dict[str, str]) -> None:
        self.reference[epoch] = dict(hashes)

    def check(self, client_id: str, epoch: int, spec: str, weights_sha256: str) -> bool | None:
        """Compare one report with the reference: True/False, or None when the reference is not computed yet.
        A mismatch is recorded once per (client, epoch)."""
        expected = self.reference.get(epoch, {}).get(spec)
        if expected is None:
            return None
        match = expected == weights_sha256
        last = self._last.get(client_id)
        if last is None or last[0] <= epoch:
            if last is None or last[0] < epoch:
                self.checked += 1
            self._last[client_id] = (epoch, match)
        if not match and not any(d.client_id == client_id and d.epoch == epoch for d in self.divergences):
            self.divergences.append(HashMismatch(epoch=epoch, client_id=client_id, spec=spec,
                                                 reported=weights_sha256, expected=expected))
        return match

    def unrecovered(self) -> list[HashMismatch]:
        """The last divergence of every client whose last compared hash differed."""
        out = []
        for cid, (epoch, matched) in sorted(self._last.items()):
            if not matched:
                out.append(next(d for d in reversed(self.divergences) if d.client_id == cid and d.epoch == epoch))
        return out

    def consistent(self) -> bool:
        return self.checked > 0 and not self.unrecovered()
