"""Rollback, the ledger head query and start-up replay on an N-version ledger; prints JSON
figures.

    python -m bench.bench_ledger --versions 200 --out bench/results/ledger-200.json

The ledger is built through the engine's own commit path (patch blob, weight checksum,
version row) from ROME-shaped rank-one patches with random factors on the layer ROME edits
(`--layers 10` spreads each over ten layers, like MEMIT): rollback and replay re-apply stored
patches and never recompute an edit, so the patch contents do not change these timings.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.provenance import write_report
from editors.model_spec import num_layers
from editors.patch import FactoredDelta, Patch
from service.config import Settings
from service.ledger.schema import JobKind, VersionKind
from service.ledger.store import NewEdit, NewVersion
from service.state import ServiceState


def _patch(engine, layers: list[int], generator: torch.Generator) -> Patch:
    deltas = {}
    for layer in layers:
        param = engine.model.get_parameter(engine.editor.spec.weight_name(layer))
        rows, cols = param.shape
        left = torch.randn(rows, 1, generator=generator) * 1e-3
        deltas[engine.editor.spec.weight_name(layer)] = FactoredDelta(
            left, torch.randn(cols, 1, generator=generator)
        )
    return Patch("rome", deltas)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--versions", type=int, default=200)
    parser.add_argument("--layers", type=int, default=1, help="edited layers per patch")
    parser.add_argument("--rollbacks", type=int, default=10)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--database-url", help="default: SQLite in a temporary folder")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="editserve-bench-"))
    settings = Settings(model=args.model, data_dir=folder, database_url=args.database_url)
    state = ServiceState.create(settings)
    began = time.perf_counter()
    state.boot(run_worker=False)
    assert state.engine is not None, state.boot_error
    engine = state.engine
    n_layers = num_layers(engine.model, engine.editor.spec)
    first = engine.editor.hparams("rome").edited_layers(n_layers)[0]
    layers = [min(n_layers - 1, first + i) for i in range(args.layers)]
    generator = torch.Generator().manual_seed(0)
    request = {"prompt": "{} is", "subject": "bench", "target_new": "fast"}
    for _ in tqdm(range(args.versions), desc="building the ledger"):
        job, (edit_id,) = state.ledger.accept_edits([NewEdit(request, "rome", {})])
        engine.jobs.record(
            job.id,
            NewVersion(VersionKind.edit, parent=engine.version, checksum="", edit_ids=(edit_id,)),
            _patch(engine, layers, generator),
            [edit_id],
        )
    head = engine.version
    rollback_seconds = []
    targets = random.Random(0).sample(range(head), min(args.rollbacks, head))
    for target in tqdm(targets, desc="rollbacks"):
        job = state.ledger.accept_job(JobKind.rollback, {"to_version": target})
        started = time.perf_counter()
        engine.run_job(job.id)
        rollback_seconds.append(time.perf_counter() - started)
        assert engine.checksum == state.ledger.version(target).checksum
    registry = state.metrics.registry
    swaps = registry.get_sample_value("editserve_swap_seconds_count") or 0
    swap_mean = (registry.get_sample_value("editserve_swap_seconds_sum") or 0) / max(swaps, 1)
    state.close()

    restarted = ServiceState.create(settings)
    restarted.boot(run_worker=False)
    assert restarted.engine is not None, restarted.boot_error
    replay = restarted.engine.state.seconds
    restarted.close()
    report = {
        "model": args.model,
        "versions": head,
        "layers_per_patch": args.layers,
        "rollback_seconds": {
            "median": statistics.median(rollback_seconds),
            "max": max(rollback_seconds),
            "count": len(rollback_seconds),
        },
        "served_swap_seconds": {"mean": swap_mean, "count": int(swaps)},
        "startup_beyond_model_load_seconds": {
            "hash_base": replay["hash_base"],
            "statistics_setup": replay["statistics_setup"],
            "replay_and_verify": replay["replay"],
            "total": sum(replay.values()),
        },
        "first_boot_seconds": round(time.perf_counter() - began, 1),
    }
    write_report(report, args.out)


if __name__ == "__main__":
    main()
