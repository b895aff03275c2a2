"""The run's summary (`summary.json`, GET /summary), written once the run has finished."""

from __future__ import annotations

from typing import Any

from aftermath.coordinator.replicas import ReplicaChecks
from aftermath.coordinator.state import RunStateMachine
from aftermath.round.objective import regressions
from aftermath.round.protocol import ClientSummary, Exclusion, RunSummary, ScreenedResult, TierResult


def _last_hash(machine: RunStateMachine, client_id: str) -> str | None:
    for epoch in sorted(machine.hash_reports, reverse=True):
        if client_id in machine.hash_reports[epoch]:
            return machine.hash_reports[epoch][client_id].weights_sha256
    return None


def build_summary(run_id: str, machine: RunStateMachine, checks: ReplicaChecks,
                  val_history: list[dict[str, Any]], *, rejected: int, rate_limited: int,
                  checkpoint: str, updates_published: int = 0, updates_witnessed: int = 0,
                  update_disputes: list[dict[str, Any]] = (), local_steps: int = 1,
                  screened: list[ScreenedResult] = ()) -> RunSummary:
    clients = []
    for cid, member in sorted(machine.members.items()):
        stats = member.stats
        clients.append(ClientSummary(
            id=cid, tier=member.info.tier, spec=member.info.spec, status=member.status,
            final_loss=stats.get("loss"), weights_sha256=_last_hash(machine, cid),
            bytes_up=stats.get("bytes_up", 0), bytes_down=stats.get("bytes_down", 0),
            rounds_contributed=member.rounds_contributed, tokens=stats.get("tokens", 0),
            tokens_per_s=stats.get("tokens_per_s")))
    final_val = val_history[-1]["val_loss"] if val_history else {}
    first_val = val_history[0]["val_loss"] if val_history else {}
    regressed = {r.name for r in regressions(val_history)}
    tiers = {}
    for name, loss in final_val.items():
        key = name[4:] if name.startswith("tier") and name[4:].isascii() and name[4:].isdigit() else name
        seen = [h["val_loss"][name] for h in val_history if (h.get("val_loss") or {}).get(name) is not None]
        tiers[key] = TierResult(val_loss=loss, initial_val_loss=first_val.get(name),
                                best_val_loss=min(seen) if seen else None, regressed=name in regressed)
    return RunSummary(run_id=run_id, steps=machine.step, local_steps=local_steps, epochs=machine.epoch + 1,
                      replicas_consistent=checks.consistent(), hashes_checked=checks.checked,
                      divergences=checks.divergences, unrecovered=checks.unrecovered(), clients=clients,
                      tiers=tiers, rejected=rejected, rate_limited=rate_limited,
                      updates_published=updates_published, updates_witnessed=updates_witnessed,
                      update_disputes=list(update_disputes), screened=list(screened),
                      excluded=[Exclusion(client_id=cid, step=step, reason=reason)
                                for cid, (step, reason) in sorted(machine.exclusions.items())],
                      val_history=val_history, checkpoint=checkpoint)
