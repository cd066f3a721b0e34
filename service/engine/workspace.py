"""The workspace: the writer's own copy of the model, where edits are computed.

Everything that edits or probes weights runs here, on the workspace lane, never on the
served model: computing a patch, the guard's before-and-after probes, statistics and
context prefixes (on the base weights), rebase recomputation, evaluation reads and
sandbox copies. The served model only receives finished patches (model_runner.py), so
generation never waits for an edit. The copy costs the model's memory once more.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from copy import deepcopy
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
from .generation import GenerationOutput, GenerationRequest, generate_batch
from .lane import ModelLane

log = logging.getLogger(__name__)

T = TypeVar("T")


class Workspace:
    def __init__(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> None:
        """`model` is this workspace's own copy (at the base weights), `tok` its own too."""
        self.model, self.tok = model, tok
        self.lane = ModelLane("edit-lane")
        self.weights = WeightState(model)
        self.version: Callable[[], int] = lambda: -1  # set by the engine
        self.catch_up: Callable[[], None] = lambda: None  # to the ledger head, on the lane
        self.move_to: Callable[[int], object] = lambda number: None  # any version, on the lane
        self._editor: Editor | None = None
        self._prefixes_on_base: dict[tuple[int, int, int], list[str]] = {}

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
        """The patch of an edit on the weights as they are now (they are left unchanged)."""
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
        for evaluation runs that edit freely. The method's statistics are prepared on the
        base first, so the copy never computes any. The copy costs the model's memory once
        more while the run lasts."""

        def on_lane() -> Editor:
            editor = self.editor
            self.ensure_statistics(editor.statistics_layers(method, overrides))
            if at_head:
                self.catch_up()
                copy = deepcopy(self.model)
            else:
                copy = self.on_base(lambda: deepcopy(self.model))
            return Editor(copy, deepcopy(self.tok), editor.stats, editor.spec)

        return self.lane.call(on_lane)

    async def generate_at(
        self, number: int, requests: list[GenerationRequest]
    ) -> list[GenerationOutput]:
        """Text from version `number` (any recorded one, not only the served): the workspace
        moves there, generates, and returns to the head."""

        def on_lane() -> list[GenerationOutput]:
            try:
                self.move_to(number)
                outputs = generate_batch(self.model, self.tok, requests)
            finally:
                self.catch_up()
            for output in outputs:
                output.version = number
            return outputs

        return await self.lane.run(on_lane)

    async def evaluate(
        self, requests: list[EditRequest], baseline: bool
    ) -> tuple[int, dict[str, float | None], dict[str, float | None] | None]:
        """EasyEdit and CounterFact metrics at the ledger head; locality compares with the
        base weights' predictions, and `baseline` scores the base weights as well."""

        def on_lane() -> tuple[int, dict[str, float | None], dict[str, float | None] | None]:
            self.catch_up()
            reference = self.on_base(lambda: locality_reference(self.model, self.tok, requests))
            scores = evaluate(self.model, self.tok, requests, reference)
            base = (
                self.on_base(lambda: evaluate(self.model, self.tok, requests, reference))
                if baseline
                else None
            )
            return self.version(), scores, base

        return await self.lane.run(on_lane)
