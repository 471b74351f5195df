"""Stages of inference: per-state metrics of a looped (or feedforward) model's Trajectory.

Every metric takes a `Trajectory` and returns a tidy DataFrame whose first columns identify the state
(`segment, recurrence, layer, depth, relative_depth`, from `Trajectory.realized_index()`: prelude, every
recurrence's block layers, coda), then `head` / `batch` where per head / per prompt, then for each metric
m the columns `m_mean`, `m_std` and `n` (observations pooled: prompts, or prompts × heads). Only real
tokens (`traj.mask`) count; attention matrices are restricted to each prompt's real tokens first.

Metrics and sources (formulas in each function's docstring):

- `attention_metrics` (attention.py), per head then aggregated:
  ColSum concentration C = 1 + (1/log T) Σ_j ĉ_j log ĉ_j — Queipo-de-Llano et al. 2025 via Blayney et al.
  2026 §3.5; sink score (1/T) Σ_t A_{t,k} and sink rate (fraction of heads with score ≥ 0.3) — Gu et al.
  2024; mixing score, mean row entropy (nats, and normalised by log of each row's support) —
  Queipo-de-Llano et al. 2025; attention on the previous 5 non-BOS tokens — Lad et al. 2024.
- `attention_change` (attention_change.py): ‖A_{j,t} − A_{j,t−1}‖_F per block layer — Blayney et al. §3.3
  (Fig. 25).
- `Prop42Check` (prop42.py): Proposition 4.2 of Blayney et al. checked numerically (measured attention change
  vs. its bound, per recurrence, layer, prompt and head; RoPE-safe κ), from the score-function inputs and the
  weights as tensors (`loopscope.models.weights`); `experiments.stage_tables.attention_lipschitz_check` runs it.
- `residual_norms` (residual.py): token norms (mean, max, first token) — Blayney et al. Fig. 9,
  Queipo-de-Llano et al. 2025; massive activations (max |activation| and its ratio to the median) — Sun
  et al. 2024. `massive_activation_layer` (massive.py) finds the layer whose output first carries them.
- `residual_entropy` (compression.py): matrix-based entropy of the token Gram spectrum, normalised by
  log T — Skean et al. 2025, Queipo-de-Llano et al. 2025.
- `logit_lens` (lens.py) with a `Readout` (readout.py): logit-lens / coda-lens entropy and rank of the
  model's final prediction — nostalgebraist 2020, Lad et al. 2024, Lu et al. 2025.
- `neuron_fractions` (neurons.py): prediction / suppression neuron fractions per layer from weights —
  Gurnee et al. 2024, Lad et al. 2024, Blayney et al. App. E.1.

Views (views.py, Blayney et al. §3.6): `by_realized_depth`, `by_recurrence` (relative depth 0..100 within
prelude + block pass + coda), `by_layer`. `alignment` (alignment.py) scores each recurrence's profile
against a feedforward model's (pearson, spearman, rmse, nrmse).
"""

from loopscope.stages.alignment import alignment
from loopscope.stages.attention import (
    ATTENTION_METRICS,
    attention_metrics,
    colsum_concentration,
    mixing_entropy,
    mixing_entropy_normalised,
    previous_window,
    sink_score,
)
from loopscope.stages.attention_change import attention_change
from loopscope.stages.compression import COMPRESSION_METRICS, matrix_entropy, residual_entropy
from loopscope.stages.frames import STATE_COLUMNS, summarise
from loopscope.stages.lens import LENS_METRICS, logit_lens
from loopscope.stages.massive import MASSIVE_RATIO, massive_activation_layer, massive_activation_profile
from loopscope.stages.neurons import (
    neuron_fractions,
    neuron_fractions_by_depth,
    vocab_moments,
)
from loopscope.stages.prop42 import Prop42Check, prop42_bound
from loopscope.stages.readout import Readout
from loopscope.stages.residual import RESIDUAL_METRICS, residual_norms
from loopscope.stages.views import by_layer, by_realized_depth, by_recurrence

__all__ = [
    "ATTENTION_METRICS", "COMPRESSION_METRICS", "LENS_METRICS", "MASSIVE_RATIO", "RESIDUAL_METRICS", "STATE_COLUMNS",
    "Readout",
    "Prop42Check", "alignment", "attention_change", "attention_metrics", "by_layer",
    "by_realized_depth", "by_recurrence", "colsum_concentration", "logit_lens", "massive_activation_layer",
    "massive_activation_profile", "matrix_entropy",
    "mixing_entropy", "mixing_entropy_normalised", "neuron_fractions", "neuron_fractions_by_depth",
    "previous_window", "prop42_bound", "residual_entropy", "residual_norms",
    "sink_score", "summarise", "vocab_moments",
]
