"""The one table dialect: every summary table loopscope writes (dynamics and stages alike) reads the same way, so
any table feeds any view.

A summary table has one row per state (or per state and head, per model, …):

- the identifying columns of the state, `STATE_COLUMNS` = segment, recurrence, layer, depth, relative_depth
  (`depth` = realized depth: 0 the embedding, P + t·K + j + 1 block layer j of recurrence t, after the last
  recurrence the coda; `relative_depth` = depth / the deepest state's depth);
- for every value v: `v_mean`, `v_std` (the *sample* standard deviation, ddof = 1, NaN when fewer than two
  observations), and quantile columns `v_q10, v_q25, v_median, v_q75, v_q90` where a table has them;
- `n`: the observations pooled into the row (tokens for the per-token dynamics, prompts × heads for attention, …).

A raw table (one row per observation) carries the same identifying columns, `batch` (the prompt), `head` where
there is one, and `n_tokens` (the real tokens an observation was computed over).
"""

from __future__ import annotations

import torch

STATE_COLUMNS = ["segment", "recurrence", "layer", "depth", "relative_depth"]
COUNT = "n"


def mean_column(value: str) -> str:
    """`x` → `x_mean` (a name already ending in `_mean` stays)."""
    return value if value.endswith("_mean") else f"{value}_mean"


def std_column(value: str) -> str:
    """`x_mean` → `x_std`; `x` → `x_std`."""
    return (value[: -len("_mean")] if value.endswith("_mean") else value) + "_std"


def sample_std(m2: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """sqrt(M2 / (n − 1)) from the sum of squared deviations M2 of n observations; NaN where n < 2 (pandas' `std`)."""
    n = n.double()
    return torch.where(n >= 2, (m2 / (n - 1).clamp(min=1)).sqrt(), torch.tensor(float("nan"), dtype=torch.float64))


def block_state_columns(recurrence: torch.Tensor, layer: torch.Tensor, *, n_prelude: int, block_size: int,
                        recurrences: int, n_coda: int) -> dict:
    """The STATE_COLUMNS of block states (recurrence t, layer j), t and j given elementwise."""
    depth = n_prelude + recurrence * block_size + layer + 1
    last = max(n_prelude + recurrences * block_size + n_coda, 1)
    return {"segment": ["core"] * int(depth.numel()), "recurrence": recurrence.numpy(), "layer": layer.numpy(),
            "depth": depth.numpy(), "relative_depth": (depth.double() / last).numpy()}
