"""Fault injection for the client's transport: latency, loss and a bandwidth limit, seeded and counted.

`Transport._send` (where every request to the coordinator leaves) asks the injector before every request, and
`Transport.gate` before every token batch fetched from the data server (latency and loss only):

    await faults.before_request(kind, up_bytes)   # latency (base + jitter), then maybe drop, then throttle upload
    await faults.after_response(down_bytes)        # throttle the download

The bandwidth limit emulates a link with one rate per direction (`bandwidth_up`, `bandwidth_down`; `bandwidth`
sets both, and a per-direction value wins where it is set), like a home line with 10 Mbit/s up and 50 Mbit/s
down. Each direction is one pipe shared by its transfers: a transfer of N bytes passes in slices of about
`SLICE_SECONDS` of the rate, and transfers at the same time take turns slice by slice (as TCP flows share a
line). Alone, N bytes take N / rate seconds; together, transfers never get more than the rate; a small answer
waits at most one slice behind a big download; an upload and a download do not wait for each other.

A dropped request raises `InjectedDrop` before anything is sent (the request is lost on the way); the transport
handles it like a refused connection: it retries with backoff. Counters say how many faults really happened, so a
test can assert that a faulty run was faulty. The random stream is seeded (`--fault-seed`), so a run's faults
can be replayed.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from dataclasses import asdict, dataclass, field

from aftermath.errors import AftermathError, ConfigError


SLICE_SECONDS = 0.05  # a transfer through an emulated pipe goes in slices of this much time at the rate
MIN_SLICE_BYTES = 16_384


class InjectedDrop(AftermathError):
    """A request dropped on purpose by the fault injector (handled like a lost connection)."""


@dataclass(frozen=True)
class FaultConfig:
    latency_ms: float = 0.0  # base delay added to every request
    jitter_ms: float = 0.0  # plus uniform [0, jitter)
    loss: float = 0.0  # fraction of requests and blob transfers dropped
    bandwidth: float = 0.0  # bytes per second, up and down each; 0 = unlimited
    seed: int = 0
    bandwidth_up: float = 0.0  # bytes per second for uploads (request bodies); 0 = `bandwidth`
    bandwidth_down: float = 0.0  # bytes per second for downloads (answers); 0 = `bandwidth`

    @property
    def up_rate(self) -> float:
        """The upload limit in bytes per second (0 = unlimited): `bandwidth_up`, else `bandwidth`."""
        return self.bandwidth_up or self.bandwidth

    @property
    def down_rate(self) -> float:
        """The download limit in bytes per second (0 = unlimited): `bandwidth_down`, else `bandwidth`."""
        return self.bandwidth_down or self.bandwidth

    @property
    def active(self) -> bool:
        return self.latency_ms > 0 or self.jitter_ms > 0 or self.loss > 0 or self.up_rate > 0 or self.down_rate > 0

    def to_args(self) -> list[str]:
        """The client command-line flags that reproduce this config."""
        args: list[str] = []
        if self.latency_ms or self.jitter_ms:
            args += ["--fault-latency-ms", f"{self.latency_ms:g}-{self.jitter_ms:g}"]
        if self.loss:
            args += ["--fault-loss", f"{self.loss:g}"]
        if self.bandwidth:
            args += ["--fault-bandwidth", _number(self.bandwidth)]
        if self.bandwidth_up:
            args += ["--fault-bandwidth-up", _number(self.bandwidth_up)]
        if self.bandwidth_down:
            args += ["--fault-bandwidth-down", _number(self.bandwidth_down)]
        if self.active:
            args += ["--fault-seed", str(self.seed)]
        return args


def _number(x: float) -> str:
    """`x` as a flag value that parses back to exactly `x` (short where that loses nothing: 1e+06)."""
    short = f"{x:g}"
    return short if float(short) == x else f"{x:.17g}"


def parse_latency(text: str | None) -> tuple[float, float]:
    """`--fault-latency-ms 50-20` -> (50.0, 20.0): 50 ms base plus up to 20 ms jitter; `50` alone: no jitter."""
    if text is None or text == "":
        return 0.0, 0.0
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:-\s*(\d+(?:\.\d+)?))?\s*", text)
    if m is None:
        raise ConfigError(f"--fault-latency-ms {text!r} must be BASE or BASE-JITTER in milliseconds, e.g. 50-20")
    return float(m.group(1)), float(m.group(2) or 0.0)


def make_fault_config(latency: str | None = None, loss: float = 0.0, bandwidth: float = 0.0,
                      seed: int = 0, bandwidth_up: float = 0.0, bandwidth_down: float = 0.0) -> FaultConfig:
    """A FaultConfig from command-line values, each checked with a message naming the flag."""
    base, jitter = parse_latency(latency)
    if not 0.0 <= loss < 1.0:
        raise ConfigError(f"--fault-loss {loss} must be a fraction in [0, 1), e.g. 0.1")
    for flag, rate in (("--fault-bandwidth", bandwidth), ("--fault-bandwidth-up", bandwidth_up),
                       ("--fault-bandwidth-down", bandwidth_down)):
        check_rate(flag, rate)
    return FaultConfig(latency_ms=base, jitter_ms=jitter, loss=loss, bandwidth=bandwidth, seed=seed,
                       bandwidth_up=bandwidth_up, bandwidth_down=bandwidth_down)


def check_rate(flag: str, rate: float) -> None:
    """A bandwidth flag's value: bytes per second, 0 (unlimited) or at least 1024; else a ConfigError naming it."""
    if not 0 <= rate < float("inf"):  # also NaN
        raise ConfigError(f"{flag} {rate} must be a finite number of bytes per second >= 0 (0 = unlimited), "
                          f"e.g. 1250000 for 10 Mbit/s")
    if 0 < rate < 1024:
        raise ConfigError(f"{flag} {rate} bytes/s is too small to train over; give >= 1024 (0 = unlimited)")


