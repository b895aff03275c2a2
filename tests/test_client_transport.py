"""The client's transport against real aiohttp servers, and the --tier auto choice."""

from __future__ import annotations

import asyncio
import hashlib

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from aftermath.client.loop import choose_tier, estimate_memory
from aftermath.client.transport import CoordinatorError, Transport, Unreachable
from aftermath.errors import ConfigError
from aftermath.model import preset_config, tier_spec


def with_server(app: web.Application, body):
    async def main():
        async with TestServer(app, host="127.0.0.1") as server:
            async with aiohttp.ClientSession() as session:
                t = Transport(str(server.make_url("")), session, retries=3, backoff=0.01)
                await body(t)

    asyncio.run(main())


def test_retries_5xx_then_succeeds_and_counts_bytes():
    calls = {"n": 0}

    async def flaky(request):
        calls["n"] += 1
        if calls["n"] < 3:
            return web.json_response({"error": "busy"}, status=503)
        return web.json_response({"ok": True, "echo": await request.json()})

    app = web.Application()
    app.router.add_post("/x", flaky)

    async def body(t: Transport):
        answer = await t.call("POST", "/x", {"a": 1})
        assert answer == {"ok": True, "echo": {"a": 1}}
        assert calls["n"] == 3 and t.stats.retries == 2
        assert t.stats.bytes_up > 0 and t.stats.bytes_down > 0

    with_server(app, body)


def test_4xx_is_raised_at_once_with_the_message_and_auth_is_sent():
    seen = {}

    async def refuse(request):
        seen["auth"] = request.headers.get("Authorization")
        return web.json_response({"error": "wrong run token", "reason": "token"}, status=401)

    app = web.Application()
    app.router.add_post("/join", refuse)

    async def body(t: Transport):
        t.auth = "S1"
        with pytest.raises(CoordinatorError) as info:
            await t.call("POST", "/join", {})
        assert info.value.status == 401 and info.value.message == "wrong run token"
        assert info.value.data["reason"] == "token" and seen["auth"] == "Bearer S1"

    with_server(app, body)


def test_blob_bytes_are_checked_by_hash():
    good = b"payload bytes"
    sha = hashlib.sha256(good).hexdigest()

    async def blob(request):
        return web.Response(body=b"tampered" if request.match_info["sha"] != sha else good)

    app = web.Application()
    app.router.add_get("/blobs/{sha}", blob)

    async def body(t: Transport):
        assert await t.get_blob(sha) == good
        with pytest.raises(CoordinatorError, match="do not hash"):
            await t.get_blob("0" * 64)

    with_server(app, body)


def test_unreachable_after_retries():
    async def main():
        async with aiohttp.ClientSession() as session:
            t = Transport("http://127.0.0.1:9", session, retries=1, backoff=0.01)
            with pytest.raises(Unreachable, match="2 attempts"):
                await t.call("GET", "/health")

    asyncio.run(main())


def test_tier_auto_picks_the_widest_tier_that_fits():
    cfg = preset_config("small")
    need = [estimate_memory(cfg, tier_spec(cfg, t), 8, 128, "distro") for t in range(4)]
    assert need == sorted(need, reverse=True)  # narrower tiers need less
    assert choose_tier(cfg, need[0] + 1, 8, 128, "distro") == 0
    assert choose_tier(cfg, need[0] - 1, 8, 128, "distro") == 1
    assert choose_tier(cfg, need[2], 8, 128, "distro") == 2
    with pytest.raises(ConfigError, match="smallest tier"):
        choose_tier(cfg, need[3] - 1, 8, 128, "distro")
