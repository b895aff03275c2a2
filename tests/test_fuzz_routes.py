"""Every route of the coordinator, from its own /openapi.json, fuzzed with generated malformed input (hypothesis)
against a real server on 127.0.0.1 while a real client is in the middle of a round: zero 5xx answers, /health
answers throughout, and afterwards the round completes and the run advances."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import socket
import threading
import urllib.parse

import torch
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aftermath.checkpoint.hf_dir import load_model_dir
from aftermath.checkpoint.schema import schema_hash
from aftermath.round.replica import Replica
from aftermath.coordinator.openapi import route_table
from aftermath.coordinator.service import CoordinatorService
from aftermath.crypto import Signer
from aftermath.data import default_data_dir
from aftermath.model import preset_config, tier_spec
from aftermath.runconfig import load_run_config

TOKEN = "fuzz-token"
EXAMPLES_PER_ROUTE = 25

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12)


class ServerThread:
    """The coordinator's app served by its own event loop in a thread (so the test can speak raw HTTP)."""

    def __init__(self, service: CoordinatorService) -> None:
        self.service = service
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.port = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.runner = web.AppRunner(self.service.app, access_log=None)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.runner.cleanup())

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        assert self.ready.wait(120)
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            timeout: float = 10.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def call(port: int, method: str, path: str, payload=None, session: str | None = None) -> dict:
    headers = {"Content-Type": "application/json"}
    if session:
        headers["Authorization"] = f"Bearer {session}"
    status, data = request(port, method, path, None if payload is None else json.dumps(payload).encode(), headers)
    assert status < 400, (method, path, status, data[:300])
    return json.loads(data)


def wait_phase(port: int, phase: str, session: str, step: int | None = None) -> dict:
    for _ in range(600):
        st_ = call(port, "GET", "/state?after=-1&wait=0", session=session)
        if st_["phase"] == phase and (step is None or st_["step"] == step):
            return st_
        call(port, "POST", "/heartbeat", {}, session)
        threading.Event().wait(0.05)
    raise AssertionError(f"phase {phase} never came; last {st_['phase']}")


