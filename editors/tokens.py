"""Tokenisation helpers: where the subject sits in a prompt, prompt/answer id pairs, and the
tokens that end a generated sequence."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .errors import SubjectNotLocatedError


@dataclass(frozen=True)
class PromptIds:
    """A tokenised prompt, the index of the subject's last token, and the answer ids."""

    prompt_ids: list[int]
    lookup: int
    answer_ids: list[int]

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.answer_ids


def encode_prompt(tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=True)["input_ids"])


def encode_answer(tok: PreTrainedTokenizerBase, answer: str) -> list[int]:
    """Answer ids as a continuation: no BOS, leading space kept."""
    ids = list(tok(answer, add_special_tokens=False)["input_ids"])
    if not ids:
        raise SubjectNotLocatedError(f"answer {answer!r} encodes to no tokens", field="target_new")
    return ids


def subject_last_token(
    tok: PreTrainedTokenizerBase, text: str, subject_start: int, subject_end: int
) -> tuple[list[int], int]:
    """Token ids of `text` and the index of the last token overlapping [start, end)."""
    enc = tok(text, add_special_tokens=True, return_offsets_mapping=True)
    last = None
    for index, (start, end) in enumerate(enc["offset_mapping"]):
        if end > start and start < subject_end and end > subject_start:
            last = index
    if last is None:
        raise SubjectNotLocatedError(
            f"subject at characters {subject_start}-{subject_end} of {text!r} maps to no token",
            field="subject",
        )
    return list(enc["input_ids"]), last


def locate(
    tok: PreTrainedTokenizerBase, prefix: str, template: str, subject: str, answer: str | None
) -> PromptIds:
    """Tokenise `prefix + template.replace('{}', subject)` and find the subject's last token."""
    head, _, tail = template.partition("{}")
    start = len(prefix) + len(head)
    text = prefix + head + subject + tail
    ids, lookup = subject_last_token(tok, text, start, start + len(subject))
    return PromptIds(ids, lookup, encode_answer(tok, answer) if answer is not None else [])


def eos_ids(model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> set[int]:
    """Every token that ends a sequence: the tokenizer's eos and the generation config's (chat
    models often list several)."""
    eos: set[int] = set()
    for source in (tok.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            eos.add(source)
        elif isinstance(source, list):
            eos.update(source)
    return eos
