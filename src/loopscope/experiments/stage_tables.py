"""Stage-of-inference tables of one captured model: every per-state metric in one wide table, and alignment.

Used by `loopscope analyze` and `loopscope compare`; the report only draws what these return.
"""

from __future__ import annotations

from functools import reduce

import pandas as pd
import torch

from loopscope import stages
from loopscope.capture import Trajectory
from loopscope.errors import InputError
from loopscope.labels import Step
from loopscope.models.looped import LoopedLM
from loopscope.models.weights import down_projections
from loopscope.stages.frames import STATE_COLUMNS

# metric column -> axis label, in the order the report shows them (Blayney et al. §3.5, App. E)
STAGE_METRICS = {
    "colsum_concentration_mean": "ColSum concentration",
    "sink_rate_mean": "sink rate (first token, τ = 0.3)",
    "mixing_entropy_normalised_mean": "mixing score (row entropy / log support)",
    "previous_window_mean": "attention to previous 5 tokens",
    "matrix_entropy_normalised_mean": "residual matrix entropy (normalised)",
    "token_norm_mean_mean": "mean token norm ‖x‖",
    "first_token_norm_mean": "first-token norm",
    "massive_activation_ratio_mean": "massive activations (max / median |x|)",
    "logit_entropy_mean": "logit-lens entropy (nats)",
    "logit_final_top1_rank_mean": "logit-lens rank of the final prediction",
}


def stage_accumulators(readout: stages.Readout | None, attention: bool = True) -> list:
    """The accumulators behind `stage_table`: residual norms, matrix entropy, attention metrics, logit lens."""
    from loopscope.stages.attention import AttentionMetrics
    from loopscope.stages.compression import ResidualEntropy
    from loopscope.stages.lens import LogitLens
    from loopscope.stages.residual import ResidualNorms

    accs = [ResidualNorms(["batch"]), ResidualEntropy(["batch"])]
    if attention:
        accs.append(AttentionMetrics(["batch", "head"]))
    if readout is not None:
        accs.append(LogitLens(readout))
    return accs


