"""Render bench/bench_edits.py JSON results as the README's markdown table.

python bench/figures_table.py bench/results/*.json
"""

from __future__ import annotations

import json
import sys


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def main(paths: list[str]) -> None:
    print(
        "| method | mode | cases | s/edit (median) | batch total s | reliability | "
        "generalization | locality | efficacy | paraphrase | neighborhood (unedited) | "
        "peak RSS MB |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            r = json.load(handle)
        m, b = r["metrics"], r["baseline"]
        batch = f"{r['seconds_total']:.0f}" if r["mode"] == "batch" else "–"
        print(
            f"| {r['method']} | {r['mode']} | {r['cases']} | "
            f"{r['seconds_per_edit_median']:.2f} | {batch} | {pct(m['reliability'])} | "
            f"{pct(m['generalization'])} | {pct(m['locality'])} | {pct(m['efficacy'])} | "
            f"{pct(m['paraphrase'])} | {pct(m['neighborhood'])} ({pct(b['neighborhood'])}) | "
            f"{r['peak_rss_mb']:.0f} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
