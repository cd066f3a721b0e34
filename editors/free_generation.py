"""Free-generation success: what a user of /v1/generate sees, beside the teacher-forced scores.

Teacher forcing feeds the gold answer's own prefix back in, so a model that would never say
the answer unprompted can still score it token by token. Here the model answers on its own:
greedy decoding from the prompt for the answer's length plus a few tokens, and the
continuation is judged by one rule.

The rule (`states_answer`): lower-case both texts, turn every run of characters that are not
letters or digits into one space, and split into words; drop at most two leading articles
("the", "a", "an") from each; the continuation states the answer when its first words are the
answer's words, in order. So " English." and " the English language" state "English", while
" French, and later English" does not: an answer named after another object is not credited.
"""

from __future__ import annotations

import re
import unicodedata

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .requests import with_leading_space
from .tokens import encode_answer

ARTICLES = frozenset({"the", "a", "an"})
MAX_ARTICLES = 2
SLACK_TOKENS = 4  # room for an article, a quote or a space token before the answer
NON_WORD = re.compile(r"[\W_]+", re.UNICODE)


def answer_words(text: str) -> list[str]:
    """`text` as the rule compares it: normalised words, leading articles dropped."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    words = NON_WORD.sub(" ", folded).split()
    dropped = 0
    while words and words[0] in ARTICLES and dropped < MAX_ARTICLES and len(words) > 1:
        words, dropped = words[1:], dropped + 1
    return words


def states_answer(continuation: str, answer: str) -> bool:
    """Whether `continuation` begins by stating `answer` (the module's rule)."""
    expected = answer_words(answer)
    return bool(expected) and answer_words(continuation)[: len(expected)] == expected


def gives_same_answer(before: str, after: str, answer: str) -> bool:
    """Whether `after` gives the answer `before` gave: their first words agree, as many
    words as the stated `answer` has (the answer the model gave, right or wrong)."""
    count = len(answer_words(answer))
    return answer_words(before)[:count] == answer_words(after)[:count]


def answer_budget(tok: PreTrainedTokenizerBase, answer: str) -> int:
    """Tokens to generate for `answer`: its own length plus the slack."""
    return len(encode_answer(tok, with_leading_space(answer))) + SLACK_TOKENS


def continuations(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompts: list[str],
    budgets: list[int],
    chunk: int = 64,
) -> list[str]:
    """Greedy continuations of `prompts`, each cut to its own token budget; decoded in
    batches of `chunk` prompts of similar length."""
    from .metrics import greedy_continuations  # metrics imports this module

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts: dict[int, str] = {}
    for start in range(0, len(order), chunk):
        indices = order[start : start + chunk]
        steps = max(budgets[i] for i in indices)
        tokens = greedy_continuations(model, tok, [prompts[i] for i in indices], steps)
        for i, ids in zip(indices, tokens, strict=True):
            texts[i] = tok.decode(ids[: budgets[i]], skip_special_tokens=True)
    return [texts[i] for i in range(len(prompts))]
