"""The coordinator: the pure run state machine, batch assignment, and the aiohttp service around them."""

from aftermath.coordinator.assignment import BatchRange, assign_batches, proportional_shares
from aftermath.coordinator.state import ClientInfo, Commit, Event, Member, Phase, Rejected, Round, RunStateMachine

__all__ = ["BatchRange", "assign_batches", "proportional_shares", "ClientInfo", "Commit", "Event",
           "Member", "Phase", "Rejected", "Round", "RunStateMachine"]
