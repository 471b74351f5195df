"""An output folder one run owns: a lock, a manifest of what made it, and nothing stale left beside it.

    with claim_output(out, "analyze", settings, overwrite=False) as folder:
        loaded = load_model(...)
        folder.record_weights(loaded.name, loaded.fingerprint())
        ...
        folder.finish(report.write())

What it guarantees, so a table under a folder's name is always that folder's run's table:

- **One writer.** `OUT/.loopscope.lock` is held (`fcntl.flock`) for the whole run; a second run into the same folder
  is refused in one line naming the first one's pid. The OS releases the lock when a process dies, however it dies.
- **One run per folder.** `OUT/manifest.json` records the command, every setting that decides the outputs, the
  weights' fingerprints, the versions, and (once finished) every file the run wrote with what it is. A rerun with
  the same settings resumes (its caches are keyed on the same things); with other settings or other weights it is
  refused in one line naming what differs and the fix: `--overwrite` (clears the previous run's outputs and caches,
  never another file) or another `--out`.
- **Nothing stale.** A run's report products (index.html, report.json, figures/, tables/ and the files its manifest
  lists) are removed before it writes its own, so a file from an earlier run can never sit beside the new report.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

from loopscope.errors import InputError
from loopscope.resume import write_atomic

MANIFEST = "manifest.json"
LOCK = ".loopscope.lock"
REPORT_PRODUCTS = ("index.html", "report.json", "figures", "tables")  # what every report command writes


def plain(value: Any) -> Any:
    """Settings as JSON-comparable data: paths, dtypes and other objects by `repr`-free text, tuples as lists."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


class Settings(dict):
    """The settings a manifest compares, with each field's default beside them (`defaults`): a setting added to
    loopscope after a folder's run held its default in that run, so a manifest without it still matches."""

    defaults: dict


def settings_of(settings: Any, exclude: tuple[str, ...] = ("out", "progress", "overwrite")) -> dict:
    """A settings dataclass as the manifest compares it: every field but where it writes and how it talks."""
    import dataclasses

    out = Settings({k: v for k, v in plain(dataclasses.asdict(settings)).items() if k not in exclude})
    out.defaults = {}
    for f in dataclasses.fields(settings):
        if f.name in out and f.default is not dataclasses.MISSING:
            out.defaults[f.name] = plain(f.default)
        elif f.name in out and f.default_factory is not dataclasses.MISSING:
            out.defaults[f.name] = plain(f.default_factory())
    return out


def versions() -> dict[str, str]:
    import torch

    from loopscope import __version__

    return {"loopscope": __version__, "torch": torch.__version__, "python": platform.python_version()}


