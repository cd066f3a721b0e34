"""Web console sessions: an API key signs in once; the browser then holds an HttpOnly cookie.

The cookie carries a random token; the ledger keeps only its sha256, so sessions survive a
restart and are shared by every process on one database. A session acts with its key's
scopes and dies with the key. Requests that change anything must also send the session's
CSRF token (a header a cross-site form cannot set), derived from the cookie's token so
nothing more is stored.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from .auth import KeyStore, Principal
from .ledger.schema import ApiKey, ConsoleSession, utcnow

COOKIE_NAME = "editserve_session"
CSRF_HEADER = "x-csrf-token"


@dataclass(frozen=True)
class SignedIn:
    principal: Principal
    csrf_token: str


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def csrf_token_for(token: str) -> str:
    return hmac.new(token.encode(), b"editserve console csrf", hashlib.sha256).hexdigest()


class SessionStore:
    def __init__(self, sessions: sessionmaker[Session], keys: KeyStore, lifetime: timedelta):
        self.sessions, self.keys, self.lifetime = sessions, keys, lifetime

    def sign_in(self, api_key: str) -> tuple[str, SignedIn] | None:
        """A new session's cookie token for a valid key, or None (wrong or revoked key)."""
        principal = self.keys.authenticate(api_key)
        if principal is None:
            return None
        token = secrets.token_urlsafe(32)
        now = utcnow()
        with self.sessions.begin() as session:
            session.execute(delete(ConsoleSession).where(ConsoleSession.expires_at < now))
            session.add(
                ConsoleSession(
                    token_sha256=_digest(token),
                    key_id=principal.key_id,
                    created_at=now,
                    expires_at=now + self.lifetime,
                )
            )
        return token, SignedIn(principal, csrf_token_for(token))

    def lookup(self, token: str) -> SignedIn | None:
        """The session's key, if the session exists, has not expired and its key is live."""
        with self.sessions() as session:
            row = session.execute(
                select(ConsoleSession, ApiKey)
                .join(ApiKey, ApiKey.id == ConsoleSession.key_id)
                .where(ConsoleSession.token_sha256 == _digest(token))
            ).first()
        if row is None:
            return None
        console_session, key = row
        expires = console_session.expires_at
        if expires.tzinfo is None:  # SQLite returns naive datetimes
            expires = expires.replace(tzinfo=utcnow().tzinfo)
        if expires <= utcnow() or key.revoked_at is not None:
            return None
        principal = Principal(key.id, key.name, frozenset(key.scopes))
        return SignedIn(principal, csrf_token_for(token))

    def sign_out(self, token: str) -> None:
        with self.sessions.begin() as session:
            session.execute(
                delete(ConsoleSession).where(ConsoleSession.token_sha256 == _digest(token))
            )
