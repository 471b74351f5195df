"""PCA of one token's latent trajectory across (recurrence, layer) (Geiping et al. 2025 Fig. 12; Blayney et al.
2026 §4 item 4, Fig. 5: a closed cycle traced by the final token's states over layers and recurrences)."""

from __future__ import annotations

import pandas as pd
import torch

from loopscope.capture.trajectory import Trajectory
from loopscope.errors import InputError


def _token_position(traj: Trajectory, batch: int, token: int) -> int:
    if not 0 <= batch < traj.batch_size:
        raise InputError(f"batch={batch} is out of range for {traj.batch_size} prompts")
    real = traj.mask[batch].cpu().nonzero(as_tuple=True)[0]
    if real.numel() == 0:
        raise InputError(f"prompt {batch} has no real tokens (its mask is all False)")
    if token < 0:
        if -token > real.numel():
            raise InputError(f"token={token}: prompt {batch} has only {real.numel()} real tokens")
        return int(real[token])
    if token >= traj.seq_len or not bool(traj.mask[batch, token]):
        raise InputError(f"token={token} of prompt {batch} is padding or out of range; real positions are "
                         f"{real.tolist()[:5]}…{int(real[-1])} (negative values count from the last real token)")
    return token


def pca_trajectory(traj: Trajectory, batch: int = 0, token: int = -1, n_components: int = 6,
                   ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """PCA fit on the R·K block states X_{j,t} of one token (fp64 SVD of the centred states, torch.linalg.svd).

    token: a position in the prompt; negative values index the REAL tokens (-1 = the last real token).
    Returns
      projections: one row per (recurrence, layer) in realized order, columns [recurrence, layer, depth,
                   pc1..pc{n}] with pc_i = ⟨X_{j,t} − mean, v_i⟩ (depth = realized depth P + t·K + j + 1);
      variance:    columns [component (1..n, matching column pc{component}), explained_variance_ratio]
                   = σ_i² / Σ σ² (sorted, sums to ≤ 1).
    Each direction's sign is fixed so that its largest-magnitude loading is positive. Only finite states are
    fitted; non-finite states get NaN coordinates. Components beyond the rank available (min(#finite states,
    D)) get NaN coordinates and ratio 0.
    """
    if n_components < 1:
        raise InputError(f"n_components={n_components}: ask for at least 1")
    t_pos = _token_position(traj, batch, token)
    R, K = traj.recurrences, traj.block_size
    x = traj.core[:, :, batch, t_pos, :].reshape(R * K, -1).to(device="cpu", dtype=torch.float64)
    good = torch.isfinite(x).all(-1)
    coords = torch.full((R * K, n_components), float("nan"), dtype=torch.float64)
    ratio = torch.zeros(n_components, dtype=torch.float64)
    if int(good.sum()) >= 2:
        xs = x[good]
        xc = xs - xs.mean(0, keepdim=True)
        _, s, vh = torch.linalg.svd(xc, full_matrices=False)
        k = min(n_components, vh.shape[0])
        v = vh[:k]
        sign = torch.sign(v.gather(1, v.abs().argmax(1, keepdim=True)))
        v = v * torch.where(sign == 0, torch.ones_like(sign), sign)
        coords[good, :k] = xc @ v.T
        total = (s ** 2).sum()
        if total > 0:
            ratio[:k] = (s[:k] ** 2) / total
    index = traj.realized_index()
    core = index[index["segment"] == "core"].reset_index(drop=True)
    projections = pd.DataFrame({"recurrence": core["recurrence"], "layer": core["layer"], "depth": core["depth"]})
    for i in range(n_components):
        projections[f"pc{i + 1}"] = coords[:, i].numpy()
    variance = pd.DataFrame({"component": range(1, n_components + 1),
                             "explained_variance_ratio": ratio.numpy()})
    return projections, variance
