"""The writer lease and the head compare-and-set, on the lineage row (see schema.Lineage).

Every write a writer makes runs in a transaction that first checks its fencing token with
an UPDATE of the lineage row. The UPDATE also takes the row's write lock (a row lock on
PostgreSQL, the database lock on SQLite), so the check and the write cannot be separated by
a take-over: a writer that lost its lease commits nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from .schema import Lineage, utcnow

LINEAGE_ID = 1


class StaleWriterError(RuntimeError):
    """This process no longer holds the writer lease, or the head moved under it: what it
    was about to write is dropped (the lease holder redoes the job)."""


@dataclass(frozen=True)
class LeaseView:
    writer: str | None
    token: int
    beat: int
    head: int


def check_fence(session: Session, token: int | None) -> None:
    """Fail the transaction unless `token` is still the lease's (None: an unfenced caller,
    such as the command line on a stopped service)."""
    if token is None:
        return
    found = session.execute(
        update(Lineage)
        .where(Lineage.id == LINEAGE_ID, Lineage.token == token)
        .values(token=Lineage.token)
    )
    if found.rowcount != 1:
        raise StaleWriterError(f"the writer lease moved on from token {token}")


def advance_head(session: Session, on_head: int, token: int | None) -> int:
    """Move the head from `on_head` to the next version number, or fail: the head moved
    (another writer appended) or the lease was lost."""
    conditions = [Lineage.id == LINEAGE_ID, Lineage.head == on_head]
    if token is not None:
        conditions.append(Lineage.token == token)
    moved = session.execute(update(Lineage).where(*conditions).values(head=on_head + 1))
    if moved.rowcount != 1:
        raise StaleWriterError(
            f"version {on_head + 1} was not recorded: the head is no longer {on_head}"
            + (f" or the lease moved on from token {token}" if token is not None else "")
        )
    return on_head + 1


class Leases:
    """Lease operations; each is one short transaction."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def view(self) -> LeaseView | None:
        with self.sessions() as session:
            row = session.get(Lineage, LINEAGE_ID)
            if row is None:
                return None
            return LeaseView(row.writer, row.token, row.beat, row.head)

    def acquire(self, me: str, seen: LeaseView) -> int | None:
        """Take the lease as it was `seen` (free, or held by a writer whose beat stood still
        for the lease time): the new fencing token, or None when it changed meanwhile."""
        conditions = [Lineage.id == LINEAGE_ID, Lineage.token == seen.token]
        if seen.writer is None:
            conditions.append(Lineage.writer.is_(None))
        else:
            conditions += [Lineage.writer == seen.writer, Lineage.beat == seen.beat]
        with self.sessions.begin() as session:
            taken = session.execute(
                update(Lineage)
                .where(*conditions)
                .values(writer=me, token=seen.token + 1, beat=0, renewed_at=utcnow())
            )
            return seen.token + 1 if taken.rowcount == 1 else None

    def renew(self, token: int) -> bool:
        """Show the holder is alive; False when the lease is no longer this token's."""
        with self.sessions.begin() as session:
            renewed = session.execute(
                update(Lineage)
                .where(Lineage.id == LINEAGE_ID, Lineage.token == token)
                .values(beat=Lineage.beat + 1, renewed_at=utcnow())
            )
            return renewed.rowcount == 1

    def release(self, token: int) -> None:
        """Give the lease up (a clean stop): a standby takes it at once."""
        with self.sessions.begin() as session:
            session.execute(
                update(Lineage)
                .where(Lineage.id == LINEAGE_ID, Lineage.token == token)
                .values(writer=None)
            )

    def head(self) -> int | None:
        with self.sessions() as session:
            return session.scalar(select(Lineage.head).where(Lineage.id == LINEAGE_ID))
