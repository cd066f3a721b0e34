"""Editing metrics, each group of prompts scored in one batched pass.

EasyEdit family (token-level teacher-forced accuracy):
  reliability     new target after the edit prompt
  generalization  new target after the paraphrases
  locality        the locality prompts' predicted answer tokens are those before the edit
  portability     the portability answers (multi-hop, alias, reasoning)
CounterFact family (probability comparisons, mean token NLL per answer):
  efficacy        NLL(new) < NLL(true) on the edit prompt          (ES, magnitude P(new)-P(true))
  paraphrase      the same on the paraphrases                      (PS)
  neighborhood    NLL(true) < NLL(new) on the locality prompts     (NS)
Free generation (greedy decoding, judged by free_generation.states_answer):
  free_rewrite      the continuation of the edit prompt states the new target
  free_paraphrase   the same from the paraphrases
  free_locality     a locality prompt's continuation gives the answer it gave before the edit
                    (without a reference: states the stated answer)
  free_portability  the continuation states the portability answer
Fluency: ROME's weighted 2/3-gram entropy of greedy generations; perplexity of fixed text.
MQuAKE multi-hop accuracy: any of a case's questions answered with the new answer.
"""

from __future__ import annotations

import inspect
import math
from collections import Counter
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .core.keys import pad_id_of, right_padded
from .free_generation import answer_budget, continuations, gives_same_answer, states_answer
from .memory import memory_of, rewrite_ids
from .requests import EditRequest, with_leading_space
from .tokens import encode_answer, encode_prompt, eos_ids

Pair = tuple[str, str]  # (prompt text, answer)


def prompt_ids(model: PreTrainedModel, tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    """A prompt's tokens as the model reads it: with IKE memory entries (editors/memory.py)
    relevant to it, their demonstrations come first, as when the service generates."""
    ids = encode_prompt(tok, text)
    memory = memory_of(model)
    return rewrite_ids(memory, tok, text, ids)[0] if memory is not None else ids


@dataclass(frozen=True)
class PairScores:
    nll: list[float]  # mean token NLL of each answer
    predicted: list[list[int]]  # argmax token at each answer position
    answers: list[list[int]]

    def accuracy(self, index: int) -> float:
        hits = sum(p == a for p, a in zip(self.predicted[index], self.answers[index], strict=True))
        return hits / len(self.answers[index])


@torch.no_grad()
def score_pairs(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, pairs: list[Pair], chunk: int = 64
) -> PairScores:
    """Teacher-forced NLL and argmax predictions of every answer given its prompt."""
    device = next(model.parameters()).device
    encoded = [
        (prompt_ids(model, tok, p), encode_answer(tok, with_leading_space(a))) for p, a in pairs
    ]
    nll: list[float] = []
    predicted: list[list[int]] = []
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]) + len(encoded[i][1]))
    by_index: dict[int, tuple[float, list[int]]] = {}
    for start in range(0, len(order), chunk):
        indices = order[start : start + chunk]
        rows = [encoded[i][0] + encoded[i][1] for i in indices]
        ids, mask = right_padded(rows, pad_id_of(tok), device)
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        for row, i in enumerate(indices):
            prompt, answer = encoded[i]
            cols = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(answer), device=device)
            target = torch.tensor(answer, device=device)
            token_logp = logp[row, cols].gather(1, target[:, None]).squeeze(1)
            by_index[i] = (float(-token_logp.mean()), logp[row, cols].argmax(-1).tolist())
    for i in range(len(encoded)):
        nll.append(by_index[i][0])
        predicted.append(by_index[i][1])
    return PairScores(nll, predicted, [a for _, a in encoded])


@dataclass
class _Plan:
    """Every (prompt, answer) pair an evaluation needs, and where each metric's pairs are."""

    pairs: list[Pair]
    groups: dict[str, list[list[int]]]  # metric -> per request, indices into pairs

    def add(self, metric: str, request_index: int, pair: Pair) -> None:
        per_request = self.groups.setdefault(metric, [])
        while len(per_request) <= request_index:
            per_request.append([])
        per_request[request_index].append(len(self.pairs))
        self.pairs.append(pair)


def _plan(requests: list[EditRequest]) -> _Plan:
    plan = _Plan([], {})
    for i, r in enumerate(requests):
        prompts = [r.text, *r.paraphrases]
        for kind, prompt in zip(
            ["rewrite"] + ["paraphrase"] * len(r.paraphrases), prompts, strict=True
        ):
            plan.add(f"{kind}:new", i, (prompt, r.target_new))
            if r.target_true is not None:
                plan.add(f"{kind}:true", i, (prompt, r.target_true))
        for prompt, answer in r.locality:
            plan.add("locality:answer", i, (prompt, answer))
            if r.target_true is not None:
                plan.add("locality:new", i, (prompt, r.target_new))
        for prompt, answer in r.portability:
            plan.add("portability", i, (prompt, answer))
    return plan