def stage_table_from(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per state with every stage metric (mean, std), from the tables of `stage_accumulators`."""
    parts = [tables["residual_norms"], tables["residual_entropy"]]
    if "attention_metrics" in tables:
        parts.append(tables["attention_metrics"])
    if "logit_lens" in tables:
        lens = tables["logit_lens"].drop(columns=["lens"])
        parts.append(lens.rename(columns={c: f"logit_{c}" for c in lens.columns if c not in STATE_COLUMNS}))
    parts = [p.drop(columns=[c for c in ("n",) if c in p.columns]) for p in parts]
    merged = reduce(lambda a, b: a.merge(b, on=STATE_COLUMNS, how="outer"), parts)
    return merged.sort_values("depth").reset_index(drop=True)


def stage_table(traj: Trajectory, readout: stages.Readout | None) -> pd.DataFrame:
    """One row per state (prelude, every recurrence's block layers, coda) with every stage metric (mean, std)."""
    from loopscope.accumulate.replay import run_on_trajectory

    return stage_table_from(run_on_trajectory(stage_accumulators(readout, traj.has_attention), traj))


def alignment_table(looped: pd.DataFrame, feedforward: pd.DataFrame) -> pd.DataFrame:
    """Alignment of every recurrence's profile with the feedforward profile, for every metric both have."""
    rows = []
    for value in STAGE_METRICS:
        if value in looped and value in feedforward and looped[value].notna().any() \
                and feedforward[value].notna().any():
            scores = stages.alignment(looped, feedforward, value)
            scores.insert(0, "metric", value.removesuffix("_mean"))
            rows.append(scores)
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()


# --- what the stage metrics read off a live LoopedLM (its weights and its coda), kept out of `stages` ----------
def looped_readout(model: LoopedLM) -> stages.Readout:
    """The readout of a `LoopedLM`.

    Logit-lens norm: the final norm when the model has one (`cfg.final_norm`); otherwise, for an Ouro-style
    model without a coda, its per-recurrence stream norm (the last norm the model applies before W_U);
    otherwise none. Coda lens (models with a coda): Ouro's stream norm, then the final norm if
    `cfg.coda_input_norm` (Huginn), then coda layers start.., then the logit-lens norm and W_U — exactly
    the path the model takes after its last recurrence. The coda layers run with offset 0 and no cache
    (causal attention over the whole prompt), labelled Step("coda", 0, i) at their hook points.
    """
    if not isinstance(model, LoopedLM):
        raise InputError(f"looped_readout reads a LoopedLM; got {type(model).__name__}. Build "
                         "Readout(norm_weight, norm_eps, unembedding, norm_kind) from its tensors instead")
    cfg = model.cfg
    if cfg.final_norm:
        norm = model.final_norm
    elif model.loop_norm is not None and cfg.n_coda == 0:
        norm = model.loop_norm
    else:
        norm = None
    coda = None
    if cfg.n_coda:
        def coda(x: torch.Tensor, start: int = 0) -> torch.Tensor:
            with torch.no_grad():
                x = x.to(device=model.unembedding.device, dtype=model.unembedding.dtype)
                if start == 0:
                    if model.loop_norm is not None:
                        x = model.loop_norm(x)
                    if cfg.coda_input_norm:
                        x = model.final_norm(x)
                for i in range(start, cfg.n_coda):
                    x = model.coda[i](x, step=Step("coda", 0, i), rope=model.rope, offset=0, cache=None)
                return x
    return stages.Readout(
        norm_weight=None if norm is None else norm.weight.detach(),
        norm_eps=cfg.norm_eps if norm is None else norm.eps,
        unembedding=model.unembedding.detach(),
        norm_kind="none" if norm is None else "rms",
        coda=coda,
        n_coda=cfg.n_coda,
    )


def looped_neuron_fractions(model: LoopedLM, *, fold_final_norm: bool = True, center_unembedding: bool = True,
                            kurtosis_threshold: float = 10.0) -> pd.DataFrame:
    """`neuron_fractions` for every layer of a LoopedLM, folding the logit-lens norm weight (see
    `looped_readout`) into W_U when `fold_final_norm`."""
    readout = looped_readout(model)
    g = readout.norm_weight if fold_final_norm else None
    return stages.neuron_fractions(down_projections(model), readout.unembedding, norm_weight=g,
                                   center_unembedding=center_unembedding, kurtosis_threshold=kurtosis_threshold)


def model_readout(loaded) -> stages.Readout | None:
    """The logit-lens readout of any loaded model (LoopedLM of any family, or a Hugging Face feedforward LM)."""

    if loaded.is_looped:
        return looped_readout(loaded.model)
    from loopscope.models import hf_parts as hf

    return stages.Readout(**hf.hf_readout(loaded.model))


def model_neuron_fractions(loaded) -> pd.DataFrame:
    """Prediction / suppression neuron fractions per physical layer, for any loaded model."""

    if loaded.is_looped:
        return looped_neuron_fractions(loaded.model)
    from loopscope.models import hf_parts as hf

    readout = model_readout(loaded)
    downs = {f"core.{i}": w for i, w in hf.hf_mlp_down_weights(loaded.model).items()}
    return stages.neuron_fractions(downs, readout.unembedding, norm_weight=readout.norm_weight)


def attention_lipschitz_check(model, input_ids, recurrences: int, *, mask=None, state_seed: int | None = None,
                              initial_state=None) -> pd.DataFrame:
    """Proposition 4.2 on one forward of a LoopedLM: measured ‖S_{j,t} − S_{j,t−1}‖_F per (recurrence, layer, prompt,
    head) against its bound (`loopscope.stages.prop42`), from the model's own weights and score-function inputs.
    Columns: segment, recurrence, layer, depth, relative_depth, batch, head, n_tokens, head_dim, measured,
    input_change (‖ΔX‖_F), input_bound (B), kappa, kappa_qk, bound, ratio (= measured / bound, ≤ 1)."""
    from loopscope.capture.stream import stream_tensors
    from loopscope.models.looped import LoopedLM
    from loopscope.models.weights import attention_projections
    from loopscope.stages.prop42 import Prop42Check

    if not isinstance(model, LoopedLM):
        raise InputError("attention_lipschitz_check needs a LoopedLM (it reads its weights); "
                         f"got {type(model).__name__}")
    if int(recurrences) < 2:
        raise InputError("Prop. 4.2 compares consecutive recurrences: use recurrences ≥ 2")
    acc = Prop42Check(attention_projections(model))
    return stream_tensors(model, input_ids, recurrences, [acc], mask=mask, attention=True, state_seed=state_seed,
                          initial_state=initial_state)[acc.name]


def prop42_table_summary(checks: pd.DataFrame) -> pd.DataFrame:
    """Per block layer: max and median measured/bound ratio, max measured change, number of checks."""
    core = checks[checks.segment == "core"]
    return core.groupby("layer").agg(
        max_ratio=("ratio", "max"), median_ratio=("ratio", "median"),
        max_measured=("measured", "max"), n_checks=("ratio", "size"),
    ).reset_index()


def prop42_summary(loaded, prompts: list[str], recurrences: int) -> pd.DataFrame | None:
    """Proposition 4.2 on real runs: per block layer, the largest measured/bound ratio over recurrences, prompts
    and heads (LoopedLM only: the check reads the layer's weights and inputs through its hook points)."""
    from loopscope.capture.prompts import encode_prompts

    if not loaded.is_looped or recurrences < 2 or not prompts:
        return None
    ids, mask, _ = encode_prompts(loaded.tokenizer, prompts, loaded.max_seq_len)
    return prop42_table_summary(attention_lipschitz_check(loaded.model, ids.to(model_device(loaded)), recurrences,
                                                          mask=mask))


def model_device(loaded):
    return next(loaded.model.parameters()).device


def single_pass(table: pd.DataFrame, recurrence: int) -> pd.DataFrame:
    """The states of one pass: prelude, block recurrence `recurrence` (relabelled 0) and coda — a table shaped
    like a feedforward model's, so `alignment` can use it as the reference."""
    keep = (table.segment != "core") | (table.recurrence == recurrence)
    return table[keep].assign(recurrence=lambda d: d.recurrence.where(d.segment != "core", 0))


def alignment_to_baseline(baseline: pd.DataFrame, changed: pd.DataFrame) -> pd.DataFrame:
    """`alignment_table` of each recurrence t of `changed` against recurrence t of `baseline` (the same model
    before an intervention): pearson 1 and rmse 0 mean the intervention left that pass's stage profile alone."""
    rows = []
    for t in sorted(changed.loc[changed.segment == "core", "recurrence"].unique()):
        if not (baseline.recurrence[baseline.segment == "core"] == t).any():
            continue
        scores = alignment_table(single_pass(changed, t), single_pass(baseline, t))
        rows.append(scores.assign(recurrence=int(t)))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()


def profile_summary(runs: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per metric and run: mean, min, max and range (max − min) of the metric over every state of the run.

    A stage profile that collapses (e.g. ColSum concentration or sink rate flattening after the massive-activation
    MLP is zeroed) shows as a smaller range; `runs` maps a run name ("before", "after") to its stage table.
    """
    rows = []
    for value in STAGE_METRICS:
        for run, table in runs.items():
            if value in table and table[value].notna().any():
                y = table[value].astype(float)
                rows.append({"metric": value.removesuffix("_mean"), "run": run, "mean": y.mean(), "min": y.min(),
                             "max": y.max(), "range": y.max() - y.min()})
    return pd.DataFrame(rows)
