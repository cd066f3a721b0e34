"""API keys with scopes: `es_<prefix>_<secret>`, stored as sha256, compared in constant time.

A key is looked up by its public prefix; the secret's hash is compared with
`hmac.compare_digest`. Keys carry 256 bits of randomness, so a fast hash is enough (nothing
to brute-force); the plain key is shown once, when created.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import uuid
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from .ledger.schema import ApiKey, utcnow

SCOPES = ("generate", "evaluate", "edit", "admin")
# The id of the key a first start creates. Being a primary key, it is also the marker that
# lets only one of several processes starting together on one database create it.
FIRST_ADMIN_KEY_ID = "first-start-admin"
ADMIN_KEY_FILE = "admin-key"  # in the data dir: where a first start writes that key


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

    def create(self, name: str, scopes: list[str], key_id: str | None = None) -> tuple[ApiKey, str]:
        """A new key; returns the row and the plain key (shown only now)."""
        chosen = check_scopes(scopes)
        prefix, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
        row = ApiKey(
            id=key_id or str(uuid.uuid4()),
            name=name,
            prefix=prefix,
            secret_sha256=_digest(secret),
            scopes=chosen,
        )
        with self.sessions.begin() as session:
            session.add(row)
        return row, f"es_{prefix}_{secret}"

    def create_first_admin(self) -> str | None:
        """A new admin key (the plain key) if the ledger holds no key at all, revoked ones
        included; else None. Of processes racing here only one insert of the fixed id
        commits: the others fail on it (PostgreSQL waits for the first to commit, SQLite
        takes writers one at a time) and create nothing."""
        with self.sessions() as session:
            if session.scalars(select(ApiKey.id).limit(1)).first() is not None:
                return None
        try:
            _, plain = self.create("admin (first start)", ["admin"], key_id=FIRST_ADMIN_KEY_ID)
        except IntegrityError:
            return None
        return plain

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


def write_private(path: Path, text: str) -> None:
    """`text` in `path` with mode 0600 (only the owner reads it), replacing the file whole."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), 0o600)  # whatever a stale file had
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, path)
