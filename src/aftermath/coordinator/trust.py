"""The coordinator's screening of a round's results: which payloads it leaves out of the accepted set, and why.
Pure: no sockets, no files.

A member that holds the run token and signs its commitments can still sign a harmful payload. Before a round's
accepted set is fixed, every committed payload is checked against the round's others and the recent rounds
(aftermath.optim.screening computes the statistics; `[trust]` holds the thresholds):

- duplicate: its body was seen before, in this round (the later commit is the copy) or in the last
  `duplicate_rounds` rounds, from any client: a copy, a replay, the same payload every round;
- sign agreement: below `min_agreement` overall, or `min_param_agreement` on its worst parameter, in a round
  whose median agreement is `min_consensus` or more (three payloads or more, so that the honest ones are a
  majority; and a round of tiny batches, whose gradients are mostly noise, judges nobody by agreement);
- shared coefficients: it selects the coefficients the others select less than `min_shared_ratio` times as
  often as the round's median (random indices);
- size: its rms above `max_norm_ratio` times the round's median (raw-value wires; one-bit payloads are +-1);
- reported loss: above `max_loss_ratio` times the median the round's other clients reported, or below its
  inverse (needs two others).

What is flagged is decided here once, by the coordinator, and published as the accepted set: every replica
applies the same set. The state machine counts each flag as a strike on the member and excludes it at `strikes`
strikes within `strike_rounds` rounds (RunStateMachine).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from statistics import median

from aftermath.optim.chunks import ChunkPlan
from aftermath.optim.payload import Payload
from aftermath.optim.screening import PayloadIndex, PayloadStats, Prepared, payload_stats
from aftermath.runconfig import TrustSection

MIN_FOR_AGREEMENT = 3  # payloads that must share coefficients before a disagreeing one is flagged
MIN_FOR_MEDIAN = 2  # other payloads a size or loss is compared with


@dataclass(frozen=True)
class Submitted:
    """One committed result of the round, in commit order: who sent it, its payload as the screen prepared it
    when it arrived (PayloadScreen.prepare), its reported loss."""

    client_id: str
    prepared: Prepared
    loss: float


@dataclass(frozen=True)
class Screened:
    """A round's screening: every payload's statistics, and the flagged ones with the reason."""

    stats: list[PayloadStats]
    flagged: dict[str, str]


class PayloadScreen:
    """Screens round after round; remembers the fingerprints of the last `duplicate_rounds` rounds."""

    def __init__(self, trust: TrustSection, plan: ChunkPlan, one_bit: bool) -> None:
        self.trust = trust
        self.index = PayloadIndex(plan)
        self.one_bit = one_bit
        self.seen: dict[str, tuple[int, str]] = {}  # fingerprint -> (step, client) it was first seen at

    def prepare(self, payload: Payload, data: bytes) -> Prepared:
        """What `screen` needs of a payload (decoded from `data`): computed when it arrives, off the round's
        critical path."""
        return self.index.prepare(payload, data)

    def screen(self, step: int, submitted: list[Submitted]) -> Screened:
        stats = payload_stats([s.prepared for s in submitted], self.index.names)
        flagged: dict[str, str] = {}
        first_here: dict[str, str] = {}
        for s, st in zip(submitted, stats):
            earlier = self.seen.get(st.fingerprint)  # (only the last duplicate_rounds rounds are kept)
            if earlier is not None:
                flagged[s.client_id] = f"its payload repeats {earlier[1]}'s of step {earlier[0]}"
            elif st.fingerprint in first_here:
                flagged[s.client_id] = f"its payload copies {first_here[st.fingerprint]}'s of this step"
            first_here.setdefault(st.fingerprint, s.client_id)
        # agreement says something only in a round whose payloads agree: with tiny batches, gradients are noise
        measured = [st.agreement for st in stats if not math.isnan(st.agreement)]
        consensus = median(measured) if len(measured) >= MIN_FOR_AGREEMENT else None
        round_values = _RoundValues(submitted, stats)
        for s, st in zip(submitted, stats):
            if s.client_id not in flagged:
                reason = self._verdict(s, st, round_values, consensus)
                if reason is not None:
                    flagged[s.client_id] = reason
        for s, st in zip(submitted, stats):
            self.seen.setdefault(st.fingerprint, (step, s.client_id))
        self.seen = {f: seen for f, seen in self.seen.items() if seen[0] > step - self.trust.duplicate_rounds}
        return Screened(stats=stats, flagged=flagged)

    def _verdict(self, s: Submitted, st: PayloadStats, round_values: "_RoundValues",
                 consensus: float | None) -> str | None:
        """Why one (not duplicated) payload is flagged, against the round's others; None: it passes."""
        t = self.trust
        if consensus is not None and consensus >= t.min_consensus:
            if st.agreement < t.min_agreement:
                return (f"its signs agree {st.agreement:+.2f} with the round's other payloads (min_agreement "
                        f"{t.min_agreement:+.2f}; the round's median {consensus:+.2f})")
            if st.worst_agreement < t.min_param_agreement:
                return (f"its signs on {st.worst_param} agree {st.worst_agreement:+.2f} with the round's other "
                        f"payloads (min_param_agreement {t.min_param_agreement:+.2f})")
        shares = round_values.shared.others(st.shared)
        if not math.isnan(st.shared) and shares.count >= MIN_FOR_MEDIAN and \
                st.shared < t.min_shared_ratio * shares.median:
            return (f"it selects the coefficients the others select {st.shared / shares.median:.2f} times as often "
                    f"as the round's median (min_shared_ratio {t.min_shared_ratio:g}): its indices look random")
        size, losses = round_values.rms.others(st.rms), round_values.loss.others(s.loss)
        if size.count < MIN_FOR_MEDIAN:
            return None
        if not self.one_bit and st.rms > t.max_norm_ratio * size.median:
            return (f"its values are {st.rms / size.median:.3g} times the round's median size (max_norm_ratio "
                    f"{t.max_norm_ratio:g})")
        if not _loss_consistent(s.loss, losses.median, t.max_loss_ratio):
            return (f"it reported loss {s.loss:.4g}, the round's other clients {losses.median:.4g} (max_loss_ratio "
                    f"{t.max_loss_ratio:g})")
        return None


