"""Prompt sets: bundled names, or a user file (.jsonl with a `question`/`prompt`/`text` field, or .txt).

The bundled `gsm-symbolic` set is 16 GSM8K-style questions from the `reasoning-gym` package's `gsm_symbolic`
generator (seed 0), written once by `generate_gsm_symbolic(16, seed=0)`; nothing is downloaded at run time.
"""

from __future__ import annotations

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
    """Prompts from a builtin name or a file; refuses empty sets and empty prompts."""
    path = BUILTIN_PROMPTS.get(str(spec), Path(spec))
    if not path.exists():
        raise InputError(
            f"prompt set {spec!r} is neither a file nor a builtin; builtins: {sorted(BUILTIN_PROMPTS)}"
        )
    if path.suffix == ".jsonl":
        prompts = []
        for n, row in read_jsonl(path):
            field = next((f for f in TEXT_FIELDS if isinstance(row, dict) and f in row), None)
            if field is None:
                raise InputError(f"{path}:{n} has none of the fields {TEXT_FIELDS}; put the prompt text in one")
            prompts.append(str(row[field]))
    else:
        prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if limit is not None:
        prompts = prompts[:limit]
    if not prompts or any(not p.strip() for p in prompts):
        raise InputError(f"prompt set {spec!r} is empty or has an empty prompt; give at least one non-empty prompt")
    return prompts
