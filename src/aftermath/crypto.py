"""Signed commitments and signed coordinator decisions (ed25519, via `cryptography`).

A client makes a keypair when it joins and sends the public key with its join; the coordinator binds that key
to the client's session. Every result the client commits is signed over the canonical commitment message

    aftermath-commit-v1 \\n run_id \\n step \\n client_id \\n blob sha256 \\n start \\n end

(the batch range is the one the coordinator assigned). The coordinator verifies it against the key bound at join
and against ITS assignment, so nobody can commit in another client's name or for a batch not assigned to it;
peers verify the signatures of the accepted set again before applying it (they do not have to trust the
coordinator's word either).

The coordinator has an identity of its own (a keypair kept in its run directory, the same across restarts; its
public key is printed with the join command and served in the run info). It signs what clients act on, so a
proxy or a tampered cache between them cannot make replicas apply different sets:

    aftermath-round-v1 \n run_id \n step \n accepted-set sha256 \n update blob sha256 (or "-")
    aftermath-assignment-v1 \n run_id \n step \n client_id \n start \n end
    aftermath-checkpoint-v1 \n run_id \n sha256 of the checkpoint answer's info and manifest (canonical JSON)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from aftermath.errors import AftermathError

COORDINATOR_KEY_FILE = "coordinator_key.pem"  # the coordinator's identity, in its run directory
PUBLIC_KEY_RE = re.compile(r"[0-9a-f]{64}")  # 32 raw bytes, hex
SIGNATURE_RE = re.compile(r"[0-9a-f]{128}")  # 64 raw bytes, hex


class SignatureError(AftermathError):
    """A commitment's signature is missing, malformed or does not verify."""


def commitment_message(run_id: str, step: int, client_id: str, blob: str, start: int, end: int) -> bytes:
    return "\n".join(["aftermath-commit-v1", run_id, str(int(step)), client_id, blob,
                      str(int(start)), str(int(end))]).encode("utf-8")


def round_message(run_id: str, step: int, accepted_digest: str, update_blob: str | None) -> bytes:
    return "\n".join(["aftermath-round-v1", run_id, str(int(step)), accepted_digest,
                      update_blob or "-"]).encode("utf-8")


def assignment_message(run_id: str, step: int, client_id: str, start: int, end: int) -> bytes:
    return "\n".join(["aftermath-assignment-v1", run_id, str(int(step)), client_id, str(int(start)),
                      str(int(end))]).encode("utf-8")


def checkpoint_message(run_id: str, info: dict[str, Any], manifest: dict[str, Any] | None) -> bytes:
    canonical = json.dumps({"info": info, "manifest": manifest}, sort_keys=True, separators=(",", ":"))
    return "\n".join(["aftermath-checkpoint-v1", run_id,
                      hashlib.sha256(canonical.encode("utf-8")).hexdigest()]).encode("utf-8")


class Signer:
    """A keypair: a client's (made at join) or the coordinator's identity (`load_or_create`)."""

    def __init__(self, key: Ed25519PrivateKey | None = None) -> None:
        self.key = key or Ed25519PrivateKey.generate()

    @classmethod
    def load_or_create(cls, path: Path) -> "Signer":
        """The keypair stored at `path` (PEM, readable by its owner only), made and stored on first use."""
        if path.exists():
            try:
                key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            except ValueError as exc:
                raise SignatureError(f"{path} is not a PEM ed25519 private key ({exc}); move it away to make a "
                                     f"new identity (clients pinned to the old key will refuse the new one)")
            if not isinstance(key, Ed25519PrivateKey):
                raise SignatureError(f"{path} holds a {type(key).__name__}, not an ed25519 key; move it away to "
                                     f"make a new identity")
            return cls(key)
        signer = cls()
        pem = signer.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())
        tmp = path.with_suffix(path.suffix + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        tmp.replace(path)
        return signer

    @property
    def public_hex(self) -> str:
        return self.key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()

    def sign(self, message: bytes) -> str:
        return self.key.sign(message).hex()

    def sign_commitment(self, run_id: str, step: int, client_id: str, blob: str, start: int, end: int) -> str:
        return self.sign(commitment_message(run_id, step, client_id, blob, start, end))


def check_public_key(public_hex: str) -> Ed25519PublicKey:
    if not isinstance(public_hex, str) or PUBLIC_KEY_RE.fullmatch(public_hex) is None:
        raise SignatureError(f"public key {str(public_hex)[:80]!r} is not an ed25519 key (64 lowercase hex digits)")
    return Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex))


def verify(public_hex: str, signature_hex: str, message: bytes) -> None:
    """Raises SignatureError unless `signature_hex` is `public_hex`'s signature of `message`."""
    key = check_public_key(public_hex)
    if not isinstance(signature_hex, str) or SIGNATURE_RE.fullmatch(signature_hex) is None:
        raise SignatureError(f"signature {str(signature_hex)[:40]!r}... is not an ed25519 signature "
                             f"(128 lowercase hex digits)")
    try:
        key.verify(bytes.fromhex(signature_hex), message)
    except InvalidSignature:
        raise SignatureError("the signature does not verify with the key bound to this client at join: the result "
                             "was not signed by this client, or not for this run, step, blob and batch range")


def verify_commitment(public_hex: str, signature_hex: str, run_id: str, step: int, client_id: str, blob: str,
                      start: int, end: int) -> None:
    verify(public_hex, signature_hex, commitment_message(run_id, step, client_id, blob, start, end))


def verify_decision(coordinator_key: str, signature: str | None, message: bytes, what: str) -> None:
    """Raises SignatureError unless `signature` is the coordinator's signature of `message` (`what`: the
    decision, for the error)."""
    if not signature:
        raise SignatureError(f"{what} is not signed by the coordinator: a proxy or cache between you and the "
                             f"coordinator removed its signature, or the coordinator is older than this client")
    try:
        verify(coordinator_key, signature, message)
    except SignatureError:
        raise SignatureError(f"{what} does not carry the signature of coordinator key {coordinator_key[:16]}...: "
                             f"it was altered between the coordinator and you (a proxy or cache), or you pinned "
                             f"the wrong key (--coordinator-key)") from None
