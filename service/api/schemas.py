"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_ID = 2**31 - 1  # ids and versions are 32-bit in the ledger
MAX_EVALUATION_PROMPTS = 32  # paraphrases, locality and portability prompts per edit
MAX_STOP_CHARS = 64  # a stop string is matched against the text at every new token


class PromptAnswer(BaseModel):
    prompt: str = Field(min_length=1)
    answer: str = Field(min_length=1)


class EditIn(BaseModel):
    """One fact rewrite: `prompt` holds `{}` for the subject (or spells the subject out)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, examples=["The mother tongue of {} is"])
    subject: str = Field(min_length=1, examples=["Danielle Darrieux"])
    target_new: str = Field(min_length=1, examples=["English"])
    target_true: str | None = None
    paraphrases: list[str] = Field(default_factory=list, max_length=MAX_EVALUATION_PROMPTS)
    locality: list[PromptAnswer] = Field(default_factory=list, max_length=MAX_EVALUATION_PROMPTS)
    portability: list[PromptAnswer] = Field(default_factory=list, max_length=MAX_EVALUATION_PROMPTS)
    case_id: str | None = None


class EditsIn(BaseModel):
    """One edit (`edit`) or a batch (`edits`), computed as one patch by `method`."""

    model_config = ConfigDict(extra="forbid")

    edit: EditIn | None = None
    edits: list[EditIn] | None = None
    method: str = Field("rome", examples=["rome", "memit"])
    hparams: dict[str, Any] = Field(default_factory=dict, description="overrides, by name")


class Accepted(BaseModel):
    job_id: int
    edit_ids: list[str]
    status: str = "queued"
    job_url: str


class EditOut(BaseModel):
    id: str
    job_id: int
    position: int
    method: str
    hparams: dict[str, Any]
    request: dict[str, Any]
    status: str
    error: str | None
    diagnostics: dict[str, Any] | None
    version: int | None  # the version that first applied it
    live: bool  # in effect at the current head
    live_version: int | None  # the version on the head's chain whose patch carries it
    created_at: datetime
    applied_at: datetime | None


class EditList(BaseModel):
    edits: list[EditOut]
    total: int
    model_version: int


class JobOut(BaseModel):
    id: int
    kind: str
    status: str
    stage: str
    percent: float
    payload: dict[str, Any]
    attempts: int
    error: str | None
    error_type: str | None
    result_version: int | None
    result: dict[str, Any] | None = Field(
        None, description="what the job produced beyond a version (the guard's refusal)"
    )
    edit_ids: list[str]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class EvaluateIn(BaseModel):
    """Cases to score (`cases`), or the stored requests of earlier edits (`edit_ids`)."""

    model_config = ConfigDict(extra="forbid")

    cases: list[EditIn] | None = None
    edit_ids: list[str] | None = None
    baseline: bool = Field(True, description="also score the base weights (version 0)")


class EvaluateOut(BaseModel):
    model_version: int
    cases: int
    metrics: dict[str, float | None]
    baseline: dict[str, float | None] | None


class RollbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    to_version: int = Field(ge=0, le=MAX_ID)
    wait: bool = Field(
        True, description="answer when the rollback is done (up to EDITSERVE_JOB_WAIT_SECONDS)"
    )


class RevertIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["rebase", "subtract"] = "rebase"
    wait: bool = True


class VersionOut(BaseModel):
    number: int
    parent: int | None
    kind: str
    job_id: int | None
    patch_sha256: str | None
    checksum: str
    edit_ids: list[str]
    reverts: int | None
    note: str
    created_at: datetime


class ModelOut(BaseModel):
    model: str
    version: int
    checksum: str
    base_checksum: str
    device: str
    dtype: str
    family: str
    layers: int
    edited_parameters: list[str]
    edited_layers: list[int]
    live_edits: int
    role: str = Field(description="writer, standby (takes over when the writer dies) or follower")


class GenerateParameters(BaseModel):
    """TGI-style sampling parameters."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(32, ge=0, le=MAX_ID)
    do_sample: bool = False
    temperature: float | None = Field(None, ge=0, le=100)
    top_k: int | None = Field(None, ge=0, le=MAX_ID)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]] = Field(
        default_factory=list, max_length=16
    )


class GenerateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: str | list[str] = Field(examples=["The mother tongue of Danielle Darrieux is"])
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    version: int | None = Field(
        None,
        ge=0,
        le=MAX_ID,
        description="answer from this recorded version instead of the served one (computed "
        "on the edit workspace, so it waits while an edit is being computed)",
    )


class GenerateOut(BaseModel):
    generated_text: str
    finish_reason: str
    generated_tokens: int
    prompt_tokens: int
    model_version: int


class EvaluationIn(BaseModel):
    """A dataset evaluation job. The cases come from exactly one of: a named benchmark
    (`dataset`, `split`, `count`, `start`), uploaded benchmark records (`records`, in
    `format` or detected), or edits in the API's own JSON (`cases`)."""

    model_config = ConfigDict(extra="forbid")

    dataset: str | None = Field(None, examples=["counterfact"])
    split: str | None = Field(None, examples=["edit"])
    count: int = Field(100, ge=1, le=MAX_ID, description="cases taken from the benchmark")
    start: int = Field(0, ge=0, le=MAX_ID)
    records: list[Any] | None = Field(None, description="your own cases in a benchmark format")
    format: Literal["counterfact", "zsre", "knowedit", "mquake"] | None = None
    cases: list[EditIn] | None = None
    method: str = Field("rome", examples=["rome", "memit"])
    protocol: Literal["none", "single", "batch", "sequential"] = "single"
    batch_size: int | None = Field(None, ge=1, le=MAX_ID)
    checkpoint_every: int | None = Field(None, ge=1, le=MAX_ID)
    hparams: dict[str, Any] = Field(default_factory=dict, description="overrides, by name")
    fluency: bool = Field(True, description="also measure n-gram entropy of generations")
    at_head: bool = Field(False, description="start from the ledger head, not the base")


class EvaluationOut(BaseModel):
    id: int
    status: str
    stage: str
    percent: float
    source: dict[str, Any]
    plan: dict[str, Any]
    cases: int
    error: str | None
    summary: dict[str, Any] | None = Field(
        None, description="baseline, final and checkpoint metrics (as far as the run got)"
    )
    results_url: str
    csv_url: str
    report_url: str
    created_at: datetime
    finished_at: datetime | None


class HyperparameterOut(BaseModel):
    name: str
    type: str
    default: Any = Field(description="the default for the served model's family")
    maximum: int | None = Field(None, description="the largest value (a layer index, a bound)")
    max_items: int | None = Field(None, description="the most items a list may hold")


class MethodOut(BaseModel):
    name: str
    family: str = Field(description="the served model's family, whose defaults are shown")
    needs_statistics: bool = Field(description="reads the second moment of its layers' keys")
    uses_history: bool = Field(description="reads the patches applied before it")
    subtractable: bool = Field(description="a revert may subtract its patch")
    writes_weights: bool = Field(description="changes weights (not only codebook entries)")
    hyperparameters: list[HyperparameterOut]
