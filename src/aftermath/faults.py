"""Fault injection for the client's transport: latency, loss and a bandwidth limit, seeded and counted.

`Transport._send` (where every request to the coordinator leaves) asks the injector before every request, and
`Transport.gate` before every token batch fetched from the data server (latency and loss only):

    await faults.before_request(kind, up_bytes)   # latency (base + jitter), then maybe drop, then throttle upload
    await faults.after_response(down_bytes)        # throttle the download

A dropped request raises `InjectedDrop` before anything is sent (the request is lost on the way); the transport
handles it like a refused connection: it retries with backoff. Counters say how many faults really happened, so a
test can assert that a faulty run was faulty. The random stream is seeded (`--fault-seed`), so a run's faults
can be replayed.
"""

from __future__ import annotations

import asyncio
import random
import re
from dataclasses import asdict, dataclass, field

from aftermath.errors import AftermathError, ConfigError


class InjectedDrop(AftermathError):
    """A request dropped on purpose by the fault injector (handled like a lost connection)."""


@dataclass(frozen=True)
class FaultConfig:
    latency_ms: float = 0.0  # base delay added to every request
    jitter_ms: float = 0.0  # plus uniform [0, jitter)
    loss: float = 0.0  # fraction of requests and blob transfers dropped
    bandwidth: float = 0.0  # bytes per second, up and down each; 0 = unlimited
    seed: int = 0

    @property
    def active(self) -> bool:
        return self.latency_ms > 0 or self.jitter_ms > 0 or self.loss > 0 or self.bandwidth > 0

    def to_args(self) -> list[str]:
        """The client command-line flags that reproduce this config."""
        args: list[str] = []
        if self.latency_ms or self.jitter_ms:
            args += ["--fault-latency-ms", f"{self.latency_ms:g}-{self.jitter_ms:g}"]
        if self.loss:
            args += ["--fault-loss", f"{self.loss:g}"]
        if self.bandwidth:
            args += ["--fault-bandwidth", f"{self.bandwidth:g}"]
        if self.active:
            args += ["--fault-seed", str(self.seed)]
        return args


def parse_latency(text: str | None) -> tuple[float, float]:
    """`--fault-latency-ms 50-20` -> (50.0, 20.0): 50 ms base plus up to 20 ms jitter; `50` alone: no jitter."""
    if text is None or text == "":
        return 0.0, 0.0
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:-\s*(\d+(?:\.\d+)?))?\s*", text)
    if m is None:
        raise ConfigError(f"--fault-latency-ms {text!r} must be BASE or BASE-JITTER in milliseconds, e.g. 50-20")
    return float(m.group(1)), float(m.group(2) or 0.0)


def make_fault_config(latency: str | None = None, loss: float = 0.0, bandwidth: float = 0.0,
                      seed: int = 0) -> FaultConfig:
    """A FaultConfig from command-line values, each checked with a message naming the flag."""
    base, jitter = parse_latency(latency)
    if not 0.0 <= loss < 1.0:
        raise ConfigError(f"--fault-loss {loss} must be a fraction in [0, 1), e.g. 0.1")
    if bandwidth < 0:
        raise ConfigError(f"--fault-bandwidth {bandwidth} must be bytes per second >= 0 (0 = unlimited)")
    if 0 < bandwidth < 1024:
        raise ConfigError(f"--fault-bandwidth {bandwidth} bytes/s is too small to train over; give >= 1024")
    return FaultConfig(latency_ms=base, jitter_ms=jitter, loss=loss, bandwidth=bandwidth, seed=seed)


@dataclass
class FaultCounters:
    latency: int = 0  # requests delayed
    latency_seconds: float = 0.0
    dropped: int = 0  # requests and transfers dropped
    throttled: int = 0  # transfers slowed by the bandwidth limit
    throttled_seconds: float = 0.0
    by_kind: dict[str, int] = field(default_factory=dict)  # drops per request kind (json, blob_up, blob_down, ...)

    def to_json(self) -> dict[str, float | int | dict[str, int]]:
        out = asdict(self)
        out["latency_seconds"] = round(self.latency_seconds, 3)
        out["throttled_seconds"] = round(self.throttled_seconds, 3)
        return out


class FaultInjector:
    """Seeded faults for one process. `sleep` is injectable so unit tests need not wait."""

    def __init__(self, config: FaultConfig, sleep=asyncio.sleep) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.counters = FaultCounters()
        self._sleep = sleep

    async def before_request(self, kind: str, up_bytes: int = 0) -> None:
        """Delay, maybe drop (raises InjectedDrop), then hold the upload to the bandwidth limit."""
        c = self.config
        if c.latency_ms > 0 or c.jitter_ms > 0:
            delay = (c.latency_ms + self.rng.random() * c.jitter_ms) / 1000.0
            self.counters.latency += 1
            self.counters.latency_seconds += delay
            await self._sleep(delay)
        if c.loss > 0 and self.rng.random() < c.loss:
            self.counters.dropped += 1
            self.counters.by_kind[kind] = self.counters.by_kind.get(kind, 0) + 1
            raise InjectedDrop(f"fault injection dropped this {kind} request (--fault-loss {c.loss:g})")
        await self._throttle(up_bytes)

    async def after_response(self, down_bytes: int) -> None:
        await self._throttle(down_bytes)

    async def _throttle(self, nbytes: int) -> None:
        if self.config.bandwidth > 0 and nbytes > 0:
            delay = nbytes / self.config.bandwidth
            self.counters.throttled += 1
            self.counters.throttled_seconds += delay
            await self._sleep(delay)
