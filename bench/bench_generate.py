"""/v1/generate throughput over real HTTP: N concurrent clients vs the same N requests one
after another; prints JSON figures.

    python bench/bench_generate.py --clients 8 --max-new-tokens 64

Starts `editserve serve` on a free port with a fresh SQLite ledger (the default model).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
    port = _free_port()
    env = {
        **os.environ,
        "EDITSERVE_MODEL": args.model,
        "EDITSERVE_DATA_DIR": tempfile.mkdtemp(prefix="editserve-bench-"),
        "EDITSERVE_PORT": str(port),
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--log-level", "warning"],
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
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
    finally:
        server.terminate()
        server.wait(60)
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
