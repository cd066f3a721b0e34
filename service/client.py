"""A typed Python client for the EditServe HTTP API.

    with EditServeClient(api_key=KEY) as client:
        job = client.edit_and_wait("The mother tongue of {} is", "Danielle Darrieux", "English")
        print(client.generate("The mother tongue of Danielle Darrieux is").generated_text)

Answers are parsed into the service's own response models (`service.api.schemas`), so the
client and the server share one definition of every body. Every error answer raises
`EditServeError`; a wait that runs out raises `JobTimeoutError`. Network failures surface as
`httpx.HTTPError`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, Self, TypedDict, TypeVar, Unpack, overload

import httpx

from .api.schemas import (
    Accepted,
    EditIn,
    EditList,
    EditOut,
    EvaluateOut,
    EvaluationOut,
    GenerateOut,
    JobOut,
    MethodOut,
    ModelOut,
    PromptAnswer,
    VersionOut,
)

__all__ = [
    "Accepted",
    "EditFields",
    "EditList",
    "EditOut",
    "EditServeClient",
    "EditServeError",
    "EvaluateOut",
    "EvaluationOut",
    "GenerateOut",
    "JobOut",
    "JobTimeoutError",
    "MethodOut",
    "ModelOut",
    "VersionOut",
]

DEFAULT_URL = "http://127.0.0.1:8000"
API_KEY_ENV = "EDITSERVE_API_KEY"
ACTIVE = ("queued", "running")  # job statuses that have not ended

ProgressCallback = Callable[[float, str], None]
"""Called with (percent, stage) whenever a polled job's progress changes."""

PromptAnswerLike = PromptAnswer | Mapping[str, str] | tuple[str, str]
EditLike = EditIn | Mapping[str, Any]
Polled = TypeVar("Polled", JobOut, EvaluationOut)


class EditFields(TypedDict, total=False):
    """The optional fields of one edit, besides prompt, subject and target_new."""

    target_true: str
    paraphrases: Sequence[str]
    locality: Sequence[PromptAnswerLike]
    portability: Sequence[PromptAnswerLike]
    case_id: str


class EditServeError(Exception):
    """An error answer: HTTP status, message, error `type` and the request `field` it names."""

    def __init__(
        self,
        status_code: int,
        message: str,
        type: str | None = None,
        field: str | None = None,
        *,
        request_id: str | None = None,
        retry_after: float | None = None,
        body: Any = None,
    ) -> None:
        self.status_code, self.message, self.type, self.field = status_code, message, type, field
        self.request_id, self.retry_after, self.body = request_id, retry_after, body
        where = f" (field {field})" if field else ""
        super().__init__(f"{status_code} {type or 'error'}: {message}{where}")

    @classmethod
    def from_response(cls, response: httpx.Response) -> EditServeError:
        """Read `{error, type, field}` (or OpenAI's `{error: {message, type, param}}`)."""
        try:
            body: Any = response.json()
        except ValueError:
            body = None
        message, kind, field = response.text[:500] or response.reason_phrase, None, None
        if isinstance(body, dict):
            error = body.get("error")
            if isinstance(error, dict):
                message, kind, field = error.get("message"), error.get("type"), error.get("param")
            elif error is not None:
                message, kind, field = error, body.get("type"), body.get("field")
            elif "detail" in body:
                message = body["detail"]
        retry = response.headers.get("retry-after")
        return cls(
            response.status_code,
            str(message),
            str(kind) if kind is not None else None,
            str(field) if field is not None else None,
            request_id=response.headers.get("x-request-id"),
            retry_after=float(retry) if retry and retry.replace(".", "", 1).isdigit() else None,
            body=body,
        )


class JobTimeoutError(TimeoutError):
    """A job (or evaluation) did not end within the wait; `last` is how it stood."""

    def __init__(self, message: str, last: JobOut | EvaluationOut) -> None:
        super().__init__(message)
        self.last = last


def _pair(item: PromptAnswerLike) -> dict[str, str]:
    if isinstance(item, PromptAnswer):
        return item.model_dump()
    if isinstance(item, tuple):
        return {"prompt": item[0], "answer": item[1]}
    return dict(item)


