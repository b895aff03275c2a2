"""Whole runs in one process (a real coordinator on 127.0.0.1, real TrainingClients) on the aggregate data plane:
every client applies the coordinator's published update, a witness recomputes it from the payloads after the
fact, replicas stay bit-identical; with object storage the clients download the blobs from a real S3-compatible server (moto);
and a wrong update is caught by its witness and by the epoch's hash check."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from aftermath.client.loop import ClientOptions, TrainingClient
from aftermath.coordinator.service import CoordinatorService
from aftermath.data import default_data_dir
from aftermath.optim.update import encode_update
from aftermath.round.protocol import RunSummary
from coordinator_helpers import small_run_config
from support.s3server import ACCESS_KEY, SECRET_KEY, S3Server

TOKEN = "planes"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_config(**overrides):
    return small_run_config(**{
        "optimizer.lr": 1e-3, "optimizer.warmup_steps": 1, "schedule.total_steps": 4,
        "schedule.rounds_per_epoch": 2, "schedule.global_batch_size": 6, "schedule.init_min_clients": 3,
        "schedule.warmup_time": 20.0, "schedule.cooldown_time": 10.0, "schedule.heartbeat_interval": 0.5,
        "schedule.heartbeat_timeout": 10.0, "data.val_sequences": 4, "train.micro_batch_size": 3,
        "network.data_plane": "update", "network.witnesses": 1, **overrides})


def run_clients(tmp_path: Path, run, prepare=None) -> tuple[CoordinatorService, RunSummary, list[dict]]:
    async def main():
        service = CoordinatorService(run, tmp_path / "run", token=TOKEN, data_dir=default_data_dir(), linger=1.0)
        if prepare is not None:
            prepare(service)
        async with TestServer(service.app, host="127.0.0.1") as server:
            url = str(server.make_url("")).rstrip("/")
            clients = [TrainingClient(ClientOptions(coordinator=url, token=TOKEN, tier=t, name=n,
                                                    work_dir=tmp_path / "clients", threads=1,
                                                    metrics_path=tmp_path / f"{n}.jsonl"))
                       for n, t in (("a", 0), ("b", 1), ("c", 1))]
            results = await asyncio.wait_for(asyncio.gather(*(c.run_async() for c in clients)), timeout=240)
            await service.finished.wait()
            return service, service.summary, list(results)

    return asyncio.run(main())


def rounds(tmp_path: Path, name: str) -> list[dict]:
    lines = (tmp_path / f"{name}.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == "round"]


def test_every_client_applies_the_published_update_and_stays_identical(tmp_path):
    service, summary, results = run_clients(tmp_path, run_config())
    assert summary.steps == 4 and summary.replicas_consistent and summary.divergences == []
    assert summary.updates_published == 4 and summary.update_disputes == []
    assert summary.updates_witnessed >= 3  # one witness per round (the last round's may come after the summary)
    by_id = {r["client_id"]: r for r in results}
    assert by_id["b"]["weights_sha256"] == by_id["c"]["weights_sha256"]
    records = [r for n in "abc" for r in rounds(tmp_path, n)]
    assert len(records) == 12
    assert {r["data_plane"] for r in records} == {"update"}
    assert sum(r["witness"] for r in records) == 4  # one witness a round, checking after the fact
    verdicts = [r for n in "abc" for r in map(json.loads, (tmp_path / f"{n}.jsonl").read_text().splitlines())
                if r["event"] == "witnessed"]
    assert len(verdicts) == 4 and all(v["agrees"] for v in verdicts)
    # an update client downloads one blob per round, not its peers' payloads
    plain = [r for r in records if not r["witness"]]
    assert all(r["accepted"] == 3 for r in plain)


def s3_run(tmp_path, monkeypatch, plane: str):
    with S3Server() as s3:
        bucket = s3.create_bucket()
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)  # the coordinator's credentials, never the config's
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        run = run_config(**{"storage.backend": "s3", "storage.endpoint_url": s3.endpoint_url,
                            "storage.bucket": bucket, "storage.prefix": "run/", "network.data_plane": plane})
        service, summary, results = run_clients(tmp_path, run)
        stored = s3.client().list_objects_v2(Bucket=bucket, Prefix="run/blobs/").get("KeyCount", 0)
    return service, summary, results, stored


def test_with_object_storage_the_clients_fetch_the_payloads_from_the_bucket(tmp_path, monkeypatch):
    service, summary, results, stored = s3_run(tmp_path, monkeypatch, "payloads")
    assert summary.steps == 4 and summary.replicas_consistent and summary.divergences == []
    assert summary.updates_published == 0 and stored > 0
    # every round applied from the payloads, fetched by the URLs of GET /rounds/{step}: nothing failed
    records = [r for n in "abc" for r in rounds(tmp_path, n)]
    assert len(records) == 12 and {r["data_plane"] for r in records} == {"payloads"}
    assert all(r["failures"] == 0 for r in results)


def test_with_object_storage_the_clients_download_from_the_bucket(tmp_path, monkeypatch):
    service, summary, results, stored = s3_run(tmp_path, monkeypatch, "update")
    assert summary.replicas_consistent and summary.updates_published == 4 and summary.update_disputes == []
    assert stored > 0  # the last rounds' payloads and updates (older ones are collected)
    # the updates (and the witnesses' payloads) came from the bucket: the coordinator sent far less than the
    # clients received
    downloaded = sum(r["bytes_down"] for r in results)
    update_bytes = 4 * 3 * json.loads(next(line for line in (tmp_path / "run" / "metrics" / "coordinator.jsonl")
                                           .read_text().splitlines() if '"update_bytes": ' in line
                                           and '"update_bytes": null' not in line))["update_bytes"]
    assert downloaded > update_bytes and service.bytes_out < downloaded - update_bytes // 2


def test_a_wrong_update_is_disputed_by_its_witness_and_caught_by_the_hash_check(tmp_path):
    def tamper(service: CoordinatorService) -> None:
        honest = service.keeper.apply_round

        def apply_round(step, payloads, accepted=None):
            blob = honest(step, payloads, accepted)
            if blob is None:
                return None
            # publish another direction for one tensor than the coordinator applied itself
            update = service.keeper.replica.decode_update(blob, step)
            name = next(iter(update.params))
            update.params[name] = -update.params[name]
            return encode_update(update, service.keeper.replica.rule.codec.plan)

        service.keeper.apply_round = apply_round

    service, summary, _ = run_clients(tmp_path, run_config(), prepare=tamper)
    assert summary.update_disputes and {d.step for d in summary.update_disputes} <= set(range(4))
    # the clients that trusted the update differ from the coordinator's replica: said, not silent
    assert summary.divergences
