"""Small helpers shared by the bench scripts: the machine's description, JSON output, rich tables.

Bench scripts run as plain files (`python bench/NAME.py`), so they import this module by path:
`sys.path.insert(0, str(Path(__file__).parent))` then `import _common`.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.table import Table


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: enough for a reader to judge whether they carry over."""
    import psutil
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average": [round(x, 2) for x in os.getloadavg()],  # 1, 5, 15 minutes, when the JSON was written
    }
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["git_commit"] = None
    return info


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    """Write `data` (plus when and how it was produced) as indented JSON; create parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        **data,
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
                console: Console | None = None) -> None:
    """A rich table; numbers are right-aligned, None prints as a dash."""
    console = console or Console()
    table = Table(title=title)
    numeric = [all(isinstance(r[i], (int, float)) or r[i] is None for r in rows) if rows else False
               for i in range(len(columns))]
    for col, is_num in zip(columns, numeric):
        table.add_column(col, justify="right" if is_num else "left")
    for row in rows:
        table.add_row(*["-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v)) for v in row])
    console.print(table)


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """The same table as GitHub Markdown, for pasting into docs/results.md."""
    def cell(v: Any) -> str:
        return "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
