"""Every bench result the docs name is committed: a figure must be checkable."""

from __future__ import annotations

import re
import subprocess

from .service_support import ROOT


def test_every_bench_result_the_docs_name_is_committed():
    tracked = set(
        subprocess.run(
            ["git", "ls-files", "bench/results"], cwd=ROOT, capture_output=True, text=True
        ).stdout.split()
    )
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    named = {
        (doc.name, path)
        for doc in docs
        for path in re.findall(r"bench/results/[\w.-]+\.json", doc.read_text(encoding="utf-8"))
    }
    assert named, "the docs should cite at least one committed result"
    missing = sorted((doc, path) for doc, path in named if path not in tracked)
    assert not missing, missing
