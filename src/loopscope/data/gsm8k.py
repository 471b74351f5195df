"""GSM8K (Cobbe et al. 2021): the official jsonl files, the paper's fixed 256-question test subset, answer
extraction and exact-match scoring.

Blayney et al. (2026) §2 analyse "a fixed random subset of 256 examples from the GSM8k test split, the same for
every model and metric". The paper does not publish its indices, so ours are our own: `random.Random(0)`
samples 256 of the 1319 test indices (`gsm8k_subset_indices`); every loopscope tool uses these.

A GSM8K row is `{"question": str, "answer": str}`; the answer is a worked solution whose last line is
`#### N` (the final number). Nothing here touches the network unless `load_gsm8k` is called without a path
and the optional `datasets` package is installed.
"""

from __future__ import annotations

import random
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path

from loopscope.data.jsonl import read_jsonl
from loopscope.errors import InputError

SPLITS = ("train", "test")
TEST_SPLIT_SIZE = 1319  # rows in the official GSM8K test split
TEST_SUBSET_SIZE = 256  # Blayney et al. §2
TEST_SUBSET_SEED = 0
HF_DATASET = ("openai/gsm8k", "main")  # used only when no path is given and `datasets` is importable

# a number as written in GSM8K answers: optional sign, optional $, digits with thousands commas, decimals
_NUMBER = re.compile(r"-?\$?\s*(?:\d[\d,]*(?:\.\d+)?|\.\d+)")


def load_gsm8k(split: str, path: str | Path | None = None) -> list[dict[str, str]]:
    """Rows `{"question", "answer"}` of one GSM8K split.

    `path` is the split's jsonl file or a directory holding `{split}.jsonl` (the official layout). Without a
    path, the Hugging Face `datasets` hub is used if that optional package is installed; otherwise an
    InputError tells the user to pass `--data PATH`.
    """
    if split not in SPLITS:
        raise InputError(f"GSM8K split {split!r} does not exist; choose one of {SPLITS}")
    if path is None:
        return _load_from_hub(split)
    path = Path(path)
    file = path / f"{split}.jsonl" if path.is_dir() else path
    if not file.exists():
        raise InputError(
            f"GSM8K {split} file {file} does not exist; pass --data pointing at the official jsonl file or at "
            f"the directory holding train.jsonl and test.jsonl"
        )
    rows = []
    for n, row in read_jsonl(file, "; is this the official GSM8K jsonl?"):
        if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not isinstance(
            row.get("answer"), str
        ):
            raise InputError(f"{file}:{n} lacks string fields 'question' and 'answer'; is this GSM8K?")
        rows.append({"question": row["question"], "answer": row["answer"]})
    if not rows:
        raise InputError(f"{file} holds no GSM8K rows; give the official {split}.jsonl")
    return rows


def _load_from_hub(split: str) -> list[dict[str, str]]:
    try:
        import datasets  # optional, not a loopscope dependency
    except ImportError:
        raise InputError(
            "no GSM8K path given and the optional `datasets` package is not installed; pass --data PATH "
            "(the official GSM8K jsonl file, or the directory holding train.jsonl and test.jsonl)"
        ) from None
    ds = datasets.load_dataset(*HF_DATASET, split=split)
    return [{"question": r["question"], "answer": r["answer"]} for r in ds]


def gsm8k_subset_indices(
    n_total: int = TEST_SPLIT_SIZE, size: int = TEST_SUBSET_SIZE, seed: int = TEST_SUBSET_SEED
) -> list[int]:
    """The fixed analysis subset: `size` distinct indices of `range(n_total)`, sorted ascending.

    `random.Random(seed).sample` is stable across Python versions (≥ 3.2) for integer seeds, so the subset is
    the same everywhere. Defaults give the paper-sized subset of the GSM8K test split (§2).
    """
    if not 0 < size <= n_total:
        raise InputError(f"subset size {size} must be in [1, {n_total}] (the split has {n_total} rows)")
    return sorted(random.Random(seed).sample(range(n_total), size))


def gsm8k_test_subset(
    path: str | Path | None = None, size: int = TEST_SUBSET_SIZE, seed: int = TEST_SUBSET_SEED
) -> list[dict[str, str | int]]:
    """The fixed test subset as rows `{"index", "question", "answer"}` (index = row in the test split)."""
    rows = load_gsm8k("test", path)
    if len(rows) != TEST_SPLIT_SIZE:
        raise InputError(
            f"the GSM8K test split has {len(rows)} rows, not the official {TEST_SPLIT_SIZE}; the fixed subset is "
            "defined on the official file, pass that"
        )
    return [{"index": i, **rows[i]} for i in gsm8k_subset_indices(len(rows), size, seed)]


def document_text(row: dict) -> str:
    """Training/evaluation text of a row: question, newline, worked answer (the bundled tokenizer's format)."""
    return f"{row['question']}\n{row['answer']}"


def normalise_number(text: str) -> str | None:
    """Canonical string of the first number in `text`, or None if it has none.

    Removes `$`, thousands commas and spaces; keeps the sign; drops trailing zeros of decimals:
    "$1,000.50" → "1000.5", "-3" → "-3", "18.00" → "18", ".5" → "0.5", "-0" → "0".
    """
    match = _NUMBER.search(text)
    if match is None:
        return None
    raw = match.group(0).replace("$", "").replace(",", "").replace(" ", "")
    try:
        value = Decimal(raw)
    except InvalidOperation:
        return None
    if value == 0:
        return "0"
    out = format(value.normalize(), "f")
    return out


def extract_answer(text: str) -> str | None:
    """The normalised number after the last `####` in `text` (a GSM8K answer or a model's generation).

    None when there is no `####` or no number after it. Only the rest of that line is read.
    """
    if "####" not in text:
        return None
    tail = text.rsplit("####", 1)[1].split("\n", 1)[0]
    return normalise_number(tail)


def exact_match(prediction: str | None, reference: str | None) -> bool:
    """True when both are numbers and their normalised strings are equal (GSM8K's metric; Cobbe et al. 2021).

    Arguments are raw strings (a `#### N` line, a bare number); each is normalised with `extract_answer` if it
    holds `####`, else with `normalise_number`. A missing prediction is never correct.
    """

    def norm(s: str | None) -> str | None:
        if s is None:
            return None
        return extract_answer(s) if "####" in s else normalise_number(s)

    p, r = norm(prediction), norm(reference)
    return p is not None and p == r


def exact_match_accuracy(predictions: list[str | None], references: list[str]) -> float:
    """Fraction of exact matches: (1/N) Σ_i [norm(pred_i) = norm(ref_i)]."""
    if len(predictions) != len(references):
        raise InputError(f"{len(predictions)} predictions for {len(references)} references; give one per question")
    if not references:
        raise InputError("no references to score; give at least one question")
    return sum(exact_match(p, r) for p, r in zip(predictions, references)) / len(references)
