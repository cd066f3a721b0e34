"""Nothing the project runs deserialises with pickle or loads remote code: weights, patches
and statistics go through safetensors (ROME .npz imports refuse object arrays)."""

from __future__ import annotations

import re

from .service_support import ROOT

UNSAFE = re.compile(
    r"import pickle|pickle\.loads?\(|torch\.load\(|allow_pickle\s*=\s*True"
    r"|trust_remote_code\s*=\s*True"
)


def test_no_pickle_or_remote_code_in_the_packages():
    offenders = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for package in ("editors", "service")
        for path in sorted((ROOT / package).rglob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if UNSAFE.search(line) and not line.lstrip().startswith("#")
    ]
    assert offenders == []


# OpenAI's request shapes name a `model`: it selects, and must be the served model's id (any
# other is a 404, test_openai_api.py); nothing is loaded from it
OPENAI_INPUTS = {"CompletionIn", "ChatCompletionIn"}


def test_no_route_takes_a_path_or_a_model_name():
    from service.api.app import create_app

    schema = create_app().openapi()
    inputs = {
        name: component
        for name, component in schema["components"]["schemas"].items()
        if name.endswith(("In", "Parameters", "PromptAnswer"))
    }
    assert len(inputs) >= 7 and set(inputs) >= OPENAI_INPUTS
    fields = {n for component in inputs.values() for n in component.get("properties", {})}
    assert not fields & {"model_path", "path", "file", "corpus", "stats_corpus"}
    service_fields = {
        n
        for name, component in inputs.items()
        if name not in OPENAI_INPUTS
        for n in component.get("properties", {})
    }
    assert "model" not in service_fields
