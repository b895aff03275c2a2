"""The coordinator's routes on a real aiohttp server on 127.0.0.1: the happy path, and every route rejecting
malformed input with a 4xx and a JSON error (never a 5xx)."""

from __future__ import annotations

import asyncio
import hashlib
import json

import aiohttp
import pytest
import torch

from aftermath.checkpoint.schema import schema_hash
from aftermath.round.replica import Replica
from aftermath.coordinator.service import CoordinatorService
from aftermath.crypto import Signer
from aftermath.model import preset_config, tier_spec
from aftermath.checkpoint.hf_dir import load_model_dir
from coordinator_helpers import serve_coordinator, small_run_config, wait_phase

TOKEN = "secret-run-token"


def run_config(**overrides):
    return small_run_config(**{**{"schedule.init_min_clients": 1}, **overrides})


def serve(tmp_path, body, **overrides):
    """Run `body(service, session, url)` against a real server."""
    serve_coordinator(run_config(**overrides), tmp_path / "run", TOKEN, body)


async def join(session, url, **kw):
    body = {"token": TOKEN, "name": "c", "tier": 0, "schema_hash": schema_hash(preset_config("tiny"))}
    body.update(kw)
    async with session.post(f"{url}/join", json=body) as r:
        return r.status, await r.json()


async def expect_4xx(session, method, url, status=None, **kw):
    async with session.request(method, url, **kw) as r:
        assert 400 <= r.status < 500, (method, url, r.status, await r.text())
        if status is not None:
            assert r.status == status, (method, url, r.status, await r.text())
        data = await r.json()
        assert isinstance(data.get("error"), str) and data["error"]
        return data


def test_every_route_rejects_malformed_input_with_a_json_4xx(tmp_path):
    async def body(service, s, url):
        # join: bad JSON, not an object, missing fields, wrong token, wrong schema, bad tier, both tier and spec
        await expect_4xx(s, "POST", f"{url}/join", 400, data=b"{not json")
        await expect_4xx(s, "POST", f"{url}/join", 400, json=[1, 2])
        await expect_4xx(s, "POST", f"{url}/join", 400, json={"token": TOKEN})
        await expect_4xx(s, "POST", f"{url}/join", 400, data=b"\xff\xfe")
        await expect_4xx(s, "POST", f"{url}/join", 400, json={"token": TOKEN, "tier": 0, "schema_hash": "x", "extra": 1})
        status, data = await join(s, url, token="wrong")
        assert status == 401 and "token" in data["error"]
        status, data = await join(s, url, schema_hash="0" * 64)
        assert status == 409 and data["reason"] == "schema_mismatch" and "schema" in data["error"]
        status, data = await join(s, url, tier=9)
        assert status == 400 and "tiers 0.." in data["error"]
        status, data = await join(s, url, tier=-1)
        assert status == 400
        status, data = await join(s, url, tier=None, spec="bad spec")
        assert status == 400
        status, data = await join(s, url, spec="m=64,64,64,64")
        assert status == 400 and "exactly one" in data["error"]
        status, data = await join(s, url, name="../../etc")
        assert status == 400
        status, data = await join(s, url, throughput=0)
        assert status == 400
        # session-protected routes without, or with a wrong, session
        for method, path in (("POST", "/heartbeat"), ("POST", "/ready"), ("POST", "/commit"), ("POST", "/applied"),
                             ("POST", "/hash"), ("PUT", "/blobs/" + "a" * 64), ("GET", "/blobs/" + "a" * 64)):
            await expect_4xx(s, method, url + path, 401, json={})
            await expect_4xx(s, method, url + path, 401, json={}, headers={"Authorization": "Bearer nope"})
        status, data = await join(s, url)
        assert status == 200, data
        auth = {"Authorization": f"Bearer {data['session']}"}
        # heartbeat / ready / applied / hash / commit: wrong types, extra keys, bad values
        await expect_4xx(s, "POST", f"{url}/heartbeat", 400, headers=auth, json={"stats": {"x": [1, 2]}})
        await expect_4xx(s, "POST", f"{url}/heartbeat", 400, headers=auth, data=b"[]")
        await expect_4xx(s, "POST", f"{url}/heartbeat", 413, headers=auth, data=b" " * (300 * 1024))
        await expect_4xx(s, "POST", f"{url}/ready", 400, headers=auth, json={"epoch": "zero"})
        await expect_4xx(s, "POST", f"{url}/ready", 409, headers=auth, json={"epoch": 7})
        await expect_4xx(s, "POST", f"{url}/applied", 400, headers=auth, json={"step": -1})
        await expect_4xx(s, "POST", f"{url}/applied", 409, headers=auth, json={"step": 0})
        await expect_4xx(s, "POST", f"{url}/hash", 400, headers=auth,
                         json={"epoch": 0, "step": 0, "weights_sha256": "nothex"})
        await expect_4xx(s, "POST", f"{url}/hash", 409, headers=auth,
                         json={"epoch": 0, "step": 5, "weights_sha256": "a" * 64})
        await expect_4xx(s, "POST", f"{url}/commit", 400, headers=auth,
                         json={"step": 0, "blob": "a" * 64, "sequences": 4, "train_seconds": 1, "loss": "NaN"})
        await expect_4xx(s, "POST", f"{url}/commit", 409, headers=auth,
                         json={"step": 0, "blob": "a" * 64, "sequences": 4, "train_seconds": 1, "loss": 1.0})
        # blobs: bad id, hash mismatch, too large, unknown
        await expect_4xx(s, "PUT", f"{url}/blobs/XYZ", 400, headers=auth, data=b"abc")
        await expect_4xx(s, "PUT", f"{url}/blobs/" + "0" * 64, 400, headers=auth, data=b"abc")
        big = b"x" * (service.run.network.max_blob_bytes + 10)
        await expect_4xx(s, "PUT", f"{url}/blobs/" + hashlib.sha256(big).hexdigest(), 413, headers=auth, data=big)
        await expect_4xx(s, "GET", f"{url}/blobs/" + "b" * 64, 404, headers=auth)
        await expect_4xx(s, "GET", f"{url}/blobs/short", 400, headers=auth)
        # a blob that is not a payload is refused at commit (it never reaches an accepted set): here already
        # for its missing signature (tests/test_trust_signatures.py refuses a signed junk payload)
        junk = b"not a payload"
        sha = hashlib.sha256(junk).hexdigest()
        async with s.put(f"{url}/blobs/{sha}", data=junk, headers=auth) as r:
            assert r.status == 201
        await expect_4xx(s, "POST", f"{url}/commit", None, headers=auth,
                         json={"step": 0, "blob": sha, "sequences": 4, "train_seconds": 1, "loss": 1.0})
        # state, checkpoint files, summary, unknown routes and methods
        await expect_4xx(s, "GET", f"{url}/state?after=x", 400)
        await expect_4xx(s, "GET", f"{url}/state?after=1&wait=nan", 400)
        await expect_4xx(s, "GET", f"{url}/checkpoint/files/../state.json", None)
        await expect_4xx(s, "GET", f"{url}/checkpoint/files/model/%2e%2e/%2e%2e/state.json", None)
        await expect_4xx(s, "GET", f"{url}/checkpoint/files/model/nothing.bin", 404)
        await expect_4xx(s, "GET", f"{url}/checkpoint/files/model/a%00b", 400)  # NUL once crashed resolve()
        await expect_4xx(s, "GET", f"{url}/checkpoint/files/model/%0a", None)
        await expect_4xx(s, "GET", f"{url}/summary", 404)
        await expect_4xx(s, "GET", f"{url}/no-such-route", 404)
        await expect_4xx(s, "DELETE", f"{url}/join", 405)
        async with s.get(f"{url}/health") as r:
            assert r.status == 200 and (await r.json())["ok"] is True

    serve(tmp_path, body)


