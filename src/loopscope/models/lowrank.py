"""Low-rank updates of a model's linear layers (LoRA, Hu et al. 2021), attached without changing the model.

    W' = W + (α / r) · B A,     A ∈ R^{r × in}, B ∈ R^{out × r}   (B = 0 at the start, so W' = W)

`attach_low_rank(model, names, rank, alpha)` adds `(α/r) · B(A(x))` to the output of every named `nn.Linear` by a
forward hook: the model's own modules, names and state_dict stay as they are (a capture or a checkpoint of the
model sees plain weights), and `LowRank.merge()` folds the update into the weights for good. What healing a
retrofit trains and ships is the factors (`LowRank.factors()`), a few MB instead of the whole model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from loopscope.errors import CheckpointError, InputError

LINEAR_NAMES = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                "mlp.down_proj")


def key(name: str) -> str:
    """A module name usable as a parameter-container key ('core.0.attn.q_proj' → 'core__0__attn__q_proj')."""
    return name.replace(".", "__")


def layer_linears(model: nn.Module, segments: Iterable[str] = ("prelude", "core", "coda")) -> list[str]:
    """Names of every attention and MLP projection of the given segments of a LoopedLM, in model order."""
    names = []
    for segment in segments:
        for i, _ in enumerate(getattr(model, segment)):
            names += [f"{segment}.{i}.{lin}" for lin in LINEAR_NAMES]
    return names


class LowRank(nn.Module):
    """The factors of every attached update: `A[key(name)]` (r, in) and `B[key(name)]` (out, r)."""

    def __init__(self, model: nn.Module, names: list[str], rank: int, alpha: float, seed: int = 0) -> None:
        super().__init__()
        if rank < 1:
            raise InputError(f"low-rank update rank={rank}: give at least 1")
        modules = dict(model.named_modules())
        missing = [n for n in names if not isinstance(modules.get(n), nn.Linear)]
        if missing:
            raise InputError(f"no nn.Linear named {missing[:3]} in the model; name attention/MLP projections, "
                             f"e.g. {LINEAR_NAMES[0]!r} of a layer")
        self.rank, self.alpha, self.names = rank, float(alpha), list(names)
        self.A, self.B = nn.ParameterDict(), nn.ParameterDict()
        gen = torch.Generator().manual_seed(seed)
        for name in names:
            lin = modules[name]
            w = lin.weight
            a = torch.empty(rank, lin.in_features, dtype=torch.float32)
            bound = 1 / math.sqrt(lin.in_features)  # the Kaiming-uniform bound nn.Linear uses, as LoRA does for A
            a.uniform_(-bound, bound, generator=gen)
            self.A[key(name)] = nn.Parameter(a.to(device=w.device))
            self.B[key(name)] = nn.Parameter(torch.zeros(lin.out_features, rank, device=w.device))
        self._modules_by_name = {n: modules[n] for n in names}
        self._handles: list = []

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def attach(self) -> LowRank:
        """Start adding the updates to the layers' outputs (idempotent)."""
        if not self._handles:
            for name, lin in self._modules_by_name.items():
                self._handles.append(lin.register_forward_hook(self._hook(key(name))))
        return self

    def detach_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, k: str):
        def fn(module, args, output):
            x = args[0]
            a, b = self.A[k], self.B[k]
            return output + self.scale * ((x.to(a.dtype) @ a.T) @ b.T).to(output.dtype)
        return fn

    def delta(self, name: str) -> torch.Tensor:
        """(α/r) · B A for one layer (out, in)."""
        return self.scale * (self.B[key(name)] @ self.A[key(name)])

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W + (α/r) B A for every layer, then remove the hooks: the model alone now computes W'."""
        self.detach_hooks()
        for name, lin in self._modules_by_name.items():
            lin.weight += self.delta(name).to(lin.weight.dtype)

    def factors(self) -> dict[str, torch.Tensor]:
        """`{name}.lora_A`, `{name}.lora_B` for every layer (module names with dots), detached."""
        out = {}
        for name in self.names:
            out[f"{name}.lora_A"] = self.A[key(name)].detach()
            out[f"{name}.lora_B"] = self.B[key(name)].detach()
        return out


def attach_low_rank(model: nn.Module, names: list[str], rank: int, alpha: float, seed: int = 0) -> LowRank:
    """Attach `LowRank` updates to the named linear layers of `model` (see the module docstring)."""
    return LowRank(model, names, rank, alpha, seed).attach()


@torch.no_grad()
def merge_factors(model: nn.Module, factors: Mapping[str, torch.Tensor], alpha: float, source: str) -> list[str]:
    """Fold stored factors `{name}.lora_A` / `{name}.lora_B` into `model`'s weights: W += (α/r) B A.

    Checks every name and shape first and raises one CheckpointError naming the problems. Returns the names."""
    modules = dict(model.named_modules())
    names = sorted({k.rsplit(".", 1)[0] for k in factors})
    problems = []
    for name in names:
        lin = modules.get(name)
        a, b = factors.get(f"{name}.lora_A"), factors.get(f"{name}.lora_B")
        if not isinstance(lin, nn.Linear):
            problems.append(f"{name}: no such linear layer")
        elif a is None or b is None:
            problems.append(f"{name}: needs both lora_A and lora_B")
        elif a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or a.shape[1] != lin.in_features \
                or b.shape[0] != lin.out_features:
            problems.append(f"{name}: A {tuple(a.shape)}, B {tuple(b.shape)} do not fit ({lin.out_features}, "
                            f"{lin.in_features})")
    if problems:
        raise CheckpointError(f"low-rank update in {source} does not fit the model: {'; '.join(problems[:6])}")
    for name in names:
        a, b = factors[f"{name}.lora_A"].float(), factors[f"{name}.lora_B"].float()
        lin = modules[name]
        lin.weight += ((alpha / a.shape[0]) * (b @ a)).to(device=lin.weight.device, dtype=lin.weight.dtype)
    return names
