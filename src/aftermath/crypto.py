"""Signed commitments (ed25519, via `cryptography`).

A client makes a keypair when it joins and sends the public key with its join; the coordinator binds that key
to the client's session. Every result the client commits is signed over the canonical commitment message

    aftermath-commit-v1 \\n run_id \\n step \\n client_id \\n blob sha256 \\n start \\n end

(the batch range is the one the coordinator assigned). The coordinator verifies it against the key bound at join
and against ITS assignment, so nobody can commit in another client's name or for a batch not assigned to it;
peers verify the signatures of the accepted set again before applying it (they do not have to trust the
coordinator's word either).
"""

from __future__ import annotations

import re

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from aftermath.errors import AftermathError

PUBLIC_KEY_RE = re.compile(r"[0-9a-f]{64}")  # 32 raw bytes, hex
SIGNATURE_RE = re.compile(r"[0-9a-f]{128}")  # 64 raw bytes, hex


class SignatureError(AftermathError):
    """A commitment's signature is missing, malformed or does not verify."""


def commitment_message(run_id: str, step: int, client_id: str, blob: str, start: int, end: int) -> bytes:
    return "\n".join(["aftermath-commit-v1", run_id, str(int(step)), client_id, blob,
                      str(int(start)), str(int(end))]).encode("utf-8")


class Signer:
    """A client's keypair."""

    def __init__(self, key: Ed25519PrivateKey | None = None) -> None:
        self.key = key or Ed25519PrivateKey.generate()

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
