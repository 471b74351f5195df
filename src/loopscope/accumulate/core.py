"""The accumulator protocol: what a streaming metric sees of a batch and what it keeps.

Events arrive in realized order, as the model produces them (or as a stored Trajectory is replayed):

    site          step                           tensor
    "embed"       Step("embed", 0, 0)            [B, T, D]      scaled token embeddings
    "attn_in"     Step(segment, t, j)            [B, T, D]      input of the score function, n1(X) (Prop. 4.2)
    "pattern"     Step(segment, t, j)            [B, H, T, T]   attention probabilities (before that layer's
                                                                resid_post)
    "injected"    Step("core", t, 0)             [B, T, D]      block input after injection z_t
    "resid_post"  Step(segment, t, j)            [B, T, D]      layer output X_{j,t}
    "exit_gate"   Step("core", t, K−1)           [B, T]         Ouro's exit-gate logit
    "logits"      Step("coda", 0, C)             [B, T, V]      final logits

Some metrics need the end of the run before they can be computed (distance to X*_ℓ = X_{ℓ,R−1}, the cosine to the
final state, the rank of the final prediction). They declare `needs_finals`: the batch's `Finals` are then known
when the batch begins — from a first, deterministic pass of the same forward when streaming (the second pass is
checked to reproduce them bit for bit), or from the Trajectory itself when replaying one. That is exact: no state
is approximated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from loopscope.labels import Step

Part = dict[str, Any]  # a batch's reduced result: name -> Tensor | DataFrame | JSON-able value

SITES = ("embed", "attn_in", "pattern", "injected", "resid_post", "exit_gate", "logits")


@dataclass
class Finals:
    """What a batch ends with, known before its analysis pass begins (see the module doc).

    core_last [K, B, T, D] = X_{j,R−1}; core_prev [K, B, T, D] = X_{j,R−2} (None for R = 1);
    attention_last [K, B, H, T, T] = the block's attention at R−1 (None without attention);
    prediction [B, T] int64 = argmax of the final logits (None without logits)."""

    core_last: torch.Tensor
    core_prev: torch.Tensor | None = None
    attention_last: torch.Tensor | None = None
    prediction: torch.Tensor | None = None


@dataclass
class BatchContext:
    """Everything about a batch except its states.

    index: the batch's position in the whole run (parts are folded in this order); first_prompt: global index of
    its first prompt; mask [B, T] bool (CPU, right padding); R, K, P, C: recurrences, block, prelude and coda
    sizes; state_dtype: dtype the states were computed in (for the numerical floor); finals: see `Finals`;
    device: where the states are (accumulators reduce there, and hand the host only their Part, once per batch)."""

    index: int
    first_prompt: int
    mask: torch.Tensor
    recurrences: int
    block_size: int
    n_prelude: int
    n_coda: int
    token_ids: torch.Tensor | None = None
    tokens: list[list[str]] | None = None
    state_dtype: torch.dtype = torch.float32
    finals: Finals | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def batch_size(self) -> int:
        return int(self.mask.shape[0])

    @property
    def real(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, token) indices of the real tokens, row-major (CPU int64)."""
        b, t = self.mask.nonzero(as_tuple=True)
        return b, t

    def prompt_pattern(self, x: torch.Tensor, b: int) -> torch.Tensor:
        """Prompt b's attention [H, T_b, T_b] over its real rows and columns (x [B, H, T, T]): a view when the mask
        is right padding (every captured batch), a gather otherwise."""
        n = self.lengths[b]
        if self.prefix:
            return x[b, :, :n, :n]
        pos = self.mask[b].nonzero(as_tuple=True)[0].to(x.device)
        return x[b].index_select(-2, pos).index_select(-1, pos)

    def prompt_state(self, x: torch.Tensor, b: int) -> torch.Tensor:
        """Prompt b's state [T_b, …] over its real tokens (x [B, T, …]): a view for right padding."""
        if self.prefix:
            return x[b, : self.lengths[b]]
        return x[b].index_select(0, self.mask[b].nonzero(as_tuple=True)[0].to(x.device))

    def real_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """`real` on `device`, copied there once per batch (not once per state)."""
        device = torch.device(device)
        cache = self.__dict__.setdefault("_real_on", {})
        if device not in cache:
            b, t = self.real
            cache[device] = (b, t) if device.type == "cpu" else (b.to(device), t.to(device))
        return cache[device]

    @property
    def lengths(self) -> list[int]:
        if getattr(self, "_lengths", None) is None:
            self._lengths = self.mask.sum(1).tolist()
        return self._lengths

    @property
    def prefix(self) -> bool:
        """True when every prompt's real tokens come first (right padding)."""
        if getattr(self, "_prefix", None) is None:
            n = self.mask.sum(1)
            self._prefix = bool(torch.equal(torch.arange(self.mask.shape[1])[None, :] < n[:, None], self.mask))
        return self._prefix

    def real_states(self, x: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """x [B, T, D] at the real tokens → [N, D] in `dtype`, on x's device; computed once per state however many
        accumulators ask (a one-slot cache of the last tensor asked for). Never modify the result in place."""
        # the cache holds the source tensor itself: comparing ids alone would match a new tensor that reused a freed
        # one's id and address
        if getattr(self, "_real_source", None) is not x or self._real_dtype != dtype:
            b, t = self.real_on(x.device)
            self._real_value = x[b, t].to(dtype)
            self._real_source, self._real_dtype = x, dtype
        return self._real_value

    def depth(self, step: Step) -> int:
        """Realized depth P + t·K + j + 1 of a state (embedding 0; coda after the last recurrence)."""
        seg, t, j = step
        if seg == "embed":
            return 0
        if seg == "prelude":
            return j + 1
        if seg == "core":
            return self.n_prelude + t * self.block_size + j + 1
        return self.n_prelude + self.recurrences * self.block_size + j + 1

    @property
    def last_depth(self) -> int:
        return self.n_prelude + self.recurrences * self.block_size + self.n_coda


class Accumulator:
    """A metric fed one batch at a time. Subclasses set `name`, `sites` (events they read) and `needs_finals`,
    and implement `begin`, `observe`, `end` (→ the batch's Part) and `combine` (Parts in batch order → table)."""

    name: str = "accumulator"
    sites: frozenset[str] = frozenset()
    needs_finals: bool = False
    needs_attention: bool = False

    def begin(self, ctx: BatchContext) -> None:
        self.ctx = ctx

    def observe(self, site: str, step: Step, x: torch.Tensor) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def end(self) -> Part:  # pragma: no cover - interface
        raise NotImplementedError

    def combine(self, parts: list[Part]) -> Any:  # pragma: no cover - interface
        raise NotImplementedError


class Dispatcher:
    """Begins every accumulator on a batch, passes each event to those that read its site, and ends them."""

    def __init__(self, accumulators: list[Accumulator], ctx: BatchContext) -> None:
        self.accumulators = accumulators
        self.by_site: dict[str, list[Accumulator]] = {}
        for acc in accumulators:
            acc.begin(ctx)
            for site in acc.sites:
                self.by_site.setdefault(site, []).append(acc)

    @property
    def sites(self) -> set[str]:
        return set(self.by_site)

    def push(self, site: str, step: Step, x: torch.Tensor) -> None:
        for acc in self.by_site.get(site, ()):
            acc.observe(site, step, x)

    def finish(self) -> dict[str, Part]:
        """Every accumulator's Part, on the host: the batch's one transfer of what it reduced to."""
        return {acc.name: to_host(acc.end()) for acc in self.accumulators}


def to_host(part: Any) -> Any:
    """A Part with every tensor in it moved to the CPU (dicts, lists and tuples followed; anything else as is)."""
    if isinstance(part, torch.Tensor):
        return part if part.device.type == "cpu" else part.cpu()
    if isinstance(part, dict):
        return {k: to_host(v) for k, v in part.items()}
    if isinstance(part, (list, tuple)):
        return type(part)(to_host(v) for v in part)
    return part


def run_accumulators(accumulators: list[Accumulator], ctx: BatchContext, events) -> dict[str, Part]:
    """Feed one batch's events (an iterable of (site, step, tensor)) to every accumulator; return their Parts."""
    names = [acc.name for acc in accumulators]
    if len(set(names)) != len(names):
        raise ValueError(f"accumulator names must be unique in one run; got {names}")
    dispatch = Dispatcher(accumulators, ctx)
    for site, step, x in events:
        dispatch.push(site, step, x)
    return dispatch.finish()


def signature(acc: Accumulator) -> str:
    """A stable description of an accumulator's settings (for cache keys): class name and simple attributes."""
    simple = {k: v for k, v in sorted(vars(acc).items())
              if isinstance(v, (int, float, str, bool, tuple, type(None))) and not k.startswith("_")}
    nested = {k: repr(v) for k, v in sorted(vars(acc).items()) if hasattr(v, "__dataclass_fields__")}
    return f"{type(acc).__name__}({simple}, {nested})"


def frame_or_empty(parts: list[pd.DataFrame]) -> pd.DataFrame:
    parts = [p for p in parts if p is not None and len(p)]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
