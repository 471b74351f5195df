"""Turn per-token metric grids [R', K, N] into tidy DataFrames (per token, or mean/std over tokens)."""

from __future__ import annotations

import pandas as pd
import torch

from loopscope.dynamics._tokens import RealTokens


def mean_std(x: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean and population std (correction 0) over the last axis, counting only entries where `keep` is True
    (all entries if None). Returns (mean, std, count); an empty cell gives NaN."""
    if keep is None:
        keep = torch.ones_like(x, dtype=torch.bool)
    x64 = x.double()
    count = keep.sum(-1)
    zero = torch.zeros((), dtype=torch.float64)
    mean = torch.where(keep, x64, zero).sum(-1) / count
    var = torch.where(keep, (x64 - mean[..., None]) ** 2, zero).sum(-1) / count
    return mean, var.sqrt(), count


def grid_frame(tokens: RealTokens, recurrence: torch.Tensor, metrics: dict[str, torch.Tensor], *,
               per_token: bool, finite_only: bool) -> pd.DataFrame:
    """metrics: name -> [R', K, N] (recurrence values given by `recurrence` [R'], layers 0..K-1).

    per_token: columns [batch, token, recurrence, layer, *metrics], rows ordered by (batch, token, recurrence,
    layer). Aggregated: [recurrence, layer, m, m_std for each metric, n_tokens], rows ordered by (recurrence,
    layer); n_tokens counts the tokens averaged — all real tokens, or with `finite_only` those whose metrics
    are all finite in that cell (otherwise a single non-finite token makes the cell's mean non-finite, so that
    divergence is never hidden).
    """
    first = next(iter(metrics.values()))
    Rp, K, N = first.shape
    if per_token:
        data = {
            "batch": tokens.batch[:, None, None].expand(N, Rp, K).reshape(-1).numpy(),
            "token": tokens.token[:, None, None].expand(N, Rp, K).reshape(-1).numpy(),
            "recurrence": recurrence[None, :, None].expand(N, Rp, K).reshape(-1).numpy(),
            "layer": torch.arange(K)[None, None, :].expand(N, Rp, K).reshape(-1).numpy(),
        }
        for name, v in metrics.items():
            data[name] = v.permute(2, 0, 1).reshape(-1).double().numpy()
        return pd.DataFrame(data)
    keep = None
    if finite_only:
        keep = torch.stack([torch.isfinite(v) for v in metrics.values()]).all(0)
    data = {
        "recurrence": recurrence[:, None].expand(Rp, K).reshape(-1).numpy(),
        "layer": torch.arange(K)[None, :].expand(Rp, K).reshape(-1).numpy(),
    }
    count = None
    for name, v in metrics.items():
        mean, std, count = mean_std(v, keep)
        data[name] = mean.reshape(-1).numpy()
        data[f"{name}_std"] = std.reshape(-1).numpy()
    data["n_tokens"] = count.reshape(-1).numpy().astype("int64")
    return pd.DataFrame(data)
