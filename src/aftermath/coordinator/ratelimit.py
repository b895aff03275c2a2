"""Per-client rate limits: one token bucket per key (a client's id, or the remote address before it joins).

Pure: the clock is passed in. A bucket holds at most `burst` tokens and refills at `rate` tokens per second; each
request takes one. The number of buckets is bounded (the least recently used are forgotten), so a flood of new
addresses cannot grow the coordinator's memory.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    def __init__(self, rate: float, burst: int, max_keys: int = 4096) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self.limited = 0  # requests refused so far

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, key: str, now: float) -> float:
        """Take one token for `key`: 0.0 when allowed, else the seconds until a token is back."""
        if not self.enabled:
            return 0.0
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            bucket = _Bucket(tokens=float(self.burst), updated=now)
        bucket.tokens = min(float(self.burst), bucket.tokens + max(0.0, now - bucket.updated) * self.rate)
        bucket.updated = now
        self._buckets[key] = bucket  # most recently used last
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        self.limited += 1
        return (1.0 - bucket.tokens) / self.rate
