"""Resume without losing work: the one key, the one atomic write and the one cached table every long run uses.

    key = run_key({"model": name, "R": 128, "prompts": prompts})      # same settings → same key, always
    write_atomic(folder / f"batch{i:05d}.part", data)                 # a kill mid-write leaves no half file
    table = cached_table(folder / f"{name}-{key}.csv", compute)      # computed once, read back ever after

A run writes each finished unit of work (a batch's reduced accumulators, one condition's labels, one extrapolation
row) under a name that carries the key of everything that decides its content; a restarted run finds it and skips
the work. Changing any setting changes the key, so a stale result is never read as a fresh one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

KEY_LENGTH = 16  # hex digits of sha1: 64 bits, so two different settings never meet in one cache folder


def run_key(payload: Any) -> str:
    """sha1 of `payload` as canonical JSON (sorted keys; tuples as lists; paths, dtypes and other objects by
    `str`), first KEY_LENGTH hex digits."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:KEY_LENGTH]


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename: the file is whole or absent, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def cached_table(path: Path, compute: Callable[[], pd.DataFrame]) -> pd.DataFrame:
    """The table stored at `path` (CSV), or `compute()` written there atomically first. Always the read-back CSV,
    so a first run and a resumed run return the same dtypes."""
    path = Path(path)
    if not path.exists():
        write_atomic(path, compute().to_csv(index=False).encode())
    return pd.read_csv(path)