@dataclass(frozen=True)
class LocalityReference:
    """How the model answered one request's locality prompts before the edit: the argmax
    tokens at each stated answer's positions, and its own greedy continuations."""

    predicted: list[list[int]]
    continuations: list[str]


def locality_reference(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    requests: list[EditRequest],
    free_generation: bool = True,
) -> list[LocalityReference]:
    """Each request's locality answers as the model gives them now (take it before editing)."""
    pairs = [pair for r in requests for pair in r.locality]  # only these need scoring
    predicted = iter(score_pairs(model, tok, pairs).predicted if pairs else [])
    texts = iter(
        continuations(model, tok, [p for p, _ in pairs], [answer_budget(tok, a) for _, a in pairs])
        if pairs and free_generation
        else []
    )
    return [
        LocalityReference(
            [next(predicted) for _ in r.locality],
            [next(texts) for _ in r.locality] if free_generation else [],
        )
        for r in requests
    ]


METRICS = (
    "reliability",
    "generalization",
    "locality",
    "portability",
    "efficacy",
    "efficacy_magnitude",
    "paraphrase",
    "neighborhood",
    "neighborhood_magnitude",
    "free_rewrite",
    "free_paraphrase",
    "free_locality",
    "free_portability",
)

CaseMetrics = dict[str, float | None]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def mean_metrics(per_case: list[CaseMetrics]) -> CaseMetrics:
    """The mean of each metric over the cases that have it (None where none has)."""
    names = list(dict.fromkeys(name for case in per_case for name in case))
    return {
        name: _mean([v for case in per_case if (v := case.get(name)) is not None]) for name in names
    }


def evaluate_cases(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    requests: list[EditRequest],
    reference: list[LocalityReference] | None = None,
    free_generation: bool = True,
) -> list[CaseMetrics]:
    """The metrics of each request (each the mean over its prompts; None where it has no
    data for a metric), all requests scored in one batched pass (and, with
    `free_generation`, their prompts decoded greedily in batches).

    `reference` (from `locality_reference` before the edit) makes locality the EasyEdit
    agreement with the pre-edit predictions; without it locality is accuracy on the stated
    answers.
    """
    cases = _teacher_forced(model, tok, requests, reference)
    if free_generation:
        for case, figures in zip(cases, _free(model, tok, requests, reference), strict=True):
            case.update(figures)
    return cases


def _teacher_forced(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    requests: list[EditRequest],
    reference: list[LocalityReference] | None,
) -> list[CaseMetrics]:
    plan = _plan(requests)
    if not plan.pairs:
        return [dict.fromkeys(METRICS) for _ in requests]
    s = score_pairs(model, tok, plan.pairs)
    g = plan.groups

    def per(metric: str, i: int) -> list[int]:
        return g[metric][i] if metric in g and i < len(g[metric]) else []

    cases = []
    for i in range(len(requests)):
        out: dict[str, list[float]] = {name: [] for name in METRICS}
        out["reliability"] += [s.accuracy(j) for j in per("rewrite:new", i)]
        out["generalization"] += [s.accuracy(j) for j in per("paraphrase:new", i)]
        out["portability"] += [s.accuracy(j) for j in per("portability", i)]
        for k, j in enumerate(per("locality:answer", i)):
            if reference is None:
                out["locality"].append(s.accuracy(j))
            else:
                before = reference[i].predicted[k]
                same = sum(a == b for a, b in zip(s.predicted[j], before, strict=True))
                out["locality"].append(same / len(before))
        for new, true in zip(per("rewrite:new", i), per("rewrite:true", i), strict=False):
            out["efficacy"].append(float(s.nll[new] < s.nll[true]))
            out["efficacy_magnitude"].append(math.exp(-s.nll[new]) - math.exp(-s.nll[true]))
        for new, true in zip(per("paraphrase:new", i), per("paraphrase:true", i), strict=False):
            out["paraphrase"].append(float(s.nll[new] < s.nll[true]))
        for true, new in zip(per("locality:answer", i), per("locality:new", i), strict=False):
            out["neighborhood"].append(float(s.nll[true] < s.nll[new]))
            out["neighborhood_magnitude"].append(math.exp(-s.nll[true]) - math.exp(-s.nll[new]))
        cases.append({name: _mean(values) for name, values in out.items()})
    return cases


