"""A client's own view of the run (GET /view) on a real coordinator: the same size whatever the number of
clients, unchanged by other clients' commits, changed once by the accepted set; the round's whole accepted set
(GET /rounds/{step}), the published update and its witness (POST /witness)."""

from __future__ import annotations

import asyncio
import hashlib
import zlib

import torch

from aftermath.checkpoint.schema import schema_hash
from aftermath.coordinator.distribution import choose_plane, choose_witnesses, distribute
from aftermath.crypto import Signer
from aftermath.model import build_model, preset_config, tier_spec
from aftermath.model.slicing import sliced_model
from aftermath.optim.update import accepted_digest
from aftermath.round.protocol import ClientView, RoundDetail
from aftermath.round.replica import Replica
from coordinator_helpers import serve_coordinator, small_run_config, wait_phase

TOKEN = "view-token"
CFG = preset_config("tiny")


class Sim:
    """A client speaking the protocol with a real (tier-3) payload, no training loop."""

    def __init__(self, name: str) -> None:
        self.name, self.signer, self.auth, self.id = name, Signer(), {}, ""

    async def join(self, s, url) -> None:
        async with s.post(f"{url}/join", json={"token": TOKEN, "name": self.name, "tier": 3,
                                               "schema_hash": schema_hash(CFG),
                                               "public_key": self.signer.public_hex}) as r:
            assert r.status == 200, await r.text()
            answer = await r.json()
        self.auth = {"Authorization": f"Bearer {answer['session']}"}
        self.id = answer["client_id"]
        assert ClientView.model_validate(answer["view"]).me.id == self.id

    async def view(self, s, url, after: int | None = None, wait: float = 5.0) -> tuple[ClientView, int]:
        params = {} if after is None else {"after": str(after), "wait": str(wait)}
        async with s.get(f"{url}/view", headers=self.auth, params=params) as r:
            assert r.status == 200, await r.text()
            raw = await r.read()
        return ClientView.model_validate_json(raw), len(raw)

    async def commit(self, s, url, run_id: str, step: int, rng: tuple[int, int]) -> str:
        model = sliced_model(build_model(CFG, seed=0), tier_spec(CFG, 3))
        replica = Replica.build(model, CFG, tier_spec(CFG, 3), small_run_config())
        seed = zlib.crc32(self.name.encode())  # str hashes differ between processes: two sims could collide
        batch = torch.randint(0, CFG.vocab_size, (2, 17), generator=torch.Generator().manual_seed(seed))
        blob = replica.encode(replica.train(batch, 2, step=step, client_id=self.id).grads, step, self.id)
        sha = hashlib.sha256(blob).hexdigest()
        async with s.put(f"{url}/blobs/{sha}", data=blob, headers=self.auth) as r:
            assert r.status in (200, 201)
        async with s.post(f"{url}/commit", headers=self.auth, json={
                "step": step, "blob": sha, "sequences": rng[1] - rng[0], "train_seconds": 0.1, "loss": 1.0,
                "signature": self.signer.sign_commitment(run_id, step, self.id, sha, *rng)}) as r:
            assert r.status == 200, await r.text()
        return sha


def test_the_view_is_the_same_size_however_many_clients_join(tmp_path):
    async def body(service, s, url):
        sims = [Sim(f"sim{i:03d}") for i in range(60)]
        for sim in sims[:5]:
            await sim.join(s, url)
        _, few = await sims[0].view(s, url)
        async with s.get(f"{url}/state") as r:
            state_few = len(await r.read())
        for sim in sims[5:]:
            await sim.join(s, url)
        view, many = await sims[0].view(s, url)
        async with s.get(f"{url}/state") as r:
            state_many = len(await r.read())
        assert view.me.id == "sim000" and view.phase == "WaitingForMembers"
        assert abs(many - few) <= 16, (few, many)  # the clock fields' digits at most
        assert state_many > 8 * state_few  # the dashboard's full state lists every member

    serve_coordinator(small_run_config(**{"schedule.init_min_clients": 100}), tmp_path / "run", TOKEN, body)


