"""From a call's parameters to generation requests: the token budget, each choice's
sampling parameters, and one `GenerationRequest` per choice."""

from __future__ import annotations

from ....engine.engine import Engine
from ....engine.generation import GenerationRequest, SamplingParams
from ....state import ServiceState
from ...openai_schemas import SamplingIn
from .common import Prompt, bad_request, context_length

GREEDY_BELOW = 1e-5  # temperature


def max_tokens(
    requested: int | None, param: str, prompts: list[Prompt], engine: Engine, state: ServiceState
) -> int:
    """The token budget: as asked, within the service's limit and the model's context;
    unset, whatever both leave."""
    limit, context = state.settings.max_new_tokens, context_length(engine)
    if requested is not None and requested > limit:
        raise bad_request(f"{param} is limited to {limit}", param, "too_many_tokens")
    longest = max(len(prompt.ids) for prompt in prompts)
    budget = requested
    if budget is None:
        budget = limit if context is None else max(0, min(limit, context - longest))
    if context is not None and longest + budget > context:
        raise bad_request(
            f"the model's context is {context} tokens: {longest} in the prompt and "
            f"{budget} to generate do not fit",
            param,
            "too_many_tokens",
        )
    return budget


def _sampling(body: SamplingIn, max_tokens: int, choice: int) -> SamplingParams:
    """OpenAI's defaults (temperature 1); choice i of `n` samples with seed + i. A
    temperature below `GREEDY_BELOW` is greedy, as in vLLM (dividing by it overflows)."""
    temperature = 1.0 if body.temperature is None else body.temperature
    return SamplingParams(
        max_new_tokens=max_tokens,
        temperature=0.0 if temperature < GREEDY_BELOW else temperature,
        top_k=max(body.top_k or 0, 0),
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=None if body.seed is None else (body.seed + choice) % 2**64,
        stop=body.stops,
    )


def generation_requests(
    prompts: list[Prompt],
    body: SamplingIn,
    max_tokens: int,
    logprobs: int | None,
    prompt_logprobs: int | None,
) -> list[GenerationRequest]:
    """`n` choices per prompt, choice index = prompt index * n + i (as OpenAI orders them)."""
    return [
        GenerationRequest(
            prompt.text,
            _sampling(body, max_tokens, choice),
            prompt_ids=prompt.ids,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )
        for prompt in prompts
        for choice in range(body.n)
    ]
