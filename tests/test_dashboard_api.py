"""The dashboard's routes on a real coordinator (aiohttp on 127.0.0.1): the page and its files, the snapshot,
pause/resume behind the admin token, a rejected payload in the events; and the history builder on its own."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re

import aiohttp
from aiohttp.test_utils import TestServer

from aftermath.checkpoint.schema import schema_hash
from aftermath.coordinator.service import CoordinatorService
from aftermath.dashboard import MetricsTail, RunHistory
from aftermath.data import default_data_dir
from aftermath.model import preset_config
from aftermath.runconfig import load_run_config

TOKEN = "run-token"
ADMIN = "admin-token"


def run_config():
    return load_run_config().with_overrides({
        "schedule.init_min_clients": 2, "schedule.min_clients": 1, "schedule.total_steps": 2,
        "schedule.rounds_per_epoch": 2, "schedule.global_batch_size": 4, "data.seq_len": 16,
        "network.max_blob_bytes": 2**20})


def serve(tmp_path, body, admin_token=ADMIN):
    async def main():
        service = CoordinatorService(run_config(), tmp_path / "run", token=TOKEN, linger=0.0, admin_token=admin_token,
                                     data_dir=default_data_dir())  # the embedded corpus: validation, tokenizer
        async with TestServer(service.app, host="127.0.0.1") as server:
            url = str(server.make_url("")).rstrip("/")
            async with aiohttp.ClientSession() as session:
                await body(service, session, url)

    asyncio.run(main())


async def get_json(s, url):
    async with s.get(url) as r:
        assert r.status == 200, await r.text()
        return await r.json()


def test_page_snapshot_and_pause_behind_the_admin_token(tmp_path):
    async def body(service, s, url):
        async with s.get(f"{url}/") as r:
            page = await r.text()
            assert r.status == 200 and r.content_type == "text/html"
        for src in re.findall(r'(?:src|href)="([^"]+)"', page):
            assert src.startswith("/web/"), src  # everything from the coordinator itself: no CDN
            async with s.get(url + src) as r:
                assert r.status == 200 and len(await r.read()) > 500
        async with s.get(f"{url}/web/../state.py") as r:
            assert r.status == 404
        async with s.get(f"{url}/web/secret.txt") as r:
            assert r.status == 404 and "no dashboard file" in (await r.json())["error"]

        async with s.post(f"{url}/join", json={"token": TOKEN, "name": "a", "tier": 1,
                                                "schema_hash": schema_hash(preset_config("tiny"))}) as r:
            assert r.status == 200
        snap = await get_json(s, f"{url}/api/dashboard")
        assert snap["round"]["phase"] == "WaitingForMembers" and snap["round"]["step"] == 0
        assert snap["round"]["tokens_per_step"] == 4 * 16 and snap["round"]["paused"] is False
        assert [(p["id"], p["tier"], p["state"]) for p in snap["peers"]] == [("a", 1, "warmup")]
        assert snap["admin"] == {"enabled": True}
        # the initial checkpoint is evaluated at every exported tier width
        for _ in range(100):
            snap = await get_json(s, f"{url}/api/dashboard")
            if snap["checkpoint"] is not None and snap["loss"]["val"]:
                break
            await asyncio.sleep(0.1)
        # ... and at the Mix'n'Match specs between adjacent exported tiers; nothing has got worse yet
        assert set(snap["loss"]["val"]) == {"tier0", "tier1", "tier2", "mix0-1", "mid0-1", "mix1-2", "mid1-2"}
        assert snap["regressions"] == []
        ck = snap["checkpoint"]
        assert ck["epoch"] == -1 and [t["name"] for t in ck["tiers"]] == ["tier0", "tier1", "tier2"]
        for tier in ck["tiers"]:
            model = next(f for f in tier["files"] if f["path"].endswith("model.safetensors"))
            assert re.fullmatch(r"[0-9a-f]{64}", model["sha256"]) and model["bytes"] > 100_000
        assert set(ck["samples"]) == {"tier0", "tier1", "tier2"}
        assert all(text.startswith("ROMEO:") and len(text) > 20 for text in ck["samples"].values())
        assert [e["kind"] for e in snap["events"]].count("joined") == 1

        for headers, status in (({}, 401), ({"Authorization": "Bearer wrong"}, 401),
                                ({"Authorization": ADMIN}, 401)):
            async with s.post(f"{url}/api/pause", headers=headers) as r:
                assert r.status == status and "admin token" in (await r.json())["error"]
        assert service.machine.paused is False
        auth = {"Authorization": f"Bearer {ADMIN}"}
        async with s.post(f"{url}/api/pause", headers=auth) as r:
            assert r.status == 200 and (await r.json())["paused"] is True
        assert (await get_json(s, f"{url}/api/dashboard"))["round"]["paused"] is True
        async with s.post(f"{url}/api/resume", headers=auth) as r:
            assert r.status == 200
        await asyncio.sleep(0.2)
        snap = await get_json(s, f"{url}/api/dashboard")
        assert snap["round"]["paused"] is False
        kinds = [e["kind"] for e in snap["events"]]
        assert "paused" in kinds and "resumed" in kinds

    serve(tmp_path, body)


def test_without_an_admin_token_pause_is_refused(tmp_path):
    async def body(service, s, url):
        async with s.post(f"{url}/api/pause", headers={"Authorization": "Bearer anything"}) as r:
            assert r.status == 403 and "--admin-token" in (await r.json())["error"]
        assert (await get_json(s, f"{url}/api/dashboard"))["admin"] == {"enabled": False}

    serve(tmp_path, body, admin_token="")


def test_a_rejected_payload_is_an_event(tmp_path):
    async def body(service, s, url):
        async with s.post(f"{url}/join", json={"token": TOKEN, "name": "bad", "tier": 0,
                                                "schema_hash": schema_hash(preset_config("tiny"))}) as r:
            auth = {"Authorization": f"Bearer {(await r.json())['session']}"}
        garbage = b"not a payload" * 10
        sha = hashlib.sha256(garbage).hexdigest()
        async with s.put(f"{url}/blobs/{sha}", data=garbage, headers=auth) as r:
            assert r.status == 201
        async with s.post(f"{url}/commit", headers=auth, json={"step": 0, "blob": sha, "sequences": 2,
                                                               "train_seconds": 0.1, "loss": 3.0}) as r:
            assert 400 <= r.status < 500
        snap = await get_json(s, f"{url}/api/dashboard")
        rejected = [e for e in snap["events"] if e["kind"] == "rejected"]
        assert len(rejected) == 1 and rejected[0]["detail"]["client_id"] == "bad"
        assert rejected[0]["detail"]["reason"]

    serve(tmp_path, body)


def test_history_from_records_and_the_incremental_tail(tmp_path):
    path = tmp_path / "coordinator.jsonl"
    records = [
        {"time": 1.0, "event": "joined", "client_id": "a", "tier": 0, "spec": "tier0"},
        {"time": 1.0, "event": "joined", "client_id": "b", "tier": 2, "spec": "tier2"},
        {"time": 2.0, "event": "checkpoint", "epoch": -1, "step": 0, "val_loss": {"tier0": 8.3, "tier2": 8.31}},
        {"time": 3.0, "event": "phase", "old": "Warmup", "new": "RoundTrain"},
        {"time": 4.0, "event": "applied", "step": 0, "accepted": 2, "missing": 0, "payload_bytes": 1000,
         "losses": {"a": 8.0, "b": 8.2}},
        {"time": 6.0, "event": "applied", "step": 1, "accepted": 1, "missing": 1, "payload_bytes": 400,
         "losses": {"a": 7.0}},
    ]
    lines = [json.dumps(r) for r in records]
    path.write_text("\n".join(lines[:4]) + "\n" + lines[4][:20])  # a torn last line waits for its end
    tail = MetricsTail(path)
    history = RunHistory(dense_bytes_of=lambda cid: {"a": 40_000, "b": 10_000}[cid])
    history.add_all(tail.read())
    assert history.train_series() == {} and history.val_series() == {"tier0": [[0, 8.3]], "tier2": [[0, 8.31]]}
    with open(path, "a") as f:
        f.write(lines[4][20:] + "\n" + lines[5] + "\n")
    history.add_all(tail.read())
    assert tail.read() == []
    assert history.train_series() == {"tier0": [[0, 8.0], [1, 7.0]], "tier2": [[0, 8.2]]}
    assert [(b["step"], b["dense_bytes"], b["ratio"]) for b in history.bandwidth] == [(0, 50_000, 50.0),
                                                                                     (1, 40_000, 100.0)]
    assert history.seconds_per_round() == 2.0
    assert [e["kind"] for e in history.events] == ["joined", "joined", "checkpoint"]  # phases are not events
