"""Trust, against a real coordinator on 127.0.0.1: signed commitments (nobody commits in another client's name
or for a batch not assigned to it), payload validation before anything is applied, rate limits and bounded
blob storage."""

from __future__ import annotations

import asyncio
import hashlib

import aiohttp
import pytest
import torch

from aftermath.checkpoint.hf_dir import load_model_dir
from aftermath.checkpoint.schema import schema_hash
from aftermath.round.replica import Replica
from aftermath.crypto import SignatureError, Signer, commitment_message, verify, verify_commitment
from aftermath.model import preset_config, tier_spec
from coordinator_helpers import serve_coordinator, small_run_config, wait_phase

TOKEN = "trust-token"


def run_config(**overrides):
    return small_run_config(**{**{"schedule.init_min_clients": 2, "schedule.max_round_train_time": 30.0, "model.export_tiers": [0, 1]}, **overrides})


def serve(tmp_path, body, **overrides):
    """Run `body(service, session, url)` against a real server."""
    serve_coordinator(run_config(**overrides), tmp_path / "run", TOKEN, body)


async def join(s, url, name, signer: Signer | None, tier=1):
    body = {"token": TOKEN, "name": name, "tier": tier, "schema_hash": schema_hash(preset_config("tiny"))}
    if signer is not None:
        body["public_key"] = signer.public_hex
    async with s.post(f"{url}/join", json=body) as r:
        data = await r.json()
        assert r.status == 200, data
        return {"Authorization": f"Bearer {data['session']}"}


def test_unit_signatures():
    a, b = Signer(), Signer()
    msg = commitment_message("run", 3, "a", "f" * 64, 0, 4)
    sig = a.sign(msg)
    verify(a.public_hex, sig, msg)
    for key, message in ((b.public_hex, msg), (a.public_hex, commitment_message("run", 3, "a", "f" * 64, 0, 5)),
                         (a.public_hex, commitment_message("run", 4, "a", "f" * 64, 0, 4)),
                         (a.public_hex, commitment_message("other", 3, "a", "f" * 64, 0, 4))):
        with pytest.raises(SignatureError, match="does not verify"):
            verify(key, sig, message)
    with pytest.raises(SignatureError, match="not an ed25519 key"):
        verify("zz", sig, msg)
    with pytest.raises(SignatureError, match="not an ed25519 signature"):
        verify(a.public_hex, "00", msg)


