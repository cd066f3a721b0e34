"""Prompt + target rows for methods that train or score on the target tokens directly (FT,
GRACE, NSE's landing check)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..requests import EditRequest
from ..tokens import encode_answer, encode_prompt
from .keys import pad_id_of, right_padded


@dataclass(frozen=True)
class AnswerBatch:
    ids: torch.Tensor  # [b, t] prompt + target of each row, right-padded
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
    prefixes: tuple[str, ...] | list[str] = ("",),
) -> AnswerBatch:
    """One row per (request, prefix), requests outer: prefix + prompt, then the target."""
    rows, labels = [], []
    for request in requests:
        answer = encode_answer(tok, request.target)
        if first_token_only:
            answer = answer[:1]
        for prefix in prefixes:
            prompt = encode_prompt(tok, prefix + request.text)
            rows.append(prompt + answer)
            labels.append([-100] * len(prompt) + answer)
    ids, mask = right_padded(rows, pad_id_of(tok), device)
    target = torch.full_like(ids, -100)
    for i, row in enumerate(labels):
        target[i, : len(row)] = torch.tensor(row, device=device)
    return AnswerBatch(ids, mask, target)


@torch.no_grad()
def target_probabilities(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    requests: list[EditRequest],
    prefixes: list[str],
) -> list[float]:
    """P(target_new) of each request on the current weights: per context (prefix + prompt)
    the length-normalised probability of the target tokens, then the geometric mean over
    the contexts, as the value optimisation reports it."""
    device = next(model.parameters()).device
    batch = answer_batch(tok, requests, device, prefixes=prefixes)
    logits = model(input_ids=batch.ids, attention_mask=batch.mask).logits
    rows, positions = batch.predicting()
    logp = torch.log_softmax(logits[rows, positions].float(), dim=-1)
    token_logp = logp.gather(1, batch.labels[rows, positions + 1][:, None]).squeeze(1)
    n_rows = batch.ids.shape[0]
    per_row = torch.zeros(n_rows, device=device).index_add(0, rows, token_logp)
    per_row = per_row / torch.bincount(rows, minlength=n_rows).clamp_min(1)
    per_request = per_row.view(len(requests), len(prefixes)).mean(dim=1)
    return torch.exp(per_request).tolist()
