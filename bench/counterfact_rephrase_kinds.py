"""What the CounterFact split's `rephrase_prompt` holds: a paraphrase or a generation prompt.

    python bench/counterfact_rephrase_kinds.py --out bench/results/counterfact-rephrase-kinds.json

CounterFact (Meng et al., 2022) gives each case two paraphrase prompts, each a paraphrase of
the fact's prompt after a generated sentence ("Shayna does this and Yossel goes still and
dies. Danielle Darrieux, a native"), and about ten generation prompts, which merely mention
the subject ("Danielle Darrieux's greatest strength is") and are meant for judging
consistency of longer text, not for stating the object. The EasyEdit-format split keeps one
`rephrase_prompt` per case. This script counts how many of them carry the generated
sentence before the subject, the mark of a paraphrase prompt; about 1 in 6 would mean the
field was drawn from all twelve prompts of a case, so most "paraphrases" are generation
prompts, many of which do not ask for the object at all.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.provenance import write_report

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "counterfact"
SENTENCE_ENDS = (".", "?", "!", "\n")


def is_paraphrase_prompt(rephrase: str, subject: str) -> bool:
    """Whether a sentence ends before the subject: CounterFact's paraphrase prompts all
    start with a generated sentence, its generation prompts never do."""
    at = rephrase.find(subject)
    return at > 0 and any(mark in rephrase[:at] for mark in SENTENCE_ENDS)


def count(cases: list[dict]) -> dict[str, object]:
    marked = [is_paraphrase_prompt(c["rephrase_prompt"], c["subject"]) for c in cases]
    return {
        "cases": len(cases),
        "paraphrase_prompts": sum(marked),
        "share": sum(marked) / len(cases) if cases else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--first", type=int, default=200, help="also count the first N cases")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    report: dict[str, object] = {"expected_share_if_drawn_from_all_12": 2 / 12, "splits": {}}
    for split in ("train", "edit", "val"):
        cases = json.loads((DATA / f"counterfact-{split}.json").read_text())
        report["splits"][split] = {  # type: ignore[index]
            "all": count(cases),
            f"first_{args.first}": count(cases[: args.first]),
            "first_five": [c["rephrase_prompt"] for c in cases[:5]],
        }
    write_report(report, args.out)


if __name__ == "__main__":
    main()
