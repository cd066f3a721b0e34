"""Request ids, structured JSON logs and Prometheus metrics.

The request id (the caller's `X-Request-ID`, or a new one) lives in a context variable; it is
stored in the job a request creates, and the worker sets it again while running that job, so
one id follows an edit from the API to the worker in every log line.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time
import uuid
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


def new_request_id(given: str | None = None) -> str:
    if given and 0 < len(given) <= 128 and given.isprintable():
        return given
    return uuid.uuid4().hex


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        for key in ("job_id", "edit_ids", "method", "seconds", "status", "path", "route"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(fmt: str = "json", level: str = "info") -> None:
    handler = logging.StreamHandler()
    handler.addFilter(_RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class ServiceMetrics:
    """The service's metrics in a registry of its own (one per app)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "editserve_http_requests",
            "HTTP requests by method, route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "editserve_http_request_seconds",
            "HTTP request latency (to the response start for streams)",
            ["method", "route"],
            registry=self.registry,
        )
        self.edit_seconds = Histogram(
            "editserve_edit_seconds",
            "Time to compute and apply an edit job, by method",
            ["method", "status"],
            buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800),
            registry=self.registry,
        )
        self.swap_seconds = Histogram(
            "editserve_swap_seconds",
            "Time the served model is held to swap in a recorded version",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=self.registry,
        )
        self.decoded_tokens = Counter(
            "editserve_decoded_tokens",
            "Tokens the serving loop decoded, for finished and abandoned requests alike",
            registry=self.registry,
        )
        self.generated_tokens = Counter(
            "editserve_generated_tokens", "Tokens generated", registry=self.registry
        )
        self.queue_depth = Gauge(
            "editserve_queue_depth", "Unfinished jobs in the ledger", registry=self.registry
        )
        self.model_version = Gauge(
            "editserve_model_version", "Ledger version of the served weights",
            registry=self.registry,
        )  # fmt: skip

    def watch(self, queue_depth: Callable[[], float], model_version: Callable[[], float]) -> None:
        self.queue_depth.set_function(queue_depth)
        self.model_version.set_function(model_version)