def test_commits_do_not_wake_the_view_the_accepted_set_and_its_update_do(tmp_path):
    async def body(service, s, url):
        sims = [Sim(n) for n in ("a", "b", "c")]
        for sim in sims:
            await sim.join(s, url)
        st = await wait_phase(s, url, "Warmup")
        for sim in sims:
            async with s.post(f"{url}/ready", json={"epoch": st["epoch"]}, headers=sim.auth) as r:
                assert r.status == 200
        await wait_phase(s, url, "RoundTrain", step=0)
        views = [(await sim.view(s, url))[0] for sim in sims]
        assert all(v.round.step == 0 and v.round.result is None and not v.round.committed for v in views)
        ranges = {sim.id: v.round.assignment for sim, v in zip(sims, views)}
        assert sorted(ranges.values()) == [(0, 2), (2, 4), (4, 6)] and {v.round.first for v in views} == {0}
        version = views[0].version
        poll = asyncio.create_task(sims[0].view(s, url, after=version, wait=10))
        blobs = {}
        for sim in sims[:2]:
            blobs[sim.id] = await sim.commit(s, url, service.run.run_id, 0, ranges[sim.id])
        await asyncio.sleep(0.3)
        assert not poll.done()  # two commits and their wake-ups: nothing a client acts on changed
        mine, _ = await sims[1].view(s, url)
        assert mine.round.committed and mine.version == version
        blobs["c"] = await sims[2].commit(s, url, service.run.run_id, 0, ranges["c"])
        woken, _ = await asyncio.wait_for(poll, timeout=5)
        # overlapped rounds: step 1 trains while step 0's accepted set is applied
        assert woken.version > version and woken.round.step == 1 and woken.previous_round.step == 0
        result = woken.previous_round.result
        assert result.accepted == 3 and result.plane == "update"  # data plane "update" in this run

        # the update is published once the coordinator has applied the round: the view changes again
        for _ in range(200):
            view, _ = await sims[0].view(s, url)
            if view.previous_round.result.update is not None:
                break
            await asyncio.sleep(0.02)
        update = view.previous_round.result.update
        assert update is not None and view.version > woken.version
        async with s.get(f"{url}/blobs/{update.blob}", headers=sims[0].auth) as r:
            data = await r.read()
        assert hashlib.sha256(data).hexdigest() == update.blob and len(data) == update.bytes
        assert service.keeper.replica.decode_update(data, 0).accepted == accepted_digest(blobs.items())

        async with s.get(f"{url}/rounds/0", headers=sims[0].auth) as r:
            detail = RoundDetail.model_validate_json(await r.read())
        assert [c.client_id for c in detail.accepted] == ["a", "b", "c"] and detail.update == update
        assert detail.assignments == ranges and detail.public_keys["b"] == sims[1].signer.public_hex
        assert detail.accepted_digest == accepted_digest(blobs.items())
        async with s.get(f"{url}/rounds/7", headers=sims[0].auth) as r:
            assert r.status == 404 and "not published" in (await r.json())["error"]

        # exactly the round's witness may attest, and only the published update
        witnesses = [sim for sim in sims if (await sim.view(s, url))[0].previous_round.result.witness]
        assert [w.id for w in witnesses] == detail.witnesses and len(witnesses) == 1
        other = next(sim for sim in sims if sim not in witnesses)
        verdict = {"step": 0, "update": update.blob, "agrees": True}
        async with s.post(f"{url}/witness", json=verdict, headers=other.auth) as r:
            assert r.status == 409 and "not a witness" in (await r.json())["error"]
        async with s.post(f"{url}/witness", json={**verdict, "update": "0" * 64}, headers=witnesses[0].auth) as r:
            assert r.status == 409
        async with s.post(f"{url}/witness", json={**verdict, "agrees": False}, headers=witnesses[0].auth) as r:
            assert r.status == 200
        assert service.update_disputes == [{"step": 0, "witness": witnesses[0].id, "update": update.blob}]

    run = small_run_config(**{"schedule.init_min_clients": 3, "schedule.global_batch_size": 6,
                              "schedule.heartbeat_timeout": 60.0, "network.data_plane": "update",
                              "network.witnesses": 1,
                              # every result must be accepted: the screen's verdicts are tests/test_trust_*.py's
                              "trust.screen": False})
    serve_coordinator(run, tmp_path / "run", TOKEN, body)


def test_the_plane_and_the_witnesses_are_decided_from_the_set_alone():
    assert choose_plane("auto", 10_000, 5_000) == "update" and choose_plane("auto", 4_000, 5_000) == "payloads"
    assert choose_plane("payloads", 10**9, 1) == "payloads" and choose_plane("update", 1, 10**9) == "update"
    ids = [f"c{i:04d}" for i in range(1000)]
    picked = [tuple(choose_witnesses("run", step, ids, 2)) for step in range(200)]
    assert all(len(set(p)) == 2 and set(p) <= set(ids) for p in picked)
    assert picked[0] == tuple(choose_witnesses("run", 0, ids[::-1], 2))  # the order they come in is irrelevant
    assert len({c for p in picked for c in p}) > 300  # every round its own witnesses
    d = distribute("run", 3, [("a", "1" * 64, 600), ("b", "2" * 64, 600)], "auto", 1000, 1, "d" * 64)
    assert d.plane == "update" and d.payload_bytes == 1200 and d.witnesses[0] in ("a", "b")
    assert distribute("run", 3, [], "update", 1000, 1, "d" * 64).plane == "payloads"  # nothing to aggregate
    assert distribute("run", 3, [("a", "1" * 64, 600)], "auto", 1000, 1, "d" * 64).witnesses == []
