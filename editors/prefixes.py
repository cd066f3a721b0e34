"""Context prefixes: short texts the model writes itself, put before an edit prompt.

ROME and MEMIT average keys and fit values over several contexts so that the edit holds
whatever precedes the subject. Sampling is seeded, and the prefixes are returned in each
EditResult so a replay can reuse them verbatim.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

STARTERS = ("The", "Therefore", "Because", "I", "You")


@torch.no_grad()
def sample_prefixes(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    count: int,
    length: int,
    seed: int,
) -> list[str]:
    """`count` sampled prefixes of about `length` tokens, plus the empty prefix first."""
    if count <= 0:
        return [""]
    generator = torch.Generator(device="cpu").manual_seed(seed)
    device = next(model.parameters()).device
    prompts = [STARTERS[i % len(STARTERS)] for i in range(count)]
    rows = [list(tok(p, add_special_tokens=True)["input_ids"]) for p in prompts]
    prefixes: list[str] = []
    for row in rows:
        ids = torch.tensor([row], device=device)
        past = None
        out_ids = list(row)
        for _ in range(length):
            out = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[0, -1].float().cpu()
            top = torch.topk(logits, 5)
            choice = torch.multinomial(torch.softmax(top.values, -1), 1, generator=generator)
            next_id = int(top.indices[choice])
            out_ids.append(next_id)
            ids = torch.tensor([[next_id]], device=device)
        text = tok.decode(out_ids, skip_special_tokens=True)
        text = text.replace("{", " ").replace("}", " ").replace("\n", " ").strip()
        prefixes.append(text + ". ")
    return ["", *prefixes]
