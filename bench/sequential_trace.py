"""Trace a sequential editing run batch by batch; prints JSON lines.

    python bench/sequential_trace.py --method alphaedit -n 500 --samples 8000 --scores-every 100

After every batch: the probe perplexity, the mean target probability the method reported,
the batch's own P(target) on the edited weights (bare prompts: whether the edits landed),
the share of its target distance each request has left after the sweeps (spread methods),
and per edited matrix the accumulated drift |W - W0| / |W0|. Every `--scores-every` edits,
the CounterFact scores of all cases edited so far. The last line ablates the drift layer by
layer: the probe perplexity without one matrix's accumulated change ("without") and with
only that change ("only"), which says where the damage sits. `editserve eval` measures the
protocol itself; this is for finding out why a run degrades. Tune on --split train.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.ready_editor import ready_editor
from editors import apply_patch
from editors.core.answers import target_probabilities
from editors.datasets import load_counterfact
from editors.evaluation.probe import PROBE_TEXT
from editors.hparams import parse_overrides
from editors.metrics import evaluate, locality_reference, perplexity
from editors.patch import Patch, dense_of

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "counterfact"


def accumulate(drift: dict[str, torch.Tensor], patch: Patch) -> None:
    for name, delta in patch.deltas.items():
        change = dense_of(delta).float()
        drift[name] = drift[name] + change if name in drift else change


def shifted(model: torch.nn.Module, name: str, change: torch.Tensor, sign: float) -> None:
    weight = model.get_parameter(name)
    with torch.no_grad():
        weight.add_(sign * (change if change.shape == weight.shape else change.T))


def layer_ablation(model, tok, drift: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Probe perplexity without each matrix's drift, and with only it (model left as is)."""
    rows: dict[str, dict[str, float]] = {}
    for name, change in drift.items():
        shifted(model, name, change, -1.0)
        rows[name] = {"without": perplexity(model, tok, PROBE_TEXT)}
        shifted(model, name, change, 1.0)
    for name in drift:
        shifted(model, name, drift[name], -1.0)
    for name, change in drift.items():
        shifted(model, name, change, 1.0)
        rows[name]["only"] = perplexity(model, tok, PROBE_TEXT)
        shifted(model, name, change, -1.0)
    for name in drift:
        shifted(model, name, drift[name], 1.0)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", default="alphaedit")
    parser.add_argument("-n", "--count", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--split", default="train", choices=["train", "edit", "val"])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--scores-every", type=int, default=100)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args()
    overrides = parse_overrides(args.set)

    editor, _ = ready_editor(args.model, args.method, overrides, args.samples)
    model, tok = editor.model, editor.tok
    requests = load_counterfact(DATA / f"counterfact-{args.split}.json", args.count)
    reference = locality_reference(model, tok, requests)
    original: dict[str, float] = {}  # |W0| of each matrix, read before its first change
    history: list[Patch] = []
    drift: dict[str, torch.Tensor] = {}
    size = args.batch_size
    for start in tqdm(range(0, len(requests), size), desc="sequential batches", file=sys.stderr):
        batch = requests[start : start + size]
        result = editor.compute(batch, args.method, overrides, history=history)
        for name in result.patch.deltas:
            original.setdefault(name, float(model.get_parameter(name).detach().norm()))
        apply_patch(model, result.patch)
        history.append(result.patch)
        accumulate(drift, result.patch)
        done = start + len(batch)
        row = {
            "edits": done,
            "perplexity": perplexity(model, tok, PROBE_TEXT),
            "prob_after": sum(result.diagnostics.prob_after) / len(batch),
            "landed": [round(p, 4) for p in target_probabilities(model, tok, batch, [""])],
            "gap_left": [round(g, 4) for g in result.diagnostics.extra.get("target_gap_left", [])],
            "drift": {n: round(float(d.norm()) / original[n], 4) for n, d in drift.items()},
        }
        if done % args.scores_every == 0 or done == len(requests):
            row["scores"] = evaluate(model, tok, requests[:done], reference[:done])
        print(json.dumps(row), flush=True)
    print(json.dumps({"ablation": layer_ablation(model, tok, drift)}), flush=True)


if __name__ == "__main__":
    main()
