"""TLS and secrets for a run across the internet: pure helpers (no sockets).

- `make_self_signed` writes a self-signed ECDSA P-256 certificate and its key (the key file mode 0600, both
  written atomically); `fingerprint` is the SHA-256 of a certificate's DER bytes (64 hex digits), which clients
  pin with `--coordinator-fingerprint`.
- `server_context` is the coordinator's ssl context; `client_ssl` is what a client gives aiohttp as `ssl=`:
  a pinned fingerprint (`aiohttp.Fingerprint`: no CA validation, but exactly that certificate), a context that
  verifies against a CA file, or None (the system's CAs).
- `check_plain_http` and `check_listen` refuse unencrypted traffic beyond this machine unless `--insecure`.
- `read_secret`: a token from its flag, else its file, else its environment variable (never from argv alone).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import ssl
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aftermath.errors import ConfigError

TOKEN_ENV = "AFTERMATH_TOKEN"
ADMIN_TOKEN_ENV = "AFTERMATH_ADMIN_TOKEN"
LOOPBACK_NAMES = ("localhost", "localhost.", "ip6-localhost")


# ---------------------------------------------------------------------------------------------- certificates
def make_self_signed(cert_path: str | Path, key_path: str | Path, hosts: list[str], days: int = 365) -> str:
    """Write a self-signed certificate for `hosts` (plus 127.0.0.1 and localhost) and its private key; return
    the certificate's fingerprint. `days` < 0 makes a certificate that expired that many days ago (tests)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for host in [*hosts, "127.0.0.1", "localhost"]:
        host = host.strip().strip("[]")
        if not host or host in seen:
            continue
        seen.add(host)
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            names.append(x509.DNSName(host))
        else:
            if not ip.is_unspecified:  # 0.0.0.0 / :: is a listening address, not a name of the server
                names.append(x509.IPAddress(ip))
    now = dt.datetime.now(dt.timezone.utc)
    if days > 0:
        not_before, not_after = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)
    else:  # already expired: valid for one day, ending `-days` days ago (at least a minute ago)
        not_after = now + dt.timedelta(days=days) - dt.timedelta(minutes=1)
        not_before = not_after - dt.timedelta(days=1)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "aftermath coordinator")])
    public = key.public_key()
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(public)
            .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_agreement=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    _write_atomic(Path(key_path), key_pem, 0o600)
    _write_atomic(Path(cert_path), cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)  # before any byte of a key is in it
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_cert(cert_path: str | Path):
    from cryptography import x509

    try:
        data = Path(cert_path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the TLS certificate {cert_path}: {exc.strerror or exc}; check the path") \
            from None
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        try:
            return x509.load_der_x509_certificate(data)
        except ValueError:
            raise ConfigError(f"{cert_path} is not a PEM or DER certificate; give the server certificate "
                              "(-----BEGIN CERTIFICATE-----)") from None


def fingerprint(cert_path: str | Path) -> str:
    """SHA-256 of the certificate's DER bytes, 64 lowercase hex digits (of the first certificate of a chain)."""
    from cryptography.hazmat.primitives import serialization

    return hashlib.sha256(_load_cert(cert_path).public_bytes(serialization.Encoding.DER)).hexdigest()


def cert_expires(cert_path: str | Path) -> dt.datetime:
    cert = _load_cert(cert_path)
    return getattr(cert, "not_valid_after_utc", None) or cert.not_valid_after.replace(tzinfo=dt.timezone.utc)


def normalize_fingerprint(text: str, flag: str = "--coordinator-fingerprint") -> str:
    """64 lowercase hex digits from `text` (also accepts AB:CD:... and a `sha256:` prefix), else ConfigError."""
    t = text.strip().lower().removeprefix("sha256:").removeprefix("sha256=").replace(":", "").replace(" ", "")
    if len(t) != 64 or any(c not in "0123456789abcdef" for c in t):
        raise ConfigError(f"{flag} {text!r} is not a SHA-256 fingerprint; give the 64 hex digits the coordinator "
                          "prints at start")
    return t


def server_context(cert: str | Path, key: str | Path) -> ssl.SSLContext:
    """The coordinator's TLS context (TLS 1.2 or later) with `cert` (PEM, may hold the chain) and `key`."""
    for path, what in ((cert, "--tls-cert"), (key, "--tls-key")):
        if not Path(path).is_file():
            raise ConfigError(f"{what} {path} does not exist; give the PEM file, or --tls self-signed")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"cannot use the TLS certificate {cert} with the key {key}: {exc}; give a PEM "
                          "certificate and its unencrypted PEM private key") from None
    return ctx