class OutputFolder:
    """The folder a run writes (see the module doc). Use through `claim_output`."""

    def __init__(self, path: Path, command: str, settings: dict, overwrite: bool, resume_dirs: tuple[str, ...],
                 clean: bool = True):
        self.path, self.command, self.settings = Path(path), command, plain(settings)
        self.defaults = getattr(settings, "defaults", {})
        self.overwrite, self.resume_dirs, self.clean = overwrite, resume_dirs, clean
        self.weights: dict[str, str] = {}
        self.started = time.time()
        self._before: dict[str, tuple[int, int]] = {}
        self._previous_text: bytes | None = None
        self.previous_weights: dict[str, str] = {}
        self._lock = None

    # --- entering ------------------------------------------------------------------------------------------
    def open(self) -> OutputFolder:
        self._create()
        self._acquire()
        manifest = self.path / MANIFEST
        self._previous_text = manifest.read_bytes() if manifest.exists() else None
        previous = self._read_manifest()
        # the weights the folder's caches were computed with: the last run that recorded any, kept once
        self.previous_weights = (previous or {}).get("weights") or (previous or {}).get("previous_weights", {})
        if previous is not None and self.overwrite:
            self._clear(previous)
            previous = None
        elif previous is not None and (previous.get("command") != self.command
                                       or self._changed(previous.get("settings") or {})):
            self._refuse_or_clear(previous, self._differences(previous))
        elif previous is None and any((self.path / p).exists() for p in REPORT_PRODUCTS):
            self._refuse_or_clear({}, "it holds a report without a manifest (written by an earlier loopscope)")
        if self.clean:
            self._remove_products(previous or {})
        self._before = self._snapshot()
        self._write_manifest("running")
        return self

    def _snapshot(self) -> dict[str, tuple[int, int]]:
        """(mtime_ns, size) of every file outside the resume caches: a file the run did not write keeps both."""
        out = {}
        for path in self.path.rglob("*"):
            rel = path.relative_to(self.path)
            if path.is_file() and rel.parts[0] not in self.resume_dirs and rel.name not in (MANIFEST, LOCK):
                st = path.stat()
                out[str(rel)] = (st.st_mtime_ns, st.st_size)
        return out

    def _create(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise InputError(f"--out {self.path} is a file; give a folder (it is created if missing)")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".loopscope.write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise InputError(f"--out {self.path} cannot be written ({exc.strerror or exc}); choose a writable "
                             "folder") from None

    def _acquire(self) -> None:
        import fcntl

        handle = open(self.path / LOCK, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise InputError(f"another loopscope run ({holder}) is writing {self.path}; wait for it to finish or "
                             "give another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}, {self.command}, started {datetime.datetime.now():%Y-%m-%d %H:%M:%S}")
        handle.flush()
        self._lock = handle

    def _read_manifest(self) -> dict | None:
        path = self.path / MANIFEST
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = None
        if not isinstance(data, dict):
            raise InputError(f"{path} is not a loopscope manifest; add --overwrite to replace the folder's "
                             "outputs or give another --out")
        return data

    def _differences(self, previous: dict) -> str:
        if previous.get("command") != self.command:
            return f"it holds the outputs of `loopscope {previous.get('command')}`, not `{self.command}`"
        old, new = previous.get("settings", {}), self.settings
        changed = [f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in self._changed(old)]
        return "it holds a run with other settings (" + "; ".join(changed[:6]) + (" …" if len(changed) > 6 else "") \
            + ")"

    def _changed(self, old: dict) -> list[str]:
        """The settings that differ from the previous run's (a setting it did not name counts at its default)."""
        return [k for k in sorted(set(old) | set(self.settings))
                if old.get(k) != self.settings.get(k) and not self._added_since(k, old)]

    def _added_since(self, key: str, old: dict) -> bool:
        """A setting the previous run's manifest does not name (added to loopscope since), at its default now."""
        return key not in old and key in self.defaults and self.settings.get(key) == self.defaults[key]

    def _refuse_or_clear(self, previous: dict, why: str,
                         fix: str = "rerun with the same options to resume it, add --overwrite to replace its "
                                    "outputs, or give another --out") -> None:
        if not self.overwrite:
            raise InputError(f"--out {self.path}: {why}; {fix}")
        self._clear(previous)

    def _clear(self, previous: dict) -> None:
        """--overwrite: the previous run's files, report products and resume caches; nothing else."""
        self._previous_text, self.previous_weights = None, {}
        self._remove_products(previous)
        for name in {*self.resume_dirs, *previous.get("resume_dirs", [])}:
            shutil.rmtree(self.path / name, ignore_errors=True)
        (self.path / MANIFEST).unlink(missing_ok=True)

    def _remove_products(self, previous: dict) -> None:
        """Every report product and every file the previous run listed: this run writes its own."""
        for name in [*REPORT_PRODUCTS, *previous.get("files", {})]:
            target = self.path / name
            if target.resolve() == self.path.resolve() or self.path.resolve() not in target.resolve().parents:
                continue  # never outside the folder
            if target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)

    # --- during and after ----------------------------------------------------------------------------------
    def record_weights(self, label: str, fingerprint: str) -> None:
        """The weights a run used; a folder resumed with other weights under the same settings is refused (or,
        with --overwrite, cleared): its caches would hold another model's results."""
        previous = self.previous_weights
        if label in previous and previous[label] != fingerprint:
            self._refuse_or_clear({}, f"its run used other weights for {label} ({previous[label]}, now {fingerprint})"
                                  ": the checkpoint changed", "add --overwrite to analyse the new weights in their "
                                  "place, or give another --out to keep both")
        self.weights[label] = fingerprint
        self._write_manifest("running")

    def finish(self, index: Path | None = None) -> None:
        """Mark the run complete and list every file it wrote (with its caption where the report gives one)."""
        captions = self._captions()
        files = {rel: captions.get(rel, "") for rel, stat in sorted(self._snapshot().items())
                 if self._before.get(rel) != stat}
        self._write_manifest("complete", files, index)

    def _captions(self) -> dict[str, str]:
        report = self.path / "report.json"
        if not report.exists():
            return {}
        out = {"index.html": "the report (self-contained HTML)", "report.json": "what is where in the report"}
        for section in json.loads(report.read_text()).get("sections", []):
            for item in section.get("items", []):
                for key in ("figure", "table"):
                    if item.get(key):
                        out[item[key]] = item.get("caption", "")
                for csv in item.get("csv", []):
                    out.setdefault(csv, f"the numbers of {item.get('figure')}")
        return out

    def _write_manifest(self, status: str, files: dict | None = None, index: Path | None = None) -> None:
        data = {"command": self.command, "status": status, "settings": self.settings, "weights": self.weights,
                "previous_weights": self.previous_weights,
                "versions": versions(), "resume_dirs": list(self.resume_dirs),
                "started": datetime.datetime.fromtimestamp(self.started).isoformat(timespec="seconds")}
        if status == "complete":
            data["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
            data["files"] = files or {}
            data["report"] = str(index.relative_to(self.path)) if index is not None else None
        write_atomic(self.path / MANIFEST, (json.dumps(data, indent=1) + "\n").encode())

    def abandon(self) -> None:
        """A run refused for bad input before any work: the folder's manifest goes back to what it was, so a
        mistyped option never blocks the corrected command."""
        manifest = self.path / MANIFEST
        if self._previous_text is None:
            manifest.unlink(missing_ok=True)
        else:
            write_atomic(manifest, self._previous_text)

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None


class _NoFolder:
    """What ranks other than 0 get: they write only their caches, under rank 0's lock."""

    def record_weights(self, label: str, fingerprint: str) -> None:
        pass

    def finish(self, index: Path | None = None) -> None:
        pass


class claim_output:  # noqa: N801  (used as a context manager, named as an action)
    """Own `path` for one run of `command` with `settings` (see the module doc). `resume_dirs`: the folders under
    `path` holding this command's resume caches (kept across a resumed run, cleared by --overwrite). `clean=False`
    (a training run, whose finished model and metrics a resumed call returns as they are): the previous run's
    files are kept until it rewrites them."""

    def __init__(self, path: Path, command: str, settings: dict, *, overwrite: bool = False, rank: int = 0,
                 resume_dirs: tuple[str, ...] = ("cache",), clean: bool = True) -> None:
        self.folder = None if rank != 0 else OutputFolder(path, command, settings, overwrite, resume_dirs, clean)

    def __enter__(self) -> OutputFolder | _NoFolder:
        if self.folder is None:
            return _NoFolder()
        try:
            return self.folder.open()
        except BaseException:
            self.folder.close()  # refused: the lock goes at once, the manifest was not touched
            raise

    def __exit__(self, kind, value, tb) -> None:
        from loopscope.errors import LoopscopeError

        if self.folder is not None:
            if kind is not None and issubclass(kind, LoopscopeError) and self.folder._lock is not None:
                self.folder.abandon()
            self.folder.close()
