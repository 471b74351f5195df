"""Finished pipeline stages on disk: each stage's tables as Parquet under ROOT/NAME/, with `done.json` last.

A long pipeline (`loopscope reproduce`) is killed and restarted; a stage whose `done.json` exists is loaded, not
rerun. `done.json` holds the stage's parameters: a restart with other parameters stops with an error instead of
mixing results. Parquet keeps dtypes (nullable integers, strings) and indexes; a square matrix whose columns are
its (Multi)index, as `dynamics.residual_similarity` returns, is stored with positional column names and gets its
columns back from the index on load. DataFrames kept in a table's `attrs` (e.g. `run_conditions`'s all-token
table) are stored beside it and put back. No pickle.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pandas as pd

from loopscope.errors import InputError

DONE = "done.json"


class StageCache:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def dir(self, name: str) -> Path:
        return self.root / name

    def load(self, name: str, params: dict) -> dict[str, pd.DataFrame] | None:
        """The stage's tables if it finished with the same `params`; None if it never finished."""
        done = self.dir(name) / DONE
        if not done.exists():
            return None
        record = json.loads(done.read_text())
        stored, wanted = settled(record["params"]), settled(jsonable(params))
        if stored != wanted:
            changed = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
            raise InputError(f"{self.dir(name)} holds stage {name!r} finished with other settings "
                             f"({', '.join(changed)}); rerun with the same options to resume, or give a new --out")
        tables = {}
        for table, info in record["tables"].items():
            tables[table] = read_frame(self.dir(name) / f"{table}.parquet", info.get("square", False))
            for key in info.get("attrs", []):
                tables[table].attrs[key] = read_frame(self.dir(name) / f"{table}.attrs.{key}.parquet", False)
        return tables

    def seconds(self, name: str) -> float | None:
        done = self.dir(name) / DONE
        return json.loads(done.read_text())["seconds"] if done.exists() else None

    def save(self, name: str, params: dict, tables: dict[str, pd.DataFrame | None], seconds: float,
             scratch: Path | None = None) -> dict[str, pd.DataFrame]:
        """Write every non-None table, then done.json; remove `scratch` (the stage's resume files) after."""
        folder = self.dir(name)
        folder.mkdir(parents=True, exist_ok=True)
        info = {}
        kept = {}
        for table, frame in tables.items():
            if frame is None:
                continue
            attrs = {k: v for k, v in frame.attrs.items() if isinstance(v, pd.DataFrame)}
            for key, extra in attrs.items():
                write_frame(extra, folder / f"{table}.attrs.{key}.parquet", f"{table}.attrs[{key!r}]")
            square = write_frame(frame, folder / f"{table}.parquet", table)
            info[table] = {"square": square, "rows": len(frame), "attrs": sorted(attrs)}
            kept[table] = frame
        record = {"params": jsonable(params), "tables": info, "seconds": round(seconds, 2),
                  "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        (folder / (DONE + ".tmp")).write_text(json.dumps(record, indent=1))
        (folder / (DONE + ".tmp")).replace(folder / DONE)
        if scratch is not None and scratch.exists():
            shutil.rmtree(scratch)
        return kept


def write_frame(frame: pd.DataFrame, path: Path, what: str) -> bool:
    """Write one frame as Parquet (without its attrs); returns whether it was stored as a square matrix."""
    square = is_square(frame)
    stored = frame.set_axis([f"c{i}" for i in range(frame.shape[1])], axis=1) if square else frame.copy()
    stored.attrs = {}
    bad = [c for c in stored.columns if not isinstance(c, str)]
    if bad:
        raise TypeError(f"table {what} has non-string columns {bad[:3]}; give its columns string names")
    stored.to_parquet(path)
    return square


def read_frame(path: Path, square: bool) -> pd.DataFrame:
    frame = pd.read_parquet(path)
    if square:
        frame.columns = frame.index.copy()
    return frame


def is_square(frame: pd.DataFrame) -> bool:
    return frame.shape[0] == frame.shape[1] and not isinstance(frame.index, pd.RangeIndex) and \
        frame.columns.equals(frame.index)


def jsonable(params: dict) -> dict:
    """`params` as it reads back from JSON (tuples → lists, paths → strings)."""
    return json.loads(json.dumps(params, default=str))


def settled(params: dict) -> dict:
    """`params` without the None-valued keys: a setting added to the code later, left at None (off), matches a
    stage that finished before it existed, so an upgrade does not throw away finished work."""
    return {k: v for k, v in params.items() if v is not None}
