"""Shared by the service tests: a small run config and a real coordinator on 127.0.0.1."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp
from aiohttp.test_utils import TestServer

from aftermath.client.loop import ClientOptions, TrainingClient
from aftermath.coordinator.service import CoordinatorService
from aftermath.runconfig import RunConfig, load_run_config

SMALL_RUN = {"schedule.min_clients": 1, "schedule.waiting_for_members_extra_time": 0.0,
             "schedule.total_steps": 2, "schedule.rounds_per_epoch": 2, "schedule.global_batch_size": 4,
             "data.seq_len": 16, "network.max_blob_bytes": 2**20}


def small_run_config(**overrides: Any) -> RunConfig:
    """The embedded default run shrunk to 2 steps of 4 sequences of 16 tokens, with `overrides` on top."""
    return load_run_config().with_overrides({**SMALL_RUN, **overrides})


def run_client(url: str, token: str, tmp_path: Path, name: str, tier: int, **options: Any) -> TrainingClient:
    """A one-thread training client of the run at `url`, its work directory and metrics (NAME.jsonl) under
    `tmp_path`."""
    return TrainingClient(ClientOptions(coordinator=url, token=token, tier=tier, name=name, threads=1,
                                        work_dir=tmp_path / "clients", metrics_path=tmp_path / f"{name}.jsonl",
                                        **options))


def serve_coordinator(run: RunConfig, run_dir: Path, token: str,
                      body: Callable[[CoordinatorService, aiohttp.ClientSession, str], Awaitable[None]]) -> None:
    """Run `body(service, session, url)` against a real coordinator server."""

    async def main() -> None:
        service = CoordinatorService(run, run_dir, token=token, linger=0.0)
        async with TestServer(service.app, host="127.0.0.1") as server:
            url = str(server.make_url("")).rstrip("/")
            async with aiohttp.ClientSession() as session:
                await body(service, session, url)

    asyncio.run(main())


async def wait_phase(session: aiohttp.ClientSession, url: str, phase: str, tries: int = 300,
                     step: int | None = None) -> dict:
    """Poll the coordinator's state until it reaches `phase` (at `step`, if given); the state then."""
    st: dict = {}
    for _ in range(tries):
        async with session.get(f"{url}/state") as r:
            st = await r.json()
        if st["phase"] == phase and (step is None or st["step"] == step):
            return st
        await asyncio.sleep(0.02)
    raise AssertionError(f"phase {phase} (step {step}) never came; last {st.get('phase')} (step {st.get('step')})")
