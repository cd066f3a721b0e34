"""/v1/generate throughput over real HTTP: N concurrent clients vs the same N requests one
after another; prints JSON figures.

    python bench/bench_generate.py --clients 8 --max-new-tokens 64

Starts `editserve serve` (bench/serving.py: open mode, fresh SQLite ledger, the default model).
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from serving import running_server

PROMPTS = [
    "The mother tongue of Danielle Darrieux is",
    "The Eiffel Tower is located in the city of",
    "The capital of Canada is",
    "Michael Jordan plays the sport of",
    "iPhone was developed by",
    "Albert Einstein is a famous",
    "The largest planet in the solar system is",
    "Python is a programming language created by",
]


def _one(client: httpx.Client, prompt: str, tokens: int) -> int:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": tokens, "stop": []}}
    reply = client.post("/v1/generate", json=body)
    reply.raise_for_status()
    return int(reply.json()["generated_tokens"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args()
    with running_server(args.model) as url:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.clients)]
        limits = httpx.Limits(max_connections=args.clients)
        with httpx.Client(base_url=url, timeout=600, limits=limits) as client:
            for prompt in prompts:  # warm-up, and one open connection per client
                _one(client, prompt, 2)
            started = time.perf_counter()
            sequential_tokens = sum(_one(client, p, args.max_new_tokens) for p in prompts)
            sequential = time.perf_counter() - started
            started = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                counts = list(pool.map(lambda p: _one(client, p, args.max_new_tokens), prompts))
            concurrent = time.perf_counter() - started
    sequential_rate = sequential_tokens / sequential
    concurrent_rate = sum(counts) / concurrent
    print(
        json.dumps(
            {
                "model": args.model,
                "clients": args.clients,
                "max_new_tokens": args.max_new_tokens,
                "sequential": {"seconds": sequential, "tokens_per_s": sequential_rate},
                "concurrent": {"seconds": concurrent, "tokens_per_s": concurrent_rate},
                "speedup": concurrent_rate / sequential_rate,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
