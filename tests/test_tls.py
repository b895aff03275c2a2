"""TLS with a pinned coordinator identity, and secrets off the command line (aftermath.tls): real https servers
on 127.0.0.1 with certificates made here, the client's checks, and the testnet's child processes' argv."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl
import stat
import threading
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from rich.console import Console

from aftermath.errors import ConfigError
from aftermath.tls import (check_listen, check_plain_http, client_ssl, fingerprint, make_self_signed,
                           normalize_fingerprint, read_secret, server_context)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    good = make_self_signed(d / "cert.pem", d / "key.pem", ["127.0.0.1", "localhost"])
    make_self_signed(d / "other.pem", d / "other-key.pem", ["127.0.0.1"])
    make_self_signed(d / "expired.pem", d / "expired-key.pem", ["127.0.0.1"], days=-2)
    return d, good


async def start_server(cert: Path, key: Path):
    """A real aiohttp https server answering GET /health; returns (runner, url, hits)."""
    hits: list[str] = []

    @web.middleware
    async def count(request, handler):
        hits.append(request.path)
        return await handler(request)

    async def health(request):
        return web.json_response({"ok": True})

    app = web.Application(middlewares=[count])
    app.router.add_get("/health", health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=server_context(cert, key))
    await site.start()
    return runner, port, hits


async def get_health(url: str, ssl_arg) -> int:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl_arg if ssl_arg is not None else True)) \
            as session:
        async with session.get(url + "/health", timeout=aiohttp.ClientTimeout(total=10)) as resp:
            await resp.read()
            return resp.status


def test_pinned_fingerprint_wrong_fingerprint_and_plain_http(certs):
    d, good = certs
    wrong = fingerprint(d / "other.pem")

    async def main():
        runner, port, hits = await start_server(d / "cert.pem", d / "key.pem")
        url = f"https://127.0.0.1:{port}"
        try:
            assert await get_health(url, client_ssl(good, None)) == 200
            assert await get_health(url, client_ssl(None, d / "cert.pem")) == 200  # the cert as its own CA
            assert hits == ["/health", "/health"]
            with pytest.raises(aiohttp.ServerFingerprintMismatch):
                await get_health(url, client_ssl(wrong, None))
            with pytest.raises(aiohttp.ClientConnectorCertificateError):  # the system CAs do not know it
                await get_health(url, None)
            with pytest.raises(aiohttp.ClientError):  # plain http to the TLS port
                await get_health(f"http://127.0.0.1:{port}", None)
            assert hits == ["/health", "/health"]  # none of the refused requests reached a handler
        finally:
            await runner.cleanup()

    asyncio.run(main())


def test_client_probe_names_both_fingerprints_before_any_token(certs):
    from aftermath.commands.client import check_coordinator_identity

    d, good = certs
    wrong = fingerprint(d / "other.pem")
    result: dict = {}

    def probe(ssl_arg):
        try:
            check_coordinator_identity(result["url"], ssl_arg, 10)
            return None
        except ConfigError as exc:
            return str(exc)

    async def main():
        runner, port, hits = await start_server(d / "cert.pem", d / "key.pem")
        result["url"] = f"https://127.0.0.1:{port}"
        try:
            loop = asyncio.get_running_loop()
            result["wrong"] = await loop.run_in_executor(None, probe, client_ssl(wrong, None))
            result["untrusted"] = await loop.run_in_executor(None, probe, None)
            result["hits_refused"] = list(hits)
            result["right"] = await loop.run_in_executor(None, probe, client_ssl(good, None))
        finally:
            await runner.cleanup()

    asyncio.run(main())
    assert result["wrong"] == (f"the coordinator's certificate fingerprint is {good}, expected {wrong}: check "
                               "--coordinator-fingerprint (no token was sent)")
    assert "--coordinator-fingerprint" in result["untrusted"] and "--ca-file" in result["untrusted"]
    assert result["hits_refused"] == []
    assert result["right"] is None


def test_expired_certificate_is_refused_by_a_ca_verifying_client(certs):
    d, _ = certs

    async def main():
        runner, port, hits = await start_server(d / "expired.pem", d / "expired-key.pem")
        try:
            with pytest.raises(aiohttp.ClientConnectorCertificateError, match="expired"):
                await get_health(f"https://127.0.0.1:{port}", client_ssl(None, d / "expired.pem"))
            assert hits == []
        finally:
            await runner.cleanup()

    asyncio.run(main())


def test_coordinator_serves_https_with_its_real_app(tmp_path, certs):
    """The coordinator's serving path (service.serve with ssl_context) on the real app."""
    from aftermath.coordinator.service import CoordinatorService, serve

    from coordinator_helpers import small_run_config

    d, good = certs
    urls: list[str] = []

    async def main():
        service = CoordinatorService(small_run_config(), tmp_path / "run", token="t0ken", linger=0.0)
        task = asyncio.create_task(serve(service, "127.0.0.1", 0, urls.append,
                                         ssl_context=server_context(d / "cert.pem", d / "key.pem")))
        try:
            for _ in range(200):
                if urls or task.done():
                    break
                await asyncio.sleep(0.02)
            assert urls and urls[0].startswith("https://127.0.0.1:"), (urls, task)
            assert await get_health(urls[0], client_ssl(good, None)) == 200
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())


