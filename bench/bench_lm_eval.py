"""lm-evaluation-harness against the served model, before and after one edit; prints JSON.

    python bench/bench_lm_eval.py --out bench/results/lm-eval-edit.json

1. Builds a local multiple-choice task from `--cases` CounterFact train facts: the question
   is the fact's prompt with its subject ("Toko Yasuda, the"), the choices are the true object
   (the gold answer) and the counterfactual `target_new`. It is a JSONL file and a task YAML
   (`dataset_path: json`) in a temporary folder, so nothing is downloaded.
2. Starts `editserve serve` (bench/serving.py: open mode, fresh SQLite ledger, free port) and
   runs lm-eval's `local-completions` model against its `/v1/completions`: each choice is one
   log-likelihood request (token ids, `echo` with `logprobs`), scored with the served model's
   own tokenizer folder (`tokenizer_backend=huggingface`, offline).
3. POSTs one edit (`--method`, ROME by default) that makes a fact the model answers correctly
   answer its counterfactual target, waits until it is applied, and runs lm-eval again: the
   edited fact's chosen answer, and every other fact whose answer changed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.provenance import ROOT, provenance
from bench.serving import running_server
from editors.datasets import load_counterfact
from editors.models import resolve_model_folder
from editors.requests import EditRequest

DATA = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact-train.json"
TASK = "counterfact_train_mc"
OUT = ROOT / "bench" / "results" / "lm-eval-edit.json"


# -- the task -----------------------------------------------------------------------------


def task_docs(cases: list[EditRequest]) -> list[dict[str, Any]]:
    """One document per fact: choice 0 is the true object (gold), choice 1 `target_new`."""
    return [
        {
            "case_id": case.case_id,
            "subject": case.subject,
            "question": case.text,
            "choices": [case.target_true, case.target_new],
            "label": 0,
        }
        for case in cases
    ]


def task_yaml(data_file: Path, cache_dir: Path) -> str:
    """lm-eval's task config: a local JSON file through the `json` builder, scored by the
    log-likelihood of each choice after the question (joined with lm-eval's default " ")."""
    config = {
        "task": TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}, "cache_dir": str(cache_dir)},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "label",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    return "".join(f"{key}: {json.dumps(value)}\n" for key, value in config.items())  # JSON is YAML


def write_task(folder: Path, cases: list[EditRequest]) -> Path:
    data_file = folder / "facts.jsonl"
    data_file.write_text("".join(json.dumps(doc) + "\n" for doc in task_docs(cases)))
    (folder / f"{TASK}.yaml").write_text(task_yaml(data_file, folder / "datasets-cache"))
    return data_file


# -- lm-eval ------------------------------------------------------------------------------


