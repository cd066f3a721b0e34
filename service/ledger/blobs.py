"""Content-addressed storage of patch blobs: bytes named by their sha256, verified on read.

`BlobStore` is the interface (an S3 store would implement the same three methods). The
database store keeps blobs in the ledger database, so every replica reads them with only
the database URL (the default); the filesystem store writes to a temporary file and renames
it into place, so a crash never leaves a truncated blob under a valid name.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Protocol

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from .schema import Blob


class BlobError(RuntimeError):
    """A blob is missing or its bytes do not match its name."""


class BlobStore(Protocol):
    def put(self, data: bytes) -> str: ...

    def get(self, sha256: str) -> bytes: ...

    def exists(self, sha256: str) -> bool: ...


def _checked(sha256: str, data: bytes, where: str) -> bytes:
    if hashlib.sha256(data).hexdigest() != sha256:
        raise BlobError(f"patch blob {sha256} in {where} is corrupt (its bytes hash differently)")
    return data


class FileBlobStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise BlobError(f"not a sha256 name: {sha256!r}")
        return self.root / sha256[:2] / f"{sha256}.safetensors"

    def put(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self._path(sha)
        if path.exists():
            return sha
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return sha

    def get(self, sha256: str) -> bytes:
        path = self._path(sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BlobError(f"patch blob {sha256} is missing from {self.root}") from None
        return _checked(sha256, data, str(self.root))

    def exists(self, sha256: str) -> bool:
        return self._path(sha256).exists()


class DatabaseBlobStore:
    """Blobs as rows of the ledger database. Blobs an older deployment wrote to a folder
    are still read from `fallback`."""

    def __init__(
        self, sessions: sessionmaker[Session], fallback: FileBlobStore | None = None
    ) -> None:
        self.sessions, self.fallback = sessions, fallback

    def put(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if self.exists(sha):
            return sha
        try:
            with self.sessions.begin() as session:
                session.add(Blob(sha256=sha, data=data, size=len(data)))
        except IntegrityError:
            pass  # written meanwhile by another process: same name, same bytes
        return sha

    def get(self, sha256: str) -> bytes:
        with self.sessions() as session:
            blob = session.get(Blob, sha256)
            data = bytes(blob.data) if blob is not None else None
        if data is not None:
            return _checked(sha256, data, "the ledger database")
        if self.fallback is not None and self.fallback.exists(sha256):
            return self.fallback.get(sha256)
        raise BlobError(f"patch blob {sha256} is missing from the ledger database")

    def exists(self, sha256: str) -> bool:
        with self.sessions() as session:
            if session.get(Blob, sha256) is not None:
                return True
        return self.fallback is not None and self.fallback.exists(sha256)