def test_a_round_through_the_routes(tmp_path):
    """One client joins, downloads its tier, trains a real payload, and the run goes to the next step."""

    async def body(service, s, url):
        signer = Signer()
        status, data = await join(s, url, tier=1, name="small", public_key=signer.public_hex)
        assert status == 200 and data["client_id"] == "small" and data["spec"]["name"] == "tier1"
        auth = {"Authorization": f"Bearer {data['session']}"}
        # the initial checkpoint and its manifest
        async with s.get(f"{url}/checkpoint") as r:
            ck = await r.json()
        assert ck["info"]["step"] == 0 and ck["manifest"]["schema_hash"] == data["schema_hash"]
        entry = next(e for e in ck["manifest"]["tiers"] if e["name"] == "tier1")
        async with s.get(f"{url}/checkpoint/files/model-tier1/config.json") as r:
            assert r.status == 200 and json.loads(await r.read())["intermediate_size"] == 256
        assert any(f.endswith("model.safetensors") for f in entry["files"])
        # warmup -> ready -> a round
        st = await wait_phase(s, url, "Warmup")
        async with s.post(f"{url}/ready", json={"epoch": st["epoch"]}, headers=auth) as r:
            assert r.status == 200
        st = await wait_phase(s, url, "RoundTrain")
        assert st["round"]["assignments"] == {"small": [0, 4]}
        # train a real payload with the sliced tier-1 model from the checkpoint
        model = load_model_dir(service.run_dir / "checkpoint" / "model-tier1")
        spec = tier_spec(service.keeper.config, 1)
        replica = Replica.build(model, service.keeper.config, spec, service.run)
        batch = torch.randint(0, 4096, (4, 17), generator=torch.Generator().manual_seed(0))
        result = replica.train(batch, micro_batch_size=2, step=0, client_id="alice")
        blob = replica.encode(result.grads, 0, "small")
        sha = hashlib.sha256(blob).hexdigest()
        async with s.put(f"{url}/blobs/{sha}", data=blob, headers=auth) as r:
            assert r.status == 201
        async with s.post(f"{url}/commit", headers=auth, json={
                "step": 0, "blob": sha, "sequences": 4, "train_seconds": result.seconds, "loss": result.loss,
                "signature": signer.sign_commitment(service.run.run_id, 0, "small", sha, 0, 4),
                "stats": {"loss": result.loss, "bytes_up": len(blob)}}) as r:
            assert r.status == 200, await r.text()
        # overlapped rounds (the default): step 1 opens at once, step 0's accepted set shown beside it
        st = await wait_phase(s, url, "RoundTrain", step=1)
        assert st["round"]["assignments"] == {"small": [4, 8]}
        assert [c["client_id"] for c in st["previous_round"]["accepted"]] == ["small"]
        async with s.get(f"{url}/blobs/{sha}", headers=auth) as r:
            assert await r.read() == blob
        replica.apply([replica.decode(blob, 0, "small", spec)], 0)
        async with s.post(f"{url}/applied", json={"step": 0}, headers=auth) as r:
            assert r.status == 200
        # long-poll returns at once for an old version, and waits for a new one
        async with s.get(f"{url}/state?after={st['version'] - 1}&wait=5") as r:
            assert (await r.json())["version"] >= st["version"]
        # the coordinator's replica applied the same update: same tier-1 hash (once its apply job ran)
        applied = service.run_dir / "metrics" / "coordinator.jsonl"
        for _ in range(200):
            if any(json.loads(line).get("event") == "applied" for line in applied.read_text().splitlines()):
                break
            await asyncio.sleep(0.02)
        assert service.keeper.tier_hash(spec) == replica.weights_sha256()

    serve(tmp_path, body)


