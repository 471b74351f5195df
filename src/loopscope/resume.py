"""Resume without losing work: the one key, the one atomic write and the one cached table every long run uses.

    key = run_key({"model": name, "weights": fp, "R": 128})            # same settings → same key, always
    part = load_or_compute(folder / f"batch{i:05d}.part", compute, encode, decode)   # the one rule
    table = cached_table(folder / f"{name}-{key}.csv", compute)      # … for a CSV table; cached_json for JSON

Every resumable unit goes through `load_or_compute`: stream batch parts, captured batches, grid cells, extrapolation
rows and control tables, condition labels. Two kinds of saved progress are not units and keep their own files, each
refusing other settings: a training run's checkpoint (`experiments.train_state`: mid-run weights, optimiser and RNG)
and a reproduce stage (`experiments.stage_cache`: several tables, `done.json` written last).

A run writes each finished unit of work (a batch's reduced accumulators, one condition's labels, one extrapolation
row) under a name that carries the key of everything that decides its content; a restarted run finds it and skips
the work. Changing any setting changes the key, so a stale result is never read as a fresh one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd

T = TypeVar("T")
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


def load_or_compute(path: Path | None, compute: Callable[[], T], encode: Callable[[T], bytes],
                    decode: Callable[[bytes], T], read_back: bool = False) -> T:
    """The one resume rule. The unit of work stored at `path` (decoded), or `compute()` stored there atomically first
    and returned (`read_back`: decoded from the bytes written, so a first and a resumed run return the same thing).
    `path` names the unit by the key of everything that decides it (`run_key`); None: no cache, just compute."""
    if path is None:
        return compute()
    path = Path(path)
    if path.exists():
        return decode(path.read_bytes())
    value = compute()
    data = encode(value)
    write_atomic(path, data)
    return decode(data) if read_back else value


def cached_table(path: Path, compute: Callable[[], pd.DataFrame]) -> pd.DataFrame:
    """The table stored at `path` (CSV), or `compute()` written there atomically first. Always the read-back CSV,
    so a first run and a resumed run return the same dtypes."""
    return load_or_compute(path, compute, lambda t: t.to_csv(index=False).encode(),
                           lambda b: pd.read_csv(io.BytesIO(b)), read_back=True)


def cached_json(path: Path | None, compute: Callable[[], Any]) -> Any:
    """A JSON-able unit of work (a grid cell, an extrapolation row) through `load_or_compute`; non-JSON scalars
    (numpy numbers) are stored as floats. Always the read-back value."""
    def encode(value: Any) -> bytes:
        return json.dumps(value, default=float).encode()

    return load_or_compute(path, compute, encode, lambda b: json.loads(b), read_back=True)
