"""Run an `EvaluationPlan` over cases on one model, recording rows as it goes.

The model is edited in place and restored exactly (every applied patch reverted) when the
run ends, however it ends. Each row is handed to `record` as soon as it is measured, so a
run that stops half-way keeps everything it measured.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from ..datasets import MultiHopCase
from ..editor import Editor
from ..errors import EditError
from ..free_generation import answer_budget, continuations
from ..metrics import (
    CaseMetrics,
    LocalityReference,
    evaluate_cases,
    fluency,
    locality_reference,
    mean_metrics,
    multi_hop_accuracy,
    perplexity,
)
from ..patch import Patch
from ..requests import EditRequest
from ..weight_state import WeightSnapshot, WeightState
from .plan import EvaluationPlan, EvaluationRow, EvaluationStopped
from .probe import PROBE_TEXT
from .summary import summarize

Case = EditRequest | MultiHopCase
ProgressFn = Callable[[float, str], None]


def requests_of(case: Case) -> list[EditRequest]:
    return list(case.requests) if isinstance(case, MultiHopCase) else [case]


class Evaluation:
    """One run: the editor's model, the cases, the plan, and where the rows go."""

    def __init__(
        self,
        editor: Editor,
        cases: Sequence[Case],
        plan: EvaluationPlan,
        record: Callable[[EvaluationRow], None],
        progress: ProgressFn | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        if not cases:
            raise EditError("no cases to evaluate", field="cases")
        self.editor, self.cases, self.plan = editor, list(cases), plan
        self.model, self.tok = editor.model, editor.tok
        self._record, self._progress = record, progress
        self._should_stop = should_stop or (lambda: False)
        self.rows: list[EvaluationRow] = []
        self.seconds = {"baseline": 0.0, "editing": 0.0, "scoring": 0.0}
        self.edits_done = 0
        self._reference: list[list[LocalityReference]] = []
        self._base: list[CaseMetrics] = []
        self._after: dict[int, CaseMetrics] = {}
        self._answers_before: list[str] = []  # each case's greedy answer, unedited
        # patches go on as they would in the service (fp32 masters), and come off exactly
        self._weights = WeightState(self.model)
        self._history: list[Patch] = []  # patches in effect, oldest first (sequential)
        self._edit_figures: list[CaseMetrics] = []  # each edit's since the last aggregate row
        self._fluency_prompts = [requests_of(c)[0].text for c in self.cases[: plan.fluency_prompts]]

    # -- measuring --------------------------------------------------------------------------

    def _case_metrics(self, indices: list[int]) -> list[CaseMetrics]:
        """Per-case metrics of the model as it is now, all cases in one batched pass."""
        flat: list[EditRequest] = []
        reference: list[LocalityReference] = []
        spans: list[tuple[int, int]] = []  # each case's requests: flat[start:end]
        for i in indices:
            start = len(flat)
            for k, request in enumerate(requests_of(self.cases[i])):
                flat.append(request)
                if self._reference:
                    reference.append(self._reference[i][k])
            spans.append((start, len(flat)))
        per_request = evaluate_cases(
            self.model, self.tok, flat, reference if self._reference else None
        )
        per_case = [mean_metrics(per_request[start:end]) for start, end in spans]
        hops = [i for i in indices if isinstance(self.cases[i], MultiHopCase)]
        if hops:
            multi = [self.cases[i] for i in hops]
            questions = [list(c.questions) for c in multi]  # type: ignore[union-attr]
            new, old = multi_hop_accuracy(
                self.model,
                self.tok,
                questions,
                [[c.new_answer, *c.new_answer_aliases] for c in multi],  # type: ignore[union-attr]
                [[c.answer] for c in multi],  # type: ignore[union-attr]
            )
            position = {i: k for k, i in enumerate(indices)}
            for k, i in enumerate(hops):
                per_case[position[i]].update(multi_hop=new[k], multi_hop_original=old[k])
        return per_case

    def _answers(self, indices: list[int]) -> list[str]:
        """Each case's greedy answer to its (first) edit prompt, as the model is now."""
        firsts = [requests_of(self.cases[i])[0] for i in indices]
        budgets = [answer_budget(self.tok, r.target_new) for r in firsts]
        return continuations(self.model, self.tok, [r.text for r in firsts], budgets)

    def _answer_texts(self, index: int, after: str) -> dict[str, str]:
        request = requests_of(self.cases[index])[0]
        return {
            "subject": request.subject,
            "prompt": request.text,
            "target_new": request.target_new,
            "before": self._answers_before[index],
            "after": after,
        }

    def _model_metrics(self, prompts: list[str]) -> CaseMetrics:
        """Whole-model health: probe perplexity, and n-gram entropy of generations."""
        out: CaseMetrics = {"perplexity": perplexity(self.model, self.tok, PROBE_TEXT)}
        if self.plan.fluency and prompts:
            out["fluency"] = fluency(self.model, self.tok, prompts, self.plan.fluency_tokens)
        return out

    def _emit(self, row: EvaluationRow) -> None:
        self.rows.append(row)
        self._record(row)

    def _report(self, fraction: float, stage: str) -> None:
        if self._progress is not None:
            self._progress(min(max(fraction, 0.0), 1.0), stage)

    # -- the run ----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Carry out the plan; the summary says whether it completed or where it stopped."""
        started = time.perf_counter()
        stopped_at: str | None = None
        start = self._weights.snapshot()
        try:
            self._measure_baseline()
            if self.plan.protocol == "sequential":
                self._run_sequential()
            elif self.plan.protocol in ("single", "batch"):
                self._run_isolated()
        except EvaluationStopped as stop:
            stopped_at = str(stop)
        finally:
            self._weights.reset_to(start)
        self.seconds["total"] = time.perf_counter() - started
        return self.summary(stopped_at)

    def _check_stop(self) -> None:
        if self._should_stop():
            raise EvaluationStopped(
                f"stopped on request after {self.edits_done} of {len(self.cases)} cases"
            )

    def _measure_baseline(self) -> None:
        began = time.perf_counter()
        self._report(0.0, "scoring the unedited model")
        every = list(range(len(self.cases)))
        flat = [requests_of(c) for c in self.cases]
        reference = iter(locality_reference(self.model, self.tok, [r for rs in flat for r in rs]))
        self._reference = [[next(reference) for _ in rs] for rs in flat]
        self._base = self._case_metrics(every)
        self._answers_before = self._answers(every)
        metrics = {**mean_metrics(self._base), **self._model_metrics(self._fluency_prompts)}
        self._base_model = metrics
        self._emit(EvaluationRow("baseline", 0, metrics))
        self.seconds["baseline"] = time.perf_counter() - began
        if self.plan.protocol != "none":
            hparams = self.editor.hparams(self.plan.method, self.plan.hparams)
            self.editor.stats.prepare(
                self.editor.statistics_layers(self.plan.method, self.plan.hparams)
            )
            self.editor.prefixes(hparams)

    def _groups(self) -> list[list[int]]:
        size = self.plan.group_size(len(self.cases))
        return [
            list(range(s, min(s + size, len(self.cases)))) for s in range(0, len(self.cases), size)
        ]

    def _edit(self, group: list[int], fraction: tuple[float, float]) -> WeightSnapshot | None:
        """Compute and apply the group's patch (returned: the snapshot that takes it off); a
        case the method refuses is recorded."""
        low, high = fraction
        requests = [r for i in group for r in requests_of(self.cases[i])]
        began = time.perf_counter()
        try:
            result = self.editor.compute(
                requests,
                self.plan.method,
                self.plan.hparams,
                progress=lambda f, stage: self._report(low + (high - low) * f, stage),
                history=self._history,
            )
        except EditError as exc:
            for i in group:
                case_id = _case_id(self.cases[i], i)
                self._emit(
                    EvaluationRow("case", self.edits_done, {}, self._base[i], case_id, str(exc))
                )
            return None
        finally:
            self.seconds["editing"] += time.perf_counter() - began
        undo = self._weights.snapshot()
        self._weights.apply(result.patch)
        self._edit_figures.append(result.diagnostics.figures())
        if self.plan.protocol == "sequential":
            self._history.append(result.patch)  # what later edits build on
        return undo

    def _run_isolated(self) -> None:
        """single / batch: each group from the unedited model, scored, rolled back."""
        groups = self._groups()
        for number, group in enumerate(groups):
            self._check_stop()
            span = (number / len(groups), (number + 1) / len(groups))
            undo = self._edit(group, span)
            if undo is None:
                continue
            began = time.perf_counter()
            try:
                scores = self._case_metrics(group)
                answers = self._answers(group)
                prompts = [
                    requests_of(self.cases[i])[0].text for i in group[: self.plan.fluency_prompts]
                ]
                health = self._model_metrics(prompts)
            finally:
                self._weights.reset_to(undo)
                self.seconds["scoring"] += time.perf_counter() - began
            self.edits_done += len(group)
            for i, metrics, answer in zip(group, scores, answers, strict=True):
                metrics = {**metrics, **health}
                self._after[i] = metrics
                self._emit(
                    EvaluationRow(
                        "case",
                        self.edits_done,
                        metrics,
                        self._base_of([i]),
                        _case_id(self.cases[i], i),
                        answers=self._answer_texts(i, answer),
                    )
                )
            if self._checkpoint_due(len(group)) and number < len(groups) - 1:
                self._emit(self._aggregate("checkpoint"))
        self._emit(self._aggregate("final"))

    def _run_sequential(self) -> None:
        """Groups applied one after another; the edited-so-far cases scored at checkpoints."""
        groups = self._groups()
        edited: list[int] = []
        for number, group in enumerate(groups):
            self._check_stop()
            span = (number / len(groups), (number + 1) / len(groups))
            if self._edit(group, span) is not None:
                edited += group
                self.edits_done += len(group)
            last = number == len(groups) - 1
            if edited and (last or self._checkpoint_due(len(group))):
                self._report(span[1], f"scoring {len(edited)} edited cases")
                self._score_sequential(edited, final=last)

    def _score_sequential(self, edited: list[int], final: bool) -> None:
        began = time.perf_counter()
        scores = self._case_metrics(edited)
        health = self._model_metrics(self._fluency_prompts)
        answers = self._answers(edited) if final else [""] * len(edited)
        self.seconds["scoring"] += time.perf_counter() - began
        for i, metrics, answer in zip(edited, scores, answers, strict=True):
            self._after[i] = metrics
            if final:
                row = EvaluationRow(
                    "case",
                    self.edits_done,
                    metrics,
                    self._base_of([i]),
                    _case_id(self.cases[i], i),
                    answers=self._answer_texts(i, answer),
                )
                self._emit(row)
        self._emit(self._aggregate("final" if final else "checkpoint", edited, health))

    def _checkpoint_due(self, group_size: int) -> bool:
        every = self.plan.checkpoint_every
        return (
            every is not None and self.edits_done // every > (self.edits_done - group_size) // every
        )

    def _base_of(self, indices: list[int]) -> CaseMetrics:
        return mean_metrics([self._base[i] for i in indices])

    def _aggregate(
        self, kind: str, indices: list[int] | None = None, health: CaseMetrics | None = None
    ) -> EvaluationRow:
        """The mean over `indices` (default: every case scored after its edit) beside the
        unedited model's mean over the same cases, with the mean reach of the edits computed
        since the previous aggregate row (Diagnostics.figures)."""
        chosen = sorted(self._after) if indices is None else indices
        metrics = mean_metrics([self._after[i] for i in chosen])
        metrics.update(mean_metrics(self._edit_figures))
        self._edit_figures.clear()
        baseline = self._base_of(chosen)
        model_keys = ("perplexity", "fluency")
        baseline.update({k: v for k, v in self._base_model.items() if k in model_keys})
        if health is not None:
            metrics.update(health)
        return EvaluationRow(kind, self.edits_done, metrics, baseline)  # type: ignore[arg-type]

    def summary(self, stopped_at: str | None) -> dict[str, Any]:
        return summarize(self.plan.to_dict(), len(self.cases), self.rows, stopped_at, self.seconds)


def _case_id(case: Case, index: int) -> str:
    return case.case_id or str(index)


def run_evaluation(
    editor: Editor,
    cases: Sequence[Case],
    plan: EvaluationPlan,
    record: Callable[[EvaluationRow], None] = lambda row: None,
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[dict[str, Any], list[EvaluationRow]]:
    """Evaluate `cases` under `plan`; the summary and every row recorded."""
    run = Evaluation(editor, cases, plan, record, progress, should_stop)
    return run.run(), run.rows
