"""The model runner: owns the resident model and its lane.

Everything that reads or changes the served weights runs on the lane, one task at a time:
generation batches, evaluation reads, and the job handlers' compute-and-swap. It also keeps
what edits need besides the weights: the editor, its statistics (always of the base
weights) and the context prefixes sampled from the base.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any, TypeVar

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from editors import ProgressFn
from editors.editor import Editor
from editors.methods import METHODS, get_method
from editors.metrics import evaluate, locality_reference
from editors.patch import Patch
from editors.requests import EditRequest
from editors.result import EditResult
from editors.stats import Statistics
from editors.weight_state import WeightState

from ..requests import request_from_record
from .batcher import GenerationBatcher
from .generation import GenerationOutput, GenerationRequest, generate_batch
from .lane import ModelLane

T = TypeVar("T")


@dataclass
class RunnerState:
    ready: bool = False
    stage: str = "loading"
    error: str | None = None
    started_at: float = field(default_factory=time.monotonic)
    seconds: dict[str, float] = field(default_factory=dict)


class ModelRunner:
    def __init__(
        self,
        model: PreTrainedModel,
        tok: PreTrainedTokenizerBase,
        generate_max_batch: int = 32,
        generate_wait_seconds: float = 0.02,
    ) -> None:
        self.model, self.tok = model, tok
        self.lane = ModelLane()
        self.weights = WeightState(model)
        self.version: Callable[[], int] = lambda: -1  # set by the engine: the served version
        self._editor: Editor | None = None
        self._prefixes_on_base: dict[tuple[int, int, int], list[str]] = {}
        self.batcher = GenerationBatcher(
            self.lane, self._generate_on_lane, generate_max_batch, generate_wait_seconds
        )
        self.before_read: Callable[[], None] = lambda: None  # catch up with the head

    @property
    def editor(self) -> Editor:
        if self._editor is None:
            raise RuntimeError("the engine has not started")
        return self._editor

    def set_statistics(self, stats: Statistics) -> None:
        self._editor = Editor(self.model, self.tok, stats)

    def close(self) -> None:
        self.lane.close()

    # -- on the lane --------------------------------------------------------------------------

    def on_base(self, work: Callable[[], T]) -> T:
        """Run `work` on the base weights, then put the current ones back."""
        undo = self.weights.snapshot()
        try:
            self.weights.restore([])
            return work()
        finally:
            self.weights.reset_to(undo)

    def ensure_statistics(self, layers: list[int], progress: ProgressFn | None = None) -> None:
        """Statistics always describe the base weights: compute missing ones on the base."""
        editor = self.editor
        missing = editor.missing_statistics(layers)
        if missing:
            self.on_base(lambda: editor.prepare_statistics(missing, progress))

    def default_statistics_layers(self) -> list[int]:
        editor = self.editor
        return sorted({layer for name in METHODS for layer in editor.statistics_layers(name)})

    def base_prefixes(self, hparams: Any) -> list[str]:
        """Context prefixes sampled from the base weights, so an edit is a function of the
        ledger alone: a restarted worker computes the same patch as one that never stopped."""
        key = (hparams.prefixes, hparams.prefix_length, hparams.seed)
        if key not in self._prefixes_on_base:
            self._prefixes_on_base[key] = self.on_base(lambda: self.editor.prefixes(hparams))
            self.editor.forget_prefixes()
        return self._prefixes_on_base[key]

    def compute(
        self,
        records: list[dict[str, Any]],
        method: str,
        overrides: dict[str, Any],
        progress: ProgressFn | None,
        history: Callable[[], list[Patch]],
        prefixes: list[str] | None = None,
    ) -> EditResult:
        """The patch of an edit on the weights as they are now (the model is unchanged)."""
        requests = [request_from_record(r) for r in records]
        editor = self.editor
        hparams = editor.hparams(method, overrides)
        self.ensure_statistics(editor.statistics_layers(method, overrides), progress)
        prefixes = prefixes if prefixes is not None else self.base_prefixes(hparams)
        past = history() if get_method(method).uses_history else []
        return editor.compute(
            requests, method, overrides, progress=progress, prefixes=prefixes, history=past
        )

    # -- reads --------------------------------------------------------------------------------

    def sandbox(self, method: str, overrides: dict[str, Any], at_head: bool = False) -> Editor:
        """An editor on a private copy of the model (base weights, or the ledger head's),
        for evaluation runs that edit freely while the served model goes on serving. The
        method's statistics are prepared on the base first, so the copy never computes any.
        The copy costs the model's memory once more while the run lasts."""

        def on_lane() -> Editor:
            editor = self.editor
            self.ensure_statistics(editor.statistics_layers(method, overrides))
            if at_head:
                self.before_read()
                copy = deepcopy(self.model)
            else:
                copy = self.on_base(lambda: deepcopy(self.model))
            return Editor(copy, self.tok, editor.stats, editor.spec)

        return self.lane.call(on_lane)

    async def evaluate(
        self, requests: list[EditRequest], baseline: bool
    ) -> tuple[int, dict[str, float | None], dict[str, float | None] | None]:
        """EasyEdit and CounterFact metrics at the current version; locality compares with
        the base weights' predictions, and `baseline` scores the base weights as well."""

        def on_lane() -> tuple[int, dict[str, float | None], dict[str, float | None] | None]:
            self.before_read()
            reference = self.on_base(lambda: locality_reference(self.model, self.tok, requests))
            scores = evaluate(self.model, self.tok, requests, reference)
            base = (
                self.on_base(lambda: evaluate(self.model, self.tok, requests, reference))
                if baseline
                else None
            )
            return self.version(), scores, base

        return await self.lane.run(on_lane)

    async def generate(self, request: GenerationRequest) -> GenerationOutput:
        return await self.batcher.generate(request)

    def _generate_on_lane(self, requests: list[GenerationRequest]) -> list[GenerationOutput]:
        self.before_read()
        outputs = generate_batch(self.model, self.tok, requests)
        for output in outputs:
            output.version = self.version()
        return outputs
