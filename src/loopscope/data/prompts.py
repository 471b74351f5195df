"""Prompt sets: bundled names, or a user file (.jsonl with a `question`/`prompt`/`text` field, or .txt).

The bundled `gsm-symbolic` set is 16 GSM8K-style questions from the `reasoning-gym` package's `gsm_symbolic`
generator (seed 0), written once by `generate_gsm_symbolic(16, seed=0)`; nothing is downloaded at run time.
"""

from __future__ import annotations

import json
from pathlib import Path

from loopscope.data.jsonl import read_jsonl
from loopscope.errors import InputError

ASSETS = Path(__file__).parent / "assets"
BUILTIN_PROMPTS = {"gsm-symbolic": ASSETS / "gsm_symbolic_16.jsonl"}
TEXT_FIELDS = ("question", "prompt", "text")


def generate_gsm_symbolic(n: int, seed: int = 0) -> list[dict[str, str]]:
    """n GSM-Symbolic problems {question, answer, solution} from reasoning-gym (procedural, offline).

    `solution` is the generator's worked solution, ending in a GSM8K-style `#### N` line (training text).
    """
    import reasoning_gym

    return [{"question": x["question"], "answer": str(x["answer"]), "solution": x["metadata"]["answer_cot"]}
            for x in reasoning_gym.create_dataset("gsm_symbolic", size=n, seed=seed)]


def load_prompts(spec: str | Path, limit: int | None = None) -> list[str]:
    """Prompts from a builtin name or a file (.jsonl: one JSON object a line with a string `question`, `prompt` or
    `text`; .txt: one prompt a line). Refuses, in one line naming the file and line: an empty set or prompt, a
    non-string prompt field (null, a number), another suffix (a .csv header would be read as a prompt), a folder, a
    file that is not UTF-8 text, and a `limit` below 1."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InputError(f"--max-prompts {limit}: give a whole number ≥ 1 (or leave it out for every prompt)")
    path = BUILTIN_PROMPTS.get(str(spec), Path(spec))
    if not path.exists():
        raise InputError(
            f"prompt set {spec!r} is neither a file nor a builtin; builtins: {sorted(BUILTIN_PROMPTS)}"
        )
    if path.is_dir():
        raise InputError(f"prompt set {spec!r} is a folder; give a .jsonl or .txt file")
    if path.suffix not in PROMPT_SUFFIXES:
        raise InputError(f"prompt file {path} has suffix {path.suffix or '(none)'!r}; give a .jsonl file (one "
                         "{\"question\": …} a line) or a .txt file (one prompt a line)")
    try:
        prompts = jsonl_prompts(path) if path.suffix == ".jsonl" else \
            [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as exc:
        raise InputError(f"prompt file {path} is not UTF-8 text (byte {exc.start}); give a text file") from None
    if limit is not None:
        prompts = prompts[:limit]
    if not prompts:
        raise InputError(f"prompt set {spec!r} is empty; give at least one non-empty prompt")
    if empty := [i for i, p in enumerate(prompts) if not p.strip()]:
        raise InputError(f"prompt set {spec!r}: prompt {empty[0]} is empty; give non-empty prompts")
    return prompts


PROMPT_SUFFIXES = (".jsonl", ".txt")


def jsonl_prompts(path: Path) -> list[str]:
    prompts = []
    for n, row in read_jsonl(path):
        field = next((f for f in TEXT_FIELDS if isinstance(row, dict) and f in row), None)
        if field is None:
            raise InputError(f"{path}:{n} has none of the fields {TEXT_FIELDS}; put the prompt text in one")
        if not isinstance(row[field], str):
            raise InputError(f"{path}:{n}: {field!r} is {json_type(row[field])}, not text; give the prompt as a "
                             "string")
        prompts.append(row[field])
    return prompts


def json_type(value) -> str:
    """How a JSON value reads in an error: null, a number (42), true/false, a list, an object."""
    if value is None:
        return "null"
    kind = {bool: "a true/false", int: "a number", float: "a number", list: "a list", dict: "an object"}
    return f"{kind.get(type(value), 'a ' + type(value).__name__)} ({json.dumps(value)[:40]})"
