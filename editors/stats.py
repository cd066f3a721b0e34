"""Second-moment statistics C = E[k k^T] of the keys at a layer's MLP output projection.

Computed by streaming a corpus through the model (never holding the corpus in memory),
accumulating sum(k k^T) in float64 or float32, and cached on disk under a key made of the
model fingerprint, the module, the corpus hash, the sample count and the dtype, so other
processes reuse them. ROME's `.npz` statistics files can be imported.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .errors import StatisticsError
from .model_spec import ModelSpec
from .tracing import forward_until, record_inputs

ProgressFn = Callable[[float, str], None]
DTYPES = {"float64": torch.float64, "float32": torch.float32}


class Statistics(Protocol):
    """What a method needs: C for a layer, and its inverse."""

    def prepare(self, layers: list[int]) -> None: ...
    def second_moment(self, layer: int) -> torch.Tensor: ...
    def inverse(self, layer: int) -> torch.Tensor: ...


class _InverseMemo:
    def __init__(self) -> None:
        self._inverses: dict[int, torch.Tensor] = {}

    def inverse(self, layer: int) -> torch.Tensor:
        if layer not in self._inverses:
            c = self.second_moment(layer).double()  # type: ignore[attr-defined]
            ridge = 1e-6 * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype)
            self._inverses[layer] = torch.linalg.inv(c + ridge)
        return self._inverses[layer]


class FixedStatistics(_InverseMemo):
    """Statistics given directly (imported files, tests)."""

    def __init__(self, moments: dict[int, torch.Tensor]) -> None:
        super().__init__()
        self.moments = moments

    def prepare(self, layers: list[int]) -> None:
        missing = [layer for layer in layers if layer not in self.moments]
        if missing:
            raise StatisticsError(f"no statistics for layers {missing}", field="layers")

    def second_moment(self, layer: int) -> torch.Tensor:
        self.prepare([layer])
        return self.moments[layer]


# ---------------------------------------------------------------- corpora


class Corpus(Protocol):
    identity: str

    def texts(self) -> Iterator[str]: ...


class TextFileCorpus:
    """Plain text (paragraphs split by blank lines) or JSONL with a `text` field."""

    def __init__(self, path: str | Path, field: str = "text") -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise StatisticsError(f"corpus file {self.path} does not exist", field="corpus")
        self.field = field
        digest = hashlib.sha256()
        with self.path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        self.identity = f"file:{digest.hexdigest()}:{field}"

    def texts(self) -> Iterator[str]:
        jsonl = self.path.suffix in {".jsonl", ".ndjson"}
        with self.path.open(encoding="utf-8") as handle:
            paragraph: list[str] = []
            for number, line in enumerate(handle, 1):
                if jsonl:
                    if line.strip():
                        yield _jsonl_text(line, self.field, self.path, number)
                    continue
                if line.strip():
                    paragraph.append(line.rstrip("\n"))
                elif paragraph:
                    yield "\n".join(paragraph)
                    paragraph = []
            if paragraph:
                yield "\n".join(paragraph)


def _jsonl_text(line: str, field: str, path: Path, number: int) -> str:
    try:
        value = json.loads(line)[field]
    except (ValueError, KeyError, TypeError) as exc:
        raise StatisticsError(
            f"{path}:{number}: no string field {field!r}", field="corpus"
        ) from exc
    if not isinstance(value, str):
        raise StatisticsError(f"{path}:{number}: field {field!r} is not text", field="corpus")
    return value


class ModelSampledCorpus:
    """Text the model writes itself, from short starters, seeded (used when no corpus is named)."""

    starters = ("The", "In", "A", "It", "He", "She", "This", "When")

    def __init__(
        self,
        model: PreTrainedModel,
        tok: PreTrainedTokenizerBase,
        seed: int = 0,
        length: int = 128,
        batch: int = 16,
    ) -> None:
        self.model, self.tok = model, tok
        self.seed, self.length, self.batch = seed, length, batch
        self.identity = f"model-sampled:seed={seed}:length={length}:batch={batch}"

    @torch.no_grad()
    def texts(self) -> Iterator[str]:
        device = next(self.model.parameters()).device
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        round_ = 0
        while True:
            prompts = [
                self.starters[(round_ * self.batch + i) % len(self.starters)]
                for i in range(self.batch)
            ]
            ids = [self.tok(p)["input_ids"] for p in prompts]
            width = max(len(r) for r in ids)  # starters are one word: lengths match
            batch = torch.tensor([[pad] * (width - len(r)) + r for r in ids], device=device)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed * 100_003 + round_)
                out = self.model.generate(
                    input_ids=batch,
                    attention_mask=torch.ones_like(batch),
                    do_sample=True,
                    top_k=50,
                    temperature=1.0,
                    max_new_tokens=self.length,
                    min_new_tokens=8,
                    pad_token_id=pad,
                )
            yield from self.tok.batch_decode(out, skip_special_tokens=True)
            round_ += 1


# ---------------------------------------------------------------- cache


@dataclass(frozen=True)
class StatsKey:
    fingerprint: str
    module: str
    corpus: str
    samples: int
    dtype: str
    max_length: int  # texts are cut to this many tokens: it changes which keys are sampled

    @property
    def digest(self) -> str:
        text = json.dumps(self.__dict__, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:32]


class StatsCache:
    """A folder of `<key digest>.safetensors` files holding sum(k k^T) and the count."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, key: StatsKey) -> Path:
        return self.root / f"{key.digest}.safetensors"

    def load(self, key: StatsKey) -> torch.Tensor | None:
        path = self.path(key)
        if not path.is_file():
            return None
        tensors = load_file(str(path))
        return tensors["sum"] / tensors["count"]

    def save(self, key: StatsKey, total: torch.Tensor, count: int) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.path(key).with_suffix(".tmp")
        save_file(
            {"sum": total.contiguous(), "count": torch.tensor(float(count), dtype=total.dtype)},
            str(tmp),
            metadata={k: str(v) for k, v in key.__dict__.items()},
        )
        tmp.replace(self.path(key))


