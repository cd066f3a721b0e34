"""Service settings, read from `EDITSERVE_*` environment variables (pydantic-settings).

The defaults are the embedded profile: SQLite and patch blobs under `data_dir`, an
in-process queue (no Redis URL), the worker inside the API process, the default model.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from editors.models import DEFAULT_MODEL, default_cache_dir

from .engine.guard import GuardLimits
from .evaluations.sources import default_benchmark_dir

log = logging.getLogger(__name__)
OLD_DEFAULT_DATA_DIR = Path("editserve-data")  # the old default, relative to the working dir


def default_data_dir() -> Path:
    """`$XDG_DATA_HOME/editserve`, else ~/.local/share/editserve: one place per user, so
    `editserve keys create` run from any folder uses the ledger the server uses."""
    base = os.environ.get("XDG_DATA_HOME", "")
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".local" / "share"
    return root / "editserve"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDITSERVE_", extra="ignore")

    model: str = Field(DEFAULT_MODEL, description="built-in model name or a local folder")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="SQLite ledger, blobs and the first admin key (~/.local/share/editserve)",
    )
    database_url: str | None = Field(None, description="default: SQLite in data_dir")
    blob_store: Literal["database", "filesystem"] = Field(
        "database", description="where patch blobs live: the ledger database, or blob_dir"
    )
    blob_dir: Path | None = Field(None, description="default: data_dir/blobs")
    redis_url: str | None = Field(None, description="unset: the in-process queue")
    cache_dir: Path = Field(default_factory=default_cache_dir)
    benchmark_dir: Path = Field(
        default_factory=default_benchmark_dir, description="folder of the benchmark files"
    )
    max_evaluation_cases: int = Field(10_000, gt=0, description="cases per evaluation job")
    stats_corpus: Path | None = Field(None, description="text/JSONL corpus for statistics")
    stats_samples: int = Field(20_000, gt=0)
    precompute_statistics: bool = Field(
        True, description="compute the default layers' statistics before reporting ready"
    )
    auto_migrate: bool = Field(True, description="run the ledger migrations at start-up")
    run_worker: bool = Field(True, description="run the edit worker inside the API process")
    worker_name: str = Field("worker-1", description="stable Redis consumer name")
    queue_name: str = Field("editserve", description="Redis key prefix of the job stream")
    queue_poll_seconds: float = Field(2.0, gt=0, description="ledger poll when no message")
    writer_lease_seconds: float = Field(
        3.0, gt=0, description="a writer silent this long is replaced by a standby"
    )
    follow_poll_seconds: float = Field(
        1.0, gt=0, description="ledger poll for new versions (notices come at once with Redis)"
    )
    max_prompt_tokens: int = Field(512, gt=0)
    max_new_tokens: int = Field(1024, gt=0)
    max_edits_per_job: int = Field(1000, gt=0)
    max_evaluate_cases: int = Field(64, gt=0, description="cases per synchronous /v1/evaluate")
    generate_max_batch: int = Field(32, gt=0)
    auth: Literal["keys", "open"] = Field(
        "keys", description="keys: every model route needs an API key; open: no keys (local use)"
    )
    console_session_hours: float = Field(
        12.0, gt=0, description="a web console sign-in lasts this long"
    )
    rate_limit_per_minute: int = Field(600, ge=0, description="requests per key; 0: no limit")
    max_body_bytes: int = Field(1_000_000, gt=0)
    max_queue_depth: int = Field(1000, gt=0, description="unfinished jobs before 429")
    max_job_attempts: int = Field(
        3, gt=0, description="runs of a job a crash may interrupt before it is failed"
    )
    db_connect_timeout_seconds: float = Field(
        5.0, gt=0, description="connecting to the database gives up after this long"
    )
    db_statement_timeout_seconds: float = Field(
        30.0, gt=0, description="a PostgreSQL statement (or lock wait) is cancelled after this"
    )
    job_time_limit_seconds: float = Field(
        3600.0, gt=0, description="an edit, rollback or revert job running longer is stopped"
    )
    guard: bool = Field(True, description="measure every edit before recording it")
    guard_max_perplexity_rise: float = Field(0.2, ge=0, description="relative, probe text")
    guard_max_canary_changed: float = Field(0.3, ge=0, le=1, description="canary answer tokens")
    guard_max_canary_nll_rise: float = Field(0.1, ge=0, description="nats, canary answers")
    guard_max_delta_ratio: float = Field(0.5, gt=0, description="|delta| / |W| per matrix")
    guard_max_entropy_drop: float = Field(0.3, ge=0, le=1, description="generation entropy")
    guard_max_total_perplexity_rise: float = Field(0.5, ge=0, description="against the base")
    guard_max_total_canary_changed: float = Field(0.5, ge=0, le=1, description="against the base")
    guard_max_total_canary_nll_rise: float = Field(0.5, ge=0, description="against the base")
    guard_max_total_delta_ratio: float = Field(1.0, gt=0, description="|W - W_base| / |W_base|")
    guard_max_total_entropy_drop: float = Field(0.5, ge=0, le=1, description="against the base")
    job_wait_seconds: float = Field(120.0, ge=0, description="longest wait of wait=true calls")
    log_format: Literal["json", "text"] = "json"
    host: str = "127.0.0.1"
    port: int = 8000

    @property
    def guard_limits(self) -> GuardLimits:
        return GuardLimits(
            self.guard,
            self.guard_max_perplexity_rise,
            self.guard_max_canary_changed,
            self.guard_max_canary_nll_rise,
            self.guard_max_delta_ratio,
            self.guard_max_entropy_drop,
            self.guard_max_total_perplexity_rise,
            self.guard_max_total_canary_changed,
            self.guard_max_total_canary_nll_rise,
            self.guard_max_total_delta_ratio,
            self.guard_max_total_entropy_drop,
        )

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'ledger.db').resolve()}"

    @property
    def resolved_blob_dir(self) -> Path:
        return self.blob_dir or self.data_dir / "blobs"

    def warn_about_old_data_dir(self) -> None:
        """A ledger in ./editserve-data (the old default) that these settings do not use."""
        old = OLD_DEFAULT_DATA_DIR / "ledger.db"
        if "data_dir" in self.model_fields_set or self.database_url or not old.is_file():
            return
        log.warning(
            "%s holds a ledger from the old default data dir; this process uses %s. "
            "Set EDITSERVE_DATA_DIR=%s to keep using the old one",
            old.absolute(),
            self.data_dir,
            OLD_DEFAULT_DATA_DIR.absolute(),
        )
