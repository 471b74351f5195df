"""Convergence of each block layer's state across recurrences (Blayney et al. 2026 §3.3, §4; Figs. 3, 4, 22–25).

Notation: X_{j,t} ∈ R^D is the output of block layer j at recurrence t for one real token (Trajectory.core),
t = 0..R-1. All norms are L2 over D; cos(a, b) = ⟨a, b⟩ / (‖a‖‖b‖) (NaN if either is zero/non-finite).

Each metric is an accumulator (`loopscope.accumulate`): fed state by state (memory: one batch at one
recurrence), reduced per batch to moments and log-histograms per (recurrence, layer), and combined in batch
order. The functions below run the same accumulator on an in-memory Trajectory.
"""

from __future__ import annotations

import pandas as pd
import torch

from loopscope.accumulate.core import Accumulator, BatchContext, Part
from loopscope.accumulate.replay import run_on_trajectory
from loopscope.accumulate.stats import LogHistogram, Moments
from loopscope.capture.trajectory import Trajectory
from loopscope.dynamics._tokens import batch_tokens, cosine_from_distance, need_recurrences, norm
from loopscope.errors import InputError
from loopscope.labels import Step
from loopscope.tables import COUNT, block_state_columns, mean_column, sample_std, std_column

QUANTILES = {"q10": 0.1, "q25": 0.25, "median": 0.5, "q75": 0.75, "q90": 0.9}


def cell_frame(recurrence: torch.Tensor, K: int, moments: dict[str, Moments], quantiles: dict[str, torch.Tensor],
               finite_only: bool, layout: dict[str, int]) -> pd.DataFrame:
    """One row per (recurrence, layer), in the table dialect (`loopscope.tables`): [STATE_COLUMNS, m_mean, m_std for
    each metric, n (tokens), then the quantile columns `h_q10, h_q25, h_median, h_q75, h_q90` of each histogrammed
    quantity h]. `layout`: n_prelude, block_size, recurrences, n_coda of the run (for the depth columns)."""
    Rp = recurrence.numel()
    data = block_state_columns(recurrence[:, None].expand(Rp, K).reshape(-1),
                               torch.arange(K)[None, :].expand(Rp, K).reshape(-1), **layout)
    count = None
    for name, m in moments.items():
        mean, std, count = m.result(finite_only)
        data[mean_column(name)] = mean.reshape(-1).numpy()
        data[std_column(name)] = std.reshape(-1).numpy()
    data[COUNT] = count.reshape(-1).numpy().astype("int64")
    for name, q in quantiles.items():  # [Q, Rp, K]
        for i, label in enumerate(QUANTILES):
            data[f"{name}_{label}"] = q[i].reshape(-1).numpy()
    return pd.DataFrame(data)


def per_token_frame(parts: list[Part], recurrence: torch.Tensor, K: int, metrics: list[str]) -> pd.DataFrame:
    """[batch, token, recurrence, layer, *metrics], rows ordered by (batch, token, recurrence, layer)."""
    frames = []
    Rp = recurrence.numel()
    for p in parts:
        b, t = p["batch"], p["token"]
        N = b.numel()
        data = {
            "batch": b[:, None, None].expand(N, Rp, K).reshape(-1).numpy(),
            "token": t[:, None, None].expand(N, Rp, K).reshape(-1).numpy(),
            "recurrence": recurrence[None, :, None].expand(N, Rp, K).reshape(-1).numpy(),
            "layer": torch.arange(K)[None, None, :].expand(N, Rp, K).reshape(-1).numpy(),
        }
        for name in metrics:
            data[name] = p["values"][name].permute(2, 0, 1).reshape(-1).double().numpy()
        frames.append(pd.DataFrame(data))
    return pd.concat(frames, ignore_index=True)


