"""Prediction and suppression neurons per layer, from weights alone (input independent).

Gurnee et al. 2024 ("Universal Neurons in GPT2 Language Models", §prediction neurons), used per layer by
Lad et al. 2024 (stages of inference) and by Blayney et al. 2026 App. E.1 (Figs. 32/33). For MLP neuron n
with output weight w_out[n] ∈ R^D (column n of down_proj, which writes w_out[n]·act_n to the stream):

    s_v = cos(w_out[n], W_U[v])   over the vocabulary v = 1..V
    skew = E[z³], kurtosis = E[z⁴],  z = (s − mean(s)) / std(s)   (population moments; kurtosis is the
                                                                  Pearson one: 3 for a Gaussian)
    prediction neuron:  kurtosis > 10 and skew > 0   (boosts a few tokens)
    suppression neuron: kurtosis > 10 and skew < 0   (suppresses a few tokens)

As TransformerLens does before these analyses (fold_ln, center_unembed), the final norm's weight g can be
folded into W_U (W_U[v] ⊙ g, the direction a residual write actually reads out through) and W_U can be
centred over the vocabulary (W_U[v] − mean_v W_U[v]: a shift common to all logits does not change the
softmax). Both are options; `experiments.stage_tables.looped_neuron_fractions` uses both. Weights are tied across
recurrences,
so these fractions are one number per physical layer (`neuron_fractions_by_depth` spreads them over
realized depth for plotting next to the other metrics).
"""

from __future__ import annotations

import pandas as pd
import torch

from loopscope.capture.trajectory import Trajectory
from loopscope.errors import InputError
from loopscope.stages.frames import STATE_COLUMNS

NEURON_COLUMNS = ["name", "segment", "layer", "n_neurons", "n_prediction", "n_suppression", "prediction_fraction",
                  "suppression_fraction"]


def readout_directions(unembedding: torch.Tensor, norm_weight: torch.Tensor | None = None,
                       center_unembedding: bool = True) -> torch.Tensor:
    """Unit vocabulary directions (V, D): W_U[v] (⊙ g) (− mean over v), each row normalised."""
    w = unembedding.detach().cpu().double()
    if norm_weight is not None:
        w = w * norm_weight.detach().cpu().double()
    if center_unembedding:
        w = w - w.mean(0, keepdim=True)
    return w / w.norm(dim=-1, keepdim=True).clamp_min(1e-300)


def vocab_moments(w_down: torch.Tensor, directions: torch.Tensor, chunk: int = 1024,
                  dtype: torch.dtype = torch.float64) -> pd.DataFrame:
    """Per neuron: `cos_mean`, `cos_std`, `vocab_skew` and `vocab_kurtosis` (Pearson) of cos(w_out[n], W_U[v]) over v.

    w_down: (D, d_mlp) (nn.Linear weight of down_proj); directions: (V, D) from `readout_directions`.
    NaN skew/kurtosis where the cosines do not vary. From the central power sums of each chunk of neurons,
    m_k = mean_v (s_v − mean s)^k: skew = m3 / m2^1.5, kurtosis = m4 / m2². `dtype` float32 is about 2.5× faster
    on a CPU (SmolLM2's 46k neurons × 49k tokens) and moves the moments by ~1e-6 relative; float64 is exact.
    """
    if w_down.ndim != 2 or w_down.shape[0] != directions.shape[1]:
        raise InputError(f"w_down must be (d_model={directions.shape[1]}, d_mlp); got {tuple(w_down.shape)}")
    out = w_down.detach().cpu().double().T  # (d_mlp, D)
    out = (out / out.norm(dim=-1, keepdim=True).clamp_min(1e-300)).to(dtype)
    directions_t = directions.to(dtype).T.contiguous()
    parts = []
    for start in range(0, out.shape[0], chunk):
        cos = out[start:start + chunk] @ directions_t  # (n, V)
        mean = cos.mean(-1, keepdim=True)
        d = cos.sub_(mean)
        d2 = d * d
        m2 = d2.mean(-1)
        m3 = (d2 * d).mean(-1)
        m4 = d2.mul_(d2).mean(-1)
        std = m2.sqrt()
        flat = std <= (1e-12 if dtype == torch.float64 else 1e-6)  # constant cosines, up to rounding
        skew = (m3 / m2.pow(1.5)).masked_fill(flat, float("nan"))
        kurt = (m4 / m2.pow(2)).masked_fill(flat, float("nan"))
        parts.append(torch.stack([mean.squeeze(-1), std, skew, kurt], dim=-1).double())
    table = torch.cat(parts).numpy()
    df = pd.DataFrame(table, columns=["cos_mean", "cos_std", "vocab_skew", "vocab_kurtosis"])
    df.insert(0, "neuron", range(len(df)))
    return df


def parse_layer_name(name: str) -> tuple[str, int | None]:
    """"core.2" → ("core", 2); anything else → (name, None)."""
    head, _, tail = name.rpartition(".")
    return (head, int(tail)) if head and tail.isdigit() else (name, None)


def neuron_fractions(
    layers: dict[str, torch.Tensor],
    unembedding: torch.Tensor,
    *,
    norm_weight: torch.Tensor | None = None,
    center_unembedding: bool = True,
    kurtosis_threshold: float = 10.0,
    dtype: torch.dtype = torch.float32,
) -> pd.DataFrame:
    """Fraction of prediction / suppression neurons per layer.

    layers: name → w_down (D, d_mlp) (names like "prelude.0", "core.3" give `segment` and `layer`);
    unembedding W_U (V, D); norm_weight: final-norm weight to fold into W_U (None = do not fold);
    dtype: of the cosines and moments (`vocab_moments`; float64 for exact moments).
    Columns: NEURON_COLUMNS (`layer` is <NA> when the name has no ".<index>" suffix).
    """
    directions = readout_directions(unembedding, norm_weight, center_unembedding)
    rows = []
    for name, w_down in layers.items():
        m = vocab_moments(w_down, directions, dtype=dtype)
        heavy = m["vocab_kurtosis"] > kurtosis_threshold
        n_pred, n_supp = int((heavy & (m["vocab_skew"] > 0)).sum()), int((heavy & (m["vocab_skew"] < 0)).sum())
        segment, layer = parse_layer_name(name)
        rows.append({"name": name, "segment": segment, "layer": layer, "n_neurons": len(m),
                     "n_prediction": n_pred, "n_suppression": n_supp,
                     "prediction_fraction": n_pred / len(m), "suppression_fraction": n_supp / len(m)})
    df = pd.DataFrame(rows, columns=NEURON_COLUMNS)
    df["layer"] = df["layer"].astype("Int64")
    return df


def neuron_fractions_by_depth(fractions: pd.DataFrame, traj: Trajectory) -> pd.DataFrame:
    """Place per-layer fractions on the realized depth of `traj` (a block layer repeats every recurrence).

    Columns: STATE_COLUMNS + the NEURON_COLUMNS after `layer`.
    """
    index = traj.realized_index()
    table = fractions.drop(columns=["name"]).astype({"layer": "int64"})
    merged = index.merge(table, on=["segment", "layer"], how="left", validate="many_to_one")
    if merged["n_neurons"].isna().any():
        missing = merged.loc[merged["n_neurons"].isna(), ["segment", "layer"]].drop_duplicates().values.tolist()
        raise InputError(f"no neuron fractions for layers {missing}; compute them from the model that made `traj`")
    return merged[[*STATE_COLUMNS, *NEURON_COLUMNS[3:]]]