def test_state_is_pushed_over_websocket(tmp_path):
    async def body(service, s, url):
        async with s.ws_connect(f"{url}/ws") as ws:
            first = json.loads((await ws.receive(timeout=5)).data)
            assert first["phase"] == "WaitingForMembers"
            status, _ = await join(s, url)
            assert status == 200
            for _ in range(20):
                msg = json.loads((await ws.receive(timeout=5)).data)
                if msg["members"]:
                    break
            assert msg["members"][0]["id"] == "c"

    serve(tmp_path, body)


def test_restart_resumes_from_the_persisted_state_and_refuses_a_finished_run(tmp_path):
    from aftermath.coordinator.persist import save_state
    from aftermath.errors import ConfigError

    async def first(service, s, url):
        async with s.get(f"{url}/checkpoint") as r:
            assert (await r.json())["info"]["step"] == 0

    serve(tmp_path, first)
    run_dir = tmp_path / "run"
    save_state(run_dir, {"run_id": "aftermath-run", "epoch": 0, "step": 0, "finished": False})

    async def second(service, s, url):
        assert service.machine.epoch == 1 and service.machine.step == 0 and service.machine.checkpoint_epoch == 0
        async with s.get(f"{url}/health") as r:
            assert (await r.json())["epoch"] == 1

    serve(tmp_path, second)
    save_state(run_dir, {"run_id": "aftermath-run", "epoch": 0, "step": 0, "finished": True})
    with pytest.raises(ConfigError, match="finished run"):
        CoordinatorService(run_config(), run_dir, token=TOKEN)
    save_state(run_dir, {"run_id": "other", "epoch": 0, "step": 0, "finished": False})
    with pytest.raises(ConfigError, match="holds run 'other'"):
        CoordinatorService(run_config(), run_dir, token=TOKEN)


def test_hostile_bodies_and_paths_are_a_400_not_a_500(tmp_path):
    async def body(service, s, url):
        schema = schema_hash(preset_config("tiny"))
        # 120,000 nested arrays: the JSON parser's recursion limit, answered, not crashed
        data = await expect_4xx(s, "POST", f"{url}/join", 400, data=b"[" * 120_000 + b"]" * 120_000)
        assert "nests too deeply" in data["error"]
        deep = b'{"token": "x", "stats": ' + b'{"a": ' * 30_000 + b"1" + b"}" * 30_000 + b"}"
        await expect_4xx(s, "POST", f"{url}/join", 400, data=deep)
        # a boolean is not a tier (JSON true must not pass as tier 1)
        data = await expect_4xx(s, "POST", f"{url}/join", 400,
                                json={"token": TOKEN, "tier": True, "schema_hash": schema})
        assert "tier" in data["error"]
        # a 5,000-character file name: refused before the file system sees it
        data = await expect_4xx(s, "GET", f"{url}/checkpoint/files/{'a' * 5000}", 400)
        assert "255" in data["error"]
        async with s.get(f"{url}/health") as r:  # still serving
            assert r.status == 200

    serve(tmp_path, body)