class CellMetric(Accumulator):
    """Shared machinery: a few per-token metrics per (recurrence, layer) cell. As each cell's values arrive they are
    reduced at once — to moments, and to each histogrammed quantity's bin per token (int16) — and dropped, so a
    batch holds O(R·K·N) small integers, not O(R·K·N) floats (the float values are kept only for `per_token`)."""

    metrics: tuple[str, ...] = ()
    histogrammed: dict[str, str] = {}  # histogram name -> the metric it bins ("1-" prefix: of 1 − value)

    def __init__(self, per_token: bool = False, finite_only: bool = False) -> None:
        self.per_token, self.finite_only = per_token, finite_only

    def first_recurrence(self) -> int:
        return 0

    def begin(self, ctx: BatchContext) -> None:
        super().begin(ctx)
        self.b, self.t = ctx.real
        n = self.b.numel()
        if n == 0:
            raise InputError("the Trajectory has no real tokens (mask is all False); check the mask you passed")
        cells = (ctx.recurrences - self.first_recurrence(), ctx.block_size)
        dev = ctx.device  # everything a batch reduces to stays where its states are until `end`
        self.moments = {m: Moments(cells, dev) for m in self.metrics}
        self.hist = LogHistogram((), device=dev)
        self.bins = {h: torch.zeros((*cells, n), dtype=torch.int16, device=dev) for h in self.histogrammed}
        self.values = {m: torch.full((*cells, n), float("nan"), dtype=torch.float64, device=dev)
                       for m in self.metrics} if self.per_token else None

    def record(self, i: int, j: int, values: dict[str, torch.Tensor]) -> None:
        """One cell's per-token values (float64, on the states' device)."""
        if self.per_token:
            for k, v in values.items():
                self.values[k][i, j] = v
        if self.finite_only:
            keep = torch.stack([torch.isfinite(v) for v in values.values()]).all(0)
            values = {k: torch.where(keep, v, torch.full((), float("nan"), dtype=v.dtype, device=v.device))
                      for k, v in values.items()}
        for k, v in values.items():
            self.moments[k].set_cell((i, j), v)
        for hname, source in self.histogrammed.items():
            v = values[source.removeprefix("1-")]
            self.bins[hname][i, j] = self.hist.bin_index(1.0 - v if source.startswith("1-") else v)

    def end(self) -> Part:
        c = self.ctx
        part = {"moments": {k: m.state() for k, m in self.moments.items()}, "bins": self.bins,
                "batch": self.b + c.first_prompt, "token": self.t,
                "layout": torch.tensor([c.n_prelude, c.block_size, c.recurrences, c.n_coda])}
        if self.per_token:
            part["values"] = self.values
        return part

    def combine(self, parts: list[Part]) -> pd.DataFrame:
        R0 = self.first_recurrence()
        Rp, K = parts[0]["moments"][self.metrics[0]]["n"].shape
        recurrence = torch.arange(R0, R0 + Rp)
        if self.per_token:
            return per_token_frame(parts, recurrence, K, list(self.metrics))
        moments = {m: Moments.folded([p["moments"][m] for p in parts]) for m in self.metrics}
        quantiles = {}
        for hname in self.histogrammed:  # one histogram at a time: [cells, bins] counts are the largest object here
            h = LogHistogram((Rp, K))
            for p in parts:
                h.add_bins(p["bins"][hname])
            quantiles[hname] = h.quantiles(list(QUANTILES.values()))
            del h
        layout = dict(zip(("n_prelude", "block_size", "recurrences", "n_coda"), parts[0]["layout"].tolist()))
        return cell_frame(recurrence, K, moments, quantiles, self.finite_only, layout)


class SuccessiveChange(CellMetric):
    """‖X_{j,t} − X_{j,t−1}‖, its relative size and the cosine, for t = 1..R−1 (see `successive_change`)."""

    name = "successive_change"
    sites = frozenset({"resid_post"})
    metrics = ("l2", "relative", "cosine")
    histogrammed = {"l2": "l2", "relative": "relative", "cosine_distance": "1-cosine"}

    def first_recurrence(self) -> int:
        return 1

    def begin(self, ctx: BatchContext) -> None:
        if ctx.recurrences < 2:
            need_recurrences_ctx(ctx, 2, "successive_change")
        super().begin(ctx)
        self.previous: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def observe(self, site: str, step: Step, x: torch.Tensor) -> None:
        if step.segment != "core":
            return
        cur = self.ctx.real_states(x)
        n_cur = norm(cur)
        prev = self.previous.get(step.layer)
        if prev is not None:
            p, n_prev = prev
            d = norm(cur - p)
            self.record(step.recurrence - 1, step.layer, {
                "l2": d.double(), "relative": (d / n_prev).double(),
                "cosine": cosine_from_distance(n_cur, n_prev, d)})
        self.previous[step.layer] = (cur, n_cur)


