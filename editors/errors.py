"""Exceptions raised by the editors; each names the offending input."""

from __future__ import annotations


class EditError(ValueError):
    """Base class: the edit cannot be computed and the model was left unchanged."""

    field: str | None = None

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class SubjectNotInPromptError(EditError):
    """The prompt neither contains `{}` nor the subject text."""


class EmptyTargetError(EditError):
    """target_new (or subject) is empty or whitespace."""


class SubjectNotLocatedError(EditError):
    """The subject's tokens cannot be found in the tokenised prompt."""


class UnknownMethodError(EditError):
    """No editing method is registered under that name."""


class HyperparameterError(EditError):
    """Base class of the hyperparameter problems below; `field` names the hyperparameter."""


class UnknownHyperparameterError(HyperparameterError):
    """A hyperparameter override names a field the method does not have."""


class InvalidValueError(HyperparameterError):
    """A hyperparameter has a value of the wrong type, outside its allowed range (negative
    where it must be positive, past an upper bound, ...) or at odds with another one."""


class LayerOutOfRangeError(HyperparameterError):
    """A hyperparameter names a layer index the model does not have."""


class UnsupportedModelError(EditError):
    """The model family has no ModelSpec and none was given."""


class StatisticsError(EditError):
    """Second-moment statistics could not be computed, loaded or imported."""


class PatchError(EditError):
    """A patch does not fit the model, or its bytes fail verification."""
