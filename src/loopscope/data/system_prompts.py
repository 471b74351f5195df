"""System-prompt conditions for the orbit/slider rates of Blayney et al. (2026) App. C (spec §2).

The paper tests four conditions and prints none of the prompt bodies:

- `none`: the question alone (the main-text setting).
- `long-persona`: the system prompt Geiping et al. (2025) used for their orbit plots. RECONSTRUCTED: we use
  the Huginn persona from the example/evaluation scripts of the recurrent-pretraining code, which the spec
  marks as "very likely" the one meant.
- `long-persona-padded`: the same number of tokens as `long-persona`, every one the tokenizer's pad token
  (tests whether sequence length alone explains the effect).
- `short-math`: the prompt Geiping et al. used for GSM8K evaluation. RECONSTRUCTED from the Huginn README.

A condition is applied to a question as token ids: `[BOS] + system tokens + question tokens`, where the
system tokens are the prompt text followed by a blank line, encoded on their own (so the padded condition
replaces exactly those tokens). Encoding the prefix separately changes nothing for byte-level BPE here: the
pre-tokenizer always splits after a newline.
"""

from __future__ import annotations

from dataclasses import dataclass

from loopscope.errors import InputError

HUGINN_PERSONA = (
    "You are Huginn, an AI assistant who embodies careful thought and deliberation. Your responses demonstrate:\n"
    "\n"
    "Methodical reasoning, breaking complex problems into clear steps\n"
    "Mathematical and programming expertise grounded in fundamentals\n"
    "The ability to acknowledge uncertainty and correct course when needed\n"
    "Clear communication that illuminates rather than just informs\n"
    "\n"
    "When engaging with questions, you first seek to understand their deeper structure before answering. "
    "Like your namesake who flew the nine worlds seeking wisdom, you explore problems from multiple angles, "
    "helping users build genuine understanding rather than providing shallow answers.\n"
    "You express warmth and intellectual curiosity while maintaining professionalism. When faced with errors "
    "or confusion, you model honest reflection and careful correction. Your goal is not just to provide "
    "answers, but to help humans develop clearer, deeper thinking."
)
SHORT_MATH = "You are a helpful assistant that can assist users with mathematical reasoning."
SEPARATOR = "\n\n"  # between the system prompt and the question


@dataclass(frozen=True)
class SystemPromptCondition:
    """One condition: the system text (None = no system prompt), or `pad_like`: the name of the condition
    whose token count is filled with pad tokens. `reconstructed` is True when the paper does not print the
    text and ours is inferred (see the module docstring)."""

    name: str
    text: str | None
    reconstructed: bool
    description: str
    pad_like: str | None = None


SYSTEM_PROMPT_CONDITIONS: dict[str, SystemPromptCondition] = {
    c.name: c
    for c in (
        SystemPromptCondition("none", None, False, "no system prompt (the paper's main-text setting)"),
        SystemPromptCondition(
            "long-persona", HUGINN_PERSONA, True,
            "Huginn persona system prompt (reconstructed from the recurrent-pretraining example scripts)",
        ),
        SystemPromptCondition(
            "long-persona-padded", None, True,
            "as many pad tokens as the long persona prompt has tokens (length control)", pad_like="long-persona",
        ),
        SystemPromptCondition(
            "short-math", SHORT_MATH, True, "short maths assistant prompt (reconstructed from the Huginn README)",
        ),
    )
}


def get_condition(name: str) -> SystemPromptCondition:
    if name not in SYSTEM_PROMPT_CONDITIONS:
        raise InputError(f"system-prompt condition {name!r} is unknown; choose one of "
                         f"{sorted(SYSTEM_PROMPT_CONDITIONS)}")
    return SYSTEM_PROMPT_CONDITIONS[name]


def system_token_ids(condition: SystemPromptCondition | str, tokenizer) -> list[int]:
    """Token ids the condition puts between BOS and the question (empty for `none`)."""
    cond = get_condition(condition) if isinstance(condition, str) else condition
    if cond.pad_like is not None:
        if tokenizer.pad_token_id is None:
            raise InputError(f"condition {cond.name!r} needs a pad token, and this tokenizer has none")
        n = len(system_token_ids(cond.pad_like, tokenizer))
        return [tokenizer.pad_token_id] * n
    if cond.text is None:
        return []
    return list(tokenizer(cond.text + SEPARATOR, add_special_tokens=False)["input_ids"])


def apply_condition(question: str, condition: SystemPromptCondition | str, tokenizer) -> list[int]:
    """Token ids of `question` under `condition`: [BOS] + system tokens + question tokens.

    BOS is included only if the tokenizer defines one. The padded condition has exactly the long persona's
    token count, so the two differ only in the ids of the system positions.
    """
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    question_ids = list(tokenizer(question, add_special_tokens=False)["input_ids"])
    if not question_ids:
        raise InputError("the question is empty; give a non-empty question")
    return bos + system_token_ids(condition, tokenizer) + question_ids
