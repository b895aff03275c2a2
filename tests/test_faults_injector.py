"""Fault injection really injects: latency, loss and a bandwidth limit (one rate per direction), measured through
the client's transport against a real aiohttp server on 127.0.0.1, seeded and counted."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import time

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from aftermath.client.transport import Transport, Unreachable
from aftermath.commands.client import add_fault_arguments, fault_config_from_args
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


def test_per_direction_bandwidth_flags():
    # the per-direction value wins where it is set; `bandwidth` stays both directions
    both = FaultConfig(bandwidth=300_000)
    assert (both.up_rate, both.down_rate) == (300_000, 300_000)
    mixed = FaultConfig(bandwidth=300_000, bandwidth_up=1_250_000)
    assert (mixed.up_rate, mixed.down_rate) == (1_250_000, 300_000)
    home = make_fault_config("40", bandwidth_up=1_250_000, bandwidth_down=6_250_000)
    assert home.active and (home.up_rate, home.down_rate) == (1_250_000, 6_250_000)
    assert home.to_args() == ["--fault-latency-ms", "40-0", "--fault-bandwidth-up", "1.25e+06",
                              "--fault-bandwidth-down", "6.25e+06", "--fault-seed", "0"]
    assert FaultConfig(bandwidth_down=2048).active and not FaultConfig(bandwidth_up=0).active
    for flag, kwargs in (("--fault-bandwidth-up 10", {"bandwidth_up": 10}),
                         ("--fault-bandwidth-down -1", {"bandwidth_down": -1}),
                         ("--fault-bandwidth-up nan", {"bandwidth_up": float("nan")}),
                         ("--fault-bandwidth-down inf", {"bandwidth_down": float("inf")})):
        with pytest.raises(ConfigError, match=flag):
            make_fault_config(**kwargs)

    # the client's flags parse to the config, and to_args() renders flags that parse back to the same config
    parser = argparse.ArgumentParser()
    add_fault_arguments(parser)
    parsed = fault_config_from_args(parser.parse_args(["--fault-bandwidth-up", "1250000",
                                                       "--fault-bandwidth-down", "6250000", "--fault-seed", "4"]))
    assert parsed == FaultConfig(bandwidth_up=1_250_000, bandwidth_down=6_250_000, seed=4)
    odd = FaultConfig(latency_ms=40, bandwidth=300_000, bandwidth_up=1_234_567, bandwidth_down=6_543_210.5, seed=2)
    assert fault_config_from_args(parser.parse_args(odd.to_args())) == odd  # no digits lost on the way


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


def test_asymmetric_link_holds_each_direction_to_its_own_rate():
    up, down = 400_000, 20_000  # bytes per second: a fast upload, a slow download
    data = b"\x02" * 100_000  # 0.25 s up; the same bytes would take 5 s at the down rate
    small = b"\x03" * 4_000  # 0.2 s down; 0.01 s at the up rate

    async def body(t: Transport):
        started = time.perf_counter()
        await t.put_blob(data)
        upload = time.perf_counter() - started
        assert upload >= len(data) / up
        assert upload < len(data) / up + 1.5 < len(data) / down  # the slow down rate did not hold the upload
        c = t.faults.counters
        assert c.throttled_up_seconds == pytest.approx(len(data) / up, abs=1e-3)
        assert c.throttled_down_seconds < 0.01  # only the PUT's small JSON answer came down

        sha = await t.put_blob(small)
        started = time.perf_counter()
        assert await t.get_blob(sha) == small
        download = time.perf_counter() - started
        assert download >= len(small) / down  # a GET sends no body: only the down rate holds it
        assert download < len(small) / down + 1.5

        # one direction is one pipe: two downloads at once take as long as both one after the other ...
        await asyncio.sleep(0.05)  # the pipe is free again
        started = time.perf_counter()
        got = await asyncio.gather(t.get_blob(sha), t.get_blob(sha))
        assert got == [small, small] and time.perf_counter() - started >= 2 * len(small) / down
        # ... while an upload and a download at once do not wait for each other: each waits its own bytes / rate
        await asyncio.sleep(0.05)
        up_before, down_before = c.throttled_up_seconds, c.throttled_down_seconds
        started = time.perf_counter()
        await asyncio.gather(t.put_blob(data + b"\x00"), t.get_blob(sha))
        assert time.perf_counter() - started >= max(len(data) / up, len(small) / down)
        assert c.throttled_up_seconds - up_before == pytest.approx((len(data) + 1) / up, abs=0.02)
        assert c.throttled_down_seconds - down_before == pytest.approx(len(small) / down, abs=0.02)

    with_transport(FaultConfig(bandwidth=5_000, bandwidth_up=up, bandwidth_down=down), body)


def test_transfers_at_the_same_time_share_a_direction_slice_by_slice():
    down = 200_000
    big = b"\x04" * 200_000  # 1 s down alone

    async def body(t: Transport):
        sha = await t.put_blob(big)

        async def timed(coro):
            started = time.perf_counter()
            await coro
            return time.perf_counter() - started

        async def small_call_a_moment_later():
            await asyncio.sleep(0.2)  # the big download is under way
            return await timed(t.call("POST", "/x", {}))

        big_s, small_s = await asyncio.gather(timed(t.get_blob(sha)), small_call_a_moment_later())
        assert big_s >= len(big) / down
        # the small answer took its turn between two slices of the big one, instead of waiting for all of it
        assert small_s < 0.5 < len(big) / down - 0.2

    with_transport(FaultConfig(bandwidth_down=down), body)


async def _no_sleep(seconds: float) -> None:
    return None
