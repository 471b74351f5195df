"""Checkpoints: a directory with `config.json` + `model.safetensors` (+ tokenizer files). Never pickle.

Loading checks every tensor by name and shape against the config and fails loudly, listing every missing,
unexpected and mis-shaped tensor at once, so a wrong config is found in one try.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from loopscope.errors import CheckpointError
from loopscope.models.config import LoopedConfig
from loopscope.models.looped import LoopedLM, rope_inverse_frequencies

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def config_json(path: Path) -> dict | None:
    """`path`/config.json as a dict, or None when `path` is not a directory with a readable JSON object there: what
    the loaders' `recognises` checks read (a malformed file is reported by the loader that claims the path)."""
    file = Path(path) / CONFIG_NAME
    if not (file.parent.is_dir() and file.exists()):
        return None
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


HEADER_LIMIT = 100_000_000  # bytes of JSON header a safetensors file may have (the library's own bound)


def safetensors_header(path: Path) -> dict | None:
    """The JSON header of a safetensors file, or None when `path` is not one (`safetensors_header_bytes` on its
    first 8 + N bytes). Decided by parsing that header — never by a magic byte: N's low byte is 0x80 for one header
    length in 256, which is pickle's protocol byte."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            return safetensors_header_bytes(head + f.read(min(n, HEADER_LIMIT)), path.stat().st_size)
    except OSError:
        return None


def safetensors_header_bytes(data: bytes, size: int | None = None) -> dict | None:
    """The JSON header of a safetensors blob (its first 8 + N bytes at least; `size`: the whole blob's length, if
    `data` is only its start), or None when it is not one. The format (safetensors' spec): 8 bytes little-endian
    u64 N, then N bytes of a UTF-8 JSON object, then the tensor bytes."""
    if len(data) < 8:
        return None
    n = int.from_bytes(data[:8], "little")
    if n < 2 or n > HEADER_LIMIT or n > (len(data) if size is None else size) - 8 or len(data) < 8 + n:
        return None
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return header if isinstance(header, dict) else None


def refuse_pickle(path: Path) -> None:
    """Raise if `path` looks like a pickle/torch.save file: loading one can run arbitrary code. A file whose
    safetensors header parses is never refused, whatever its name or first byte."""
    if path.is_file() and safetensors_header(path) is not None:
        return
    head = b""
    if path.is_file():
        with open(path, "rb") as f:
            head = f.read(4)
    if path.suffix in PICKLE_SUFFIXES or head[:1] == b"\x80" or head[:4] == b"PK\x03\x04":
        raise CheckpointError(
            f"{path} is a pickle/torch.save file; loopscope never unpickles (it can execute code). "
            "Convert it once in a trusted environment: "
            "`safetensors.torch.save_file(torch.load(path), 'model.safetensors')`"
        )


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file, with a clear error for anything else."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"weight file {path} does not exist")
    refuse_pickle(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a valid safetensors file ({exc}); re-save it with safetensors") from exc


def check_state_dict(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], source: str) -> None:
    """Compare names and shapes; raise one error listing every problem."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = [
        f"{k}: file {tuple(found[k].shape)} vs config {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(found))
        if tuple(found[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {missing[:8]}{' …' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {unexpected[:8]}{' …' if len(unexpected) > 8 else ''}")
        if misshaped:
            parts.append(f"wrong shape {len(misshaped)}: {misshaped[:8]}")
        raise CheckpointError(
            f"weights in {source} do not match the config: " + "; ".join(parts)
            + ". Check that config.json belongs to these weights."
        )


def save_model(model: LoopedLM, directory: str | Path, tokenizer=None, dtype: torch.dtype | None = None) -> Path:
    """Write `config.json`, `model.safetensors` (tied weights stored once) and the tokenizer, if given."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.cfg.to_json(directory / CONFIG_NAME)
    tensors = {k: v.detach().to(dtype or v.dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "producer": "loopscope"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    return directory


def load_looped(directory: str | Path, dtype: torch.dtype = torch.float32) -> LoopedLM:
    """Load a loopscope-format checkpoint directory into an eval-mode `LoopedLM`."""
    directory = Path(directory)
    if not directory.exists():
        raise CheckpointError(f"model path {directory} does not exist; give a checkpoint directory or a builtin name")
    if directory.is_file():
        refuse_pickle(directory)
        raise CheckpointError(f"{directory} is a file; give the checkpoint directory holding {CONFIG_NAME}")
    if not (directory / CONFIG_NAME).exists():
        raise CheckpointError(f"{directory} has no {CONFIG_NAME}; a checkpoint needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    weights = directory / WEIGHTS_NAME
    if not weights.exists():
        pickles = [p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES]
        hint = f" (found pickle files {pickles}, which loopscope does not load)" if pickles else ""
        raise CheckpointError(f"{directory} has no {WEIGHTS_NAME}{hint}; save weights with safetensors")
    cfg = LoopedConfig.from_json(directory / CONFIG_NAME)
    with torch.device("meta"):  # no random init, no float32 copy of a large checkpoint
        model = LoopedLM(cfg)
    found = read_safetensors(weights)
    check_state_dict(model.state_dict(), found, str(weights))
    model.load_state_dict({k: v.to(dtype) for k, v in found.items()}, strict=True, assign=True)
    model.rope.inv_freq = rope_inverse_frequencies(cfg)  # non-persistent buffer: recompute off the meta device
    return model.eval()


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path} as JSON ({exc})") from exc