class DistanceToFixedPoint(CellMetric):
    """‖X_{j,t} − X*_j‖ and cos(X_{j,t}, X*_j), X*_j = X_{j,R−1} from the batch's finals, plus the attention
    pattern's Frobenius distance to the last recurrence's (see `distance_to_fixed_point`)."""

    name = "distance_to_fixed_point"
    sites = frozenset({"resid_post", "pattern"})
    needs_finals = True
    metrics = ("l2", "cosine")
    histogrammed = {"l2": "l2", "cosine_distance": "1-cosine"}

    def __init__(self, per_token: bool = False, finite_only: bool = False, head_reduction: str = "average") -> None:
        super().__init__(per_token, finite_only)
        from loopscope.dynamics._attention import check_head_reduction

        check_head_reduction(head_reduction)
        self.head_reduction = head_reduction

    def begin(self, ctx: BatchContext) -> None:
        super().begin(ctx)
        star = ctx.finals.core_last  # [K, B, T, D]
        self.star = [batch_tokens(star[j], self.b, self.t, torch.float64) for j in range(ctx.block_size)]
        self.star_norm = [norm(s) for s in self.star]
        att = ctx.finals.attention_last
        self.positions = [m.nonzero(as_tuple=True)[0] for m in ctx.mask]
        self.att_star = None if att is None else [self.patterns(att[j]) for j in range(ctx.block_size)]
        self.att = torch.full((ctx.recurrences, ctx.block_size, ctx.batch_size), float("nan"), dtype=torch.float64,
                              device=ctx.device)

    def patterns(self, a: torch.Tensor) -> list[torch.Tensor | None]:
        """Per prompt: its pattern [H, n, n] (or head-averaged [n, n]) over real rows × columns, float64, on the
        pattern's device."""
        out = []
        for b, pos in enumerate(self.positions):
            if pos.numel() == 0:
                out.append(None)
                continue
            x = self.ctx.prompt_pattern(a, b).to(torch.float64)
            out.append(x.mean(0) if self.head_reduction == "average" else x)
        return out

    def observe(self, site: str, step: Step, x: torch.Tensor) -> None:
        if step.segment != "core":
            return
        t, j = step.recurrence, step.layer
        if site == "pattern":
            if self.att_star is not None:
                for b, (a, a_star) in enumerate(zip(self.patterns(x), self.att_star[j])):
                    if a is not None:
                        self.att[t, j, b] = norm((a - a_star).reshape(-1))
            return
        cur = self.ctx.real_states(x)
        d = norm(cur - self.star[j])
        cos = cosine_from_distance(norm(cur), self.star_norm[j], d)
        self.record(t, j, {"l2": d.double(), "cosine": cos})

    def end(self) -> Part:
        part = super().end()
        part["attention"] = self.att
        part["prompt_has_tokens"] = self.ctx.mask.any(1)
        part["has_attention"] = self.att_star is not None
        return part

    def combine(self, parts: list[Part]) -> pd.DataFrame:
        frame = super().combine(parts)
        if not all(p["has_attention"] for p in parts):
            if self.per_token:
                frame["attention_frobenius"] = float("nan")
            else:
                frame["attention_frobenius_mean"] = frame["attention_frobenius_std"] = float("nan")
            return frame
        att = torch.cat([p["attention"] for p in parts], dim=-1)  # [R, K, B_total]
        if self.per_token:
            frame["attention_frobenius"] = att[frame["recurrence"].to_numpy(), frame["layer"].to_numpy(),
                                               frame["batch"].to_numpy()].numpy()
            return frame
        has = torch.cat([p["prompt_has_tokens"] for p in parts])
        values = att[..., has]  # [R, K, prompts]: the attention distance is one value per prompt
        keep = torch.isfinite(values) if self.finite_only else torch.ones_like(values, dtype=torch.bool)
        n = keep.sum(-1)
        zero = torch.zeros((), dtype=torch.float64)
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        mean = torch.where(n > 0, torch.where(keep, values, zero).sum(-1) / n.clamp(min=1), nan) \
            if self.finite_only else values.mean(-1)
        m2 = torch.where(keep, (values - mean[..., None]) ** 2, zero).sum(-1)
        frame["attention_frobenius_mean"] = mean.reshape(-1).numpy()
        frame["attention_frobenius_std"] = sample_std(m2, n).reshape(-1).numpy()  # over prompts
        return frame


class CyclicFixedPointCheck(Accumulator):
    """Proposition 4.1 read off the last two recurrences (the batch's finals); see `cyclic_fixed_point_check`."""

    name = "cyclic_fixed_point_check"
    sites = frozenset()
    needs_finals = True

    def begin(self, ctx: BatchContext) -> None:
        super().begin(ctx)
        need_recurrences_ctx(ctx, 2, "cyclic_fixed_point_check")
        b, t = ctx.real
        last, prev = ctx.finals.core_last, ctx.finals.core_prev
        change, rel = [], []
        for j in range(ctx.block_size):
            x1, x0 = batch_tokens(last[j], b, t, torch.float64), batch_tokens(prev[j], b, t, torch.float64)
            d = norm(x1 - x0)
            change.append(d.double())
            rel.append((d / norm(x0)).double())
        self.change, self.rel = torch.stack(change), torch.stack(rel)  # [K, N_b]

    def end(self) -> Part:
        return {"change": self.change, "relative": self.rel}

    def combine(self, parts: list[Part]) -> pd.DataFrame:
        change = torch.cat([p["change"] for p in parts], dim=-1)
        rel = torch.cat([p["relative"] for p in parts], dim=-1)
        return pd.DataFrame({
            "layer": range(change.shape[0]),
            "final_change": change.mean(-1).numpy(),
            "final_relative_change": rel.mean(-1).numpy(),
            "max_relative_change": max_with_nan(rel).numpy(),
        })


