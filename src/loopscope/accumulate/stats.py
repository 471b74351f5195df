"""Mergeable summaries of many observations per cell: moments (Chan et al.) and log-spaced histograms.

`Moments` keeps, per cell, the count n, the mean and M2 = Σ (x − mean)² of the finite observations (Chan, Golub &
LeVeque 1979 pairwise update, exact up to float64 rounding in any merge order), plus the plain sum of every
observation, so that a non-finite value still shows in the mean (inf/NaN), as divergence must never be hidden:

    merge:  n = n_a + n_b,  δ = μ_b − μ_a,  μ = μ_a + δ·n_b/n,  M2 = M2_a + M2_b + δ²·n_a·n_b/n
    mean (all)   = Σ x / n_all          (non-finite if any observation is)
    mean (finite)= μ;   std (population) = sqrt(M2 / n)

`LogHistogram` counts positive observations in bins of width 1/`per_decade` decades between 10^lo and 10^hi (plus
one bin for zeros and values below 10^lo, one for values above 10^hi, one for non-finite values). Counts add
exactly, so quantiles of a streamed run equal those of the same observations seen at once; a quantile is the
geometric centre of the bin where the cumulative count crosses it (error ≤ half a bin, a factor 10^(0.5/per_decade):
±1.2 % at the default 100 bins per decade).
"""

from __future__ import annotations

import math

import torch

from loopscope.tables import sample_std


