"""The data server over a real aiohttp server on 127.0.0.1, and the client's retries and timeouts."""

import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import psutil
import pytest
import torch
from aiohttp import web

from aftermath.data import TokenStream
from aftermath.data.server import add_data_routes, fetch_meta, fetch_sequences, fetch_sequences_blocking
from aftermath.errors import DataError
from data_helpers import prepared_bytes_dir


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}"


@pytest.fixture
def data_dir(tmp_path):
    return prepared_bytes_dir(tmp_path, repeats=120)


def test_routes_and_client_fetch(data_dir):
    async def scenario():
        app = web.Application()
        service = add_data_routes(app, data_dir)
        runner, url = await serve(app)
        try:
            meta = await fetch_meta(url)
            assert meta["data_id"] == service.data_id and meta["vocab_size"] == 256 and meta["dtype"] == "uint16"
            assert set(meta["splits"]) == {"train", "val"} and meta["meta"]["tokenizer"]["kind"] == "bytes"
            remote = await fetch_sequences(url, 10, 26, 32, seed=5, data_id=service.data_id)
            val = await fetch_sequences(url, 0, 4, 32, split="val", shuffle=False)
            async with aiohttp.ClientSession() as s:
                async with s.get(f"{url}/data/sequences", params={"start": 0, "end": 2, "seq_len": 8}) as r:
                    assert r.status == 200 and r.headers["X-Aftermath-Shape"] == "2,9"
                    assert r.headers["X-Aftermath-Dtype"] == "uint16" and len(await r.read()) == 2 * 9 * 2
                async with s.get(f"{url}/data/tokenizer.json") as r:
                    assert r.status == 200 and "model" in await r.json(content_type=None)
                with pytest.raises(DataError, match="serves data .* not the run's"):
                    await fetch_sequences(url, 0, 2, 8, data_id="0" * 64, session=s)
            return remote, val
        finally:
            await runner.cleanup()

    remote, val = asyncio.run(scenario())
    assert torch.equal(remote, TokenStream(data_dir, 32, seed=5).sequences(10, 26))
    assert torch.equal(val, TokenStream(data_dir, 32, split="val", shuffle=False).sequences(0, 4))


@pytest.mark.parametrize("params, status, message", [
    ({"end": 4, "seq_len": 8}, 400, "missing query parameter 'start'"),
    ({"start": "x", "end": 4, "seq_len": 8}, 400, "start='x' is not an integer"),
    ({"start": 5, "end": 2, "seq_len": 8}, 400, "ends before it starts"),
    ({"start": -2, "end": 2, "seq_len": 8}, 400, "starts below 0"),
    ({"start": 0, "end": 100, "seq_len": 8}, 400, "at most 50 per request"),
    ({"start": 0, "end": 2, "seq_len": 10**6}, 400, "too few for one sequence"),
    ({"start": 0, "end": 2, "seq_len": 10**6 + 1}, 400, "seq_len=1000001 is longer than this server sends: give "
     "seq_len <= 1000000"),
    ({"start": 0, "end": 50, "seq_len": 10**5}, 400, "asks for 5000050 tokens; this server sends at most 4194304"),
    ({"start": 0, "end": 2, "seq_len": 0}, 400, "must be a positive integer"),
    ({"start": 0, "end": 2, "seq_len": 8, "split": "test"}, 400, "split='test' is unknown"),
])
def test_bad_requests_get_4xx_json(data_dir, params, status, message):
    async def scenario():
        app = web.Application()
        add_data_routes(app, data_dir, max_sequences=50, max_seq_len=10**6)
        runner, url = await serve(app)
        try:
            async with aiohttp.ClientSession() as s:
                async with s.get(f"{url}/data/sequences", params=params) as r:
                    return r.status, await r.json()
        finally:
            await runner.cleanup()

    got_status, body = asyncio.run(scenario())
    assert got_status == status and message in body["error"]


def test_client_retries_through_failures_and_gives_up_with_a_clear_error(data_dir):
    calls = {"n": 0}

    @web.middleware
    async def flaky(request, handler):  # the first two requests fail, then the real routes answer
        calls["n"] += 1
        if calls["n"] <= 2:
            raise web.HTTPServiceUnavailable(text="busy")
        return await handler(request)

    async def slow(_):
        await asyncio.sleep(5)
        return web.Response(text="late")

    async def scenario():
        app = web.Application(middlewares=[flaky])
        add_data_routes(app, data_dir)
        app.router.add_get("/slow/sequences", slow)
        runner, url = await serve(app)
        try:
            got = await fetch_sequences(url, 0, 3, 16, retries=3, backoff=0.01)
            assert calls["n"] == 3
            calls["n"] = 100  # no more failures: the slow route times out on its own
            with pytest.raises(DataError, match="after 2 attempts.*TimeoutError"):
                await fetch_sequences(url, 0, 3, 16, prefix="/slow", retries=1, timeout=0.2, backoff=0.01)
            before = calls["n"]
            with pytest.raises(DataError, match="refused the request \\(400\\)"):
                await fetch_sequences(url, 0, 3, 10**6, retries=3)  # a 4xx is not retried
            assert calls["n"] == before + 1
            return got
        finally:
            await runner.cleanup()

    got = asyncio.run(scenario())
    assert torch.equal(got, TokenStream(data_dir, 16).sequences(0, 3))
    with pytest.raises(DataError, match="after 2 attempts"):  # nobody listens on this port
        fetch_sequences_blocking("http://127.0.0.1:9", 0, 2, 8, retries=1, timeout=1, backoff=0.01)
    with pytest.raises(DataError, match="invalid"):
        fetch_sequences_blocking("http://127.0.0.1:9", 5, 2, 8)


