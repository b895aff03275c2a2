"""Checks shared by the commands: argparse types for numeric flags, and checks made before a command starts work.

The argparse types reject a bad value at parse time ("aftermath X: error: argument --flag: ..."), naming the value
and the valid range. The other checks raise ConfigError (one line: "error: ...") before anything is written.
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

from aftermath.errors import ConfigError


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def positive_int(text: str) -> int:
    """An int >= 1 (counts, sizes, threads, steps)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def non_negative_int(text: str) -> int:
    """An int >= 0 (seeds, tiers)."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or more")
    return value


def positive_float(text: str) -> float:
    """A float > 0 (seconds)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text} must be more than 0")
    return value


def port(text: str) -> int:
    """A TCP port, 1..65535."""
    value = _int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is out of range; use 1..65535")
    return value


def port_or_any(text: str) -> int:
    """A TCP port, 1..65535, or 0 for any free port."""
    value = _int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is out of range; use 1..65535, or 0 for any free port")
    return value


def check_can_listen(host: str, port: int) -> None:
    """Raise ConfigError unless a server could listen on host:port now (bound and released at once).

    The server binds a moment later, so a port taken in between still fails there; this check turns the
    common mistakes (port in use, a host that is not this machine's) into one line before any work starts.
    """
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError):
        raise _bad_host(host) from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's server does
            try:
                sock.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise ConfigError(f"port {port} is already in use on {host}; choose another with --port or stop "
                                      "the process holding it") from None
                if exc.errno == errno.EADDRNOTAVAIL:
                    raise _bad_host(host) from None
                if exc.errno == errno.EACCES:
                    raise ConfigError(f"no permission to listen on port {port} of {host}; ports below 1024 need "
                                      "root: choose one above 1023 with --port") from None
                raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; check --host and --port") \
                    from None


def _bad_host(host: str) -> ConfigError:
    return ConfigError(f"cannot listen on host {host!r}: it is not an address of this machine; give --host "
                       "127.0.0.1 (this machine only), 0.0.0.0 (every interface) or one of this machine's addresses")


def check_http_url(url: str, flag: str) -> None:
    """Raise ConfigError unless `url` is http(s)://HOST[:PORT][/path]."""
    try:
        parts = urlsplit(url)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname)
        parts.port  # noqa: B018 - reading it raises ValueError when the port is not a number in 0..65535
    except ValueError:
        valid = False
    if not valid:
        raise ConfigError(f"{flag} {url!r} is not an http URL; give http://HOST:PORT, e.g. http://10.0.0.5:8700")


def check_writable_dir(path: Path, flag: str) -> None:
    """Create `path` (and its parents) if missing; raise ConfigError if that fails or it is not writable."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create {flag} {path}: {exc.strerror or exc}; choose a directory you can write "
                          "to") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write to {flag} {path}: permission denied; choose a directory you can write to")
