"""Bad input raises a specific error naming the problem, and leaves the model unchanged."""

from __future__ import annotations

import pytest
import torch

from editors import (
    EditRequest,
    EmptyTargetError,
    InvalidValueError,
    LayerOutOfRangeError,
    ModelSpec,
    SubjectNotInPromptError,
    SubjectNotLocatedError,
    UnknownHyperparameterError,
    UnknownMethodError,
    UnsupportedModelError,
    detect_spec,
)
from editors.editor import Editor
from editors.stats import FixedStatistics
from editors.tiny import tiny_random_model
from editors.tokens import subject_last_token

from .conftest import assert_same_weights, weights_snapshot


@pytest.fixture(scope="module")
def editor(gpt2_tok):
    model = tiny_random_model("llama", len(gpt2_tok))
    moments = {layer: torch.eye(256) for layer in range(4)}
    return Editor(model, gpt2_tok, FixedStatistics(moments))


GOOD = {"prompt": "The capital of {} is", "subject": "France", "target_new": "Rome"}


@pytest.mark.parametrize(
    ("changes", "error", "field"),
    [
        ({"prompt": "The capital city is"}, SubjectNotInPromptError, "prompt"),
        ({"prompt": "{} and {} are"}, SubjectNotInPromptError, "prompt"),
        ({"target_new": ""}, EmptyTargetError, "target_new"),
        ({"target_new": "   "}, EmptyTargetError, "target_new"),
        ({"subject": ""}, EmptyTargetError, "subject"),
    ],
)
def test_request_validation(changes, error, field):
    with pytest.raises(error) as err:
        EditRequest(**{**GOOD, **changes})
    assert err.value.field == field


def test_prompt_may_spell_the_subject_out():
    request = EditRequest(prompt="The capital of France is", subject="France", target_new="Rome")
    assert request.prompt == "The capital of {} is"
    assert request.text == "The capital of France is"


def test_subject_without_tokens_is_reported():
    with pytest.raises(SubjectNotLocatedError):
        subject_last_token(_Empty(), "abc", 0, 3)


class _Empty:
    def __call__(self, text, **_):
        return {"input_ids": [], "offset_mapping": []}


@pytest.mark.parametrize(
    ("method", "overrides", "error", "field"),
    [
        ("nope", None, UnknownMethodError, "method"),
        ("rome", {"learning_rate": 1.0}, UnknownHyperparameterError, "learning_rate"),
        ("rome", {"steps": "many"}, InvalidValueError, "steps"),
        ("rome", {"steps": 0}, InvalidValueError, "steps"),
        ("rome", {"layer": 99}, LayerOutOfRangeError, "layer"),
        ("rome", {"variant": "fancy"}, InvalidValueError, "variant"),
        ("rome", {"layer": [1, 2]}, InvalidValueError, "layer"),
        ("rome", {"lr": True}, InvalidValueError, "lr"),
        ("memit", {"layers": 3}, InvalidValueError, "layers"),
        ("memit", {"layers": [3, 1]}, InvalidValueError, "layers"),
        ("memit", {"layers": "1,2"}, InvalidValueError, "layers"),
        ("memit", {"layers": [1, 40]}, LayerOutOfRangeError, "layers"),
    ],
)
def test_bad_method_or_hyperparameters_change_nothing(editor, method, overrides, error, field):
    snapshot = weights_snapshot(editor.model)
    with pytest.raises(error) as err:
        editor.compute([EditRequest(**GOOD)], method, overrides)
    assert err.value.field == field
    assert_same_weights(editor.model, snapshot)


def test_unlocatable_target_changes_nothing(editor):
    snapshot = weights_snapshot(editor.model)

    class NoAnswerTokens:
        def __init__(self, tok):
            self.tok = tok

        def __getattr__(self, name):
            return getattr(self.tok, name)

        def __call__(self, text, add_special_tokens=True, **kw):
            if not add_special_tokens:
                return {"input_ids": []}
            return self.tok(text, add_special_tokens=add_special_tokens, **kw)

    broken = Editor(editor.model, NoAnswerTokens(editor.tok), editor.stats)
    with pytest.raises(SubjectNotLocatedError):
        broken.compute([EditRequest(**GOOD)], "rome", {"prefixes": 0})
    assert_same_weights(editor.model, snapshot)


def test_unknown_family_needs_a_spec(gpt2_tok):
    model = tiny_random_model("llama", len(gpt2_tok))
    model.config.model_type = "mystery"
    with pytest.raises(UnsupportedModelError, match="mystery"):
        detect_spec(model)
    spec = ModelSpec(family="mystery", layers="model.layers", mlp_out="mlp.down_proj")
    assert detect_spec(model, spec) is spec
    editor = Editor(model, gpt2_tok, FixedStatistics({1: torch.eye(256)}), spec=spec)
    result = editor.compute([EditRequest(**GOOD)], "rome", {"layer": 1, "steps": 2})
    assert set(result.patch.deltas) == {"model.layers.1.mlp.down_proj.weight"}
    with pytest.raises(UnsupportedModelError, match="no module"):
        Editor(
            model,
            gpt2_tok,
            FixedStatistics({}),
            spec=ModelSpec(family="mystery", layers="model.blocks", mlp_out="mlp.out"),
        ).compute([EditRequest(**GOOD)], "rome", {"layer": 1})


def test_command_line_overrides_parse_json_or_text():
    from editors.hparams import parse_overrides

    assert parse_overrides(["variant=original", "layers=[1, 2]", "lr=0.5"]) == {
        "variant": "original",
        "layers": [1, 2],
        "lr": 0.5,
    }
    with pytest.raises(InvalidValueError):
        parse_overrides(["steps"])
