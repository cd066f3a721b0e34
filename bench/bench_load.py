"""Load test: concurrent /v1/generate clients while edits stream in; prints JSON figures.

    python bench/bench_load.py --clients 8 --seconds 60 --edit-every 5

Starts `editserve serve` (open mode, fresh SQLite ledger, the default model) on a free port.
Reports errors, latency percentiles and throughput, and checks for torn reads: greedy answers
to the same prompt at the same model version must be identical, so an answer computed while
the weights changed would show up as a second text for one (prompt, version).
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from collections import defaultdict

import httpx
from serving import running_server

PROMPTS = [
    "The mother tongue of Danielle Darrieux is",
    "The Eiffel Tower is located in the city of",
    "The capital of Canada is",
    "Michael Jordan plays the sport of",
]
EDITS = [
    ("The mother tongue of {} is", "Danielle Darrieux", "English"),
    ("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome"),
    ("The capital of {} is", "Canada", "Sydney"),
    ("{} plays the sport of", "Michael Jordan", "baseball"),
]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--edit-every", type=float, default=5.0)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args()
    latencies: list[float] = []
    errors: list[str] = []
    answers: dict[tuple[str, int], set[str]] = defaultdict(set)
    tokens = 0
    lock = threading.Lock()
    stop = threading.Event()

    def generator(index: int) -> None:
        nonlocal tokens
        with httpx.Client(base_url=url, timeout=600) as client:
            n = index
            while not stop.is_set():
                prompt = PROMPTS[n % len(PROMPTS)]
                n += 1
                body = {"inputs": prompt, "parameters": {"max_new_tokens": args.max_new_tokens}}
                started = time.perf_counter()
                try:
                    reply = client.post("/v1/generate", json=body)
                    reply.raise_for_status()
                except httpx.HTTPError as exc:
                    with lock:
                        errors.append(str(exc))
                    continue
                out = reply.json()
                with lock:
                    latencies.append(time.perf_counter() - started)
                    tokens += out["generated_tokens"]
                    answers[(prompt, out["model_version"])].add(out["generated_text"])

    def editor(accepted: list[int]) -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            n = 0
            while not stop.wait(args.edit_every):
                prompt, subject, target = EDITS[n % len(EDITS)]
                n += 1
                body = {"edit": {"prompt": prompt, "subject": subject, "target_new": target}}
                reply = client.post("/v1/edits", json=body)
                if reply.status_code != 202:
                    errors.append(f"edit refused: {reply.text}")
                else:
                    accepted.append(reply.json()["job_id"])

    with running_server(args.model) as url:
        httpx.post(f"{url}/v1/generate", json={"inputs": "Hi"}, timeout=600)  # warm-up
        accepted: list[int] = []
        threads = [threading.Thread(target=generator, args=(i,)) for i in range(args.clients)]
        threads.append(threading.Thread(target=editor, args=(accepted,)))
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        time.sleep(args.seconds)
        stop.set()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
        jobs = [httpx.get(f"{url}/v1/jobs/{j}").json()["status"] for j in accepted]
    torn = sum(1 for texts in answers.values() if len(texts) > 1)
    print(
        json.dumps(
            {
                "model": args.model,
                "clients": args.clients,
                "seconds": round(elapsed, 1),
                "requests": len(latencies),
                "errors": len(errors),
                "latency_s": {
                    "p50": _percentile(latencies, 0.50),
                    "p99": _percentile(latencies, 0.99),
                    "mean": statistics.fmean(latencies) if latencies else None,
                },
                "tokens_per_s": tokens / elapsed,
                "edits_accepted": len(accepted),
                "edit_statuses": {s: jobs.count(s) for s in set(jobs)},
                "versions_seen": len({version for _, version in answers}),
                "torn_reads": torn,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