def run_lm_eval(
    folder: Path, url: str, model: str, tokenizer: str, batch_size: int
) -> dict[str, Any]:
    """One lm-eval run of the task against the server: accuracy and each document's choice."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    started = time.perf_counter()
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={
            "model": model,
            "base_url": f"{url}/v1/completions",
            "tokenizer": tokenizer,
            "tokenizer_backend": "huggingface",
            "tokenized_requests": True,
            "max_retries": 1,
        },
        tasks=[TASK],
        batch_size=batch_size,
        task_manager=TaskManager(include_path=str(folder), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
    )
    if results is None:
        raise RuntimeError("lm-eval returned no results")
    choices = {}
    for sample in results["samples"][TASK]:
        scores = [float(response[0]) for response in sample["filtered_resps"]]
        choices[sample["doc_id"]] = {
            "choice": max(range(len(scores)), key=scores.__getitem__),
            "loglikelihoods": [round(score, 4) for score in scores],
        }
    return {
        "accuracy": results["results"][TASK]["acc,none"],
        "docs": [choices[index] for index in sorted(choices)],
        "seconds": round(time.perf_counter() - started, 2),
    }


# -- the edit -----------------------------------------------------------------------------


def apply_edit(client: httpx.Client, case: EditRequest, method: str) -> dict[str, Any]:
    """POST the edit and wait until its job ends; the job, with the seconds it took."""
    edit = {"prompt": case.prompt, "subject": case.subject, "target_new": case.target_new}
    started = time.perf_counter()
    reply = client.post("/v1/edits", json={"edit": edit, "method": method})
    reply.raise_for_status()
    job_id = reply.json()["job_id"]
    while (job := client.get(f"/v1/jobs/{job_id}").json())["finished_at"] is None:
        time.sleep(0.2)
    job["seconds"] = round(time.perf_counter() - started, 2)
    return job


def pick_edit(docs: list[dict[str, Any]], requested: int | None) -> int:
    """The requested document, else the first the model answers with its true object."""
    if requested is not None:
        return requested
    for index, doc in enumerate(docs):
        if doc["choice"] == 0:
            return index
    raise RuntimeError("the model answers no fact with its true object")


def compare(
    cases: list[EditRequest], before: dict[str, Any], after: dict[str, Any], edited: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The edited fact's choices, and every other fact whose choice changed."""

    def answer(index: int, run: dict[str, Any]) -> str | None:
        case = cases[index]
        return (case.target_true, case.target_new)[run["docs"][index]["choice"]]

    case = cases[edited]
    edited_case = {
        "index": edited,
        "case_id": case.case_id,
        "subject": case.subject,
        "prompt": case.text,
        "true_object": case.target_true,
        "target_new": case.target_new,
        "choice_before": answer(edited, before),
        "choice_after": answer(edited, after),
        "flipped": answer(edited, before) == case.target_true
        and answer(edited, after) == case.target_new,
        "loglikelihoods_before": before["docs"][edited]["loglikelihoods"],
        "loglikelihoods_after": after["docs"][edited]["loglikelihoods"],
    }
    changed = [
        {
            "index": index,
            "case_id": cases[index].case_id,
            "prompt": cases[index].text,
            "choice_before": answer(index, before),
            "choice_after": answer(index, after),
        }
        for index in range(len(cases))
        if index != edited and before["docs"][index]["choice"] != after["docs"][index]["choice"]
    ]
    others = {
        "count": len(changed),
        "of": len(cases) - 1,
        "to_target_new": sum(c["choice_after"] == cases[c["index"]].target_new for c in changed),
        "to_true_object": sum(c["choice_after"] == cases[c["index"]].target_true for c in changed),
        "cases": changed,
    }
    return edited_case, others


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--cases", type=int, default=30, help="facts in the task")
    parser.add_argument("--start", type=int, default=0, help="first CounterFact train case")
    parser.add_argument(
        "--edit-index", type=int, help="document to edit (default: the first answered right)"
    )
    parser.add_argument("--method", default="rome")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per request")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before lm-eval imports datasets
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    started = time.perf_counter()
    cases = load_counterfact(DATA, args.cases, args.start)
    if args.edit_index is not None and not 0 <= args.edit_index < len(cases):
        parser.error(f"--edit-index must be below {len(cases)}")
    with (
        tempfile.TemporaryDirectory(prefix="editserve-lm-eval-") as temp,
        running_server(args.model) as url,
        httpx.Client(base_url=url, timeout=3600) as client,
    ):
        folder = Path(temp)
        data_file = write_task(folder, cases)
        yaml_text = (folder / f"{TASK}.yaml").read_text().replace(temp, "<tmp>")
        tokenizer = str(resolve_model_folder(args.model))  # converted by the server's start
        version_before = client.get("/v1/model").json()["version"]
        before = run_lm_eval(folder, url, args.model, tokenizer, args.batch_size)
        edited = pick_edit(before["docs"], args.edit_index)
        job = apply_edit(client, cases[edited], args.method)
        if job["status"] != "applied":
            raise RuntimeError(f"the edit was not applied: {job['status']}: {job['error']}")
        version_after = client.get("/v1/model").json()["version"]
        after = run_lm_eval(folder, url, args.model, tokenizer, args.batch_size)
        if client.get("/v1/model").json()["version"] != version_after:
            raise RuntimeError("the model version changed during the second run")
    edited_case, others = compare(cases, before, after, edited)
    result = {
        "lm_eval_version": importlib.metadata.version("lm-eval"),
        "model": args.model,
        "lm_eval_model": {
            "name": "local-completions",
            "endpoint": "/v1/completions",
            "requests": "token ids; echo with logprobs=1, max_tokens=1 (log-likelihoods)",
            "tokenizer": "the served model's folder, tokenizer_backend=huggingface",
            "batch_size": args.batch_size,
        },
        "task": {
            "name": TASK,
            "size": len(cases),
            "source": str(DATA.relative_to(ROOT.parent)),
            "cases": f"{args.start}..{args.start + len(cases) - 1}",
            "choices": "[true object (gold), target_new]",
            "data_file": data_file.name,
            "yaml": yaml_text,
        },
        "model_version_before": version_before,
        "model_version_after": version_after,
        "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"],
        "edit": {
            "method": args.method,
            "job_id": job["id"],
            "status": job["status"],
            "seconds": job["seconds"],
            "edit_ids": job["edit_ids"],
        },
        "edited_case": edited_case,
        "other_cases_changed": others,
        "seconds": {
            "lm_eval_before": before["seconds"],
            "lm_eval_after": after["seconds"],
            "edit": job["seconds"],
            "total": round(time.perf_counter() - started, 2),
        },
        "provenance": provenance(),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
