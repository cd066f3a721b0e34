"""Shared fixtures: the project's own small models, and the real pretrained ones."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from editors.editor import Editor, corpus_statistics
from editors.models import default_cache_dir, load_model
from editors.tiny import gpt2_tokenizer, load_facts, tiny_random_model, train_fact_model

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CACHE = default_cache_dir()
# one statistics budget for all real-model tests: enough for a full-rank C, one sampling round
REAL_MODEL_STATS_SAMPLES = 8_000


def shared(path: str) -> Path:
    full = DATA / path
    if not full.exists():
        pytest.fail(f"benchmark data missing: {full} (../shared/data must sit beside the repo)")
    return full


def counterfact(split: str, count: int, start: int = 0) -> list[dict]:
    with shared(f"counterfact/counterfact-{split}.json").open(encoding="utf-8") as handle:
        return json.load(handle)[start : start + count]


def weights_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(model: torch.nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    for name, value in model.state_dict().items():
        assert torch.equal(value, snapshot[name]), f"{name} changed"


@pytest.fixture(scope="session")
def gpt2_tok():
    return gpt2_tokenizer(shared("tokenizers/gpt2"))


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """A small real-text corpus (CounterFact train prompts) for statistics of tiny models."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    lines = [
        f"{r['prompt']} {r['ground_truth']}. {r['rephrase_prompt']}"
        for r in counterfact("train", 600, start=1000)
    ]
    path.write_text("\n\n".join(lines), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_llama_editor_factory(gpt2_tok, corpus_file, tmp_path_factory):
    """Makes editors on fresh tiny random Llama models, with statistics from the corpus."""

    def make() -> Editor:
        model = tiny_random_model("llama", len(gpt2_tok))
        stats = corpus_statistics(
            model, gpt2_tok, tmp_path_factory.mktemp("stats"), corpus_file, samples=2_000
        )
        return Editor(model, gpt2_tok, stats)

    return make


@pytest.fixture(scope="session")
def fact_facts() -> list[dict]:
    return load_facts(shared("counterfact/counterfact-train.json"), 60)


@pytest.fixture(scope="session")
def fact_model(fact_facts):
    return train_fact_model(fact_facts)


@pytest.fixture(scope="session")
def fact_model_folder(fact_model, tmp_path_factory) -> Path:
    """The trained fact model saved as a model folder (the service can load it)."""
    model, tok = fact_model
    folder = tmp_path_factory.mktemp("fact-model")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def fact_editor(fact_model, tmp_path_factory, corpus_file):
    model, tok = fact_model
    stats = corpus_statistics(
        model, tok, tmp_path_factory.mktemp("stats"), corpus_file, samples=4_000
    )
    return Editor(model, tok, stats)


@functools.cache
def _real_editor(name: str) -> Editor:
    model, tok = load_model(name, CACHE)
    stats = corpus_statistics(model, tok, CACHE / "stats", samples=REAL_MODEL_STATS_SAMPLES)
    editor = Editor(model, tok, stats)
    layers = sorted(
        {
            layer
            for method in ("rome", "memit")
            for layer in editor.hparams(method).edited_layers(
                len(model.get_submodule(editor.spec.layers))
            )
        }
    )
    stats.prepare(layers)  # one pass for every layer the tests edit
    return editor


@pytest.fixture(scope="session", params=["smollm2-135m-instruct", "gemma3-270m"])
def real_editor(request) -> Editor:
    return _real_editor(request.param)


@pytest.fixture(scope="session")
def smollm2_editor() -> Editor:
    return _real_editor("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, gpt2_tok) -> Path:
    """A small random GPT-2 saved as a model folder, the service's fast test model."""
    import transformers as tf

    folder = tmp_path_factory.mktemp("tiny-gpt2")
    torch.manual_seed(0)
    config = tf.GPT2Config(
        n_layer=4,
        n_embd=64,
        n_head=4,
        vocab_size=len(gpt2_tok),
        n_positions=512,
        bos_token_id=gpt2_tok.eos_token_id,
        eos_token_id=gpt2_tok.eos_token_id,
    )
    tf.GPT2LMHeadModel(config).eval().save_pretrained(folder)
    gpt2_tok.save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_settings(tmp_path, tiny_model_dir, corpus_file):
    """Service settings on the tiny model: embedded SQLite and the in-process queue."""
    from .service_support import service_settings

    def make(**overrides):
        values = {
            "cache_dir": tmp_path.parent / "editserve-cache",
            "stats_corpus": corpus_file,
            "stats_samples": 2_000,
            **overrides,
        }
        model = values.pop("model", tiny_model_dir)
        return service_settings(tmp_path, model, **values)

    return make