def client_ssl(fingerprint: str | None, cafile: str | Path | None) -> Any:
    """What aiohttp's `ssl=` gets: `aiohttp.Fingerprint` for a pinned certificate (no CA validation, exactly that
    certificate), an `ssl.SSLContext` verifying against `cafile`, or None (the system's CAs)."""
    import aiohttp

    if fingerprint:
        if cafile:
            raise ConfigError("give --coordinator-fingerprint or --ca-file, not both")
        return aiohttp.Fingerprint(bytes.fromhex(normalize_fingerprint(fingerprint)))
    if cafile:
        if not Path(cafile).is_file():
            raise ConfigError(f"--ca-file {cafile} does not exist; give the PEM file of the CA (or the "
                              "coordinator's certificate)")
        try:
            ctx = ssl.create_default_context(cafile=str(cafile))
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"--ca-file {cafile} holds no usable certificate: {exc}") from None
        ctx.verify_flags |= getattr(ssl, "VERIFY_X509_PARTIAL_CHAIN", 0)  # the coordinator's own cert as the CA
        return ctx
    return None


def fingerprint_mismatch_message(exc: Exception) -> str:
    """One line for aiohttp.ServerFingerprintMismatch (its `got` and `expected` are the digests)."""
    got, expected = getattr(exc, "got", b""), getattr(exc, "expected", b"")
    return (f"the coordinator's certificate fingerprint is {bytes(got).hex()}, expected {bytes(expected).hex()}: "
            "check --coordinator-fingerprint (no token was sent)")


def certificate_error_message(url: str, exc: Exception) -> str:
    reason = getattr(getattr(exc, "certificate_error", None), "verify_message", None) or str(exc)
    return (f"the coordinator at {url} has a certificate this client does not trust ({reason}): pin it with "
            "--coordinator-fingerprint FP (printed by the coordinator) or give its CA with --ca-file (no token was "
            "sent)")


# ---------------------------------------------------------------------------------------------- plain http
def is_loopback(host: str | None) -> bool:
    """127.0.0.0/8, ::1 or localhost."""
    if not host:
        return False
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_plain_http(url: str, insecure: bool, flag: str = "--coordinator") -> None:
    """Refuse http:// to a host that is not this machine (the token would cross the network in clear text)."""
    parts = urlsplit(url)
    if parts.scheme == "http" and not insecure and not is_loopback(parts.hostname):
        raise ConfigError(f"{flag} {url} is plain http to another machine: the run token and every update would "
                          "cross the network unencrypted; use https:// (the coordinator with --tls-cert/--tls-key "
                          "or --tls self-signed), or pass --insecure on a network you trust")


def check_listen(host: str, tls: bool, insecure: bool) -> None:
    """Refuse to listen without TLS on an address other machines can reach, unless --insecure."""
    if not tls and not insecure and not is_loopback(host):
        raise ConfigError(f"listening on {host} without TLS would send the run token unencrypted to other machines; "
                          "give --tls-cert PATH --tls-key PATH or --tls self-signed, put a TLS reverse proxy in front "
                          "and listen on 127.0.0.1, or pass --insecure on a network you trust")


# ---------------------------------------------------------------------------------------------- secrets
def read_secret(value: str | None, file: str | Path | None, env: str, flag: str = "--token") -> str | None:
    """The secret from its flag, else from `file` (stripped), else from the environment variable `env`, else None."""
    if value:
        return value
    if file:
        try:
            text = Path(file).read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise ConfigError(f"cannot read {flag}-file {file}: {reason}; give a readable file holding the token") \
                from None
        if not text:
            raise ConfigError(f"{flag}-file {file} is empty; write the token in it")
        return text
    return os.environ.get(env) or None
