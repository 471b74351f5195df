"""`load_model(spec)`: one entry point for every model loopscope analyses.

`spec` is a builtin name (`loopscope models` lists them) or a path: a loopscope checkpoint directory, or a
directory/file that a registered loader recognises (Hugging Face feedforward LMs, GGUF files, the Ouro,
Huginn and retrofit families). Loaders register themselves with `register_loader`; builtins with
`register_builtin`. Nothing here executes code from a checkpoint.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loopscope.errors import CheckpointError


@dataclass
class LoadedModel:
    """A model ready for capture, with its tokenizer and how to describe it."""

    model: nn.Module
    tokenizer: Any
    name: str
    kind: str  # "looped" (LoopedLM, any family) or "feedforward-hf": how the model is described
    recurrences: int  # the number of recurrences it was built/trained with (1 for feedforward)

    def __post_init__(self) -> None:
        if (self.kind == "looped") != self.is_looped:
            raise CheckpointError(f"loader bug: {self.name} is a {type(self.model).__name__} labelled {self.kind!r}")

    @property
    def is_looped(self) -> bool:
        """The one question "is it looped?": a LoopedLM (any family) runs a recurrent block; anything else runs once."""
        from loopscope.models.looped import LoopedLM

        return isinstance(self.model, LoopedLM)

    def fingerprint(self) -> str:
        """The weights' fingerprint (`loopscope.models.fingerprint`): what every cache key and manifest carries,
        so a retrained or edited model never meets another's cached results. Recomputed on each call, except
        inside `weights_held()`, where the first call's value serves the whole block."""
        from loopscope.models.fingerprint import weights_fingerprint

        held = self.__dict__.get("_held_fingerprint")
        if held is not None and held:
            return held[0]
        value = weights_fingerprint(self.model)
        if held is not None:
            held.append(value)
        return value

    @contextlib.contextmanager
    def weights_held(self):
        """A block in which the weights are taken as fixed — one command's run, which reads its model and never
        edits it: `fingerprint()` hashes them once there instead of once per cache key (at Huginn-0125's 3.5 B
        parameters each hash was 6 s of a 41 s analysis on an H200). Re-entrant; an edit made after the block
        is seen by the next fingerprint, as outside one."""
        outer = "_held_fingerprint" in self.__dict__
        if not outer:
            self.__dict__["_held_fingerprint"] = []
        try:
            yield self
        finally:
            if not outer:
                self.__dict__.pop("_held_fingerprint", None)

    def config_dict(self) -> dict | str:
        """The model's configuration as plain data: a LoopedLM's `cfg`, a Hugging Face model's `config`."""
        cfg = getattr(self.model, "cfg", None)
        if cfg is not None:
            return cfg.to_dict()
        hf = getattr(self.model, "config", None)
        return hf.to_dict() if hasattr(hf, "to_dict") else str(type(self.model))

    @property
    def max_seq_len(self) -> int:
        cfg = getattr(self.model, "cfg", None)
        if cfg is not None:
            return cfg.max_seq_len
        return int(getattr(self.model.config, "max_position_embeddings", 2048))


BUILTINS: dict[str, tuple[str, Callable[..., LoadedModel]]] = {}
LOADERS: list[tuple[str, Callable[[Path], bool], Callable[..., LoadedModel]]] = []


def register_builtin(name: str, description: str, build: Callable[[], LoadedModel]) -> None:
    BUILTINS[name] = (description, build)


# The order loaders are tried in, whatever order their modules were imported in: the specific formats first
# (loopscope's own, then the families: a retrofit is a Raven checkpoint, so it is asked before Huginn), the
# generic Hugging Face loader last (it recognises any config.json + safetensors).
LOADER_ORDER = ("looped", "healed-delta", "ouro", "retrofit", "huginn", "feedforward-hf")


def register_loader(kind: str, recognises: Callable[[Path], bool], load: Callable[[Path], LoadedModel]) -> None:
    if kind not in LOADER_ORDER:
        raise ValueError(f"loader kind {kind!r} is not in LOADER_ORDER; add it there, where it must be tried")
    LOADERS[:] = sorted([*(x for x in LOADERS if x[0] != kind), (kind, recognises, load)],
                        key=lambda x: LOADER_ORDER.index(x[0]))


def load_model(spec: str | Path, *, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
               state_dtype: str | torch.dtype | None = None) -> LoadedModel:
    """Resolve `spec` (builtin name or path) to a LoadedModel in eval mode on `device`.

    `dtype`: the weights' dtype (float32 default, bfloat16, float16): loaders build in that dtype directly, never
    through a float32 copy of a large checkpoint. `state_dtype`: the residual stream and recurrent state of a
    LoopedLM (float32 unless "weights"; see `loopscope.models.device`).
    """
    from loopscope.models.device import resolve_device, resolve_dtype, resolve_state_dtype

    target = resolve_device(device)
    weights = resolve_dtype(dtype)
    _import_loaders()
    if str(spec) in BUILTINS:
        loaded = BUILTINS[str(spec)][1](dtype=weights)
    else:
        path = Path(spec)
        if not path.exists():
            raise CheckpointError(
                f"model {str(spec)!r} is neither an existing path nor a builtin; builtins: {sorted(BUILTINS)}"
            )
        for _, recognises, load in LOADERS:
            if recognises(path):
                loaded = load(path, dtype=weights)
                break
        else:
            raise CheckpointError(
                f"{path} is not a model loopscope recognises: expected a directory with config.json and "
                "model.safetensors (loopscope, Hugging Face Llama-family/GPT-2, Ouro, Huginn, retrofit) or a .gguf file"
            )
    model = loaded.model.eval()
    if next(model.parameters()).dtype != weights:
        model.to(weights)
    if target.type != "cpu":
        model.to(target)
    if hasattr(model, "stream_dtype"):
        model.stream_dtype = resolve_state_dtype(state_dtype, weights)
    return loaded


def _import_loaders() -> None:
    """Import the modules that register loaders and builtins (kept lazy: transformers is slow to import)."""
    from loopscope.models import (
        builtin,  # noqa: F401
        families,  # noqa: F401  (Ouro, Huginn, retrofit loaders)
        healed,  # noqa: F401  (a healed retrofit stored as a delta on its base)
        hf,  # noqa: F401  (feedforward HF models; tried last)
    )


def looped_loader_recognises(path: Path) -> bool:
    from loopscope.models.checkpoint import config_json

    return (config_json(path) or {}).get("format") == "loopscope"


def load_looped_checkpoint(path: Path, dtype: torch.dtype = torch.float32) -> LoadedModel:
    from loopscope.data.tokenizer import load_tokenizer
    from loopscope.models.checkpoint import load_looped

    model = load_looped(path, dtype=dtype)
    has_tok = (path / "tokenizer.json").exists()
    tokenizer = load_tokenizer(path if has_tok else None)
    if len(tokenizer) > model.cfg.vocab_size:
        raise CheckpointError(
            f"tokenizer in {path} has {len(tokenizer)} tokens but the model's vocab_size is {model.cfg.vocab_size}"
        )
    return LoadedModel(model, tokenizer, model.cfg.name or path.name, "looped", model.cfg.recurrences)


register_loader("looped", looped_loader_recognises, load_looped_checkpoint)
