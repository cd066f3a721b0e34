"""Small models the project builds itself, for fast tests and examples.

- `tiny_random_model(family)`: a randomly initialised model of each supported family with
  the GPT-2 byte-level BPE tokenizer (files under ../shared/data/tokenizers/gpt2).
- `train_fact_model(facts)`: a small GPT-2 (Conv1D weights) trained, deterministically,
  until it knows a set of real CounterFact facts, with a word-level tokenizer of their words.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
import transformers as tf
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedModel, PreTrainedTokenizerFast

TINY_CONFIGS: dict[str, Callable[[int], tf.PretrainedConfig]] = {
    "gpt2": lambda v: tf.GPT2Config(
        n_layer=4,
        n_embd=64,
        n_head=4,
        vocab_size=v,
        n_positions=128,
        bos_token_id=0,
        eos_token_id=0,
    ),
    "gptj": lambda v: tf.GPTJConfig(
        n_layer=4,
        n_embd=64,
        n_head=4,
        vocab_size=v,
        n_positions=128,
        rotary_dim=8,
        bos_token_id=0,
        eos_token_id=0,
    ),
    "gpt_neox": lambda v: tf.GPTNeoXConfig(
        num_hidden_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        intermediate_size=256,
        vocab_size=v,
        bos_token_id=0,
        eos_token_id=0,
    ),
    "llama": lambda v: tf.LlamaConfig(
        num_hidden_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        vocab_size=v,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    ),
    "mistral": lambda v: tf.MistralConfig(
        num_hidden_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        vocab_size=v,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    ),
    "qwen2": lambda v: tf.Qwen2Config(
        num_hidden_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        vocab_size=v,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    ),
    "gemma3_text": lambda v: tf.Gemma3TextConfig(
        num_hidden_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=256,
        vocab_size=v,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        sliding_window=64,
    ),
}


def gpt2_tokenizer(folder: str | Path) -> PreTrainedTokenizerFast:
    """GPT-2's byte-level BPE from `encoder.json` + `vocab.bpe` (or vocab.json + merges.txt)."""
    folder = Path(folder)
    vocab = folder / ("encoder.json" if (folder / "encoder.json").is_file() else "vocab.json")
    merges = folder / ("vocab.bpe" if (folder / "vocab.bpe").is_file() else "merges.txt")
    tok = tf.GPT2TokenizerFast(vocab=str(vocab), merges=str(merges))
    tok.pad_token = tok.eos_token
    return tok


def tiny_random_model(family: str, vocab_size: int, seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    config = TINY_CONFIGS[family](vocab_size)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    model.requires_grad_(False)
    return model


def _fact_texts(facts: list[dict]) -> list[str]:
    texts = []
    for f in facts:
        texts.append(f"{f['prompt']} {f['ground_truth']}")
        texts.append(f"{f['locality_prompt']} {f['locality_ground_truth']}")
    return texts


def word_tokenizer(texts: list[str], extra_words: list[str]) -> PreTrainedTokenizerFast:
    words = sorted({w for t in texts for w in t.split()} | set(extra_words))
    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<pad>",
    )


def load_facts(path: str | Path, count: int) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)[:count]


def train_fact_model(
    facts: list[dict],
    steps: int = 600,
    seed: int = 0,
    progress: Callable[[float, str], None] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A 4-layer GPT-2 that completes each fact's prompt (and locality prompt) correctly."""
    texts = _fact_texts(facts)
    extra = [w for f in facts for w in f["target_new"].split() + f["rephrase_prompt"].split()]
    tok = word_tokenizer(texts, extra)
    torch.manual_seed(seed)
    config = tf.GPT2Config(
        n_layer=4,
        n_embd=128,
        n_head=4,
        vocab_size=len(tok),
        n_positions=64,
        bos_token_id=2,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = tf.GPT2LMHeadModel(config)
    rows = [tok(t)["input_ids"] for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    labels = torch.tensor([r + [-100] * (width - len(r)) for r in rows])
    mask = (labels != -100).long()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    threads = torch.get_num_threads()
    # One thread: summation order changes with the thread count, and over 600 steps that
    # gives a differently trained model, so the same seed would not mean the same model.
    torch.set_num_threads(1)
    try:
        for step in range(steps):
            batch = torch.randperm(len(rows), generator=generator)[:64]
            loss = model(
                input_ids=ids[batch], attention_mask=mask[batch], labels=labels[batch]
            ).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if progress and step % 20 == 0:
                progress(step / steps, f"train fact model (loss {loss.item():.3f})")
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.requires_grad_(False)
    return model, tok
