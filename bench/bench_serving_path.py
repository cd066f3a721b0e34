"""Does generation wait for edits? Three measurements over real HTTP; prints JSON.

    python bench/bench_serving_path.py --out bench/results/serving-path.json

1. `/v1/generate` (8 new tokens, one client) while idle, then while a MEMIT batch of 10
   CounterFact edits computes: the slowest answer during the edit against the slowest idle.
2. A served ROME edit, POST to `applied` (guard included), against its bare computation
   (the method's own time, from the edit's diagnostics): medians over `--rome-edits`.
3. The load test: `--clients` clients generating for `--seconds`, idle and then with an edit
   every `--edit-every` seconds: p50/p99 latency of each phase.

Starts `editserve serve` (bench/serving.py: open mode, fresh SQLite ledger, the default model).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.provenance import ROOT, write_report
from bench.serving import running_server
from editors.datasets import load_counterfact
from editors.requests import EditRequest

DATA = ROOT.parent / "shared" / "data" / "counterfact"
PROMPTS = [
    "The mother tongue of Danielle Darrieux is",
    "The Eiffel Tower is located in the city of",
    "The capital of Canada is",
    "Michael Jordan plays the sport of",
]


def _percentile(values: list[float], q: float) -> float | None:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4) if ordered else None


def _summary(values: list[float]) -> dict[str, float | int | None]:
    return {
        "count": len(values),
        "p50": _percentile(values, 0.5),
        "p99": _percentile(values, 0.99),
        "max": round(max(values), 4) if values else None,
    }


def _generate(client: httpx.Client, index: int, tokens: int = 8) -> float:
    body = {"inputs": PROMPTS[index % len(PROMPTS)], "parameters": {"max_new_tokens": tokens}}
    started = time.perf_counter()
    client.post("/v1/generate", json=body).raise_for_status()
    return time.perf_counter() - started


def _wait(client: httpx.Client, job_id: int, poll: float = 0.05) -> dict:
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["finished_at"] is not None:
            return job
        time.sleep(poll)


def _edit_body(case: EditRequest, method: str) -> dict:
    edit = {"prompt": case.prompt, "subject": case.subject, "target_new": case.target_new}
    return {"edit": edit, "method": method}


def during_memit(client: httpx.Client, cases: list[EditRequest], idle_requests: int) -> dict:
    idle = [_generate(client, i) for i in range(idle_requests)]
    body = {"edits": [_edit_body(c, "memit")["edit"] for c in cases], "method": "memit"}
    reply = client.post("/v1/edits", json=body)
    reply.raise_for_status()
    job_id = reply.json()["job_id"]
    during: list[float] = []
    started = time.perf_counter()
    while client.get(f"/v1/jobs/{job_id}").json()["finished_at"] is None:
        during.append(_generate(client, len(during)))
    job = _wait(client, job_id)
    return {
        "edits": len(cases),
        "job_status": job["status"],
        "job_seconds": round(time.perf_counter() - started, 2),
        "idle": _summary(idle),
        "during_edit": _summary(during),
        "slowest_ratio": round(max(during) / max(idle), 2) if during else None,
        "floor": "slowest during the edit <= 3x the slowest idle",
    }


def served_rome(client: httpx.Client, cases: list[EditRequest]) -> dict:
    served, bare, guard = [], [], []
    for case in cases:
        started = time.perf_counter()
        reply = client.post("/v1/edits", json=_edit_body(case, "rome"))
        reply.raise_for_status()
        job = _wait(client, reply.json()["job_id"])
        served.append(time.perf_counter() - started)
        edit = client.get(f"/v1/edits/{job['edit_ids'][0]}").json()
        diagnostics = edit["diagnostics"] or {}
        bare.append(float(diagnostics.get("seconds", {}).get("total", "nan")))
        guard.append(float((diagnostics.get("guard") or {}).get("seconds", 0.0)))
    return {
        "edits": len(cases),
        "served_seconds": _summary(served) | {"median": round(statistics.median(served), 3)},
        "bare_seconds": _summary(bare) | {"median": round(statistics.median(bare), 3)},
        "guard_seconds": _summary(guard) | {"median": round(statistics.median(guard), 3)},
        "median_ratio": round(statistics.median(served) / statistics.median(bare), 2),
        "floor": "served (POST to applied, guard included) <= 1.5x bare, medians",
    }


def load_phase(url: str, clients: int, seconds: float, edits: list[EditRequest] | None) -> dict:
    latencies: list[float] = []
    stop = threading.Event()
    lock = threading.Lock()
    accepted: list[int] = []

    def generator(index: int) -> None:
        with httpx.Client(base_url=url, timeout=600) as client:
            n = index
            while not stop.is_set():
                took = _generate(client, n, 16)
                n += 1
                with lock:
                    latencies.append(took)

    def editor(every: float) -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            n = 0
            while edits and not stop.wait(every):
                reply = client.post("/v1/edits", json=_edit_body(edits[n % len(edits)], "rome"))
                n += 1
                if reply.status_code == 202:
                    accepted.append(reply.json()["job_id"])

    threads = [threading.Thread(target=generator, args=(i,)) for i in range(clients)]
    if edits is not None:
        threads.append(threading.Thread(target=editor, args=(LOAD_EDIT_EVERY,)))
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    return {"latency_s": _summary(latencies), "edits_posted": len(accepted)}


LOAD_EDIT_EVERY = 5.0
PHASES = ("memit", "rome", "load")


def main() -> None:
    global LOAD_EDIT_EVERY
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--idle-requests", type=int, default=30)
    parser.add_argument("--memit-edits", type=int, default=10)
    parser.add_argument("--rome-edits", type=int, default=20)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--edit-every", type=float, default=5.0)
    parser.add_argument(
        "--phases", nargs="+", choices=PHASES, default=list(PHASES), help="what to measure"
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    LOAD_EDIT_EVERY = args.edit_every
    cases = load_counterfact(DATA / "counterfact-train.json", 121)
    memit_cases = cases[: args.memit_edits]
    rome_cases = cases[args.memit_edits : args.memit_edits + args.rome_edits]
    load_cases = cases[100:120]
    result: dict = {"model": args.model}
    with running_server(args.model) as url, httpx.Client(base_url=url, timeout=3600) as client:
        for index in range(4):  # warm-up: the first calls pay one-time costs
            _generate(client, index)
        warm = client.post("/v1/edits", json=_edit_body(cases[120], "rome")).json()
        _wait(client, warm["job_id"])  # statistics and prefixes, once
        if "memit" in args.phases:
            result["memit_batch"] = during_memit(client, memit_cases, args.idle_requests)
        if "rome" in args.phases:
            result["served_rome"] = served_rome(client, rome_cases)
        if "load" in args.phases:
            result["load"] = {
                "clients": args.clients,
                "seconds": args.seconds,
                "edit_every": args.edit_every,
                "idle": load_phase(url, args.clients, args.seconds, None),
                "with_edits": load_phase(url, args.clients, args.seconds, load_cases),
            }
    write_report(result, args.out)


if __name__ == "__main__":
    main()