def reduction_dtype(device: torch.device | str) -> torch.dtype:
    """float64, the dtype every reduction keeps, on any device that has it; Apple's MPS has no float64, so there the
    reductions keep float32 (a relative rounding of 6e-8 per addition: fine for means and spreads of thousands of
    observations, not for the numerical floor of a float32 state, which the dynamics read from float64 states)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


class Moments:
    """Per-cell moments of observations; cells are the leading dims of what `add` receives. The running sums live on
    `device` (that of the observations: a streamed batch reduces where its states are, and hands the host its
    `state()` once); a Moments made before its first observation moves there at that observation."""

    def __init__(self, shape: tuple[int, ...], device: torch.device | str = "cpu") -> None:
        self.shape = tuple(shape)
        self._allocate(torch.device(device))

    def _allocate(self, device: torch.device) -> None:
        f = dict(dtype=reduction_dtype(device), device=device)
        i = dict(dtype=torch.int64, device=device)
        self.n_all, self.total, self.n = torch.zeros(self.shape, **i), torch.zeros(self.shape, **f), \
            torch.zeros(self.shape, **i)
        self.mean, self.m2 = torch.zeros(self.shape, **f), torch.zeros(self.shape, **f)

    def _observations(self, x: torch.Tensor) -> torch.Tensor:
        """x detached, in the reduction dtype, with the sums on x's device (moved there while still empty)."""
        if self.total.device != x.device:
            if bool((self.n_all != 0).any()):
                raise ValueError("Moments: observations on another device than the ones already added")
            self._allocate(x.device)
        return x.detach().to(self.total.dtype)

    def add(self, x: torch.Tensor) -> None:
        """Observations x [*cells, n] (last axis: observations of each cell), any float dtype, any device."""
        x = self._observations(x)
        finite = torch.isfinite(x)
        n_b = finite.sum(-1)
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        safe = torch.where(finite, x, zero)
        mean_b = safe.sum(-1) / n_b.clamp(min=1).to(x.dtype)
        m2_b = torch.where(finite, (x - mean_b[..., None]) ** 2, zero).sum(-1)
        self.n_all += x.shape[-1]
        self.total += x.sum(-1)
        self._merge(n_b, mean_b, m2_b)

    def set_cell(self, cell: tuple[int, ...], x: torch.Tensor) -> None:
        """All observations x [n] of one cell that has none yet (within a batch, each (recurrence, layer) cell's
        values arrive together, once): its moments directly, two-pass, no merge, and no synchronisation."""
        x = self._observations(x)
        finite = torch.isfinite(x)
        n = finite.sum()
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        good = torch.where(finite, x, zero)
        mean = good.sum() / n.clamp(min=1).to(x.dtype)
        self.n_all[cell] = x.numel()
        self.total[cell] = x.sum()
        self.n[cell] = n
        self.mean[cell] = mean
        self.m2[cell] = torch.where(finite, (x - mean) ** 2, zero).sum()

    def _merge(self, n_b: torch.Tensor, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        n = self.n + n_b
        delta = mean_b - self.mean
        frac = n_b.to(self.mean.dtype) / n.clamp(min=1).to(self.mean.dtype)  # (int / int is float32 in torch)
        self.mean = self.mean + delta * frac
        self.m2 = self.m2 + m2_b + delta * delta * self.n.to(self.mean.dtype) * frac
        self.n = n

    def merge(self, other: Moments) -> None:
        other = other.to(self.total.device)
        self.n_all += other.n_all
        self.total += other.total
        self._merge(other.n, other.mean, other.m2)

    def result(self, finite_only: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, sample std (ddof = 1, NaN for fewer than two; `loopscope.tables`), count): over finite observations
        (`finite_only`), else over all of them — a cell holding a non-finite observation then has a non-finite mean
        and a NaN std."""
        std = sample_std(self.m2, self.n)
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        if finite_only:
            return torch.where(self.n > 0, self.mean, nan), torch.where(self.n > 0, std, nan), self.n
        clean = self.n == self.n_all
        mean = torch.where(clean, self.mean, self.total / self.n_all.clamp(min=1).double())
        mean = torch.where(self.n_all > 0, mean, nan)
        return mean, torch.where(clean & (self.n_all > 0), std, nan), self.n_all

    def state(self) -> dict[str, torch.Tensor]:
        return {"n_all": self.n_all, "total": self.total, "n": self.n, "mean": self.mean, "m2": self.m2}

    def to(self, device: torch.device | str) -> Moments:
        """These moments on `device` (self when already there)."""
        if self.total.device == torch.device(device):
            return self
        return Moments.from_state({k: v.to(device) for k, v in self.state().items()})

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> Moments:
        m = cls(tuple(state["n"].shape), state["n"].device)
        for k, v in state.items():
            setattr(m, k, v.clone())
        return m

    @classmethod
    def folded(cls, states: list[dict[str, torch.Tensor]]) -> Moments:
        """Merge the states of several batches in order."""
        out = cls.from_state(states[0])
        for s in states[1:]:
            out.merge(cls.from_state(s))
        return out


class LogHistogram:
    """Per-cell counts of positive values in log-spaced bins (see the module doc)."""

    def __init__(self, shape: tuple[int, ...], lo: float = -16.0, hi: float = 8.0, per_decade: int = 100,
                 device: torch.device | str = "cpu") -> None:
        self.shape, self.lo, self.hi, self.per_decade = tuple(shape), float(lo), float(hi), int(per_decade)
        self.n_bins = int(round((self.hi - self.lo) * self.per_decade))
        # bin 0: zero / below 10^lo; 1..n_bins: log-spaced; n_bins + 1: above 10^hi; n_bins + 2: non-finite
        self.counts = torch.zeros((*self.shape, self.n_bins + 3), dtype=torch.int32, device=device)

    def bin_index(self, x: torch.Tensor) -> torch.Tensor:
        """The bin of every observation (int16: a compact stand-in for the value, all a histogram needs), on x's
        device."""
        x = x.detach().to(reduction_dtype(x.device))
        finite = torch.isfinite(x)
        logx = torch.log10(torch.where(finite & (x > 0), x, torch.ones((), dtype=x.dtype, device=x.device)))
        idx = torch.floor((logx - self.lo) * self.per_decade).long() + 1
        idx = idx.clamp(1, self.n_bins + 1)
        idx = torch.where(finite & (x > 0) & (logx >= self.lo), idx, torch.zeros_like(idx))
        return torch.where(finite, idx, torch.full_like(idx, self.n_bins + 2)).to(torch.int16)

    def add(self, x: torch.Tensor) -> None:
        """Observations x [*cells, n] (≥ 0; negative values count as below the range)."""
        self.add_bins(self.bin_index(x))

    def add_bins(self, idx: torch.Tensor) -> None:
        """Observations given by their bins (`bin_index`), [*cells, n]."""
        if idx.device != self.counts.device:
            idx = idx.to(self.counts.device)
        idx = idx.long().reshape(math.prod(self.shape), -1)
        flat = self.counts.view(-1, self.n_bins + 3)
        flat.scatter_add_(1, idx, torch.ones(idx.shape, dtype=self.counts.dtype, device=idx.device))

    def merge(self, other: LogHistogram) -> None:
        self.counts += other.counts

    def quantiles(self, qs: list[float]) -> torch.Tensor:
        """[len(qs), *cells] quantiles of the finite observations (NaN for an empty cell; 0 for the zero bin)."""
        cdf = self.counts[..., : self.n_bins + 2].cumsum(-1, dtype=torch.int64)  # finite observations only
        total = cdf[..., -1:]
        centres = torch.cat([
            torch.zeros(1, dtype=torch.float64),
            10 ** (self.lo + (torch.arange(self.n_bins, dtype=torch.float64) + 0.5) / self.per_decade),
            torch.full((1,), 10 ** self.hi, dtype=torch.float64),
        ])
        out = []
        for q in qs:
            target = q * total.double()
            idx = (cdf < target).sum(-1, keepdim=True).clamp(max=self.n_bins + 1)
            value = centres[idx[..., 0]]
            out.append(torch.where(total[..., 0] > 0, value, torch.tensor(math.nan, dtype=torch.float64)))
        return torch.stack(out)

    def state(self) -> dict[str, torch.Tensor]:
        return {"counts": self.counts, "range": torch.tensor([self.lo, self.hi, float(self.per_decade)])}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> LogHistogram:
        lo, hi, per = (float(v) for v in state["range"])
        h = cls(tuple(state["counts"].shape[:-1]), lo, hi, int(per))
        h.counts = state["counts"].clone()
        return h

    @classmethod
    def folded(cls, states: list[dict[str, torch.Tensor]]) -> LogHistogram:
        out = cls.from_state(states[0])
        for s in states[1:]:
            out.merge(cls.from_state(s))
        return out
