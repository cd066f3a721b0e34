"""What the OpenAI routes share: their dependencies, the prompt they generate from, request
errors, the served model's id and context, fingerprints, finish reasons and usage."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fastapi import Depends

from ....engine.engine import Engine
from ....engine.generation import GenerationOutput
from ....state import ServiceState
from ...deps import authenticated, require
from ...errors import ApiError
from ...openai_schemas import Usage

MODELS = [Depends(authenticated)]
GENERATE = [Depends(require("generate"))]


@dataclass
class Prompt:
    ids: list[int]
    text: str  # what `echo` sends back


def bad_request(message: str, param: str | None, code: str = "invalid_request") -> ApiError:
    return ApiError(400, message, code, param)


def fingerprint(version: int) -> str:
    return f"editserve-v{version}"


def finish_reason(output: GenerationOutput) -> str:
    return "length" if output.finish_reason == "length" else "stop"  # eos or a stop string


def context_length(engine: Engine) -> int | None:
    length = getattr(engine.model.config, "max_position_embeddings", None)
    return length if isinstance(length, int) and length > 0 else None


def served(name: str | None, state: ServiceState) -> str:
    """The served model's id; 404 for any other name, as vLLM answers."""
    model = state.settings.model
    if name is not None and name != model:
        raise ApiError(404, f"The model `{name}` does not exist.", "model_not_found", "model")
    return model


def usage(prompts: list[Prompt], outputs: Sequence[GenerationOutput]) -> Usage:
    prompt_tokens = sum(len(prompt.ids) for prompt in prompts)
    completion_tokens = sum(len(output.token_ids) for output in outputs)
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )
