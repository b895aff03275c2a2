"""One short testnet shared by the dashboard's browser test and the report test (started once per process).

It runs in a background thread so that a test can look at the live dashboard while it trains; `wait()` gives
the finished run's directory and summary.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from rich.console import Console

from aftermath.testnet import Testnet, TestnetOptions

STEPS = 8


class SharedTestnet:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="aftermath-dash-"))
        if not os.environ.get("AFTERMATH_KEEP_TEST_RUN"):  # keep the logs to debug a failure
            atexit.register(shutil.rmtree, self.root, True)
        self.out = self.root / "out"
        options = TestnetOptions(clients=3, tiers=[0, 1, 2], steps=STEPS, out=self.out, live=False, timeout=300,
                                 extra_overrides={"schedule.rounds_per_epoch": 4, "schedule.global_batch_size": 12,
                                                  "optimizer.warmup_steps": 1, "data.val_sequences": 16})
        self.testnet = Testnet(options, Console(quiet=True))
        self.summary: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.summary = self.testnet.run()
        except BaseException as exc:  # surfaced by wait()
            self.error = exc

    @property
    def url(self) -> str:
        return self.testnet.url  # set before the coordinator starts

    def wait(self, timeout: float = 400) -> tuple[Path, dict[str, Any]]:
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise TimeoutError(f"the shared testnet did not finish in {timeout} s")
        if self.error is not None:
            raise self.error
        return self.out, self.summary


_shared: SharedTestnet | None = None


def shared_testnet() -> SharedTestnet:
    global _shared
    if _shared is None:
        _shared = SharedTestnet()
    return _shared
