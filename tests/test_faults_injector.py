"""Fault injection really injects: latency, loss and a bandwidth limit, measured through the client's transport
against a real aiohttp server on 127.0.0.1, seeded and counted."""

from __future__ import annotations

import asyncio
import hashlib
import time

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from aftermath.client.transport import Transport, Unreachable
from aftermath.errors import ConfigError
from aftermath.faults import FaultConfig, FaultInjector, InjectedDrop, make_fault_config, parse_latency


def echo_app(seen: list[str]) -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.json_response({"ok": True})

    blobs: dict[str, bytes] = {}

    async def put(request: web.Request) -> web.Response:
        seen.append(request.path)
        blobs[request.match_info["sha"]] = await request.read()
        return web.json_response({"ok": True}, status=201)

    async def get(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.Response(body=blobs[request.match_info["sha"]])

    app = web.Application(client_max_size=2**24)
    app.router.add_post("/x", echo)
    app.router.add_put("/blobs/{sha}", put)
    app.router.add_get("/blobs/{sha}", get)
    return app


def with_transport(config: FaultConfig, body, retries: int = 8) -> list[str]:
    seen: list[str] = []

    async def main():
        async with TestServer(echo_app(seen), host="127.0.0.1") as server:
            async with aiohttp.ClientSession() as session:
                t = Transport(str(server.make_url("")), session, retries=retries, backoff=0.001,
                              faults=FaultInjector(config))
                await body(t)

    asyncio.run(main())
    return seen


def test_parse_flags():
    assert parse_latency("50-20") == (50.0, 20.0)
    assert parse_latency("7") == (7.0, 0.0)
    assert parse_latency(None) == (0.0, 0.0)
    for bad in ("fast", "-5", "5-", "1-2-3"):
        with pytest.raises(ConfigError, match="--fault-latency-ms"):
            parse_latency(bad)
    with pytest.raises(ConfigError, match="--fault-loss"):
        make_fault_config(loss=1.5)
    with pytest.raises(ConfigError, match="--fault-bandwidth"):
        make_fault_config(bandwidth=10)
    config = make_fault_config("50-20", 0.1, 1e6, 3)
    assert config.active and config.to_args() == ["--fault-latency-ms", "50-20", "--fault-loss", "0.1",
                                                  "--fault-bandwidth", "1e+06", "--fault-seed", "3"]
    assert not FaultConfig().active and FaultConfig().to_args() == []


def test_latency_delays_every_request_by_base_plus_jitter():
    config = FaultConfig(latency_ms=40, jitter_ms=20, seed=1)
    n = 8

    async def body(t: Transport):
        started = time.perf_counter()
        for _ in range(n):
            await t.call("POST", "/x", {})
        elapsed = time.perf_counter() - started
        c = t.faults.counters
        assert c.latency == n and c.dropped == 0 and c.throttled == 0
        assert 0.040 * n <= c.latency_seconds <= 0.060 * n
        assert elapsed >= c.latency_seconds  # the delay really happened on the wall clock

    with_transport(config, body)


def test_loss_drops_a_seeded_fraction_and_the_transport_retries():
    config = FaultConfig(loss=0.3, seed=7)
    n = 60

    async def body(t: Transport):
        for _ in range(n):
            assert (await t.call("POST", "/x", {}))["ok"] is True  # every call still succeeds, after retries
        c = t.faults.counters
        # attempts = n + dropped; the dropped fraction of attempts is near 0.3
        assert 0.15 <= c.dropped / (n + c.dropped) <= 0.45, c
        assert t.stats.retries == c.dropped and c.by_kind == {"json": c.dropped}

    seen = with_transport(config, body)
    assert len(seen) == n  # a dropped request never reached the server

    # the same seed drops the same requests
    def drops(seed: int) -> list[bool]:
        inj = FaultInjector(FaultConfig(loss=0.3, seed=seed), sleep=_no_sleep)
        out = []
        for _ in range(50):
            try:
                asyncio.run(inj.before_request("json"))
                out.append(False)
            except InjectedDrop:
                out.append(True)
        return out

    assert drops(7) == drops(7) and drops(7) != drops(8)


def test_loss_reaches_blob_transfers_and_gives_up_after_the_retries():
    config = FaultConfig(loss=0.5, seed=2)
    data = bytes(range(256)) * 64

    async def body(t: Transport):
        for i in range(6):  # at loss 0.5, twelve transfers without a drop of each kind would be a broken injector
            blob = data + bytes([i])
            sha = await t.put_blob(blob)
            assert await t.get_blob(sha) == blob
        kinds = t.faults.counters.by_kind
        assert set(kinds) == {"blob_up", "blob_down"} and min(kinds.values()) >= 1, kinds
        assert sum(kinds.values()) == t.faults.counters.dropped and t.stats.retries >= t.faults.counters.dropped

    with_transport(config, body)

    async def hopeless(t: Transport):
        with pytest.raises(Unreachable, match="fault injection dropped"):
            await t.call("POST", "/x", {})

    assert with_transport(FaultConfig(loss=0.999999, seed=0), hopeless, retries=2) == []


def test_bandwidth_limit_holds_uploads_and_downloads():
    bandwidth = 200_000  # bytes per second
    data = b"\x01" * 40_000  # 0.2 s each way at the limit

    async def body(t: Transport):
        started = time.perf_counter()
        sha = await t.put_blob(data)
        got = await t.get_blob(sha)
        elapsed = time.perf_counter() - started
        assert got == data and hashlib.sha256(got).hexdigest() == sha
        c = t.faults.counters
        assert c.throttled == 3 and c.throttled_seconds  # upload, its JSON answer, download
        assert c.throttled_seconds >= 2 * len(data) / bandwidth - 1e-6
        assert elapsed >= 0.4

    with_transport(FaultConfig(bandwidth=bandwidth), body)


async def _no_sleep(seconds: float) -> None:
    return None
