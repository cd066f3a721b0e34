"""Statistics: computed from a named corpus or model-sampled text, cached across processes,
keyed exactly, streamed, and importable from ROME's .npz files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from editors import StatisticsError, detect_spec
from editors.stats import (
    CorpusStatistics,
    ModelSampledCorpus,
    StatsCache,
    TextFileCorpus,
    load_rome_npz,
    model_fingerprint,
)
from editors.tiny import tiny_random_model


class ExplodingCorpus:
    """A corpus that must never be read (proves a cache hit)."""

    identity = "same-as-before"

    def texts(self):
        raise AssertionError("statistics were recomputed instead of read from the cache")


class CountingCorpus:
    def __init__(self, inner) -> None:
        self.inner, self.identity, self.read = inner, inner.identity, 0

    def texts(self):
        for text in self.inner.texts():
            self.read += 1
            yield text


@pytest.fixture(scope="module")
def llama(gpt2_tok):
    return tiny_random_model("llama", len(gpt2_tok)), gpt2_tok


def _stats(model, tok, cache, corpus, **kw) -> CorpusStatistics:
    return CorpusStatistics(
        model, tok, detect_spec(model), StatsCache(cache), corpus, model_fingerprint(model), **kw
    )


def test_second_moment_is_the_mean_outer_product_of_the_keys(llama, corpus_file, tmp_path):
    model, tok = llama
    stats = _stats(model, tok, tmp_path, TextFileCorpus(corpus_file), samples=500)
    c = stats.second_moment(1)
    assert c.shape == (256, 256)
    torch.testing.assert_close(c, c.T)
    assert torch.linalg.eigvalsh(c.double()).min() > -1e-6  # positive semi-definite
    # the same quantity computed by hand from the first texts
    texts = list(TextFileCorpus(corpus_file).texts())
    keys = []
    handle = model.get_submodule("model.layers.1.mlp.down_proj").register_forward_pre_hook(
        lambda _m, a: keys.append(a[0][0])
    )
    try:
        for text in texts:
            model(**tok(text, return_tensors="pt"))
            if sum(k.shape[0] for k in keys) >= 500:
                break
    finally:
        handle.remove()
    k = torch.cat(keys)[:500].double()
    torch.testing.assert_close(c.double(), k.T @ k / 500, rtol=1e-4, atol=1e-6)


def test_cache_is_reused_by_a_new_instance_and_keyed_exactly(llama, corpus_file, tmp_path):
    model, tok = llama
    corpus = TextFileCorpus(corpus_file)
    first = _stats(model, tok, tmp_path, corpus, samples=300).second_moment(2)
    ExplodingCorpus.identity = corpus.identity
    again = _stats(model, tok, tmp_path, ExplodingCorpus(), samples=300).second_moment(2)
    assert torch.equal(first, again)
    files = set(tmp_path.glob("*.safetensors"))
    _stats(model, tok, tmp_path, corpus, samples=301).second_moment(2)
    _stats(model, tok, tmp_path, corpus, samples=300, dtype="float32").second_moment(2)
    assert len(set(tmp_path.glob("*.safetensors")) - files) == 2  # new keys, new files


def test_several_layers_come_from_one_streamed_pass(llama, corpus_file, tmp_path):
    model, tok = llama
    corpus = CountingCorpus(TextFileCorpus(corpus_file))
    stats = _stats(model, tok, tmp_path, corpus, samples=200)
    stats.prepare([0, 1, 3])
    total_texts = len(list(TextFileCorpus(corpus_file).texts()))
    assert 0 < corpus.read < total_texts  # stopped once the samples were taken
    read = corpus.read
    for layer in (0, 1, 3):
        stats.second_moment(layer)
    assert corpus.read == read


def test_jsonl_corpus_and_its_errors(tmp_path):
    good = tmp_path / "c.jsonl"
    good.write_text("\n".join(json.dumps({"text": f"line {i}"}) for i in range(3)))
    assert list(TextFileCorpus(good).texts()) == ["line 0", "line 1", "line 2"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(StatisticsError, match=r"bad\.jsonl:2"):
        list(TextFileCorpus(bad).texts())
    with pytest.raises(StatisticsError, match="does not exist"):
        TextFileCorpus(tmp_path / "missing.txt")


def test_model_sampled_corpus_is_deterministic(llama):
    model, tok = llama
    a = ModelSampledCorpus(model, tok, seed=3, length=8, batch=4)
    b = ModelSampledCorpus(model, tok, seed=3, length=8, batch=4)
    assert next(a.texts()) == next(b.texts())
    assert a.identity == b.identity
    assert ModelSampledCorpus(model, tok, seed=4).identity != a.identity


def test_rome_npz_import(tmp_path: Path):
    k = torch.randn(50, 8, dtype=torch.float64)
    path = tmp_path / "model.layers.1.mlp.down_proj_float64_mom2_50.npz"
    np.savez(path, **{"mom2.mom2": (k.T @ k).numpy(), "mom2.count": np.array(50)})
    torch.testing.assert_close(load_rome_npz(path).double(), k.T @ k / 50, rtol=1e-6, atol=1e-6)
    np.savez(tmp_path / "other.npz", something=np.zeros(3))
    with pytest.raises(StatisticsError, match="not a ROME statistics file"):
        load_rome_npz(tmp_path / "other.npz")
    obj = tmp_path / "pickled.npz"
    np.savez(obj, **{"mom2.mom2": np.array([object()]), "mom2.count": np.array(1)})
    with pytest.raises(StatisticsError):
        load_rome_npz(obj)  # never unpickles


def test_bad_statistics_settings_are_named(llama, corpus_file, tmp_path):
    model, tok = llama
    with pytest.raises(StatisticsError) as err:
        _stats(model, tok, tmp_path, TextFileCorpus(corpus_file), dtype="float16")
    assert err.value.field == "stats_dtype"
    with pytest.raises(StatisticsError) as err:
        _stats(model, tok, tmp_path, TextFileCorpus(corpus_file), samples=0)
    assert err.value.field == "stats_samples"
