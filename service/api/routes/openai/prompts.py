"""The prompts of a call, as token ids and text: a completion's (text or token ids, one or
several) and a chat's (the messages through the chat template), each checked against the
service's prompt limit."""

from __future__ import annotations

from collections.abc import Callable

from transformers import PreTrainedTokenizerBase

from ....engine.engine import Engine
from ....state import ServiceState
from ...openai_schemas import MAX_PROMPTS, ChatMessageIn, CompletionIn
from .common import Prompt, bad_request


def _prompt_items(raw: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    if isinstance(raw, str):
        return [raw]
    if raw and isinstance(raw[0], int):  # one prompt, as token ids
        return [[int(token) for token in raw]]  # type: ignore[arg-type]
    return list(raw)  # type: ignore[arg-type]


def completion_prompts(body: CompletionIn, engine: Engine, state: ServiceState) -> list[Prompt]:
    items = _prompt_items(body.prompt)
    if not items or len(items) > MAX_PROMPTS:
        raise bad_request(f"give 1 to {MAX_PROMPTS} prompts", "prompt")
    tok = engine.tok
    vocabulary = min(len(tok), engine.model.get_input_embeddings().weight.shape[0])
    prompts = []
    for item in items:
        if not item:
            raise bad_request("a prompt is empty", "prompt")
        if isinstance(item, str):
            prompts.append(Prompt(list(tok(item, add_special_tokens=True)["input_ids"]), item))
            continue
        if max(item) >= vocabulary:
            raise bad_request(
                f"token id {max(item)} is not below the vocabulary's {vocabulary}", "prompt"
            )
        prompts.append(Prompt(list(item), str(tok.decode(item))))
    _check_prompt_lengths(prompts, state, "prompt")
    return prompts


def _plain_chat(conversation: list[dict[str, str]]) -> str:
    """The layout for a tokenizer without a chat template: "role: content" lines, then the
    assistant's turn to speak."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in conversation) + "assistant:"


def _conversation(messages: list[ChatMessageIn]) -> list[dict[str, str]]:
    conversation = []
    for index, message in enumerate(messages):
        if message.text is None:
            raise bad_request(f"message {index} has no content", "messages")
        conversation.append({"role": message.role, "content": message.text})
    return conversation


def chat_memory(
    messages: list[ChatMessageIn],
) -> tuple[str | None, Callable[[str, PreTrainedTokenizerBase], list[int]] | None]:
    """For IKE (editors/memory.py): the text a chat is retrieved by (its last user
    message), and how to build its tokens with a context before that message's content.
    (None, None) when the chat has no user message."""
    conversation = _conversation(messages)
    last = max((i for i, m in enumerate(conversation) if m["role"] == "user"), default=None)
    if last is None:
        return None, None
    query = conversation[last]["content"]

    def with_context(context: str, tok: PreTrainedTokenizerBase) -> list[int]:
        changed = [dict(m) for m in conversation]
        changed[last]["content"] = context + query
        return _chat_ids(changed, tok)[0]

    return query, with_context


def _chat_ids(
    conversation: list[dict[str, str]], tok: PreTrainedTokenizerBase
) -> tuple[list[int], str]:
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        return list(tok(str(text), add_special_tokens=False)["input_ids"]), str(text)
    text = _plain_chat(conversation)
    return list(tok(text, add_special_tokens=True)["input_ids"]), text


def chat_prompt(messages: list[ChatMessageIn], engine: Engine, state: ServiceState) -> Prompt:
    conversation = _conversation(messages)
    tok = engine.tok
    if getattr(tok, "chat_template", None):
        try:
            text = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # the template's own checks (roles must alternate, ...)
            raise bad_request(f"the chat template refused the messages: {exc}", "messages") from exc
        ids = tok(str(text), add_special_tokens=False)["input_ids"]  # the template has them
    else:
        text = _plain_chat(conversation)
        ids = tok(text, add_special_tokens=True)["input_ids"]
    prompt = Prompt(list(ids), str(text))
    _check_prompt_lengths([prompt], state, "messages")
    return prompt


def _check_prompt_lengths(prompts: list[Prompt], state: ServiceState, param: str) -> None:
    limit = state.settings.max_prompt_tokens
    for prompt in prompts:
        if not prompt.ids:
            raise bad_request("a prompt encodes to no tokens", param)
        if len(prompt.ids) > limit:
            raise bad_request(
                f"a prompt is {len(prompt.ids)} tokens; the limit is {limit}",
                param,
                "too_many_tokens",
            )
