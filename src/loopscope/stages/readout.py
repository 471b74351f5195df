"""`Readout`: what a lens needs from a model to turn a residual state into next-token logits.

    logits = W_U · n_f(x) (+ b_U)

n_f is the model's final norm: RMSNorm (`norm_kind="rms"`: x / sqrt(mean(x²) + ε) · w, Zhang & Sennrich
2019), LayerNorm (`"layer"`: (x − mean) / sqrt(var + ε) · w + b, Ba et al. 2016; GPT-2), or nothing
(`"none"`). Built from plain tensors, so any model family can supply one:

    Readout(norm_weight, norm_eps, unembedding, norm_kind="rms")

and, for the coda lens, a callable `coda(x, start)` that runs what the model runs between the block and
the final norm, beginning at coda layer `start` (0 = the whole exit path).
`experiments.stage_tables.looped_readout(model)`
builds one for a `LoopedLM`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from loopscope.errors import InputError

NormKind = Literal["rms", "layer", "none"]


@dataclass
class Readout:
    """Final norm + unembedding, as plain tensors.

    norm_weight (D,) or None (only for norm_kind "none"); norm_eps; unembedding W_U (V, D);
    norm_kind "rms" | "layer" | "none"; norm_bias (D,) for LayerNorm (None = 0); unembedding_bias (V,) or
    None; coda: callable (x [B, T, D], start: int) → [B, T, D] running the model's exit path from coda
    layer `start` (start = 0 includes any norm the model applies before its coda), None if there is no coda;
    n_coda: number of coda layers the callable can run.
    """

    norm_weight: torch.Tensor | None
    norm_eps: float
    unembedding: torch.Tensor
    norm_kind: NormKind = "rms"
    norm_bias: torch.Tensor | None = None
    unembedding_bias: torch.Tensor | None = None
    coda: Callable[[torch.Tensor, int], torch.Tensor] | None = None
    n_coda: int = 0

    def __post_init__(self) -> None:
        if self.norm_kind not in ("rms", "layer", "none"):
            raise InputError(f"norm_kind={self.norm_kind!r}; use 'rms', 'layer' or 'none'")
        if self.unembedding.ndim != 2:
            raise InputError(f"unembedding must be W_U (vocab, d_model); got shape {tuple(self.unembedding.shape)}")
        D = self.unembedding.shape[1]
        if self.norm_kind != "none" and (self.norm_weight is None or tuple(self.norm_weight.shape) != (D,)):
            got = None if self.norm_weight is None else tuple(self.norm_weight.shape)
            raise InputError(f"norm_weight must have shape ({D},) for norm_kind={self.norm_kind!r}; got {got}")

    @property
    def d_model(self) -> int:
        return self.unembedding.shape[1]

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """n_f(x) in float32, x: (..., D)."""
        x = x.float()
        if self.norm_kind == "none":
            return x
        w = self.norm_weight.float()
        if self.norm_kind == "rms":
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.norm_eps) * w
        centred = x - x.mean(-1, keepdim=True)
        y = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + self.norm_eps) * w
        return y if self.norm_bias is None else y + self.norm_bias.float()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """W_U n_f(x) (+ b_U): (..., D) → (..., V), float32, on the unembedding's device."""
        if x.shape[-1] != self.d_model:
            raise InputError(f"state width {x.shape[-1]} does not match the unembedding width {self.d_model}")
        device = self.unembedding.device
        out = self.normalise(x if x.device == device else x.to(device)) @ self.unembedding_float32().T
        return out if self.unembedding_bias is None else out + self.unembedding_bias.float()

    def unembedding_float32(self) -> torch.Tensor:
        """W_U in float32, converted once (a bfloat16 W_U converted per state cost a fifth of a CPU analysis of a
        65,536-token vocabulary)."""
        cached = self.__dict__.get("_unembedding_f32")
        if cached is None or cached[0] is not self.unembedding:
            cached = (self.unembedding, self.unembedding.float())
            self.__dict__["_unembedding_f32"] = cached
        return cached[1]
