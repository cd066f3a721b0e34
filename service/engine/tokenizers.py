"""One tokenizer per thread.

A fast (Rust) tokenizer is not safe to share between threads: one thread's call can find
the tokenizer borrowed by another's ("Already borrowed") when padding or truncation
settings change under it. Every thread that tokenizes (the event loop, the route thread
pool, the serving loop, the edit lane, evaluation threads) gets its own copy.
"""

from __future__ import annotations

import copy
import threading

from transformers import PreTrainedTokenizerBase


class TokenizerPerThread:
    def __init__(self, tok: PreTrainedTokenizerBase) -> None:
        self._original = tok
        self._local = threading.local()
        self._lock = threading.Lock()  # copying reads the original: one copy at a time

    def copy(self) -> PreTrainedTokenizerBase:
        """A private copy, for a thread or object that keeps its own."""
        with self._lock:
            return copy.deepcopy(self._original)

    def get(self) -> PreTrainedTokenizerBase:
        """The calling thread's copy."""
        tok = getattr(self._local, "tok", None)
        if tok is None:
            tok = self._local.tok = self.copy()
        return tok