@dataclass(frozen=True)
class _OthersMedian:
    count: int
    median: float


class _SortedValues:
    """One value of each payload of a round, sorted once: the median of all but one, in O(log n)."""

    def __init__(self, values: list[float]) -> None:
        self.values = sorted(values)

    def others(self, mine: float) -> _OthersMedian:
        """The median of the values without one equal to `mine` (without none when `mine` is not among them)."""
        at = bisect.bisect_left(self.values, mine)
        present = at < len(self.values) and self.values[at] == mine
        rest = len(self.values) - present

        def nth(k: int) -> float:  # the k-th of the values without the one at `at`
            return self.values[k + 1 if present and k >= at else k]

        if rest == 0:
            return _OthersMedian(0, math.nan)
        middle = rest // 2
        return _OthersMedian(rest, nth(middle) if rest % 2 else (nth(middle - 1) + nth(middle)) / 2)


class _RoundValues:
    """The round's shared shares (the positive ones), sizes and finite reported losses, each sorted once."""

    def __init__(self, submitted: list[Submitted], stats: list[PayloadStats]) -> None:
        self.shared = _SortedValues([st.shared for st in stats if st.shared > 0])
        self.rms = _SortedValues([st.rms for st in stats])
        self.loss = _SortedValues([s.loss for s in submitted if math.isfinite(s.loss)])


def _loss_consistent(loss: float, typical: float, ratio: float) -> bool:
    """Whether a reported loss lies within `ratio` of the others' median (a non-finite one never does)."""
    if not math.isfinite(loss):
        return False
    if not math.isfinite(typical) or typical <= 0:
        return True
    return typical / ratio <= loss <= typical * ratio
