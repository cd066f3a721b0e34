"""A statistics corpus of true facts, written from benchmark cases.

The second moment C decides where an edit may write cheaply: directions the corpus rarely
visits. Text the model samples itself seldom names people, places and works, so the keys
of subjects sit in C's thin directions, and an update written there reaches other
subjects as well. Sentences stating facts (each case's prompt with its true answer, and
its locality prompts with theirs) fill those directions, as the Wikipedia text the MEMIT
authors used does. Build it from a tuning split, never from the cases being reported.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path

from .requests import EditRequest


def fact_sentences(requests: Iterable[EditRequest]) -> list[str]:
    """Each case's true statements: the prompt with `target_true`, and the locality
    prompts with their answers (never `target_new`)."""
    sentences: list[str] = []
    for request in requests:
        if request.target_true is not None:
            sentences.append(_sentence(request.text, request.target_true))
        sentences.extend(_sentence(prompt, answer) for prompt, answer in request.locality)
    return sentences


def write_fact_corpus(
    requests: Iterable[EditRequest], out: str | Path, per_paragraph: int = 8, seed: int = 0
) -> int:
    """Write the facts shuffled (seeded) into paragraphs of `per_paragraph` sentences,
    separated by blank lines (the plain-text corpus format); returns the sentence count."""
    sentences = fact_sentences(requests)
    random.Random(seed).shuffle(sentences)
    paragraphs = [
        " ".join(sentences[i : i + per_paragraph]) for i in range(0, len(sentences), per_paragraph)
    ]
    Path(out).write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return len(sentences)


def _sentence(prompt: str, answer: str) -> str:
    text = f"{prompt.rstrip()} {answer.strip()}"
    return text if text[-1] in ".!?" else text + "."
