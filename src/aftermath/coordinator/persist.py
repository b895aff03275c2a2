"""The coordinator's persisted state: `RUN_DIR/state.json`, written atomically at every epoch end and at the end.

It holds what a restarted coordinator needs to resume from the last checkpoint (run id, epoch, step, the data
position: the first global sequence of that step), the config it ran under (a changed one is refused, resume.py),
and the history a restart restores: validation losses, reference hashes, hash reports and divergences.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from aftermath.errors import ConfigError

STATE_FILE = "state.json"


def write_json_atomic(path: str | Path, data: Any) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def save_state(run_dir: str | Path, state: dict[str, Any]) -> Path:
    return write_json_atomic(Path(run_dir) / STATE_FILE, state)


def load_state(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); move it away to start a new run in {run_dir}")
    if not isinstance(data, dict) or not isinstance(data.get("step"), int) or not isinstance(data.get("epoch"), int):
        raise ConfigError(f"{path} lacks the integer fields step and epoch; move it away to start a new run")
    return data
