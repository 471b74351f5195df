"""Hook points: named identity modules that carry the (segment, recurrence, layer) label of every call.

Why: a looped model calls the same module R times per forward, and again for every decoded token. Counting
hook calls (as nnsight and TransformerLens do) mixes "which recurrence" with "which forward". Here the model
passes its own loop counter to every hook point as `step=Step(...)`, so whoever attaches a hook reads the
label from the call itself and never from the order calls happened.
"""

from __future__ import annotations

import torch
from torch import nn

from loopscope.labels import SEGMENTS, Step  # noqa: F401  (the label type lives with the data, not the model)


class HookPoint(nn.Module):
    """Identity `x -> x` whose forward hooks see `step` in their kwargs.

    Attach with `hook_point.register_forward_hook(fn, with_kwargs=True)`; `fn(module, args, kwargs, output)`
    reads `kwargs["step"]` and may return a replacement output (interventions). `name` is the dotted path
    in the model (TransformerLens style, e.g. `core.2.attn.hook_pattern`), set by the model on construction.
    """

    def __init__(self) -> None:
        super().__init__()
        self.name = ""

    @property
    def active(self) -> bool:
        """True when something listens here: lets the model skip work (e.g. materialising attention)."""
        return bool(self._forward_hooks or self._forward_pre_hooks)

    def forward(self, x: torch.Tensor, *, step: Step) -> torch.Tensor:  # noqa: ARG002 - read by hooks
        return x


def name_hook_points(model: nn.Module) -> dict[str, HookPoint]:
    """Give every HookPoint in `model` its dotted name and return them by name."""
    points = {}
    for name, module in model.named_modules():
        if isinstance(module, HookPoint):
            module.name = name
            points[name] = module
    return points