def _edit_record(edit: EditLike) -> dict[str, Any]:
    if isinstance(edit, EditIn):
        return edit.model_dump(mode="json", exclude_none=True)
    record = {name: value for name, value in edit.items() if value is not None}
    for name in ("locality", "portability"):
        if name in record:
            record[name] = [_pair(p) for p in record[name]]
    if "paraphrases" in record:
        record["paraphrases"] = list(record["paraphrases"])
    return record


def _given(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


class EditServeClient:
    """Synchronous client. `api_key` defaults to $EDITSERVE_API_KEY (none: an open server);
    `timeout` is per HTTP request in seconds. Pass `http_client` to reuse an `httpx.Client`
    (for example Starlette's TestClient); the client then does not close it."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        *,
        timeout: float = 120.0,
        http_client: httpx.Client | None = None,
    ) -> None:
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._owned = http_client is None
        self._http = http_client or httpx.Client(base_url=base_url, timeout=timeout)
        self._headers = headers
        self.base_url = str(self._http.base_url).rstrip("/")

    # -- plumbing ------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the HTTP connection pool (unless it was passed in)."""
        if self._owned:
            self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
    ) -> Any:
        response = self._http.request(
            method, path, json=json, params=_given(**(params or {})), headers=self._headers
        )
        if not response.is_success:
            raise EditServeError.from_response(response)
        return response.json()

    def _poll(
        self,
        read: Callable[[], Polled],
        timeout: float | None,
        poll_interval: float,
        on_progress: ProgressCallback | None,
    ) -> Polled:
        deadline = None if timeout is None else time.monotonic() + timeout
        seen: tuple[float, str] | None = None
        while True:
            current = read()
            progress = (current.percent, current.stage)
            if on_progress is not None and progress != seen:
                on_progress(*progress)
            seen = progress
            if current.status not in ACTIVE:
                return current
            if deadline is not None and time.monotonic() >= deadline:
                what = "job" if isinstance(current, JobOut) else "evaluation"
                message = f"{what} {current.id} still {current.status} after {timeout} s"
                raise JobTimeoutError(message, current)
            time.sleep(poll_interval)

    # -- edits and jobs ------------------------------------------------------------------------

    def edit(
        self,
        prompt: str,
        subject: str,
        target_new: str,
        *,
        method: str = "rome",
        hparams: Mapping[str, Any] | None = None,
        **fields: Unpack[EditFields],
    ) -> Accepted:
        """Queue one edit (`prompt` holds `{}` for the subject); the accepted job."""
        edit = _edit_record(
            {**fields, "prompt": prompt, "subject": subject, "target_new": target_new}
        )
        body = {"edit": edit, "method": method, "hparams": dict(hparams or {})}
        return Accepted.model_validate(self._request("POST", "/v1/edits", json=body))

    def edit_batch(
        self,
        edits: Sequence[EditLike],
        *,
        method: str = "rome",
        hparams: Mapping[str, Any] | None = None,
    ) -> Accepted:
        """Queue several edits computed as one patch (MEMIT-style methods)."""
        body = {
            "edits": [_edit_record(e) for e in edits],
            "method": method,
            "hparams": dict(hparams or {}),
        }
        return Accepted.model_validate(self._request("POST", "/v1/edits", json=body))

    def edit_and_wait(
        self,
        prompt: str,
        subject: str,
        target_new: str,
        *,
        method: str = "rome",
        hparams: Mapping[str, Any] | None = None,
        timeout: float | None = 600.0,
        on_progress: ProgressCallback | None = None,
        **fields: Unpack[EditFields],
    ) -> JobOut:
        """`edit`, then `wait`: the ended job (check `status`: applied, rejected, failed)."""
        accepted = self.edit(prompt, subject, target_new, method=method, hparams=hparams, **fields)
        return self.wait(accepted.job_id, timeout=timeout, on_progress=on_progress)

    def job(self, job_id: int) -> JobOut:
        return JobOut.model_validate(self._request("GET", f"/v1/jobs/{job_id}"))

    def wait(
        self,
        job_id: int,
        *,
        timeout: float | None = 600.0,
        poll_interval: float = 0.25,
        on_progress: ProgressCallback | None = None,
    ) -> JobOut:
        """Poll a job until it ends; `on_progress(percent, stage)` on every change.
        Raises JobTimeoutError after `timeout` seconds (None: wait for ever)."""
        return self._poll(lambda: self.job(job_id), timeout, poll_interval, on_progress)

    def cancel(self, job_id: int) -> JobOut:
        """Cancel a queued or running job (409 once it has ended)."""
        return JobOut.model_validate(self._request("POST", f"/v1/jobs/{job_id}/cancel"))

    def edits(self, *, limit: int = 50, offset: int = 0, status: str | None = None) -> EditList:
        """Edits, newest first, with whether each is live at the head."""
        params = {"limit": limit, "offset": offset, "status": status}
        return EditList.model_validate(self._request("GET", "/v1/edits", params=params))

    def get_edit(self, edit_id: str) -> EditOut:
        return EditOut.model_validate(self._request("GET", f"/v1/edits/{edit_id}"))

    def _job_then_wait(
        self, path: str, body: dict[str, Any], wait: bool, timeout: float | None,
        on_progress: ProgressCallback | None,
    ) -> JobOut:  # fmt: skip
        # the server is asked not to hold the request; the client polls instead, so its
        # timeout and progress callback apply
        job = JobOut.model_validate(self._request("POST", path, json={**body, "wait": False}))
        if not wait:
            return job
        return self.wait(job.id, timeout=timeout, on_progress=on_progress)

    def rollback(
        self,
        to_version: int,
        *,
        wait: bool = True,
        timeout: float | None = 600.0,
        on_progress: ProgressCallback | None = None,
    ) -> JobOut:
        """Restore the weights of `to_version` as a new version; the job (ended if `wait`)."""
        body = {"to_version": to_version}
        return self._job_then_wait("/v1/rollback", body, wait, timeout, on_progress)

    def revert(
        self,
        edit_id: str,
        *,
        mode: Literal["rebase", "subtract"] = "rebase",
        wait: bool = True,
        timeout: float | None = 600.0,
        on_progress: ProgressCallback | None = None,
    ) -> JobOut:
        """Undo one edit (`rebase` recomputes later edits; `subtract` removes its patch)."""
        path = f"/v1/edits/{edit_id}/revert"
        return self._job_then_wait(path, {"mode": mode}, wait, timeout, on_progress)

    # -- the model ----------------------------------------------------------------------------

    def model(self) -> ModelOut:
        """The served model: base, version, checksum, edited layers."""
        return ModelOut.model_validate(self._request("GET", "/v1/model"))

    def versions(self, *, limit: int = 100, offset: int = 0) -> list[VersionOut]:
        """The version history, newest first."""
        rows = self._request("GET", "/v1/versions", params={"limit": limit, "offset": offset})
        return [VersionOut.model_validate(row) for row in rows]

    def methods(self) -> list[MethodOut]:
        """Every editing method with its hyperparameters (defaults and bounds)."""
        return [MethodOut.model_validate(row) for row in self._request("GET", "/v1/methods")]

    @overload
    def generate(
        self,
        inputs: str,
        *,
        max_new_tokens: int = ...,
        do_sample: bool = ...,
        temperature: float | None = ...,
        top_k: int | None = ...,
        top_p: float | None = ...,
        seed: int | None = ...,
        stop: Sequence[str] = ...,
        version: int | None = ...,
    ) -> GenerateOut: ...

    @overload
    def generate(
        self,
        inputs: Sequence[str],
        *,
        max_new_tokens: int = ...,
        do_sample: bool = ...,
        temperature: float | None = ...,
        top_k: int | None = ...,
        top_p: float | None = ...,
        seed: int | None = ...,
        stop: Sequence[str] = ...,
        version: int | None = ...,
    ) -> list[GenerateOut]: ...

    def generate(
        self,
        inputs: str | Sequence[str],
        *,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        version: int | None = None,
    ) -> GenerateOut | list[GenerateOut]:
        """Text from the served (edited) model: one prompt gives one result, a list a list.
        Greedy unless `do_sample` or a `temperature` above 0. `version`: an earlier recorded
        version answers instead (computed on the server's edit workspace)."""
        parameters = _given(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop=list(stop),
        )
        one = isinstance(inputs, str)
        body: dict[str, Any] = {"inputs": inputs if one else list(inputs), "parameters": parameters}
        if version is not None:
            body["version"] = version
        answer = self._request("POST", "/v1/generate", json=body)
        if one:
            return GenerateOut.model_validate(answer)
        return [GenerateOut.model_validate(row) for row in answer]

    # -- evaluation ---------------------------------------------------------------------------

    def evaluate(
        self,
        cases: Sequence[EditLike] | None = None,
        *,
        edit_ids: Sequence[str] | None = None,
        baseline: bool = True,
    ) -> EvaluateOut:
        """Score `cases` (edit-shaped) or earlier edits' requests at the current version,
        with the base weights' scores as `baseline`."""
        body = _given(
            cases=None if cases is None else [_edit_record(c) for c in cases],
            edit_ids=None if edit_ids is None else list(edit_ids),
            baseline=baseline,
        )
        return EvaluateOut.model_validate(self._request("POST", "/v1/evaluate", json=body))

    def start_evaluation(
        self,
        *,
        dataset: str | None = None,
        split: str | None = None,
        count: int | None = None,
        start: int | None = None,
        records: Sequence[Any] | None = None,
        format: Literal["counterfact", "zsre", "knowedit", "mquake"] | None = None,
        cases: Sequence[EditLike] | None = None,
        method: str = "rome",
        protocol: Literal["none", "single", "batch", "sequential"] = "single",
        batch_size: int | None = None,
        checkpoint_every: int | None = None,
        hparams: Mapping[str, Any] | None = None,
        fluency: bool = True,
        at_head: bool = False,
    ) -> EvaluationOut:
        """Queue a dataset evaluation run; cases from one of `dataset`, `records`, `cases`."""
        body = _given(
            dataset=dataset,
            split=split,
            count=count,
            start=start,
            records=None if records is None else list(records),
            format=format,
            cases=None if cases is None else [_edit_record(c) for c in cases],
            method=method,
            protocol=protocol,
            batch_size=batch_size,
            checkpoint_every=checkpoint_every,
            hparams=dict(hparams or {}),
            fluency=fluency,
            at_head=at_head,
        )
        return EvaluationOut.model_validate(self._request("POST", "/v1/evaluations", json=body))

    def evaluation(self, evaluation_id: int) -> EvaluationOut:
        """A run's status, progress and summary."""
        path = f"/v1/evaluations/{evaluation_id}"
        return EvaluationOut.model_validate(self._request("GET", path))

    def evaluations(self, *, limit: int = 100, offset: int = 0) -> list[EvaluationOut]:
        rows = self._request("GET", "/v1/evaluations", params={"limit": limit, "offset": offset})
        return [EvaluationOut.model_validate(row) for row in rows]

    def wait_evaluation(
        self,
        evaluation_id: int,
        *,
        timeout: float | None = 3600.0,
        poll_interval: float = 1.0,
        on_progress: ProgressCallback | None = None,
    ) -> EvaluationOut:
        """Poll a run until it ends (completed, cancelled, failed)."""
        read = lambda: self.evaluation(evaluation_id)  # noqa: E731
        return self._poll(read, timeout, poll_interval, on_progress)

    def evaluation_results(
        self,
        evaluation_id: int,
        *,
        kind: Literal["baseline", "case", "checkpoint", "final"] | None = None,
    ) -> list[dict[str, Any]]:
        """Every recorded row of a run (or those of one `kind`), each metric beside its
        baseline."""
        path = f"/v1/evaluations/{evaluation_id}/results"
        rows: list[dict[str, Any]] = self._request("GET", path, params={"kind": kind})
        return rows

    def cancel_evaluation(self, evaluation_id: int) -> EvaluationOut:
        """Stop a run at its next edit; what it measured is kept."""
        path = f"/v1/evaluations/{evaluation_id}/cancel"
        return EvaluationOut.model_validate(self._request("POST", path))
