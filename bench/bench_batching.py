"""Continuous batching against static batches and one request at a time, on the engine
objects (no HTTP); prints JSON figures.

    python bench/bench_batching.py --out bench/results/batching.json   # ~10 min on 2 cores
    python bench/bench_batching.py --quick                              # smoke run, ~1 min

Modes, each fed the same workload by the same closed-loop clients (a client sends its next
request when its answer is in):
- continuous: `ServingLoop` (scheduler.py): rows join and leave the running batch per step;
- static: `GenerationBatcher` + `generate_batch` on a `ModelLane`, as served before: a batch
  runs until its longest row ends, the next one gathers meanwhile (20 ms gather window);
- sequential: the same lane and batcher with `max_batch=1`: one request at a time.
The workload (fixed seed) mixes prompt lengths (one word to ~150 tokens) and budgets
(`--min-new`..`--max-new` tokens), greedy. Per mode and client count: generated tokens/s,
time to first token (submission to the first streamed piece) and latency, p50/p99
(nearest rank), and how many greedy answers equal the sequential ones.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.provenance import write_report
from editors.models import load_model
from service.engine.batcher import GenerationBatcher
from service.engine.generation import (
    GenerationOutput,
    GenerationRequest,
    SamplingParams,
    generate_batch,
)
from service.engine.lane import ModelLane
from service.engine.scheduler import ServingLoop

SHORT = ["Hi", "The capital of Canada is", "Python is a programming language created by"]
FACTS = [
    "The mother tongue of Danielle Darrieux is French.",
    "The Eiffel Tower is located in the city of Paris.",
    "Michael Jordan plays the sport of basketball.",
    "The iPhone was developed by Apple.",
    "Albert Einstein is a famous physicist who was born in Ulm.",
    "The largest planet in the solar system is Jupiter.",
    "Toyota is headquartered in the city of Toyota, in Japan.",
    "The Amazon river flows through Brazil, Peru and Colombia.",
    "Marie Curie won Nobel prizes in physics and in chemistry.",
    "The Great Wall of China is thousands of kilometres long.",
]
MODES = ("continuous", "static", "sequential")

Generate = Callable[[GenerationRequest], Awaitable[GenerationOutput]]


def workload(count: int, seed: int, min_new: int, max_new: int) -> list[tuple[str, int]]:
    """`count` (prompt, max_new_tokens): a third short prompts, a third 2-4 facts, a third
    6-12 facts, in random order."""
    rng = random.Random(seed)
    items = []
    for index in range(count):
        kind = index % 3
        if kind == 0:
            prompt = rng.choice(SHORT)
        else:
            facts = rng.sample(FACTS, rng.randint(2, 4)) if kind == 1 else rng.choices(FACTS, k=9)
            prompt = " ".join(facts) + " In short,"
        items.append((prompt, rng.randint(min_new, max_new)))
    rng.shuffle(items)
    return items


def percentile(values: list[float], q: float) -> float | None:
    """Nearest rank: the smallest value with at least q of the values at or below it."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)], 4)


async def drive(generate: Generate, items: list[tuple[str, int]], clients: int) -> dict[str, Any]:
    """`clients` closed-loop clients working through `items`; figures and texts."""
    pending = iter(list(enumerate(items)))
    records: list[tuple[float, float | None, float, GenerationOutput] | None] = [None] * len(items)

    async def client() -> None:
        for index, (prompt, tokens) in pending:  # shared: each item is taken once
            first: list[float] = []

            def on_text(piece: str, first: list[float] = first) -> None:
                if not first:
                    first.append(time.perf_counter())

            params = SamplingParams(max_new_tokens=tokens, stop=())
            started = time.perf_counter()
            output = await generate(GenerationRequest(prompt, params, on_text))
            records[index] = (started, first[0] if first else None, time.perf_counter(), output)

    began = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    seconds = time.perf_counter() - began
    done = [r for r in records if r is not None]
    generated = sum(r[3].tokens for r in done)
    ttft = [r[1] - r[0] for r in done if r[1] is not None]
    latency = [r[2] - r[0] for r in done]
    return {
        "requests": len(done),
        "seconds": round(seconds, 3),
        "generated_tokens": generated,
        "tokens_per_s": round(generated / seconds, 2),
        "ttft_s": {"p50": percentile(ttft, 0.5), "p99": percentile(ttft, 0.99), "n": len(ttft)},
        "latency_s": {"p50": percentile(latency, 0.5), "p99": percentile(latency, 0.99)},
        "texts": [r[3].text for r in done],
    }


def run_mode(mode: str, model: Any, tok: Any, items: list, clients: int) -> dict[str, Any]:
    """One mode on fresh engine objects, after a warm-up request."""
    loop: ServingLoop | None = None
    lane: ModelLane | None = None
    if mode == "continuous":
        loop = ServingLoop(model, tok, max_batch=32)
        loop.start()
        generate: Generate = loop.generate
    else:
        lane = ModelLane()
        batcher = GenerationBatcher(
            lane,
            lambda requests: generate_batch(model, tok, requests),
            max_batch=32 if mode == "static" else 1,
            wait_seconds=0.02 if mode == "static" else 0.0,
        )
        generate = batcher.generate
    try:

        async def measured() -> dict[str, Any]:
            await generate(GenerationRequest("Hi", SamplingParams(max_new_tokens=2)))
            return await drive(generate, items, clients)

        return asyncio.run(measured())
    finally:
        if loop is not None:
            loop.close()
        if lane is not None:
            lane.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--requests", type=int, help="per client count (default: 3 x 8, 2 x 32)")
    parser.add_argument("--min-new", type=int, default=4)
    parser.add_argument("--max-new", type=int, default=64)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="4 clients, 8 requests, 4-16 tokens")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.clients, args.requests, args.min_new, args.max_new = [4], 8, 4, 16
    started = time.perf_counter()
    model, tok = load_model(args.model)
    runs: list[dict[str, Any]] = []
    for clients in args.clients:
        count = args.requests or max(24, 2 * clients)
        items = workload(count, args.seed, args.min_new, args.max_new)
        texts: dict[str, list[str]] = {}
        for mode in args.modes:
            figures = run_mode(mode, model, tok, items, clients)
            texts[mode] = figures.pop("texts")
            runs.append({"mode": mode, "clients": clients, **figures})
            print(json.dumps(runs[-1]), file=sys.stderr)
        if "sequential" in texts:
            for run in runs[-len(args.modes) :]:
                same = sum(
                    a == b for a, b in zip(texts[run["mode"]], texts["sequential"], strict=True)
                )
                run["greedy_texts_equal_to_sequential"] = f"{same}/{count}"
    speedups: dict[str, dict[str, float]] = {}
    for clients in args.clients:
        rate = {r["mode"]: r["tokens_per_s"] for r in runs if r["clients"] == clients}
        if "continuous" in rate:
            speedups[str(clients)] = {
                f"continuous_vs_{mode}": round(rate["continuous"] / rate[mode], 2)
                for mode in rate
                if mode != "continuous"
            }
    prompt_tokens = [len(tok(p)["input_ids"]) for p, _ in workload(64, args.seed, 1, 1)]
    report = {
        "model": args.model,
        "workload": {
            "seed": args.seed,
            "max_new_tokens": [args.min_new, args.max_new],
            "prompt_tokens": [min(prompt_tokens), max(prompt_tokens)],
            "greedy": True,
            "max_batch": 32,
        },
        "runs": runs,
        "tokens_per_s_speedup": speedups,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    write_report(report, args.out)


if __name__ == "__main__":
    main()
