"""Resumable training state on disk: safetensors for tensors, JSON for everything else. Never pickle.

    OUT/checkpoint/state.safetensors   model.<param>  and  optimizer.<param>.<exp_avg|exp_avg_sq|step>
    OUT/checkpoint/state.json          step, run settings, RNG states (lists of ints), data position,
                                       loss/eval history, elapsed seconds

A checkpoint is written to `checkpoint.tmp/` and then renamed into place, so a kill during the write leaves
the previous checkpoint intact (`checkpoint.old/` is used if the kill fell between the two renames).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from loopscope.errors import CheckpointError
from loopscope.models.checkpoint import check_state_dict, read_safetensors

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_DIRS = (CHECKPOINT_DIR, f"{CHECKPOINT_DIR}.tmp", f"{CHECKPOINT_DIR}.old")  # every folder a checkpoint uses


def in_run_folder(out: Path, command: str, settings, run) -> dict:
    """`run()` (a training loop returning its metrics, {} when it stopped early) in `out` owned as a training run's
    folder (`loopscope.output.claim_output`): locked, its manifest holding `settings.TRAJECTORY_FIELDS` (what must
    match to resume), the checkpoint folders its resume caches, a finished run's files kept for the call that
    returns them and listed once it finishes."""
    from loopscope.output import claim_output

    key = {k: getattr(settings, k) for k in settings.TRAJECTORY_FIELDS}
    with claim_output(Path(out), command, key, clean=False, resume_dirs=CHECKPOINT_DIRS) as folder:
        metrics = run()
        if metrics:
            folder.finish()
        return metrics
TENSORS_NAME = "state.safetensors"
JSON_NAME = "state.json"
ADAM_KEYS = ("exp_avg", "exp_avg_sq", "step")


def rng_state() -> dict[str, Any]:
    """Global torch and Python RNG states as JSON-able lists/ints."""
    version, internal, gauss = random.getstate()
    return {"torch": torch.get_rng_state().tolist(), "python": [version, list(internal), gauss]}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW state flattened by parameter name: `optimizer.<name>.<exp_avg|exp_avg_sq|step>`."""
    out = {}
    for name, p in model.named_parameters():
        for key, value in optimizer.state.get(p, {}).items():
            if key not in ADAM_KEYS:
                raise CheckpointError(f"optimizer state {key!r} is not one AdamW keeps; cannot save it")
            out[f"optimizer.{name}.{key}"] = value.detach().reshape(-1).clone() if key == "step" else value.detach()
    return out


def load_optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer, found: dict) -> None:
    """Inverse of `optimizer_tensors` (the optimizer must have been built over the same parameters)."""
    for name, p in model.named_parameters():
        keys = [f"optimizer.{name}.{k}" for k in ADAM_KEYS]
        if not any(k in found for k in keys):
            continue
        missing = [k for k in keys if k not in found]
        if missing:
            raise CheckpointError(f"checkpoint optimizer state is incomplete: missing {missing}; start a new run")
        exp_avg, exp_avg_sq, step = (found[k] for k in keys)
        if exp_avg.shape != p.shape or exp_avg_sq.shape != p.shape:
            raise CheckpointError(f"checkpoint optimizer state for {name} has shape {tuple(exp_avg.shape)}, "
                                  f"the model {tuple(p.shape)}; this checkpoint belongs to another model")
        optimizer.state[p] = {"step": step.reshape(()).clone(), "exp_avg": exp_avg.clone(),
                              "exp_avg_sq": exp_avg_sq.clone()}


def save_train_state(out: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, meta: dict) -> Path:
    """Write `OUT/checkpoint` atomically (tmp dir + rename). `meta` must be JSON-serialisable."""
    final, tmp, old = out / CHECKPOINT_DIR, out / f"{CHECKPOINT_DIR}.tmp", out / f"{CHECKPOINT_DIR}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    tensors.update({k: v.contiguous() for k, v in optimizer_tensors(model, optimizer).items()})
    save_file(tensors, str(tmp / TENSORS_NAME), metadata={"producer": "loopscope.train"})
    (tmp / JSON_NAME).write_text(json.dumps(meta, indent=1) + "\n")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(out: Path) -> Path | None:
    """The complete checkpoint directory under `out`, or None (fresh run)."""
    for d in (out / CHECKPOINT_DIR, out / f"{CHECKPOINT_DIR}.old"):
        if (d / JSON_NAME).exists() and (d / TENSORS_NAME).exists():
            return d
    return None


def load_train_state(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore model and optimizer in place from a checkpoint directory; return its JSON metadata."""
    try:
        meta = json.loads((directory / JSON_NAME).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {directory / JSON_NAME} ({exc}); delete {directory} to restart") from exc
    found = read_safetensors(directory / TENSORS_NAME)
    weights = {k[len("model."):]: v for k, v in found.items() if k.startswith("model.")}
    check_state_dict(model.state_dict(), weights, str(directory / TENSORS_NAME))
    model.load_state_dict(weights, strict=True)
    load_optimizer_tensors(model, optimizer, {k: v for k, v in found.items() if k.startswith("optimizer.")})
    return meta
