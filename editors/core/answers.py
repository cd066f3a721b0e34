"""Prompt + target rows for methods that train on the target tokens directly (FT, GRACE)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from ..requests import EditRequest
from ..tokens import encode_answer, encode_prompt
from .keys import pad_id_of, right_padded


@dataclass(frozen=True)
class AnswerBatch:
    ids: torch.Tensor  # [b, t] prompt + target of each request, right-padded
    mask: torch.Tensor  # [b, t]
    labels: torch.Tensor  # [b, t] the target tokens at their places, -100 elsewhere

    def predicting(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, position) of every position whose next token is a target token."""
        rows, positions = torch.nonzero(self.labels[:, 1:] != -100, as_tuple=True)
        return rows, positions


def answer_batch(
    tok: PreTrainedTokenizerBase,
    requests: list[EditRequest],
    device: torch.device,
    first_token_only: bool = False,
) -> AnswerBatch:
    rows, labels = [], []
    for request in requests:
        prompt, answer = encode_prompt(tok, request.text), encode_answer(tok, request.target)
        if first_token_only:
            answer = answer[:1]
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    ids, mask = right_padded(rows, pad_id_of(tok), device)
    target = torch.full_like(ids, -100)
    for i, row in enumerate(labels):
        target[i, : len(row)] = torch.tensor(row, device=device)
    return AnswerBatch(ids, mask, target)