def test_fuzz_every_route_no_5xx_and_the_round_goes_on(tmp_path):
    run = load_run_config().with_overrides({
        "schedule.init_min_clients": 1, "schedule.min_clients": 1, "schedule.waiting_for_members_extra_time": 0.0,
        "schedule.total_steps": 2, "schedule.rounds_per_epoch": 2, "schedule.global_batch_size": 4,
        "schedule.heartbeat_timeout": 120.0, "schedule.max_round_train_time": 300.0, "data.seq_len": 16,
        "network.max_blob_bytes": 2**20, "network.rate_limit": 1e6, "network.rate_burst": 10**6,
        "model.export_tiers": [0, 1]})
    service = CoordinatorService(run, tmp_path / "run", token=TOKEN, linger=0.0, data_dir=default_data_dir(),
                                 admin_token="admin-secret")
    with ServerThread(service) as server:
        port = server.port
        doc = call(port, "GET", "/openapi.json")
        # the description covers every route the app serves
        served = route_table(service.app)
        assert {(m.lower(), p) for m, p in served} == {(m, p) for p, ops in doc["paths"].items() for m in ops}
        assert len(served) >= 20

        # a real client gets into the middle of round 0
        signer = Signer()
        joined = call(port, "POST", "/join", {"token": TOKEN, "name": "honest", "tier": 1,
                                              "schema_hash": schema_hash(preset_config("tiny")),
                                              "public_key": signer.public_hex})
        session = joined["session"]
        st0 = wait_phase(port, "Warmup", session)
        call(port, "POST", "/ready", {"epoch": st0["epoch"]}, session)
        st0 = wait_phase(port, "RoundTrain", session)
        # a second, fuzzing client has a valid session too (it joined mid-epoch: pending)
        fuzz_session = call(port, "POST", "/join", {"token": TOKEN, "name": "fuzzer", "tier": 0,
                                                    "schema_hash": schema_hash(preset_config("tiny"))})["session"]

        answers: dict[int, int] = {}
        operations = [(p, m.upper(), op) for p, ops in doc["paths"].items() for m, op in ops.items()]

        def make_fuzz(path, method, op):
            @settings(max_examples=EXAMPLES_PER_ROUTE, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(params=st.lists(st.text(max_size=30), min_size=4, max_size=4),
                   query=st.dictionaries(st.sampled_from(["after", "wait", "start", "end", "seq_len", "seed",
                                                          "split", "x"]), st.text(max_size=12), max_size=3),
                   auth=st.sampled_from([None, "Bearer nope", "Basic xyz", "Bearer " + fuzz_session, "Bearer"]),
                   body=st.one_of(st.none(), st.binary(max_size=300), json_values.map(lambda v: json.dumps(v).encode()),
                                  st.fixed_dictionaries({}, optional={
                                      k: json_values for k in _properties(op)}).map(lambda v: json.dumps(v).encode())))
            def fuzz(params, query, auth, body):
                names = iter(params)
                target = path
                for name in [seg[1:-1] for seg in path.split("/") if seg.startswith("{")]:
                    target = target.replace("{" + name + "}", urllib.parse.quote(next(names), safe=""))
                if query:
                    target += "?" + urllib.parse.urlencode(query)
                headers = {"Content-Type": "application/json"}
                if auth:
                    headers["Authorization"] = auth
                try:
                    status, data = request(port, method, target, body, headers, timeout=3.0)
                except (socket.timeout, TimeoutError):
                    assert path in ("/state", "/ws"), (method, target)  # a long poll may wait; nothing else
                    return
                answers[status] = answers.get(status, 0) + 1
                assert status < 500, (method, target, body, status, data[:300])

            return fuzz

        for path, method, op in operations:
            make_fuzz(path, method, op)()
            status, data = request(port, "GET", "/health")  # alive after every route's fuzzing
            assert status == 200 and json.loads(data)["ok"] is True

        assert sum(answers.values()) >= EXAMPLES_PER_ROUTE * len(operations) * 0.8
        assert any(400 <= s < 500 for s in answers)
        # nothing the fuzzer sent moved the round: the honest client is still in round 0 and finishes it
        st1 = call(port, "GET", "/state", session=session)
        assert st1["phase"] == "RoundTrain" and st1["round"]["step"] == 0
        assert [m["id"] for m in st1["members"] if m["status"] == "member"] == ["honest"]
        a0, a1 = st1["round"]["assignments"]["honest"]
        config = service.keeper.config
        spec = tier_spec(config, 1)
        replica = Replica.build(load_model_dir(service.run_dir / "checkpoint" / "model-tier1"), config, spec, run)
        result = replica.train(torch.randint(0, 4096, (a1 - a0, 17), generator=torch.Generator().manual_seed(0)), 2,
                               step=0, client_id="honest")
        blob = replica.encode(result.grads, 0, "honest")
        sha = hashlib.sha256(blob).hexdigest()
        status, _ = request(port, "PUT", f"/blobs/{sha}", blob, {"Authorization": f"Bearer {session}"})
        assert status == 201
        call(port, "POST", "/commit", {"step": 0, "blob": sha, "sequences": a1 - a0, "train_seconds": 0.1,
                                       "loss": result.loss,
                                       "signature": signer.sign_commitment(run.run_id, 0, "honest", sha, a0, a1)},
             session)
        st2 = wait_phase(port, "RoundTrain", session, step=1)  # overlapped: step 1 opens at once
        assert st2["round"]["step"] == 1 and st2["previous_round"]["step"] == 0
        call(port, "POST", "/applied", {"step": 0}, session)


def _properties(op: dict) -> list[str]:
    schema = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
    return sorted(schema.get("properties", {}))
