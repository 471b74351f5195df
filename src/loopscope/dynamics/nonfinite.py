"""Tokens whose state went non-finite: a loop that overflows (a diverging looped model at large R) or a NaN weight.

Per real token, the first recurrence t and block layer j at which X_{j,t} has a non-finite entry (inf or NaN):

    first_recurrence = min { t : ∃ j, ¬isfinite(X_{j,t}) }      (−1 when every state stays finite)
    first_layer      = the smallest such j at that t

Every other metric keeps running on such tokens (a non-finite state gives NaN, never an exception); this table says
how many there were and from when, so a report can say why its curves stop. The reduction stays on the states'
device (no host transfer per recurrence).
"""

from __future__ import annotations

import pandas as pd
import torch

from loopscope.accumulate.core import Accumulator, BatchContext, Part
from loopscope.accumulate.replay import run_on_trajectory
from loopscope.capture.trajectory import Trajectory
from loopscope.labels import Step

NEVER = -1


class NonFinite(Accumulator):
    """Per real token: the first (recurrence, block layer) whose state is non-finite (see the module doc)."""

    name = "non_finite"
    sites = frozenset({"resid_post"})

    def begin(self, ctx: BatchContext) -> None:
        super().begin(ctx)
        self.b, self.t = ctx.real
        self.first = None  # [n, 2] int64 (recurrence, layer) on the states' device, made at the first state

    def observe(self, site: str, step: Step, x: torch.Tensor) -> None:
        seg, rec, layer = step
        if seg != "core":
            return
        b, t = self.ctx.real_on(x.device)
        bad = ~torch.isfinite(x[b, t]).all(-1)  # [n]
        if self.first is None:
            self.first = torch.full((bad.numel(), 2), NEVER, dtype=torch.int64, device=x.device)
        newly = bad & (self.first[:, 0] == NEVER)
        here = torch.tensor([rec, layer], dtype=torch.int64, device=x.device)
        self.first = torch.where(newly[:, None], here, self.first)

    def end(self) -> Part:
        first = self.first.cpu() if self.first is not None else torch.full((self.b.numel(), 2), NEVER)
        return {"frame": pd.DataFrame({"batch": (self.b + self.ctx.first_prompt).numpy(), "token": self.t.numpy(),
                                       "first_recurrence": first[:, 0].numpy(), "first_layer": first[:, 1].numpy()})}

    def combine(self, parts: list[Part]) -> pd.DataFrame:
        return pd.concat([p["frame"] for p in parts], ignore_index=True)


def non_finite_tokens(traj: Trajectory) -> pd.DataFrame:
    """One row per real (batch, token): batch, token, first_recurrence, first_layer (−1: always finite)."""
    return run_on_trajectory(NonFinite(), traj)


def non_finite_summary(per_token: pd.DataFrame) -> pd.DataFrame:
    """One row: n (tokens), non_finite (tokens whose state went non-finite), fraction, and the first, median and
    last recurrence at which they did (NaN when none did)."""
    went = per_token[per_token["first_recurrence"] != NEVER]["first_recurrence"]
    n = len(per_token)
    return pd.DataFrame([{"n": n, "non_finite": len(went), "fraction": len(went) / n if n else float("nan"),
                          "first_recurrence_min": went.min() if len(went) else float("nan"),
                          "first_recurrence_median": went.median() if len(went) else float("nan"),
                          "first_recurrence_max": went.max() if len(went) else float("nan")}])