@dataclass
class FaultCounters:
    latency: int = 0  # requests delayed
    latency_seconds: float = 0.0
    dropped: int = 0  # requests and transfers dropped
    throttled: int = 0  # transfers slowed by the bandwidth limit
    throttled_seconds: float = 0.0  # waited for the limit, both directions
    throttled_up_seconds: float = 0.0
    throttled_down_seconds: float = 0.0
    by_kind: dict[str, int] = field(default_factory=dict)  # drops per request kind (json, blob_up, blob_down, ...)

    def to_json(self) -> dict[str, float | int | dict[str, int]]:
        out = asdict(self)
        out["latency_seconds"] = round(self.latency_seconds, 3)
        for key in ("throttled_seconds", "throttled_up_seconds", "throttled_down_seconds"):
            out[key] = round(getattr(self, key), 3)
        return out


class FaultInjector:
    """Seeded faults for one process. `sleep` and `clock` are injectable so unit tests need not wait."""

    def __init__(self, config: FaultConfig, sleep=asyncio.sleep, clock=time.monotonic) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.counters = FaultCounters()
        self._sleep = sleep
        self._clock = clock
        self._free_at = {"up": 0.0, "down": 0.0}  # when each direction's emulated pipe is next free (clock time)

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
        await self._throttle("up", up_bytes)

    async def after_response(self, down_bytes: int) -> None:
        """Hold a received answer of `down_bytes` to the download limit."""
        await self._throttle("down", down_bytes)

    async def _throttle(self, direction: str, nbytes: int) -> None:
        """Pass `nbytes` through the direction's pipe at its rate, slice by slice, taking turns with the other
        transfers in it (each slice waits until the pipe is free, then its bytes / rate)."""
        rate = self.config.up_rate if direction == "up" else self.config.down_rate
        if rate <= 0 or nbytes <= 0:
            return
        size = max(MIN_SLICE_BYTES, int(rate * SLICE_SECONDS))
        waited = 0.0
        left = nbytes
        while left > 0:
            n = min(size, left)
            left -= n
            now = self._clock()
            end = max(now, self._free_at[direction]) + n / rate
            self._free_at[direction] = end
            waited += end - now
            await self._sleep(end - now)
        self.counters.throttled += 1
        self.counters.throttled_seconds += waited
        setattr(self.counters, f"throttled_{direction}_seconds",
                getattr(self.counters, f"throttled_{direction}_seconds") + waited)
