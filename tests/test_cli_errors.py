"""Bad input to the `aftermath` command, as a user types it: one line naming the value and the fix, exit 2,
no traceback, nothing written. Every case runs the real command in a subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_helpers import one_line_error


def aftermath(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aftermath.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env=env)


def argparse_error(result: subprocess.CompletedProcess, command: str, *needles: str) -> str:
    """argparse's refusal: usage lines, then `aftermath COMMAND: error: argument ...` naming every needle."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"aftermath {command}: error: argument "), result.stderr
    for needle in needles:
        assert needle in last, (needle, last)
    return last


@pytest.fixture
def taken_port():
    """A port on 127.0.0.1 that another socket is listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_coordinator_port_in_use(tmp_path, taken_port):
    run_dir = tmp_path / "run"
    result = aftermath("coordinator", "--port", str(taken_port), "--run-dir", str(run_dir))
    one_line_error(result, f"port {taken_port} is already in use on 127.0.0.1", "--port")
    assert not run_dir.exists()  # refused before anything was written


def test_data_server_port_in_use(taken_port):
    result = aftermath("data-server", "--port", str(taken_port))
    one_line_error(result, f"port {taken_port} is already in use on 127.0.0.1", "--port")


def test_coordinator_host_not_of_this_machine(tmp_path):
    run_dir = tmp_path / "run"
    result = aftermath("coordinator", "--host", "999.1.1.1", "--port", "0", "--run-dir", str(run_dir))
    one_line_error(result, "'999.1.1.1'", "--host 127.0.0.1")
    assert not run_dir.exists()


@pytest.mark.parametrize("args, command, needles", [
    (["data-server", "--port", "99999"], "data-server", ["--port", "99999", "1..65535"]),
    (["coordinator", "--port", "-1"], "coordinator", ["--port", "-1", "0 for any free port"]),
    (["coordinator", "--min-clients", "0"], "coordinator", ["--min-clients", "0 must be at least 1"]),
    (["client", "--coordinator", "http://127.0.0.1:9", "--token", "t", "--threads", "0"], "client",
     ["--threads", "0 must be at least 1"]),
    (["init-model", "--out", "m", "--vocab-size", "0"], "init-model", ["--vocab-size", "0 must be at least 1"]),
    (["testnet", "--clients", "0"], "testnet", ["--clients", "0 must be at least 1"]),
    (["testnet", "--timeout", "0"], "testnet", ["--timeout", "0 must be more than 0"]),
    (["eval", "m", "--batches", "0"], "eval", ["--batches", "0 must be at least 1"]),
    (["data-server", "--max-seq-len", "0"], "data-server", ["--max-seq-len", "0 must be at least 1"]),
])
def test_numeric_flags_out_of_range_are_refused(tmp_path, args, command, needles):
    argparse_error(aftermath(*args, cwd=tmp_path), command, *needles)
    assert not any(tmp_path.iterdir())


def test_init_model_unwritable_out():
    one_line_error(aftermath("init-model", "--out", "/proc/x"), "--out /proc/x", "choose a directory")


def test_testnet_unwritable_out():
    one_line_error(aftermath("testnet", "--out", "/proc/x", "--no-live"), "--out /proc/x", "choose a directory")


def test_client_coordinator_not_a_url():
    started = time.monotonic()
    result = aftermath("client", "--coordinator", "notaurl", "--token", "t")
    one_line_error(result, "'notaurl'", "http://HOST:PORT")
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("command, source", [
    ("inspect", "./nonexistent/dir"),
    ("inspect", "foo/bar"),  # foo/ exists here, so this is a path, not the hub repo foo/bar
    ("inspect", "../nonexistent"),
    ("eval", "./nonexistent/dir"),
])
def test_missing_local_path_fails_at_once(tmp_path, command, source):
    (tmp_path / "foo").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}  # were it sent to the hub, it would retry
    started = time.monotonic()
    result = aftermath(command, source, cwd=tmp_path, env=env)
    one_line_error(result, f"no such directory: {source}", "check the path")
    assert time.monotonic() - started < 10  # the hub retried such a typo for ~25 s