def test_commits_are_signed_for_the_assigned_batch_and_validated(tmp_path):
    async def body(service, s, url):
        alice, bob = Signer(), Signer()
        auth_a = await join(s, url, "alice", alice)
        auth_b = await join(s, url, "bob", bob)
        st = await wait_phase(s, url, "Warmup")
        for auth in (auth_a, auth_b):
            async with s.post(f"{url}/ready", json={"epoch": st["epoch"]}, headers=auth) as r:
                assert r.status == 200
        st = await wait_phase(s, url, "RoundTrain")
        ranges = st["round"]["assignments"]
        a0, a1 = ranges["alice"]
        b0, b1 = ranges["bob"]
        keys = {m["id"]: m["public_key"] for m in st["members"]}
        assert keys == {"alice": alice.public_hex, "bob": bob.public_hex}  # peers learn every key from the state

        # alice trains a real tier-1 payload
        config = service.keeper.config
        spec = tier_spec(config, 1)
        replica = Replica.build(load_model_dir(service.run_dir / "checkpoint" / "model-tier1"), config, spec, service.run)
        batch = torch.randint(0, 4096, (a1 - a0, 17), generator=torch.Generator().manual_seed(0))
        result = replica.train(batch, micro_batch_size=2, step=0, client_id="alice")
        blob = replica.encode(result.grads, 0, "alice")
        sha = hashlib.sha256(blob).hexdigest()
        async with s.put(f"{url}/blobs/{sha}", data=blob, headers=auth_a) as r:
            assert r.status == 201
        run_id = service.run.run_id

        async def commit(auth, blob_sha, sequences, signature, status):
            body = {"step": 0, "blob": blob_sha, "sequences": sequences, "train_seconds": 0.1, "loss": 3.0}
            if signature is not None:
                body["signature"] = signature
            async with s.post(f"{url}/commit", json=body, headers=auth) as r:
                answer = await r.json()
                assert r.status == status, (status, answer)
                return answer["error"] if status != 200 else None

        # no signature, a signature for another batch range, for another run, by another key
        assert "no signature" in await commit(auth_a, sha, a1 - a0, None, 403)
        assert "does not verify" in await commit(
            auth_a, sha, a1 - a0, alice.sign_commitment(run_id, 0, "alice", sha, b0, b1), 403)
        assert "does not verify" in await commit(
            auth_a, sha, a1 - a0, alice.sign_commitment("other-run", 0, "alice", sha, a0, a1), 403)
        assert "does not verify" in await commit(
            auth_a, sha, a1 - a0, bob.sign_commitment(run_id, 0, "alice", sha, a0, a1), 403)
        # bob, holding alice's signature, cannot commit in her name: his session is bob, her key signed "alice"
        assert "does not verify" in await commit(
            auth_b, sha, b1 - b0, alice.sign_commitment(run_id, 0, "alice", sha, a0, a1), 403)
        # bob signing alice's payload as his own: the payload names alice, so validation refuses it
        error = await commit(auth_b, sha, b1 - b0, bob.sign_commitment(run_id, 0, "bob", sha, b0, b1), 400)
        assert "alice" in error or "client" in error
        # a correctly signed junk payload: validated before it can be accepted, refused and counted
        junk = b"\x00" * 100
        junk_sha = hashlib.sha256(junk).hexdigest()
        async with s.put(f"{url}/blobs/{junk_sha}", data=junk, headers=auth_b) as r:
            assert r.status == 201
        await commit(auth_b, junk_sha, b1 - b0, bob.sign_commitment(run_id, 0, "bob", junk_sha, b0, b1), 400)
        assert service.rejected == 7
        # a client that joined without a key can never commit
        auth_c = await join(s, url, "nokey", None)
        assert "without a public key" in await commit(auth_c, sha, 1, "0" * 128, 403)

        # alice's honest commit is accepted; the round (after bob's timeout would) ... ends now: bob is told to go
        assert await commit(auth_a, sha, a1 - a0, alice.sign_commitment(run_id, 0, "alice", sha, a0, a1), 200) is None
        service.machine.leave("bob", service.clock(), reason="test")
        st = await wait_phase(s, url, "RoundTrain", step=1)  # overlapped: step 1 opens beside step 0's set
        accepted = st["previous_round"]["accepted"]
        assert [c["client_id"] for c in accepted] == ["alice"]  # the rejected payloads never entered the set
        # a peer verifies the accepted set itself, from the state alone
        c = accepted[0]
        verify_commitment(keys["alice"], c["signature"], run_id, 0, "alice", c["blob"],
                          *st["previous_round"]["assignments"]["alice"])
        with pytest.raises(SignatureError):
            verify_commitment(keys["bob"], c["signature"], run_id, 0, "alice", c["blob"], a0, a1)

    serve(tmp_path, body)


def test_rate_limit_answers_429_per_client(tmp_path):
    async def body(service, s, url):
        auth = await join(s, url, "busy", Signer())
        codes = []
        for _ in range(8):
            async with s.post(f"{url}/heartbeat", json={}, headers=auth) as r:
                codes.append(r.status)
                if r.status == 429:
                    data = await r.json()
                    assert "rate limit" in data["error"] and float(r.headers["Retry-After"]) > 0
        assert codes[:4] == [200] * 4 and codes[-1] == 429  # the join took one token of the address's bucket
        # another client has its own bucket ...
        other = await join(s, url, "calm", Signer())
        async with s.post(f"{url}/heartbeat", json={}, headers=other) as r:
            assert r.status == 200
        # ... and the bucket refills
        await asyncio.sleep(0.5)
        async with s.post(f"{url}/heartbeat", json={}, headers=auth) as r:
            assert r.status == 200
        assert service.limiter.limited >= 1

    serve(tmp_path, body, **{"network.rate_limit": 5.0, "network.rate_burst": 5,
                             "schedule.init_min_clients": 3})


def test_blob_storage_is_bounded(tmp_path):
    cap = 2**16

    async def body(service, s, url):
        auth = await join(s, url, "uploader", Signer())
        statuses = []
        for i in range(5):
            data = bytes([i]) * 20_000
            async with s.put(f"{url}/blobs/{hashlib.sha256(data).hexdigest()}", data=data, headers=auth) as r:
                statuses.append(r.status)
                if r.status == 507:
                    assert "max_blob_storage_bytes" in (await r.json())["error"]
        assert statuses == [201, 201, 201, 507, 507]
        assert service.blobs.total_bytes == 60_000

    serve(tmp_path, body, **{"network.max_blob_storage_bytes": cap})
