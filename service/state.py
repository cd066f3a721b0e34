"""What the running service holds: settings, ledger, blobs, queue, engine and worker.

`boot()` loads the model and replays the ledger in a background thread, so `/healthz`
answers at once and `/readyz` turns ready when the head is restored.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import Engine as DbEngine
from sqlalchemy.orm import Session, sessionmaker

from editors.models import load_model

from .api.limits import RateLimiter
from .auth import KeyStore
from .config import Settings
from .engine.engine import Engine, resolve_device, torch_dtype
from .engine.lease import Role, WriterLease, process_identity
from .evaluations.jobs import EvaluationWorker
from .follower import HeadFollower
from .ledger.blobs import BlobStore, DatabaseBlobStore, FileBlobStore
from .ledger.db import make_engine, migrate, session_factory
from .ledger.store import Ledger
from .observability import ServiceMetrics
from .queue import JobQueue, QueueUnavailableError, make_queue
from .queue.notices import VersionNotices
from .sessions import SessionStore
from .worker import EditWorker

log = logging.getLogger(__name__)


@dataclass
class ServiceState:
    settings: Settings
    db: DbEngine
    ledger: Ledger
    blobs: BlobStore
    queue: JobQueue
    keys: KeyStore
    console_sessions: SessionStore
    limiter: RateLimiter
    metrics: ServiceMetrics = field(default_factory=ServiceMetrics)
    engine: Engine | None = None
    worker: EditWorker | None = None
    evaluation_worker: EvaluationWorker | None = None
    follower: HeadFollower | None = None
    lease: WriterLease | None = None
    notices: VersionNotices | None = None
    identity: str = ""
    boot_error: str | None = None
    booted: bool = False  # boot() has finished: the worker (if any) runs
    _boot_thread: threading.Thread | None = field(default=None, repr=False)

    @classmethod
    def create(cls, settings: Settings, run_migrations: bool = True) -> ServiceState:
        url = settings.resolved_database_url
        if run_migrations:
            migrate(url)
        db = make_engine(
            url, settings.db_connect_timeout_seconds, settings.db_statement_timeout_seconds
        )
        sessions = session_factory(db)
        keys = KeyStore(sessions)
        notices = (
            VersionNotices(settings.redis_url, f"{settings.queue_name}:versions")
            if settings.redis_url
            else None
        )
        return cls(
            settings=settings,
            db=db,
            ledger=Ledger(sessions, model=settings.model),
            blobs=_blob_store(settings, sessions),
            queue=make_queue(settings.redis_url, settings.worker_name, settings.queue_name),
            keys=keys,
            console_sessions=SessionStore(
                sessions, keys, timedelta(hours=settings.console_session_hours)
            ),
            limiter=RateLimiter(settings.rate_limit_per_minute),
            notices=notices,
            identity=process_identity(settings.worker_name),
        )

    def boot(self, run_worker: bool) -> None:
        """Load the model, restore the ledger head, then start the worker (if asked)."""
        try:
            device = resolve_device(self.settings.device)
            log.info("start-up: loading the model %s on %s", self.settings.model, device)
            model, tok = load_model(
                self.settings.model,
                self.settings.cache_dir,
                device=device,
                dtype=torch_dtype(self.settings.dtype, device),
            )
            engine = Engine(
                model,
                tok,
                self.ledger,
                self.blobs,
                stats_dir=str(self.settings.cache_dir / "stats"),
                stats_corpus=str(self.settings.stats_corpus)
                if self.settings.stats_corpus
                else None,
                stats_samples=self.settings.stats_samples,
                generate_max_batch=self.settings.generate_max_batch,
                metrics=self.metrics,
                precompute_statistics=self.settings.precompute_statistics,
                max_job_attempts=self.settings.max_job_attempts,
                job_time_limit_seconds=self.settings.job_time_limit_seconds,
                guard=self.settings.guard_limits,
                announce=self.notices.publish if self.notices is not None else lambda n: None,
                identity=self.identity,
            )
            self.engine = engine
            engine.start()
            self.follower = HeadFollower(engine, self.notices, self.settings.follow_poll_seconds)
            self.follower.start()
            if run_worker:
                self.lease = WriterLease(
                    self.ledger.leases, self.identity, self.settings.writer_lease_seconds
                )
                self.worker = EditWorker(
                    engine, self.queue, self.lease, self.settings.queue_poll_seconds
                )
                self._republish_pending()
                self.worker.start()
                self.evaluation_worker = EvaluationWorker(engine, self.settings, self.lease)
                self.evaluation_worker.start()
            self.booted = True
            log.info("start-up: done; serving version %s as %s", engine.version, self.role)
        except Exception as exc:
            log.exception("start-up failed")
            self.boot_error = f"{type(exc).__name__}: {exc}"

    def boot_in_background(self, run_worker: bool) -> None:
        self._boot_thread = threading.Thread(
            target=self.boot, args=(run_worker,), name="boot", daemon=True
        )
        self._boot_thread.start()

    def wait_booted(self, timeout: float | None = None) -> None:
        if self._boot_thread is not None:
            self._boot_thread.join(timeout)

    def _republish_pending(self) -> None:
        """The ledger's queued and interrupted jobs, sent again (a restarted Redis lost them)."""
        try:
            for job_id in self.ledger.pending_job_ids():
                self.queue.publish(job_id)
        except QueueUnavailableError as exc:
            log.warning("could not re-send pending jobs: %s (the worker polls the ledger)", exc)

    @property
    def role(self) -> Role:
        """`starting` until boot() has finished, then writer or standby (with a worker),
        else follower."""
        if not self.ready:
            return Role.starting
        return self.lease.role if self.lease is not None else Role.follower

    @property
    def ready(self) -> bool:
        """boot() has finished: the engine serves the ledger head and the worker (if any)
        runs, so /readyz never says ready while the role is still unknown."""
        return self.booted and self.engine is not None and self.engine.state.ready

    def close(self) -> None:
        self.wait_booted(timeout=600)
        if self.evaluation_worker is not None:
            self.evaluation_worker.stop()
        if self.worker is not None:
            self.worker.stop()
        if self.follower is not None:
            self.follower.stop()
        if self.engine is not None:
            self.engine.close()
        self.queue.close()
        if self.notices is not None:
            self.notices.close()
        self.db.dispose()


def _blob_store(settings: Settings, sessions: sessionmaker[Session]) -> BlobStore:
    folder = settings.resolved_blob_dir
    if settings.blob_store == "filesystem":
        return FileBlobStore(folder)
    return DatabaseBlobStore(sessions, FileBlobStore(folder) if folder.is_dir() else None)
