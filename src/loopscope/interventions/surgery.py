"""`intervene(model, specs)`: one context manager for every model kind.

Two tools, the same for a LoopedLM and a Hugging Face model:
- zeroing: a forward hook (registered first, `prepend=True`, so every recorder sees the changed value) on the
  module whose output a sublayer adds to the stream — `hook_attn_out`/`hook_mlp_out` of a LoopedLM layer (their
  `kwargs["step"]` says which recurrence is running), `self_attn`/`attn`/`mlp` of a HF decoder layer (R = 1);
- deleting/swapping: the segment's layer list is temporarily replaced by a shortened or reordered list of the
  *same* modules, so the forward runs exactly the computation of a model built that way. For a LoopedLM the
  config's layer count follows (the loop and Recorder read it); for a HF model the per-layer `layer_types`
  follow and `use_cache` is off (attention modules keep their `layer_idx`, which a KV cache would key on).

On exit every hook is removed and the original lists/config restored, also when the body raises.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from loopscope.errors import InputError
from loopscope.interventions.specs import DeleteLayer, Intervention, SwapLayers, ZeroSublayer, describe, spec_text
from loopscope.models.hooks import name_hook_points
from loopscope.models.looped import LoopedLM

COUNT_FIELD = {"prelude": "n_prelude", "core": "n_block", "coda": "n_coda"}


class LoopedSurgeon:
    """Layer lists of a LoopedLM: prelude, core (the block, run at every recurrence), coda."""

    def __init__(self, model: LoopedLM) -> None:
        self.model = model
        self.saved_lists = {s: getattr(model, s) for s in COUNT_FIELD}
        self.saved_cfg = model.cfg

    def layers(self, segment: str) -> list[nn.Module]:
        return list(getattr(self.model, segment))

    def reorder(self, segment: str, order: list[int]) -> None:
        current = self.layers(segment)
        if segment == "core" and not order:
            raise InputError("cannot delete the only block layer: a looped model needs at least one")
        setattr(self.model, segment, nn.ModuleList(current[i] for i in order))
        self.model.cfg = self.model.cfg.replace(**{COUNT_FIELD[segment]: len(order)})
        self.model.hook_points = name_hook_points(self.model)

    def sublayer(self, segment: str, layer: nn.Module, sublayer: str) -> nn.Module:
        return layer.hook_mlp_out if sublayer == "mlp" else layer.hook_attn_out

    def check_recurrences(self, spec: ZeroSublayer) -> None:
        if spec.segment != "core" and spec.recurrences is not None and any(t != 0 for t in spec.recurrences):
            raise InputError(f"{spec}: the {spec.segment} runs once (recurrence 0); use recurrences=None or [0]")

    def restore(self) -> None:
        for segment, layers in self.saved_lists.items():
            setattr(self.model, segment, layers)
        self.model.cfg = self.saved_cfg
        self.model.hook_points = name_hook_points(self.model)


class HFSurgeon:
    """The decoder layers of a Hugging Face feedforward model, filed as the "core" segment (R = 1)."""

    def __init__(self, model: nn.Module) -> None:
        from loopscope.models import hf_parts as hf

        self.hf, self.model = hf, model
        self.saved_list = hf.hf_layers(model)
        self.saved_types = getattr(model.config, "layer_types", None)
        self.saved_use_cache = model.config.use_cache
        model.config.use_cache = False

    def layers(self, segment: str) -> list[nn.Module]:
        if segment != "core":
            raise InputError(f"a Hugging Face feedforward model has only the 'core' segment (its decoder layers); "
                             f"got {segment!r}")
        return list(self.hf.hf_layers(self.model))

    def reorder(self, segment: str, order: list[int]) -> None:
        current = self.layers(segment)
        if not order:
            raise InputError("cannot delete every decoder layer")
        self.hf.set_hf_layers(self.model, nn.ModuleList(current[i] for i in order))
        types = getattr(self.model.config, "layer_types", None)
        if types is not None:  # Qwen2 picks each layer's mask (full/sliding) by position from this list
            self.model.config.layer_types = [types[i] for i in order]

    def sublayer(self, segment: str, layer: nn.Module, sublayer: str) -> nn.Module:
        return self.hf.hf_sublayer(self.model, layer, sublayer)

    def check_recurrences(self, spec: ZeroSublayer) -> None:
        if spec.recurrences is not None and any(t != 0 for t in spec.recurrences):
            raise InputError(f"{spec}: a feedforward model runs once (recurrence 0); use recurrences=None or [0]")

    def restore(self) -> None:
        self.hf.set_hf_layers(self.model, self.saved_list)
        if self.saved_types is not None:
            self.model.config.layer_types = self.saved_types
        self.model.config.use_cache = self.saved_use_cache


def surgeon_for(model: nn.Module) -> LoopedSurgeon | HFSurgeon:
    if isinstance(model, LoopedLM):
        return LoopedSurgeon(model)
    from loopscope.models.hf_parts import is_hf_model

    if is_hf_model(model):
        return HFSurgeon(model)
    raise InputError(f"cannot intervene on a {type(model).__name__}; load it with loopscope.models.load_model")


def zero_hook(spec: ZeroSublayer):
    """Forward hook returning zeros (same shape) when the running recurrence is one `spec` selects.

    HookPoints pass `step` (its recurrence is read); HF modules pass none (recurrence 0). Tuple outputs
    (HF attention: (out, probs)) keep everything but the first element.
    """

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        step = kwargs.get("step")
        if not spec.applies_at(0 if step is None else step.recurrence):
            return None
        if isinstance(output, tuple):
            return (torch.zeros_like(output[0]), *output[1:])
        return torch.zeros_like(output)

    return hook


def _check_index(spec: Intervention, n: int, need: int) -> None:
    if spec.layer + need > n - 1:
        last = n - 1 - need
        raise InputError(f"{spec_text(spec)}: the {spec.segment} has {n} layers at this point, so layer must be "
                         f"in 0..{last}" + (" (swap exchanges layer and layer+1)" if need else ""))


@contextmanager
def intervene(model: Any, specs: Sequence[Intervention]) -> Iterator[nn.Module]:
    """Apply `specs` (in order) to `model` (a LoopedLM, HF model, or LoadedModel) for the body of the with-block."""
    model = getattr(model, "model", model) if not isinstance(model, nn.Module) else model
    for spec in specs:
        describe(spec)  # refuses non-specs with a clear message
    surgeon = surgeon_for(model)
    handles = []
    try:
        for spec in specs:
            layers = surgeon.layers(spec.segment)
            n = len(layers)
            if isinstance(spec, ZeroSublayer):
                _check_index(spec, n, 0)
                surgeon.check_recurrences(spec)
                target = surgeon.sublayer(spec.segment, layers[spec.layer], spec.sublayer)
                handles.append(target.register_forward_hook(zero_hook(spec), with_kwargs=True, prepend=True))
            elif isinstance(spec, DeleteLayer):
                _check_index(spec, n, 0)
                surgeon.reorder(spec.segment, [i for i in range(n) if i != spec.layer])
            elif isinstance(spec, SwapLayers):
                _check_index(spec, n, 1)
                order = list(range(n))
                order[spec.layer], order[spec.layer + 1] = spec.layer + 1, spec.layer
                surgeon.reorder(spec.segment, order)
        yield model
    finally:
        for h in handles:
            h.remove()
        surgeon.restore()
