"""GPU readiness in one run: bf16 serving of SmolLM2 and of a Llama-shaped 8B model
initialised at random from a config; ROME and MEMIT edit seconds; generation tokens/s at
1, 8 and 32 concurrent requests through the serving loop; peak memory. Prints JSON.

    python bench/gpu_check.py --out bench/results/gpu-check.json   # one GPU, < 10 minutes
    python bench/gpu_check.py --tiny                                # CPU, tiny random Llama

Statistics come from text each model samples itself (few tokens: the figures time the
methods, they do not judge edit quality); the random model's edits are timed, not scored.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from tempfile import mkdtemp
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.provenance import ROOT, write_report
from editors.editor import Editor, corpus_statistics
from editors.models import load_model, prepare
from editors.requests import EditRequest
from editors.tiny import gpt2_tokenizer, tiny_random_model
from service.engine.generation import GenerationRequest, SamplingParams
from service.engine.scheduler import ServingLoop

FACTS = [
    ("The mother tongue of {} is", "Danielle Darrieux", "English"),
    ("{} is located in the city of", "The Eiffel Tower", "Rome"),
    ("The capital of {} is", "Canada", "Sydney"),
    ("{} plays the sport of", "Michael Jordan", "baseball"),
    ("{} was developed by", "The iPhone", "Nokia"),
    ("{} is a famous", "Albert Einstein", "painter"),
    ("The official language of {} is", "Brazil", "German"),
    ("{} was founded by", "Microsoft", "Steve Jobs"),
    ("The headquarters of {} are in", "Toyota", "Paris"),
    ("{} speaks the language", "Angela Merkel", "Spanish"),
]
PROMPTS = [f.format(s) for f, s, _ in FACTS]
LLAMA_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
}


def _peak_memory_gb(device: str) -> float:
    if device.startswith("cuda"):
        return round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # KiB -> GiB


def _timed(fn: Callable[[], Any], device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return round(time.perf_counter() - started, 3)


def _edit_seconds(editor: Editor, method: str, count: int, device: str) -> dict[str, float]:
    requests = [EditRequest(p, s, t) for p, s, t in FACTS[:count]]
    editor.prepare_statistics(editor.statistics_layers(method))
    editor.prefixes(editor.hparams(method))
    first = _timed(lambda: editor.compute(requests, method), device)
    second = _timed(lambda: editor.compute(requests, method), device)
    return {"first_s": first, "second_s": second}


def _generation(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, clients: int, tokens: int, device: str
) -> dict[str, float]:
    loop = ServingLoop(model, tok, max_batch=max(clients, 1))
    loop.start()
    params = SamplingParams(max_new_tokens=tokens)

    async def run() -> int:
        outs = await asyncio.gather(
            *(
                loop.generate(GenerationRequest(PROMPTS[i % len(PROMPTS)], params))
                for i in range(clients)
            )
        )
        return sum(o.tokens for o in outs)

    try:
        asyncio.run(run())  # warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        generated = asyncio.run(run())
        seconds = time.perf_counter() - started
    finally:
        loop.close()
    return {
        "tokens": generated,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(generated / seconds, 1),
    }


def check_model(
    name: str,
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    device: str,
    samples: int,
    tokens: int,
    load_seconds: float,
) -> dict[str, Any]:
    model.eval()
    stats = corpus_statistics(model, tok, mkdtemp(prefix="gpu-check-stats-"), samples=samples)
    editor = Editor(model, tok, stats)
    result: dict[str, Any] = {
        "model": name,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "parameters_billion": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
        "load_seconds": round(load_seconds, 2),
    }
    began = time.perf_counter()
    editor.prepare_statistics(sorted(set(editor.statistics_layers("rome"))))
    result["statistics_seconds"] = round(time.perf_counter() - began, 2)
    result["rome_1_edit"] = _edit_seconds(editor, "rome", 1, device)
    result["memit_10_edits"] = _edit_seconds(editor, "memit", 10, device)
    result["generation"] = {
        str(clients): _generation(model, tok, clients, tokens, device) for clients in (1, 8, 32)
    }
    result["peak_memory_gb"] = _peak_memory_gb(device)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama on the CPU")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    results: list[dict[str, Any]] = []
    if args.tiny:
        tok = gpt2_tokenizer(ROOT.parent / "shared" / "data" / "tokenizers" / "gpt2")
        model, tok = prepare(tiny_random_model("llama", len(tok)), tok)
        results.append(check_model("tiny-llama", model, tok, device, 500, 8, 0.0))
    else:
        began = time.perf_counter()
        model, tok = load_model("smollm2-135m-instruct", device=device, dtype=dtype)
        load = time.perf_counter() - began
        results.append(check_model("smollm2-135m-instruct", model, tok, device, 4000, 64, load))
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        began = time.perf_counter()
        config = LlamaConfig(vocab_size=len(tok), **LLAMA_8B)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                big = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(default)
        big.generation_config.eos_token_id = tok.eos_token_id
        big, tok = prepare(big, tok)
        load = time.perf_counter() - began
        results.append(check_model("llama-8b-random", big, tok, device, 2000, 64, load))
    report = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "models": results,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    write_report(report, args.out)


if __name__ == "__main__":
    main()
