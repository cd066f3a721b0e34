"""Checks an edit batch before it is accepted: everything that can be known without
running the model, so a 202 means the job can only fail for reasons found while editing."""

from __future__ import annotations

from typing import Any

from editors.errors import EditError
from editors.methods import get_method
from editors.model_spec import num_layers
from editors.requests import EditRequest
from editors.tokens import encode_answer, locate

from ..config import Settings
from ..engine.engine import Engine
from .errors import bad_input, from_edit_error
from .schemas import EditIn, EditsIn

MAX_TARGET_TOKENS = 64


def validated_edits(
    body: EditsIn, engine: Engine, settings: Settings
) -> tuple[list[EditRequest], str, dict[str, Any]]:
    if (body.edit is None) == (body.edits is None):
        raise bad_input("give exactly one of `edit` (one fact) or `edits` (a batch)", "edits")
    items: list[tuple[str, EditIn]] = (
        [("edit.", body.edit)]
        if body.edit is not None
        else [(f"edits.{i}.", e) for i, e in enumerate(body.edits or [])]
    )
    if not items:
        raise bad_input("edits is empty", "edits")
    if len(items) > settings.max_edits_per_job:
        raise bad_input(f"at most {settings.max_edits_per_job} edits per job", "edits")
    checked_method(body.method, body.hparams, engine)
    return (
        [checked_request(prefix, item, engine, settings) for prefix, item in items],
        body.method,
        dict(body.hparams),
    )


def checked_method(method: str, overrides: dict[str, Any], engine: Engine) -> None:
    """The method exists and `overrides` on its family defaults make valid hyperparameters
    for this model; a 422 names `method` or `hparams.<name>` otherwise."""
    try:
        get_method(method)
    except EditError as exc:
        raise from_edit_error(exc) from exc
    try:
        hparams = engine.editor.hparams(method, overrides)
        hparams.edited_layers(num_layers(engine.model, engine.editor.spec))
    except EditError as exc:
        raise from_edit_error(exc, "hparams.") from exc


def checked_request(prefix: str, item: EditIn, engine: Engine, settings: Settings) -> EditRequest:
    tok = engine.tok
    try:
        request = EditRequest(
            prompt=item.prompt,
            subject=item.subject,
            target_new=item.target_new,
            target_true=item.target_true,
            paraphrases=tuple(item.paraphrases),
            locality=tuple((p.prompt, p.answer) for p in item.locality),
            portability=tuple((p.prompt, p.answer) for p in item.portability),
            case_id=item.case_id,
        )
        ids = locate(tok, "", request.prompt, request.subject, request.target).ids
        if len(ids) > settings.max_prompt_tokens:
            raise bad_input(
                f"prompt is {len(ids)} tokens; the limit is {settings.max_prompt_tokens}",
                f"{prefix}prompt",
                "too_many_tokens",
            )
        target = encode_answer(tok, request.target)
        if len(target) > MAX_TARGET_TOKENS:
            raise bad_input(
                f"target_new is {len(target)} tokens; the limit is {MAX_TARGET_TOKENS}",
                f"{prefix}target_new",
                "too_many_tokens",
            )
    except EditError as exc:
        raise from_edit_error(exc, prefix) from exc
    return request