def test_sequence_length_is_bounded_by_the_run(data_dir):
    """The coordinator mounts the routes with its run's seq_len: a longer one is refused before anything is read."""
    async def scenario():
        app = web.Application()
        add_data_routes(app, data_dir, max_seq_len=32, max_tokens=40 * 33)
        runner, url = await serve(app)
        try:
            async with aiohttp.ClientSession() as s:
                statuses = []
                for end, seq_len in ((40, 32), (40, 33), (41, 32)):
                    async with s.get(f"{url}/data/sequences", params={"start": 0, "end": end, "seq_len": seq_len}) as r:
                        statuses.append((r.status, (await r.json())["error"] if r.status != 200 else ""))
                return statuses
        finally:
            await runner.cleanup()

    ok, too_long, too_many = asyncio.run(scenario())
    assert ok == (200, "")
    assert too_long[0] == 400 and "seq_len=33" in too_long[1] and "seq_len <= 32" in too_long[1]
    assert too_many[0] == 400 and "1353 tokens" in too_many[1] and "at most 1320" in too_many[1]


def _peak_rss(pid: int) -> int:
    """The process's peak resident memory (VmHWM) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="peak memory is read from /proc")
def test_data_server_command_refuses_requests_beyond_its_shapes(tmp_path):
    data = prepared_bytes_dir(tmp_path, repeats=3000)  # ~128k training tokens: room for one 100k-token sequence
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "aftermath.cli", "data-server", "--data", str(data),
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/data/sequences"

    async def get(session, **params):
        async with session.get(url, params=params) as r:
            return r.status, await r.read()

    async def scenario():
        async with aiohttp.ClientSession() as s:
            deadline = time.monotonic() + 60
            while True:
                try:
                    status, _ = await get(s, start=0, end=2, seq_len=64)
                    break
                except aiohttp.ClientConnectionError:
                    assert server.poll() is None and time.monotonic() < deadline, server.stderr
                    await asyncio.sleep(0.2)
            assert status == 200
            before = _peak_rss(server.pid)
            # 128 x 100,001 tokens: ~100 MiB as int64 were it gathered (the default --max-seq-len is 4096)
            long_status, long_body = await get(s, start=0, end=128, seq_len=100_000)
            # 4096 x 4097 tokens: within --max-sequences and --max-seq-len, beyond the tokens of one request
            many_status, many_body = await get(s, start=0, end=4096, seq_len=4096)
            return before, (long_status, long_body.decode()), (many_status, many_body.decode())

    try:
        before, too_long, too_many = asyncio.run(scenario())
        grew = _peak_rss(server.pid) - before
    finally:
        server.terminate()
        server.wait(timeout=20)
    assert too_long[0] == 400 and "seq_len=100000" in too_long[1] and "seq_len <= 4096" in too_long[1]
    assert too_many[0] == 400 and "16781312 tokens" in too_many[1] and "at most 4194304" in too_many[1]
    assert grew < 50 * 2**20, f"the server's peak memory grew by {grew / 2**20:.0f} MiB"


def test_data_server_over_tls_with_a_pinned_fingerprint(tmp_path):
    from aftermath.tls import client_ssl, fingerprint

    data = prepared_bytes_dir(tmp_path, repeats=50)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # plain http beyond this machine is refused with one line, before anything listens
    refused = subprocess.run([sys.executable, "-m", "aftermath.cli", "data-server", "--data", str(data),
                              "--host", "0.0.0.0", "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--insecure" in refused.stderr and "Traceback" not in refused.stderr
    server = subprocess.Popen([sys.executable, "-m", "aftermath.cli", "data-server", "--data", str(data),
                               "--port", str(port), "--tls-self-signed", str(tmp_path / "tls")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    async def scenario(pin: str) -> int:
        connector = aiohttp.TCPConnector(ssl=client_ssl(pin, None))
        async with aiohttp.ClientSession(connector=connector) as s:
            deadline = time.monotonic() + 60
            while True:
                try:
                    async with s.get(f"https://127.0.0.1:{port}/data/meta") as r:
                        return r.status
                except aiohttp.ClientConnectorError:
                    assert server.poll() is None and time.monotonic() < deadline, server.stderr
                    await asyncio.sleep(0.2)

    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "tls" / "cert.pem").is_file():
            assert server.poll() is None and time.monotonic() < deadline, server.stderr
            time.sleep(0.1)
        assert asyncio.run(scenario(fingerprint(tmp_path / "tls" / "cert.pem"))) == 200
        with pytest.raises(aiohttp.ServerFingerprintMismatch):
            asyncio.run(scenario("00" * 32))
    finally:
        server.terminate()
        server.wait(timeout=20)
