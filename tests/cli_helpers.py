"""Shared by the tests of commands: what a refused command must print."""

from __future__ import annotations

import subprocess


def one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """The single `error: ...` line of a refused command, checked to name every needle."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]
