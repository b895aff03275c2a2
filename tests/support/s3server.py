"""A real S3-compatible server for tests: moto's server (`moto[server]`) in a subprocess on 127.0.0.1.

A subprocess, not moto's in-process mocks: the code under test talks HTTP to a server, as it would to S3, R2 or
MinIO. Credentials are dummies passed explicitly (`session()`), never put in os.environ, so they cannot leak
into other tests.

    with S3Server() as server:
        bucket = server.create_bucket()
        store = S3BlobStore(bucket, 1 << 20, endpoint_url=server.endpoint_url, session=server.session())
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
import uuid

import boto3

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on (connections are refused at once)."""
    return free_port()


class S3Server:
    def __init__(self, start_timeout: float = 30.0) -> None:
        self.start_timeout = start_timeout
        self.port = 0
        self.process: subprocess.Popen | None = None
        self.log = tempfile.TemporaryFile()
        self._client = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "S3Server":
        self.port = free_port()
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto's server exited with {self.process.returncode}: {self._log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"moto's server did not listen on port {self.port} in {self.start_timeout} s: "
                           f"{self._log_tail()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        self.log.close()

    def session(self) -> boto3.session.Session:
        """A boto3 session holding the dummy credentials (explicit: the environment is not touched)."""
        return boto3.session.Session(aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                                     region_name=REGION)

    def client(self):
        """An S3 client of the server (one, kept: creating a client takes a good part of a second)."""
        if self._client is None:
            self._client = self.session().client("s3", endpoint_url=self.endpoint_url)
        return self._client

    def create_bucket(self, name: str | None = None) -> str:
        """A new bucket (a unique name unless given); its name."""
        name = name or f"test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def _log_tail(self) -> str:
        self.log.seek(0)
        return self.log.read()[-2000:].decode(errors="replace")

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
