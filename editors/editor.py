"""`Editor`: one model, its tokenizer and statistics, editing with any registered method.

It remembers the sampled context prefixes per (count, length, seed), so consecutive edits do
not sample them again; the prefixes still travel in each result for exact replays.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .core.values import ProgressFn
from .methods import get_method
from .model_spec import ModelSpec, detect_spec, num_layers
from .patch import Patch
from .prefixes import sample_prefixes
from .requests import EditRequest
from .result import EditResult
from .stats import (
    Corpus,
    CorpusStatistics,
    ModelSampledCorpus,
    Statistics,
    StatsCache,
    TextFileCorpus,
    model_fingerprint,
)


class Editor:
    def __init__(
        self,
        model: PreTrainedModel,
        tok: PreTrainedTokenizerBase,
        stats: Statistics,
        spec: ModelSpec | None = None,
    ) -> None:
        self.model, self.tok, self.stats = model, tok, stats
        self.spec = detect_spec(model, spec)
        self._prefixes: dict[tuple[int, int, int], list[str]] = {}

    def hparams(self, method: str, overrides: dict[str, Any] | None = None) -> Any:
        return get_method(method).hparams(self.spec.family, overrides)

    def statistics_layers(self, method: str, overrides: dict[str, Any] | None = None) -> list[int]:
        """The layers whose statistics an edit with `method` reads (none for some methods)."""
        chosen = get_method(method)
        hparams = chosen.hparams(self.spec.family, overrides)
        return chosen.statistics_layers(hparams, num_layers(self.model, self.spec))

    def missing_statistics(self, layers: list[int]) -> list[int]:
        """Layers whose statistics are neither in memory nor computed yet."""
        return self.stats.missing(layers) if isinstance(self.stats, CorpusStatistics) else []

    def prepare_statistics(self, layers: list[int], progress: ProgressFn | None = None) -> None:
        """Load or compute the statistics of `layers` now (on the weights the model holds),
        reporting progress while computing."""
        if not isinstance(self.stats, CorpusStatistics):
            self.stats.prepare(layers)
            return
        before, self.stats.progress = self.stats.progress, progress
        try:
            self.stats.prepare(layers)
        finally:
            self.stats.progress = before

    def prefixes(self, hparams: Any) -> list[str]:
        key = (hparams.prefixes, hparams.prefix_length, hparams.seed)
        if key not in self._prefixes:
            self._prefixes[key] = sample_prefixes(self.model, self.tok, *key)
        return self._prefixes[key]

    def forget_prefixes(self) -> None:
        """Drop the remembered prefixes (they were sampled from weights that changed since)."""
        self._prefixes.clear()

    def compute(
        self,
        requests: list[EditRequest],
        method: str = "rome",
        overrides: dict[str, Any] | None = None,
        progress: ProgressFn | None = None,
        prefixes: list[str] | None = None,
        history: Sequence[Patch] = (),
    ) -> EditResult:
        """The patch for `requests`; the model is left exactly as it was. `history` is the
        patches applied to the model so far, oldest first (methods that protect earlier
        edits read it; the others ignore it)."""
        chosen = get_method(method)
        hparams = chosen.hparams(self.spec.family, overrides)
        extra = {"history": history} if chosen.uses_history else {}
        return chosen.compute(
            self.model,
            self.tok,
            requests,
            hparams,
            self.stats,
            spec=self.spec,
            progress=progress,
            prefixes=prefixes or self.prefixes(hparams),
            **extra,
        )


def corpus_statistics(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    cache_dir: str | Path,
    corpus_path: str | Path | None = None,
    samples: int = 20_000,
    dtype: str = "float64",
    spec: ModelSpec | None = None,
    progress: ProgressFn | None = None,
) -> CorpusStatistics:
    """Statistics from a named corpus file, or from model-sampled text when none is named."""
    corpus: Corpus = (
        TextFileCorpus(corpus_path) if corpus_path is not None else ModelSampledCorpus(model, tok)
    )
    return CorpusStatistics(
        model,
        tok,
        detect_spec(model, spec),
        StatsCache(cache_dir),
        corpus,
        model_fingerprint(model),
        samples=samples,
        dtype=dtype,
        progress=progress,
    )
