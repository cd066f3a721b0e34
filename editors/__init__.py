"""EditServe editors: knowledge-editing algorithms on Hugging Face causal LMs.

Pure PyTorch + transformers: an editor reads the model and returns a Patch; applying it is
the caller's decision. Nothing here imports the service, a database or a queue.
"""

from .core.values import ProgressFn
from .errors import (
    EditError,
    EmptyTargetError,
    HyperparameterError,
    InvalidValueError,
    LayerOutOfRangeError,
    PatchError,
    StatisticsError,
    SubjectNotInPromptError,
    SubjectNotLocatedError,
    UnknownHyperparameterError,
    UnknownMethodError,
    UnsupportedModelError,
)
from .methods import METHODS, Method, get_method
from .model_spec import SPECS, ModelSpec, detect_spec
from .patch import AppliedPatch, FactoredDelta, Patch, apply_patch, revert_patch
from .requests import EditRequest
from .result import Diagnostics, EditResult
from .weight_state import WeightSnapshot, WeightState

__all__ = [
    "METHODS",
    "SPECS",
    "AppliedPatch",
    "Diagnostics",
    "EditError",
    "EditRequest",
    "EditResult",
    "EmptyTargetError",
    "FactoredDelta",
    "HyperparameterError",
    "InvalidValueError",
    "LayerOutOfRangeError",
    "Method",
    "ModelSpec",
    "Patch",
    "PatchError",
    "ProgressFn",
    "StatisticsError",
    "SubjectNotInPromptError",
    "SubjectNotLocatedError",
    "UnknownHyperparameterError",
    "UnknownMethodError",
    "UnsupportedModelError",
    "WeightSnapshot",
    "WeightState",
    "apply_patch",
    "detect_spec",
    "get_method",
    "revert_patch",
]
