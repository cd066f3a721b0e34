"""OpenAI-compatible routes, in the shapes vLLM serves: /v1/models, /v1/completions and
/v1/chat/completions. Translation only: every choice is one `GenerationRequest` on the
serving loop, as /v1/generate's prompts are; nothing here touches the model.

- Errors on these paths come in OpenAI's shape, `{"error": {"message", "type", "param",
  "code"}}` (`openai_errors.py`): 400 for bad parameters (validation errors too, which the
  rest of the API answers 422), 401 without a valid key, 404 for a model not served.
- Chat prompts go through the tokenizer's chat template. A tokenizer without one gets a
  plain layout: one "role: content" line per message, then "assistant:" to answer after.
- Logprobs are the raw model's (log-softmax of its logits, before temperature, top-k or
  top-p), as vLLM reports by default; minus infinity is sent as -9999.0, as vLLM does.
- `system_fingerprint` is `editserve-v<version>`, the model version that answered, which
  the `X-Model-Version` header also carries.

One job per module: `models` (/v1/models), `completions` and `chat` (the two generation
routes), `prompts` (prompts from either request shape, checked), `sampling` (token budget,
sampling parameters, one request per choice), `answer` (a whole answer that does not
stream), `stream` (server-sent events), `chunks` (each route's stream chunks), `logprobs`
(logprobs in the two shapes) and `common` (what they all share).
"""

from __future__ import annotations

from fastapi import APIRouter

from . import chat, completions, models

router = APIRouter()
for _module in (models, completions, chat):
    router.include_router(_module.router)

__all__ = ["router"]