def need_recurrences_ctx(ctx: BatchContext, minimum: int, what: str) -> None:
    if ctx.recurrences < minimum:
        raise InputError(
            f"{what} needs at least {minimum} recurrences; this Trajectory has {ctx.recurrences}. "
            f"Capture with recurrences ≥ {minimum}"
        )


# --- the in-memory API ---------------------------------------------------------------------------------
def successive_change(traj: Trajectory, per_token: bool = False, *, finite_only: bool = False) -> pd.DataFrame:
    """Change of each block layer's state between consecutive recurrences (Blayney et al. 2026 §3.3, Fig. 3;
    cosine version Fig. 24):

        l2       = ‖X_{j,t} − X_{j,t−1}‖
        relative = ‖X_{j,t} − X_{j,t−1}‖ / ‖X_{j,t−1}‖
        cosine   = cos(X_{j,t}, X_{j,t−1})                 for t = 1..R-1, every block layer j.

    Aggregated (default): one row per (recurrence, layer): [recurrence, layer, l2, l2_std, relative,
    relative_std, cosine, cosine_std, n_tokens], mean and population std over all real tokens of all prompts,
    then the quantiles over tokens (`l2_*`, `relative_*`, `cosine_distance_*` = of 1 − cos; suffixes q10, q25,
    median, q75, q90; from log-histograms, ±1.2 %). Non-finite values propagate into the mean unless
    `finite_only=True`, which averages, per cell, the tokens whose three metrics are finite (n_tokens says how
    many). per_token=True: one row per (batch, token, recurrence, layer): [batch, token, recurrence, layer, l2,
    relative, cosine].
    """
    need_recurrences(traj, 2, "successive_change")
    return run_on_trajectory(SuccessiveChange(per_token, finite_only), traj)


def distance_to_fixed_point(traj: Trajectory, per_token: bool = False, *, finite_only: bool = False,
                            head_reduction: str = "average") -> pd.DataFrame:
    """Distance of every state to its layer's approximate fixed point X*_j := X_{j,R-1}, the state at the last
    captured recurrence (the paper iterates 128 times; Blayney et al. 2026 §3.3, Fig. 4; cosine Fig. 22,
    attention Fig. 23):

        l2     = ‖X_{j,t} − X*_j‖           cosine = cos(X_{j,t}, X*_j)          for t = 0..R-1
        attention_frobenius = mean over prompts of ‖A_{j,t} − A_{j,R-1}‖_F over real query rows × real key
                              columns, where A is the prompt's head-averaged pattern (head_reduction="average",
                              default) or all heads stacked ("stack", as in `attention_distance`); NaN when the
                              Trajectory holds no attention.

    Aggregated: [recurrence, layer, l2, l2_std, cosine, cosine_std, n_tokens, quantile columns (`l2_*`,
    `cosine_distance_*`), attention_frobenius]. per_token=True: [batch, token, recurrence, layer, l2, cosine,
    attention_frobenius] — there the attention column holds the value of the token's own prompt. `finite_only`
    as in `successive_change`.
    """
    return run_on_trajectory(DistanceToFixedPoint(per_token, finite_only, head_reduction), traj)


def cyclic_fixed_point_check(traj: Trajectory) -> pd.DataFrame:
    """Numerical check of Proposition 4.1 (Blayney et al. 2026 §3.2): once the block's last layer has reached
    its fixed point, every cyclic permutation of the block has one, so every layer's change between the last
    two recurrences must be small too. One row per block layer j:

        final_change          = mean over real tokens of ‖X_{j,R-1} − X_{j,R-2}‖
        final_relative_change = mean over real tokens of ‖X_{j,R-1} − X_{j,R-2}‖ / ‖X_{j,R-2}‖
        max_relative_change   = max over real tokens of the same ratio

    Columns [layer, final_change, final_relative_change, max_relative_change]; non-finite states give
    non-finite (inf/NaN) entries.
    """
    need_recurrences(traj, 2, "cyclic_fixed_point_check")
    return run_on_trajectory(CyclicFixedPointCheck(), traj)


def max_with_nan(x: torch.Tensor) -> torch.Tensor:
    """Max over the last axis that returns NaN when any entry is NaN (torch.amax already does; explicit here)."""
    return torch.where(x.isnan().any(-1), torch.tensor(float("nan"), dtype=x.dtype), x.amax(-1))


def max_final_relative_change(traj: Trajectory) -> float:
    """The largest per-layer `final_relative_change` of `cyclic_fixed_point_check` (Prop. 4.1: small for every
    layer as soon as it is small for the last layer)."""
    values = torch.tensor(cyclic_fixed_point_check(traj)["final_relative_change"].to_numpy())
    return float(max_with_nan(values))
