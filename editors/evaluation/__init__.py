"""Dataset evaluation of an editing method under the single, batch and sequential
protocols, reporting each metric against the unedited model's."""

from .plan import PROTOCOLS, EvaluationPlan, EvaluationRow, EvaluationStopped
from .runner import Evaluation, run_evaluation
from .summary import summarize

__all__ = [
    "PROTOCOLS",
    "Evaluation",
    "EvaluationPlan",
    "EvaluationRow",
    "EvaluationStopped",
    "run_evaluation",
    "summarize",
]
