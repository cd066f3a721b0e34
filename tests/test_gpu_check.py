"""bench/gpu_check.py runs end to end on the CPU with a tiny Llama (the GPU run is the same
code with SmolLM2 and a random 8B Llama in bf16)."""

from __future__ import annotations

import json
import subprocess
import sys

from .conftest import ROOT


def test_the_gpu_check_runs_on_the_cpu_with_a_tiny_model_and_reports_every_figure(tmp_path):
    out = tmp_path / "gpu-check.json"
    done = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--tiny", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["provenance"]["commit"]
    (model,) = report["models"]
    for method in ("rome_1_edit", "memit_10_edits"):
        assert model[method]["second_s"] > 0
    for clients in ("1", "8", "32"):
        generation = model["generation"][clients]
        assert generation["tokens"] == 8 * int(clients)  # every request got its 8 tokens
        assert generation["tokens_per_s"] > 0
    assert model["peak_memory_gb"] > 0