def _free(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    requests: list[EditRequest],
    reference: list[LocalityReference] | None,
) -> list[CaseMetrics]:
    """Free-generation success of each request: every prompt decoded greedily for its
    answer's length plus a little, then judged (free_generation.py)."""
    # (request, metric, prompt, answer, the continuation before the edit, if a reference)
    asks: list[tuple[int, str, str, str, str | None]] = []
    for i, r in enumerate(requests):
        asks.append((i, "free_rewrite", r.text, r.target_new, None))
        asks += [(i, "free_paraphrase", p, r.target_new, None) for p in r.paraphrases]
        asks += [(i, "free_portability", p, a, None) for p, a in r.portability]
        for k, (prompt, answer) in enumerate(r.locality):
            before = (
                reference[i].continuations[k] if reference and reference[i].continuations else None
            )
            asks.append((i, "free_locality", prompt, answer, before))
    texts = continuations(
        model, tok, [a[2] for a in asks], [answer_budget(tok, a[3]) for a in asks]
    )
    hits: list[dict[str, list[float]]] = [{} for _ in requests]
    for (i, metric, _, answer, before), text in zip(asks, texts, strict=True):
        ok = (
            gives_same_answer(before, text, answer)
            if before is not None
            else states_answer(text, answer)
        )
        hits[i].setdefault(metric, []).append(float(ok))
    names = ("free_rewrite", "free_paraphrase", "free_locality", "free_portability")
    return [{name: _mean(h.get(name, [])) for name in names} for h in hits]


def evaluate(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    requests: list[EditRequest],
    reference: list[LocalityReference] | None = None,
    free_generation: bool = True,
) -> CaseMetrics:
    """Mean metrics over `requests` (each request weighs the same, as in EasyEdit)."""
    if not requests:
        return {}
    return mean_metrics(evaluate_cases(model, tok, requests, reference, free_generation))


@torch.no_grad()
def perplexity(model: PreTrainedModel, tok: PreTrainedTokenizerBase, text: str) -> float:
    """exp(mean token NLL) of `text`: a probe of how much edits damaged the language model."""
    device = next(model.parameters()).device
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(
        model.config, "n_positions", 2048
    )
    ids = torch.tensor([encode_prompt(tok, text)[:limit]], device=device)
    logits = model(input_ids=ids).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    return float(torch.exp(nll))


def multi_hop_accuracy(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    questions: list[list[str]],
    *answer_sets: list[list[str]],
) -> list[list[float]]:
    """MQuAKE: for each answer set and each case, 1.0 when the greedy (teacher-forced)
    answer to any of the case's questions is exactly one of the set's accepted answers for
    it, else 0.0. Every set is scored in one batched pass (e.g. the new and the old answers)."""
    pairs: list[Pair] = []
    owner: list[tuple[int, int]] = []  # (answer set, case) of each pair
    for which, answers in enumerate(answer_sets):
        for case, (asked, accepted) in enumerate(zip(questions, answers, strict=True)):
            for question in asked:
                for answer in accepted:
                    pairs.append((question, answer))
                    owner.append((which, case))
    hits = [[0.0] * len(questions) for _ in answer_sets]
    if not pairs:
        return hits
    s = score_pairs(model, tok, pairs)
    for index, (which, case) in enumerate(owner):
        if s.predicted[index] == s.answers[index]:
            hits[which][case] = 1.0
    return hits


def ngram_entropy(
    text: str, ns: tuple[int, ...] = (2, 3), weights: tuple[float, ...] = (2 / 3, 4 / 3)
) -> float:
    """ROME's fluency measure: weighted mean of the n-gram frequency entropies (bits)."""
    words = text.split()
    entropies = []
    for n in ns:
        grams = Counter(tuple(words[i : i + n]) for i in range(max(0, len(words) - n + 1)))
        total = sum(grams.values())
        entropies.append(
            -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        )
    return sum(w * e for w, e in zip(weights, entropies, strict=True)) / sum(weights)


@torch.no_grad()
def fluency(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int = 50,
) -> float:
    """Mean n-gram entropy of greedy continuations of `prompts` (decoded together)."""
    continuations = greedy_continuations(model, tok, prompts, max_new_tokens)
    texts = [tok.decode(ids, skip_special_tokens=True) for ids in continuations]
    return sum(ngram_entropy(t) for t in texts) / len(texts)


@torch.no_grad()
def greedy_continuations(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int
) -> list[list[int]]:
    """The tokens `model.generate` picks greedily for each prompt (up to an end-of-sequence
    token), decoded as one left-padded batch with a KV cache, each row's positions counting
    its own tokens; without `generate`'s per-step overhead, which on a CPU costs more than
    the forward passes of a small model."""
    device = next(model.parameters()).device
    pad = pad_id_of(tok)
    rows = [prompt_ids(model, tok, p) for p in prompts]
    width = max(len(r) for r in rows)
    step = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    eos = eos_ids(model, tok)
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else None
    cache = None
    tokens: list[list[int]] = [[] for _ in rows]
    ended = [False] * len(rows)
    for _ in range(max_new_tokens):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step.shape[1] :]
        kwargs = {cache_arg or "past_key_values": cache}
        out = model(
            input_ids=step, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs
        )
        cache = out.past_key_values
        chosen = out.logits[:, -1].argmax(-1)
        for index, token in enumerate(chosen.tolist()):
            if not ended[index]:
                ended[index] = token in eos
                if not ended[index]:
                    tokens[index].append(token)
        if all(ended):
            break
        step = chosen[:, None]
        mask = torch.cat([mask, torch.ones_like(step)], dim=1)
    return tokens
