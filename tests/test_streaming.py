"""Streaming equals in-memory: every table the report draws, built from batches fed state by state, equals the same
metric on one in-memory Trajectory (the same accumulator replayed); resuming after a kill loses nothing; parts
round-trip through bytes; the exact second pass is checked.

Tolerance, stated once: the streamed tables fold per-batch moments (Chan et al.), the in-memory ones reduce all
tokens at once, so means and stds may differ by float64 rounding; everything is compared at rtol 1e-9 and atol
1e-12 (far below float32 rounding, 6e-8), and labels, counts and quantiles exactly.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from loopscope.accumulate import decode_part, encode_part
from loopscope.accumulate.replay import run_on_trajectory
from loopscope.capture import Trajectory, capture_prompts
from loopscope.capture.stream import StreamSettings, stream_prompts
from loopscope.data.prompts import load_prompts
from loopscope.dynamics import rule_dynamics
from loopscope.dynamics.behaviour import Behaviour
from loopscope.dynamics.convergence import CyclicFixedPointCheck, DistanceToFixedPoint, SuccessiveChange
from loopscope.dynamics.cooccurrence import cooccurrence_from
from loopscope.dynamics.degeneracy import Degeneracy
from loopscope.dynamics.pca import TokenStates
from loopscope.dynamics.sensitivity import threshold_sweep
from loopscope.dynamics.similarity import AttentionDistance, ResidualSimilarity
from loopscope.experiments.stage_tables import model_readout, stage_accumulators, stage_table_from
from loopscope.models import load_model
from loopscope.models.weights import attention_projections
from loopscope.stages.attention_change import AttentionChange
from loopscope.stages.prop42 import Prop42Check

RTOL, ATOL = 1e-9, 1e-12
R_STATES, R_ATTN, PROMPTS, BATCH = 16, 4, 5, 2


def assert_frames_equal(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert list(a.columns) == list(b.columns) and len(a) == len(b)
    for col in a.columns:
        x, y = a[col], b[col]
        if pd.api.types.is_numeric_dtype(x) and not pd.api.types.is_bool_dtype(x):
            np.testing.assert_allclose(x.to_numpy(dtype=float), y.to_numpy(dtype=float), rtol=RTOL, atol=ATOL,
                                       err_msg=col)
        else:
            assert x.astype(str).tolist() == y.astype(str).tolist(), col


def dynamics_accs():
    return [SuccessiveChange(), DistanceToFixedPoint(), CyclicFixedPointCheck(), Degeneracy(),
            Behaviour(dynamics=rule_dynamics.DynamicsThresholds(window=8)), TokenStates(3, -1)]


def attention_accs(loaded):
    att = DistanceToFixedPoint()
    att.name = "attention_to_fixed_point"
    return [*stage_accumulators(model_readout(loaded)), att, ResidualSimilarity(), AttentionDistance(),
            AttentionChange(["batch"]), Prop42Check(attention_projections(loaded.model))]


@pytest.fixture(scope="module")
def runs():
    """The default model, 5 prompts in batches of 2: streamed, and captured whole from the same batches."""
    loaded = load_model("default")
    prompts = load_prompts("gsm-symbolic", limit=PROMPTS)
    with torch.inference_mode():
        streamed, run = stream_prompts(loaded, prompts, dynamics_accs(),
                                       StreamSettings(R_STATES, batch_size=BATCH, progress=False))
        streamed_att, _ = stream_prompts(loaded, prompts, attention_accs(loaded),
                                         StreamSettings(R_ATTN, attention=True, batch_size=BATCH, progress=False))
        whole = capture_prompts(loaded, prompts, R_STATES, batch_size=BATCH, progress=False)
        whole_att = capture_prompts(loaded, prompts, R_ATTN, attention=True, batch_size=BATCH, progress=False,
                                    sites=["attn_in"])
    memory = run_on_trajectory(dynamics_accs(), whole)
    memory_att = run_on_trajectory(attention_accs(loaded), whole_att)
    return streamed, streamed_att, memory, memory_att, run


@pytest.mark.parametrize("name", ["successive_change", "distance_to_fixed_point", "cyclic_fixed_point_check",
                                  "degeneracy"])
def test_dynamics_tables_equal(runs, name):
    streamed, _, memory, _, _ = runs
    assert_frames_equal(streamed[name], memory[name])


def test_behaviour_labels_diagnostics_cooccurrence_and_sweep_equal(runs):
    streamed, _, memory, _, _ = runs
    a, b = streamed["behaviour"], memory["behaviour"]
    for method in ("dynamics", "paper"):
        assert_frames_equal(a.frame(-1, method), b.frame(-1, method))
    assert_frames_equal(cooccurrence_from(a).reset_index(), cooccurrence_from(b).reset_index())
    assert_frames_equal(threshold_sweep(a), threshold_sweep(b))


def test_pca_of_a_kept_token_equal(runs):
    streamed, _, memory, _, _ = runs
    for x, y in zip(streamed["pca_trajectory"], memory["pca_trajectory"]):
        assert_frames_equal(x, y)


@pytest.mark.parametrize("name", ["residual_norms", "residual_entropy", "attention_metrics", "logit_lens",
                                  "attention_to_fixed_point", "attention_change", "prop42"])
def test_attention_run_tables_equal(runs, name):
    _, streamed, _, memory, _ = runs
    assert_frames_equal(streamed[name], memory[name])


@pytest.mark.parametrize("name", ["residual_similarity", "attention_distance"])
def test_similarity_maps_equal(runs, name):
    _, streamed, _, memory, _ = runs
    np.testing.assert_allclose(streamed[name].to_numpy(), memory[name].to_numpy(), rtol=RTOL, atol=ATOL)


def test_stage_table_equal_and_second_pass_is_exact(runs):
    _, streamed, _, memory, run = runs
    assert_frames_equal(stage_table_from(streamed), stage_table_from(memory))
    assert run["finals_max_abs_diff"] == 0.0  # the distance pass reproduced the first pass bit for bit
    assert run["batches"] == 3 and run["prompts"] == PROMPTS


def synthetic() -> Trajectory:
    """Six prompts of a contraction, a rotation and a drift, 3 block layers, uneven lengths (right padding)."""
    g = torch.Generator().manual_seed(0)
    R, K, B, T, D = 20, 3, 6, 5, 4
    core = torch.zeros(R, K, B, T, D, dtype=torch.float64)
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    rot = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))[0]
    for t in range(R):
        x = 0.7 * x @ rot.T + 0.1 * torch.ones(D, dtype=torch.float64) * (torch.arange(B)[:, None, None] % 3 == 2)
        for j in range(K):
            core[t, j] = x * (j + 1)
    mask = torch.arange(T)[None, :] < torch.tensor([5, 3, 4, 1, 5, 2])[:, None]
    return Trajectory(core=core, mask=mask)


def test_synthetic_trajectory_in_parts_equals_whole():
    """The combine step alone: the same states fed as three batches or as one give the same tables."""
    traj = synthetic()
    accs = lambda: [SuccessiveChange(), DistanceToFixedPoint(), CyclicFixedPointCheck(), Degeneracy(),  # noqa: E731
                    Behaviour(dynamics=rule_dynamics.DynamicsThresholds(window=8)), ResidualSimilarity()]
    whole = run_on_trajectory(accs(), traj)
    from loopscope.accumulate.core import run_accumulators
    from loopscope.accumulate.replay import context_from_trajectory, replay

    acc = accs()
    parts = []
    for i, idx in enumerate(([0, 1], [2, 3], [4, 5])):
        sub = traj.select(idx)
        parts.append(decode_part(encode_part(run_accumulators(acc, context_from_trajectory(sub, i, idx[0]),
                                                              replay(sub)))))
    for a in acc:
        combined = a.combine([p[a.name] for p in parts])
        if isinstance(combined, pd.DataFrame):
            assert_frames_equal(combined.reset_index(drop=True), whole[a.name].reset_index(drop=True))
        else:
            for method in ("dynamics", "paper"):
                assert_frames_equal(combined.frame(-1, method), whole[a.name].frame(-1, method))


def test_part_round_trip_is_exact():
    frame = pd.DataFrame({"x": [1.5, np.nan, np.inf], "s": ["a", "é", None],
                          "p": pd.array([2, None, 5], dtype="Int64"), "b": [True, False, True]})
    part = {"t": torch.arange(6, dtype=torch.float64).reshape(2, 3) / 7,
            "nested": {"n": torch.ones(2, dtype=torch.int32)},
            "frame": frame, "meta": {"k": [1, 2]}}
    back = decode_part(encode_part(part))
    assert torch.equal(back["t"], part["t"]) and back["t"].dtype == torch.float64
    assert back["nested"]["n"].dtype == torch.int32 and back["meta"] == {"k": [1, 2]}
    pd.testing.assert_frame_equal(back["frame"], frame)


def test_killed_run_resumes_with_identical_tables(tmp_path, monkeypatch):
    """A run killed after its first batch resumes from that batch's cached part: the rerun computes only the rest,
    and its tables equal an uninterrupted run's."""
    import loopscope.capture.stream as stream

    loaded = load_model("default")
    prompts = load_prompts("gsm-symbolic", limit=PROMPTS)
    settings = lambda cache: StreamSettings(R_STATES, batch_size=BATCH, progress=False, cache_dir=cache)  # noqa: E731
    reference, _ = stream_prompts(loaded, prompts, dynamics_accs(), settings(None))
    real = stream.run_batch
    calls = []

    def dies_after_one(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt("killed")
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(stream, "run_batch", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        stream_prompts(loaded, prompts, dynamics_accs(), settings(tmp_path))
    assert calls == [0] and len(list(tmp_path.rglob("*.part"))) == 1
    resumed = []
    monkeypatch.setattr(stream, "run_batch", lambda *a, **k: (resumed.append(a[2]), real(*a, **k))[1])
    tables, run = stream_prompts(loaded, prompts, dynamics_accs(), settings(tmp_path))
    assert resumed == [1, 2] and run["cached_batches_on_rank0"] == 1
    for name in ("successive_change", "distance_to_fixed_point", "degeneracy"):
        assert_frames_equal(tables[name], reference[name])
    assert_frames_equal(tables["behaviour"].frame(), reference["behaviour"].frame())
