"""The coordinator's decisions are signed: a real coordinator on 127.0.0.1 behind a real tampering proxy (an
aiohttp server that forwards every request and rewrites chosen answers). A client pinned to the coordinator's
key trains through an honest proxy, and refuses, with one line, an accepted set, an assignment or a checkpoint
that was re-signed by another key, unsigned, or altered; a client pinned to the wrong key never joins."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path
from typing import Any, Callable

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from aftermath.client.loop import ClientOptions, TrainingClient
from aftermath.coordinator.service import CoordinatorService
from aftermath.crypto import (COORDINATOR_KEY_FILE, SignatureError, Signer, assignment_message, round_message,
                              verify_decision)
from aftermath.data import default_data_dir
from aftermath.errors import ConfigError
from coordinator_helpers import small_run_config

TOKEN = "signed"
OTHER = Signer()  # the attacker's key

SESSION = web.AppKey("session", aiohttp.ClientSession)
Rewrite = Callable[[str, dict[str, Any]], None]  # (path, JSON answer) -> edits the answer in place


def tamper_proxy(upstream: str, rewrite: Rewrite | None) -> web.Application:
    """Forwards every request to `upstream`; JSON answers pass through `rewrite` first."""

    async def forward(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}
        session = request.app[SESSION]
        async with session.request(request.method, upstream + request.path_qs, headers=headers,
                                   data=await request.read(), allow_redirects=False) as r:
            body = await r.read()
            kind = r.headers.get("Content-Type", "application/octet-stream").split(";")[0]
            if rewrite is not None and kind == "application/json" and r.status == 200:
                answer = json.loads(body)
                rewrite(request.path, answer)
                body = json.dumps(answer).encode()
            passed = {k: v for k, v in r.headers.items()
                      if k.lower() not in ("content-length", "content-encoding", "transfer-encoding", "connection")}
            return web.Response(body=body, status=r.status, headers=passed)

    async def session_ctx(app: web.Application):
        app[SESSION] = aiohttp.ClientSession()
        yield
        await app[SESSION].close()

    app = web.Application(client_max_size=64 * 2**20)
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def run_through_proxy(tmp_path: Path, rewrite: Rewrite | None, pinned: str | None = None,
                      ) -> tuple[CoordinatorService, dict[str, Any] | BaseException]:
    run = small_run_config(**{"schedule.total_steps": 2, "schedule.rounds_per_epoch": 2,
                              "schedule.init_min_clients": 1, "schedule.warmup_time": 5.0})

    async def main() -> tuple[CoordinatorService, dict[str, Any] | BaseException]:
        service = CoordinatorService(run, tmp_path / "run", token=TOKEN, data_dir=default_data_dir(), linger=0.5)
        async with TestServer(service.app, host="127.0.0.1") as server:
            upstream = str(server.make_url("")).rstrip("/")
            async with TestServer(tamper_proxy(upstream, rewrite), host="127.0.0.1") as proxy:
                client = TrainingClient(ClientOptions(
                    coordinator=str(proxy.make_url("")).rstrip("/"), token=TOKEN, tier=1, name="c",
                    work_dir=tmp_path / "clients", threads=1, give_up_after=20.0,
                    coordinator_key=pinned or service.identity.public_hex))
                try:
                    result: dict[str, Any] | BaseException = await asyncio.wait_for(client.run_async(), 120)
                except (SignatureError, ConfigError) as exc:
                    result = exc
                return service, result

    return asyncio.run(main())


def test_a_pinned_client_trains_through_an_honest_proxy(tmp_path, one_torch_thread):
    service, result = run_through_proxy(tmp_path, None)
    assert isinstance(result, dict) and result["step"] == 2, result
    # the identity is kept in the run directory, readable by its owner only, and the same after a restart
    key_file = tmp_path / "run" / COORDINATOR_KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert Signer.load_or_create(key_file).public_hex == service.identity.public_hex


def _rounds(answer: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in (answer.get("round"), answer.get("previous_round"), answer.get("catch_up"))
            if r is not None]


def resign_results(path: str, answer: dict[str, Any]) -> None:
    for rnd in _rounds(answer) if path == "/view" else []:
        result = rnd["result"]
        if result is not None:
            blob = (result["update"] or {}).get("blob")
            result["signature"] = OTHER.sign(round_message(answer["run_id"], rnd["step"], result["accepted_digest"],
                                                           blob))


def unsign_results(path: str, answer: dict[str, Any]) -> None:
    for rnd in _rounds(answer) if path == "/view" else []:
        if rnd["result"] is not None:
            rnd["result"]["signature"] = None


def drop_from_accepted_set(path: str, answer: dict[str, Any]) -> None:
    # the payloads plane: the proxy serves an accepted set without its result (a replica that would then apply
    # a different set from everyone else), keeping the coordinator's signature and digest
    if path.startswith("/rounds/"):
        answer["accepted"] = []


def shift_assignment(path: str, answer: dict[str, Any]) -> None:
    for rnd in _rounds(answer) if path == "/view" else []:
        if rnd["assignment"] is not None:
            start, end = rnd["assignment"]
            rnd["assignment"] = [start + 1, end + 1]


def alter_manifest(path: str, answer: dict[str, Any]) -> None:
    if path == "/checkpoint" and answer.get("manifest"):
        answer["manifest"]["created_by"] = "someone else"


@pytest.mark.parametrize("rewrite, message", [
    (resign_results, "does not carry the signature of coordinator key"),
    (unsign_results, "is not signed by the coordinator"),
    (drop_from_accepted_set, "accepted set"),
    (shift_assignment, "does not carry the signature of coordinator key"),
    (alter_manifest, "does not carry the signature of coordinator key"),
], ids=["re-signed", "unsigned", "altered-set", "assignment", "manifest"])
def test_a_tampered_decision_is_refused_with_one_line(tmp_path, one_torch_thread, rewrite, message):
    service, result = run_through_proxy(tmp_path, rewrite)
    assert isinstance(result, SignatureError), result
    assert message in str(result) and "\n" not in str(result)
    assert service.machine.step < 2 or rewrite is drop_from_accepted_set  # nothing was applied from it


def test_a_client_pinned_to_another_key_does_not_join(tmp_path, one_torch_thread):
    service, result = run_through_proxy(tmp_path, None, pinned=OTHER.public_hex)
    assert isinstance(result, ConfigError), result
    assert "--coordinator-key" in str(result) and service.identity.public_hex[:16] in str(result)
    assert service.machine.members == {}  # it refused before sending its token


def test_decision_messages_bind_every_field():
    key = Signer()
    sig = key.sign(round_message("run", 3, "a" * 64, None))
    verify_decision(key.public_hex, sig, round_message("run", 3, "a" * 64, None), "round 3")
    for other in (round_message("run", 4, "a" * 64, None), round_message("run", 3, "b" * 64, None),
                  round_message("run", 3, "a" * 64, "c" * 64), round_message("other", 3, "a" * 64, None)):
        with pytest.raises(SignatureError, match="round 3 does not carry"):
            verify_decision(key.public_hex, sig, other, "round 3")
    assignment = key.sign(assignment_message("run", 3, "c", 0, 4))
    with pytest.raises(SignatureError):
        verify_decision(key.public_hex, assignment, assignment_message("run", 3, "c", 0, 5), "assignment")


def test_a_broken_identity_file_is_one_line(tmp_path):
    (tmp_path / COORDINATOR_KEY_FILE).write_text("not a key")
    with pytest.raises(SignatureError, match="move it away"):
        Signer.load_or_create(tmp_path / COORDINATOR_KEY_FILE)
