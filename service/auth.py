"""API keys with scopes: `es_<prefix>_<secret>`, stored as sha256, compared in constant time.

A key is looked up by its public prefix; the secret's hash is compared with
`hmac.compare_digest`. Keys carry 256 bits of randomness, so a fast hash is enough (nothing
to brute-force); the plain key is shown once, when created.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from .ledger.schema import ApiKey, utcnow

SCOPES = ("generate", "evaluate", "edit", "admin")


class ScopeError(ValueError):
    """An unknown scope name."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: a key's id, name and scopes (`admin` includes every scope)."""

    key_id: str
    name: str
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes


OPEN_ACCESS = Principal("open", "open mode", frozenset(SCOPES))


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def check_scopes(scopes: list[str]) -> list[str]:
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        raise ScopeError(f"scopes must be some of {list(SCOPES)}; got {scopes}")
    return sorted(set(scopes))


class KeyStore:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def create(self, name: str, scopes: list[str]) -> tuple[ApiKey, str]:
        """A new key; returns the row and the plain key (shown only now)."""
        chosen = check_scopes(scopes)
        prefix, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
        row = ApiKey(
            id=str(uuid.uuid4()),
            name=name,
            prefix=prefix,
            secret_sha256=_digest(secret),
            scopes=chosen,
        )
        with self.sessions.begin() as session:
            session.add(row)
        return row, f"es_{prefix}_{secret}"

    def revoke(self, key_id_or_prefix: str) -> ApiKey | None:
        with self.sessions.begin() as session:
            query = select(ApiKey).where(
                (ApiKey.id == key_id_or_prefix) | (ApiKey.prefix == key_id_or_prefix)
            )
            row = session.scalars(query).first()
            if row is not None and row.revoked_at is None:
                row.revoked_at = utcnow()
            return row

    def list(self) -> list[ApiKey]:
        with self.sessions() as session:
            return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at)))

    def authenticate(self, presented: str) -> Principal | None:
        """The key's principal, or None for a malformed, unknown, revoked or wrong key."""
        parts = presented.split("_", 2)
        if len(parts) != 3 or parts[0] != "es":
            return None
        prefix, secret = parts[1], parts[2]
        with self.sessions() as session:
            row = session.scalars(select(ApiKey).where(ApiKey.prefix == prefix)).first()
        expected = row.secret_sha256 if row is not None else _digest("no such key")
        matches = hmac.compare_digest(_digest(secret), expected)
        if row is None or not matches or row.revoked_at is not None:
            return None
        return Principal(row.id, row.name, frozenset(row.scopes))
