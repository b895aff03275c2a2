"""Who is who: session tokens handed out at join, the client id each stands for, and each client's spec.

A client id is the name the client asked for, made unique with a counter (`alice`, `alice-2`, ...) among the
clients still in the run. A rejoining client gets a fresh session; its old tokens stop working.
"""

from __future__ import annotations

import secrets
from typing import Callable

from aftermath.errors import AftermathError
from aftermath.model import TierSpec


class Unauthorized(AftermathError):
    """The call carries no session, or one this coordinator did not hand out (answered 401)."""


class Sessions:
    def __init__(self) -> None:
        self._clients: dict[str, str] = {}  # session token -> client id
        self.specs: dict[str, TierSpec] = {}  # client id -> the spec it joined with
        self._names_used: dict[str, int] = {}

    def unique_id(self, name: str, taken: Callable[[str], bool]) -> str:
        """`name` (or "client"), with a counter appended while `taken(id)` says the id is in use."""
        base = name or "client"
        cid = base
        while taken(cid):
            self._names_used[base] = self._names_used.get(base, 1) + 1
            cid = f"{base}-{self._names_used[base]}"
        return cid

    def open(self, client_id: str, spec: TierSpec) -> str:
        """A new session token for `client_id` (its earlier ones are revoked)."""
        for old in [s for s, c in self._clients.items() if c == client_id]:
            del self._clients[old]
        token = secrets.token_urlsafe(24)
        self._clients[token] = client_id
        self.specs[client_id] = spec
        return token

    def client_of(self, authorization: str) -> str | None:
        """The client id an `Authorization: Bearer SESSION` header stands for (None: no valid session)."""
        if not authorization.startswith("Bearer "):
            return None
        return self._clients.get(authorization[7:].strip())

    def authenticate(self, authorization: str) -> str:
        if not authorization.startswith("Bearer "):
            raise Unauthorized("missing 'Authorization: Bearer SESSION' (the session token /join gave)")
        cid = self.client_of(authorization)
        if cid is None:
            raise Unauthorized("unknown session token: join the run again")
        return cid
