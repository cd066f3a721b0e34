"""The edit request: which fact to rewrite, and the prompts used to judge it."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import EmptyTargetError, SubjectNotInPromptError


@dataclass(frozen=True)
class EditRequest:
    """Rewrite `prompt.format(subject)` -> `target_new`.

    `prompt` holds `{}` where the subject goes; a prompt that spells the subject out is
    accepted and its first occurrence becomes `{}`. The evaluation fields are optional.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrases: tuple[str, ...] = ()
    locality: tuple[tuple[str, str], ...] = ()  # (prompt, answer) pairs that must not change
    portability: tuple[tuple[str, str], ...] = ()
    case_id: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.subject or not self.subject.strip():
            raise EmptyTargetError("subject is empty", field="subject")
        if not self.target_new or not self.target_new.strip():
            raise EmptyTargetError("target_new is empty", field="target_new")
        if self.target_true is not None and not self.target_true.strip():
            raise EmptyTargetError("target_true is empty", field="target_true")
        template = self.prompt
        if "{}" not in template:
            if self.subject not in template:
                raise SubjectNotInPromptError(
                    f"prompt {self.prompt!r} contains neither '{{}}' nor the subject "
                    f"{self.subject!r}",
                    field="prompt",
                )
            template = template.replace(self.subject, "{}", 1)
        if template.count("{}") != 1:
            raise SubjectNotInPromptError(
                f"prompt {self.prompt!r} must hold exactly one '{{}}'", field="prompt"
            )
        object.__setattr__(self, "prompt", template)

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject)

    @property
    def target(self) -> str:
        """target_new as it continues the prompt (with its leading space)."""
        return with_leading_space(self.target_new)


def with_leading_space(answer: str) -> str:
    return answer if answer.startswith(" ") else " " + answer
