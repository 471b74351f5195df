"""JSON Lines files (GSM8K, prompt sets): one object a line, blank lines skipped, a bad line named by number."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from loopscope.errors import InputError


def read_jsonl(path: Path, hint: str = "") -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for every non-blank line; a line that is not JSON raises an InputError naming
    the file and line, followed by `hint` (e.g. "; is this the official GSM8K jsonl?")."""
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{n} is not valid JSON ({exc}){hint}") from exc
