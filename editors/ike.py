"""IKE: in-context knowledge editing (Zheng et al., 2023, "Can We Edit Factual Knowledge by
In-Context Learning?").

No weight changes, no hidden-state hooks: an edit is a memory entry holding the new fact as
text ("<prompt with its subject> <target>") and the demonstrations built from the request's
fields, in the paper's (and EasyEdit's) format:

  copy     New Fact: <fact>\\nPrompt: <fact>\\n\\n
  update   New Fact: <fact>\\nPrompt: <paraphrase> <target>\\n\\n       (one per paraphrase)
  retain   New Fact: <fact>\\nPrompt: <locality prompt> <its answer>\\n\\n  (one per pair)

When the model answers a prompt, the entries whose question is similar to it (cosine
similarity of all-MiniLM-L6-v2 sentence embeddings, at least `min_similarity`, at most
`top_k` of them) are put before the prompt, least similar first, and the query reads
"New Fact: <the nearest fact>\\nPrompt: <the prompt>". A prompt near no entry is left exactly
as it was, so its answer is the base model's, byte for byte.

The entries travel in the patch (`Patch.memories`, as JSON bytes) and are concatenated in
chain order like GRACE's codebook entries (weight_state.py), so rollback, rebase, restart
and followers rebuild the memory from the ledger. The memory sits on the model object
(`memory_of`), read by whoever turns a prompt into tokens (`context_for`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .core.values import ProgressFn
from .errors import InvalidValueError
from .memory import Memory, MemoryEntry, default_embedder, memory_of, rewrite_ids, set_memory
from .patch import Patch
from .requests import EditRequest
from .result import Diagnostics, EditResult
from .stats import Statistics

__all__ = [
    "IKEHyperParams",
    "Memory",
    "MemoryEntry",
    "compute",
    "memory_entry",
    "memory_of",
    "rewrite_ids",
    "set_memory",
]


@dataclass(frozen=True)
class IKEHyperParams:
    top_k: int = 4  # at most this many entries are put before one prompt
    min_similarity: float = 0.5  # cosine similarity of prompt and entry needed to retrieve it
    update_demos: bool = True  # a demonstration per paraphrase ("update")
    retain_demos: bool = True  # a demonstration per locality pair ("retain")
    max_demos: int = 8  # per entry, copy demonstration included
    # what every method's hyperparameters name for the context prefixes: IKE samples none
    prefixes: int = 0
    prefix_length: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise InvalidValueError("top_k must be a positive integer", field="top_k")
        if not isinstance(self.max_demos, int) or self.max_demos < 1:
            raise InvalidValueError("max_demos must be a positive integer", field="max_demos")
        similarity = self.min_similarity
        if not isinstance(similarity, int | float) or not -1.0 <= float(similarity) <= 1.0:
            raise InvalidValueError(
                "min_similarity must be a number in [-1, 1]", field="min_similarity"
            )
        if self.prefixes != 0:
            raise InvalidValueError("IKE samples no context prefixes: leave it 0", field="prefixes")
        for name in ("update_demos", "retain_demos"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidValueError(f"{name} must be true or false", field=name)

    def edited_layers(self, n_layers: int) -> list[int]:
        del n_layers
        return []  # no layer is edited (and none needs statistics)


def demonstration(fact: str, prompt: str) -> str:
    return f"New Fact: {fact}\nPrompt: {prompt}\n\n"


def memory_entry(request: EditRequest, hparams: IKEHyperParams) -> MemoryEntry:
    """The entry of one request: its fact, demonstrations and retrieval keys."""
    fact = request.text + request.target
    demos = [demonstration(fact, fact)]  # copy
    if hparams.update_demos:
        demos += [
            demonstration(fact, _filled(p, request.subject) + request.target)
            for p in request.paraphrases
        ]
    if hparams.retain_demos:
        demos += [
            demonstration(fact, prompt.rstrip() + " " + answer.strip())
            for prompt, answer in request.locality
        ]
    keys = (request.text, *(_filled(p, request.subject) for p in request.paraphrases))
    return MemoryEntry(
        fact,
        request.text,
        "".join(demos[: hparams.max_demos]),
        tuple(dict.fromkeys(keys)),  # no duplicates, order kept
        hparams.top_k,
        float(hparams.min_similarity),
    )


def _filled(prompt: str, subject: str) -> str:
    return prompt.replace("{}", subject) if "{}" in prompt else prompt


def compute(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    requests: list[EditRequest],
    hparams: IKEHyperParams,
    stats: Statistics | None = None,
    *,
    spec: Any = None,
    progress: ProgressFn | None = None,
    prefixes: list[str] | None = None,
) -> EditResult:
    """Memory entries for the requests; the model is neither read nor changed."""
    del model, tok, stats, spec, prefixes
    started = time.perf_counter()
    entries = tuple(memory_entry(r, hparams) for r in requests)
    # embed the keys here, on the editing side: serving them later finds them ready
    default_embedder().embed([key for entry in entries for key in entry.keys])
    if progress:
        progress(1.0, "memory entries")
    patch = Patch("ike", {}, {}, memories=entries)
    diagnostics = Diagnostics(method="ike", layers=[])
    diagnostics.extra["entries"] = len(entries)
    diagnostics.seconds["total"] = time.perf_counter() - started
    return EditResult(patch, diagnostics)