def test_self_signed_files_fingerprint_and_key_mode(certs):
    d, good = certs
    der = x509.load_pem_x509_certificate((d / "cert.pem").read_bytes()).public_bytes(serialization.Encoding.DER)
    assert fingerprint(d / "cert.pem") == good == hashlib.sha256(der).hexdigest()
    assert len(good) == 64
    assert stat.S_IMODE(os.stat(d / "key.pem").st_mode) == 0o600
    cert = x509.load_pem_x509_certificate((d / "cert.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert normalize_fingerprint(":".join(good[i:i + 2].upper() for i in range(0, 64, 2))) == good
    with pytest.raises(ConfigError, match="not a SHA-256 fingerprint"):
        normalize_fingerprint("abc")
    assert isinstance(client_ssl(None, d / "cert.pem"), ssl.SSLContext) and client_ssl(None, None) is None
    with pytest.raises(ConfigError, match="not both"):
        client_ssl(good, d / "cert.pem")


def test_plain_http_only_to_this_machine():
    with pytest.raises(ConfigError) as err:
        check_plain_http("http://10.0.0.1:8700", insecure=False)
    assert "http://10.0.0.1:8700" in str(err.value) and "--insecure" in str(err.value)
    assert "https" in str(err.value) and "\n" not in str(err.value)
    check_plain_http("http://10.0.0.1:8700", insecure=True)
    for ok in ("http://127.0.0.1:8700", "http://127.1.2.3:1", "http://localhost:8700", "http://[::1]:8700",
               "https://10.0.0.1:8700", "https://example.org"):
        check_plain_http(ok, insecure=False)
    with pytest.raises(ConfigError, match="--tls self-signed"):
        check_listen("0.0.0.0", tls=False, insecure=False)
    check_listen("0.0.0.0", tls=True, insecure=False)
    check_listen("0.0.0.0", tls=False, insecure=True)
    check_listen("127.0.0.1", tls=False, insecure=False)


def test_read_secret_flag_then_file_then_env(tmp_path, monkeypatch):
    file = tmp_path / "token"
    file.write_text("  from-file\n")
    monkeypatch.setenv("AFTERMATH_TEST_TOKEN", "from-env")
    assert read_secret("from-flag", file, "AFTERMATH_TEST_TOKEN") == "from-flag"
    assert read_secret(None, file, "AFTERMATH_TEST_TOKEN") == "from-file"
    assert read_secret(None, None, "AFTERMATH_TEST_TOKEN") == "from-env"
    monkeypatch.delenv("AFTERMATH_TEST_TOKEN")
    assert read_secret(None, None, "AFTERMATH_TEST_TOKEN") is None
    with pytest.raises(ConfigError, match=r"cannot read --token-file .*nope.*No such file"):
        read_secret(None, tmp_path / "nope", "AFTERMATH_TEST_TOKEN")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        read_secret(None, tmp_path / "empty", "AFTERMATH_TEST_TOKEN")


def test_cli_refusals_are_one_line(tmp_path):
    from test_cli_errors import aftermath, one_line_error

    env = {k: v for k, v in os.environ.items() if k != "AFTERMATH_TOKEN"}
    one_line_error(aftermath("client", "--coordinator", "http://10.0.0.1:8700", "--token", "t", env=env),
                   "http://10.0.0.1:8700", "--insecure", "https")
    one_line_error(aftermath("client", "--coordinator", "http://127.0.0.1:9", env=env), "no run token",
                   "--token-file", "AFTERMATH_TOKEN")
    one_line_error(aftermath("client", "--coordinator", "https://127.0.0.1:9", "--token-file",
                             str(tmp_path / "nope"), env=env), "--token-file", "nope")
    one_line_error(aftermath("coordinator", "--host", "0.0.0.0", "--port", "0", "--run-dir", str(tmp_path / "r"),
                             env=env), "--tls-cert", "--tls self-signed", "--insecure")
    one_line_error(aftermath("coordinator", "--port", "0", "--tls-cert", str(tmp_path / "c.pem"), "--run-dir",
                             str(tmp_path / "r"), env=env), "--tls-key")
    assert not (tmp_path / "r").exists()


def _run_testnet_watching_argv(out: Path, tls: bool) -> tuple[dict, list[list[str]], str, str]:
    """Run a 1-client, 2-step testnet; while it runs, read every child's /proc/PID/cmdline."""
    from aftermath.testnet import Testnet, TestnetOptions

    options = TestnetOptions(clients=1, tiers=[1], steps=2, out=out, live=False, timeout=240, tls=tls,
                             extra_overrides={"schedule.rounds_per_epoch": 2, "schedule.global_batch_size": 4,
                                              "optimizer.warmup_steps": 1, "data.val_sequences": 8})
    testnet = Testnet(options, Console(quiet=True))
    cmdlines: dict[int, list[str]] = {}
    result: dict = {}

    def target():
        try:
            result["summary"] = testnet.run()
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            result["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    while thread.is_alive():
        for proc in list(testnet.procs.values()):
            try:
                argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode().split("\0")
            except OSError:
                continue
            if "aftermath.cli" in argv:  # not a zombie's empty cmdline, nor the moment between fork and exec
                cmdlines[proc.pid] = argv
        time.sleep(0.2)
    thread.join()
    assert "error" not in result, result.get("error")
    return result["summary"], list(cmdlines.values()), testnet.token, testnet.admin_token


@pytest.mark.slow
def test_testnet_keeps_tokens_off_argv(tmp_path):
    summary, cmdlines, token, admin = _run_testnet_watching_argv(tmp_path / "out", tls=False)
    assert summary["steps"] == 2 and summary["replicas_consistent"]
    assert len(cmdlines) >= 2 and {"coordinator", "client"} <= {a for argv in cmdlines for a in argv}
    for argv in cmdlines:
        assert not any(token in a or admin in a for a in argv), argv
    logs = "".join(p.read_text() for p in (tmp_path / "out" / "logs").glob("*.log"))
    assert token not in logs  # the coordinator got it from its environment: it does not echo it


@pytest.mark.slow
def test_testnet_over_tls_with_a_pinned_certificate(tmp_path):
    summary, cmdlines, token, _ = _run_testnet_watching_argv(tmp_path / "out", tls=True)
    assert summary["steps"] == 2 and summary["replicas_consistent"]
    assert any("--coordinator-fingerprint" in argv for argv in cmdlines)
    assert all(token not in " ".join(argv) for argv in cmdlines)


def test_transport_refuses_a_wrong_fingerprint_at_once(certs):
    from aftermath.client.transport import Transport

    d, good = certs
    wrong = fingerprint(d / "other.pem")

    async def main():
        runner, port, hits = await start_server(d / "cert.pem", d / "key.pem")
        try:
            connector = aiohttp.TCPConnector(ssl=client_ssl(wrong, None))
            async with aiohttp.ClientSession(connector=connector) as session:
                transport = Transport(f"https://127.0.0.1:{port}", session, retries=5, backoff=1.0)
                started = time.monotonic()
                with pytest.raises(ConfigError) as err:
                    await transport.call("POST", "/join", {"token": "secret"}, auth=False)
                assert time.monotonic() - started < 2  # not retried
                assert str(err.value).startswith(f"the coordinator's certificate fingerprint is {good}, "
                                                 f"expected {wrong}: check --coordinator-fingerprint")
            assert hits == []
        finally:
            await runner.cleanup()

    asyncio.run(main())
