"""Shared plumbing for the stages metrics: which states exist, which tokens are real, and how a table of
observations is summarised into mean / std / n.

Every metric table starts with the identifying columns of the state it describes, taken from
`Trajectory.realized_index()`: `segment, recurrence, layer, depth, relative_depth` (prelude, every
recurrence's block layers, coda; optionally the embedding at depth 0).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pandas as pd
import torch

from loopscope.accumulate.core import Accumulator, BatchContext, Part
from loopscope.capture.trajectory import Trajectory
from loopscope.errors import InputError
from loopscope.labels import Step
from loopscope.tables import STATE_COLUMNS, std_column  # noqa: F401  (the dialect lives in loopscope.tables)


def state_at(traj: Trajectory, segment: str, recurrence: int, layer: int) -> torch.Tensor:
    """The state [B, T, D] of one row of `realized_index` (a view, nothing is copied)."""
    if segment == "embed":
        return traj.embed
    if segment == "prelude":
        return traj.prelude[layer]
    if segment == "core":
        return traj.core[recurrence, layer]
    if segment == "coda":
        return traj.coda[layer]
    raise InputError(f"unknown segment {segment!r}; use embed, prelude, core or coda")


def state_rows(traj: Trajectory, include_embed: bool = False) -> Iterator[tuple[dict, torch.Tensor]]:
    """Yield (identifying columns, states [B, T, D]) for every state in realized order."""
    for row in traj.realized_index(include_embed=include_embed).itertuples(index=False):
        ids = dict(zip(STATE_COLUMNS, row))
        yield ids, state_at(traj, ids["segment"], ids["recurrence"], ids["layer"])


def prompt_states(traj: Trajectory, include_embed: bool = False
                  ) -> Iterator[tuple[dict, int, torch.Tensor, torch.Tensor]]:
    """Yield (identifying columns, prompt b, its real-token positions (CPU), x [T_b, D] on the states' device) for
    every state in realized order and every prompt: the per-prompt rows the state metrics are computed on."""
    positions = real_positions(traj)
    for ids, states in state_rows(traj, include_embed=include_embed):
        for b, pos in enumerate(positions):
            yield ids, b, pos, states[b].index_select(0, pos.to(states.device))


def attention_rows(traj: Trajectory) -> Iterator[tuple[dict, torch.Tensor]]:
    """Yield (identifying columns, attention [B, H, T, T]) for every layer whose attention was captured.

    Prelude / coda rows appear only when their attention is present; block rows need `core_attention`.
    """
    if traj.core_attention is None:
        raise InputError("this Trajectory has no attention; capture it with attention=True")
    stored = {"prelude": traj.prelude_attention, "coda": traj.coda_attention}
    for row in traj.realized_index().itertuples(index=False):
        ids = dict(zip(STATE_COLUMNS, row))
        seg, t, j = ids["segment"], ids["recurrence"], ids["layer"]
        if seg == "core":
            yield ids, traj.core_attention[t, j]
        elif stored.get(seg) is not None:
            yield ids, stored[seg][j]


def real_positions(traj: Trajectory) -> list[torch.Tensor]:
    """Per prompt b, the (long, CPU) indices of its real tokens (`traj.mask[b]`)."""
    return [torch.nonzero(m, as_tuple=False).flatten() for m in traj.mask.cpu()]


def require_prefix_mask(traj_mask: torch.Tensor) -> None:
    """Refuse masks that are not right padding (real tokens first), which causal restrictions rely on."""
    m = traj_mask.bool()
    m = m if m.device.type == "cpu" else m.cpu()
    n = m.sum(1)
    prefix = torch.arange(m.shape[1])[None, :] < n[:, None]
    if not torch.equal(prefix, m):
        raise InputError("mask must be right padding (real tokens first, then padding); re-encode the prompts "
                         "with padding_side='right'")


def summarise(observations: pd.DataFrame, values: Sequence[str], over: Sequence[str]) -> pd.DataFrame:
    """Collapse the `over` columns (e.g. ("batch", "head")): for every value v give `v_mean`, `v_std`
    (sample std, ddof=1; NaN when n = 1), and `n` = observations per group. NaN observations are skipped by
    mean/std (e.g. a metric undefined for a one-token prompt) but still counted in n.

    Groups are the identifying columns (`STATE_COLUMNS`, plus `head` / `batch` when present and not in
    `over`), in order of first appearance.
    """
    keys = [c for c in [*STATE_COLUMNS, "head", "batch"] if c in observations.columns and c not in over]
    missing = [v for v in values if v not in observations.columns]
    if missing:
        raise InputError(f"cannot summarise: columns {missing} are not in the table ({list(observations.columns)})")
    grouped = observations.groupby(keys, sort=False, dropna=False)[list(values)]
    mean = grouped.mean().add_suffix("_mean")
    std = grouped.std(ddof=1).add_suffix("_std")
    size = grouped.size().rename("n")
    parts = []
    for v in values:
        parts += [mean[f"{v}_mean"], std[f"{v}_std"]]
    return pd.concat([*parts, size], axis=1).reset_index()


def xlogx(p: torch.Tensor) -> torch.Tensor:
    """p log p with 0 log 0 = 0 (entropies of attention rows, column masses, Gram spectra)."""
    p = p.clamp_min(0)  # p ≤ 0 contributes 0, as 0 log 0 does
    return torch.special.xlogy(p, p)  # one kernel, and xlogy(0, 0) = 0 by definition


class PromptRows(Accumulator):
    """Base of the stages accumulators: one row of observations per (state, prompt[, head]), computed as each
    state (or attention pattern) is produced; `combine` concatenates the batches' rows and summarises them
    over `over` (or returns them raw, ordered by state then prompt then head, when `raw`).

    Subclasses `record` each observation's values as tensors on the states' device; the batch's values reach the
    host once, in `end` (on a GPU a copy per state, prompt or head would synchronise the device each time)."""

    values: list[str] = []
    int_columns: list[str] = []  # whole-number columns recorded after `values` (exact in float64, int64 in the table)
    sites: frozenset[str] = frozenset({"resid_post"})

    def __init__(self, over: list[str], raw: bool = False, include_embed: bool = False) -> None:
        self.over, self.raw, self.include_embed = list(over), raw, include_embed

    def begin(self, ctx: BatchContext) -> None:
        super().begin(ctx)
        self.positions = [torch.nonzero(m, as_tuple=False).flatten() for m in ctx.mask]
        self._positions_on: dict[torch.device, list[torch.Tensor]] = {}
        self.rows: list[dict] = []  # identifying columns (Python values, known without the device)
        self.observed: list[torch.Tensor] = []  # their value columns, [rows, columns] on the states' device

    def record(self, rows: list[dict], values: torch.Tensor) -> None:
        """Add rows: their identifying columns and their `columns` values [len(rows), len(columns)] (float64, on the
        states' device). Nothing reaches the host here: `end` moves the batch's values in one copy."""
        self.rows += rows
        self.observed.append(values.reshape(len(rows), len(self.columns)))

    @property
    def columns(self) -> list[str]:
        """The value columns `record` takes, in table order: `values`, then `int_columns` (whole numbers)."""
        return [*self.values, *self.int_columns]

    def positions_on(self, device: torch.device) -> list[torch.Tensor]:
        """`positions` on `device`, moved once per batch."""
        if device not in self._positions_on:
            self._positions_on[device] = [p if p.device == device else p.to(device) for p in self.positions]
        return self._positions_on[device]

    def ids(self, step: Step) -> dict:
        """The identifying columns of the state `step` (as `Trajectory.realized_index`)."""
        depth = self.ctx.depth(step)
        return {"segment": step.segment, "recurrence": step.recurrence, "layer": step.layer, "depth": depth,
                "relative_depth": depth / max(self.ctx.last_depth, 1)}

    def wants(self, site: str, step: Step) -> bool:
        return site in self.sites and (step.segment != "embed" or self.include_embed)

    def prompts(self, x: torch.Tensor):
        """(b, global prompt index, real positions, x[b] restricted to real tokens) for every prompt of the batch."""
        for b, pos in enumerate(self.positions):
            yield b, self.ctx.first_prompt + b, pos, self.ctx.prompt_state(x, b)

    def end(self) -> Part:
        frame = pd.DataFrame(self.rows)
        if self.observed:
            values = torch.cat(self.observed).cpu().numpy()  # the batch's one host transfer
            self.observed = []
            for i, c in enumerate(self.columns):
                frame[c] = values[:, i].astype("int64") if c in self.int_columns else values[:, i]
        return {"rows": frame}

    def combine(self, parts: list[Part]) -> pd.DataFrame:
        raw = pd.concat([p["rows"] for p in parts if len(p["rows"])], ignore_index=True)
        if raw.empty:
            raise InputError(f"{self.name}: nothing to summarise (no states or no real tokens)")
        order = [c for c in ("depth", "batch", "head") if c in raw.columns]
        raw = raw.sort_values(order, kind="stable").reset_index(drop=True)
        raw[self.values] = raw[self.values].astype("float64")
        if self.raw:
            return raw
        return summarise(raw, self.values, self.over)
