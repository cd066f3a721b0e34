"""The set-up the bench scripts share: a real model, its statistics and context prefixes
ready for one method, so the timed part measures the edits alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from editors.editor import Editor, corpus_statistics
from editors.models import default_cache_dir, load_model


def ready_editor(
    model_name: str,
    method: str,
    overrides: dict[str, Any],
    samples: int,
    corpus: str | Path | None = None,
) -> tuple[Editor, Any]:
    """An editor on `model_name` with the statistics (from `corpus`, or model-sampled text)
    and prefixes `method` needs computed (or read from the cache), and the method's
    hyperparameters with `overrides`."""
    model, tok = load_model(model_name)
    stats = corpus_statistics(model, tok, default_cache_dir() / "stats", corpus, samples=samples)
    editor = Editor(model, tok, stats)
    hparams = editor.hparams(method, overrides)
    stats.prepare(editor.statistics_layers(method, overrides))
    editor.prefixes(hparams)
    return editor, hparams