def model_fingerprint(model: PreTrainedModel) -> str:
    """Hash of the config and every parameter's bytes (identifies base weights exactly)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class CorpusStatistics(_InverseMemo):
    """C for any layer: from the cache, or computed from `corpus` (missing layers in one pass)."""

    def __init__(
        self,
        model: PreTrainedModel,
        tok: PreTrainedTokenizerBase,
        spec: ModelSpec,
        cache: StatsCache,
        corpus: Corpus,
        fingerprint: str,
        samples: int = 20_000,
        dtype: str = "float64",
        max_length: int = 256,
        batch_rows: int = 8,
        progress: ProgressFn | None = None,
    ) -> None:
        super().__init__()
        if dtype not in DTYPES:
            raise StatisticsError(f"dtype must be one of {sorted(DTYPES)}", field="stats_dtype")
        if samples <= 0:
            raise StatisticsError("samples must be positive", field="stats_samples")
        self.model, self.tok, self.spec, self.cache = model, tok, spec, cache
        self.corpus, self.fingerprint, self.samples, self.dtype = (
            corpus,
            fingerprint,
            samples,
            dtype,
        )
        self.max_length, self.batch_rows, self.progress = max_length, batch_rows, progress
        self._moments: dict[int, torch.Tensor] = {}

    def key(self, layer: int) -> StatsKey:
        return StatsKey(
            self.fingerprint,
            self.spec.mlp_out_path(layer),
            self.corpus.identity,
            self.samples,
            self.dtype,
            self.max_length,
        )

    def missing(self, layers: list[int]) -> list[int]:
        """The layers whose statistics are not in memory yet (`prepare` loads or computes)."""
        return [layer for layer in layers if layer not in self._moments]

    def prepare(self, layers: list[int]) -> None:
        missing = []
        for layer in layers:
            if layer in self._moments:
                continue
            cached = self.cache.load(self.key(layer))
            if cached is None:
                missing.append(layer)
            else:
                self._moments[layer] = cached.float()
        if missing:
            for layer, (total, count) in self._accumulate(missing).items():
                self.cache.save(self.key(layer), total, count)
                self._moments[layer] = (total / count).float()

    def second_moment(self, layer: int) -> torch.Tensor:
        self.prepare([layer])
        return self._moments[layer]

    def _token_batches(self) -> Iterator[list[list[int]]]:
        rows: list[list[int]] = []
        for text in self.corpus.texts():
            ids = self.tok(
                text, add_special_tokens=True, truncation=True, max_length=self.max_length
            )["input_ids"]
            if len(ids) < 2:
                continue
            rows.append(ids)
            if len(rows) == self.batch_rows:
                yield rows
                rows = []
        if rows:
            yield rows

    @torch.no_grad()
    def _accumulate(self, layers: list[int]) -> dict[int, tuple[torch.Tensor, int]]:
        dtype = DTYPES[self.dtype]
        device = next(self.model.parameters()).device
        paths = {layer: self.spec.mlp_out_path(layer) for layer in layers}
        last = paths[max(layers)]
        totals: dict[int, torch.Tensor] = {}
        count = 0
        for rows in self._token_batches():
            width = max(len(r) for r in rows)
            ids = torch.zeros((len(rows), width), dtype=torch.long, device=device)
            mask = torch.zeros_like(ids)
            for i, row in enumerate(rows):
                ids[i, : len(row)] = torch.tensor(row)
                mask[i, : len(row)] = 1
            with record_inputs(self.model, list(paths.values())) as seen:
                forward_until(self.model, last, input_ids=ids, attention_mask=mask, use_cache=False)
            keep = mask.reshape(-1).bool()
            take = min(int(keep.sum()), self.samples - count)
            for layer, path in paths.items():
                keys = seen[path].reshape(-1, seen[path].shape[-1])[keep][:take].to(dtype)
                total = totals.setdefault(
                    layer, torch.zeros((keys.shape[1], keys.shape[1]), dtype=dtype, device=device)
                )
                total.addmm_(keys.T, keys)
            count += take
            if self.progress:
                self.progress(count / self.samples, f"statistics for layers {layers}")
            if count >= self.samples:
                break
        if count == 0:
            raise StatisticsError("the corpus yielded no tokens", field="corpus")
        return {layer: (total.cpu(), count) for layer, total in totals.items()}


def load_rome_npz(path: str | Path) -> torch.Tensor:
    """C = mom2 / count from a ROME/EasyEdit `layer_stats` file (no pickle is loaded)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            total = torch.from_numpy(np.asarray(data["mom2.mom2"], dtype=np.float64))
            count = float(np.asarray(data["mom2.count"]))
    except (OSError, KeyError, ValueError) as exc:
        raise StatisticsError(f"{path} is not a ROME statistics file: {exc}", field="path") from exc
    if count <= 0 or total.ndim != 2 or total.shape[0] != total.shape[1]:
        raise StatisticsError(f"{path} holds no usable second moment", field="path")
    return (total / count).float()
