"""Prediction / suppression neurons on constructed weights with known vocabulary moments."""

import math

import pandas as pd
import pytest
import torch

from loopscope.capture.record import capture
from loopscope.experiments.stage_tables import looped_neuron_fractions, looped_readout
from loopscope.models.config import LoopedConfig
from loopscope.models.looped import LoopedLM
from loopscope.models.weights import down_projections
from loopscope.stages import neuron_fractions, neuron_fractions_by_depth, vocab_moments
from loopscope.stages.neurons import readout_directions

V, D = 200, 256


def orthonormal_unembedding(seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(D, V, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    return q.T  # (V, D), orthonormal rows


def constructed_layer(W_U: torch.Tensor) -> torch.Tensor:
    """w_down (D, 4): a prediction neuron, a suppression neuron, a random neuron, a half-vocabulary neuron."""
    g = torch.Generator().manual_seed(1)
    cols = [3.0 * W_U[5], -2.0 * W_U[7], torch.randn(D, dtype=torch.float64, generator=g), W_U[:100].sum(0)]
    return torch.stack(cols, dim=1)


def test_vocab_moments_of_a_one_token_neuron_are_bernoulli():
    W_U = orthonormal_unembedding()
    m = vocab_moments(constructed_layer(W_U), readout_directions(W_U, center_unembedding=False))
    # cos over the vocabulary is e_5: one 1 among V values → Bernoulli(p = 1/V) moments
    p = 1 / V
    pq = p * (1 - p)
    assert m.vocab_skew[0] == pytest.approx((1 - 2 * p) / math.sqrt(pq), rel=1e-9)
    assert m.vocab_kurtosis[0] == pytest.approx((1 - 6 * pq) / pq + 3, rel=1e-9)
    assert m.vocab_skew[1] == pytest.approx(-(1 - 2 * p) / math.sqrt(pq), rel=1e-9)
    assert m.vocab_kurtosis[3] == pytest.approx(1.0)  # half ones, half zeros: Bernoulli(1/2) has kurtosis 1
    assert 2.0 < m.vocab_kurtosis[2] < 4.5  # a random direction gives near-Gaussian cosines (kurtosis 3)


@pytest.mark.parametrize("center", [False, True])
def test_fractions_count_prediction_and_suppression_neurons(center):
    W_U = orthonormal_unembedding()
    w = constructed_layer(W_U)
    df = neuron_fractions({"core.1": w, "prelude.0": w[:, 2:]}, W_U, center_unembedding=center)
    row = df.set_index("name").loc["core.1"]
    assert (row.segment, row.layer, row.n_neurons) == ("core", 1, 4)
    assert (row.n_prediction, row.n_suppression) == (1, 1)
    assert row.prediction_fraction == pytest.approx(0.25) and row.suppression_fraction == pytest.approx(0.25)
    other = df.set_index("name").loc["prelude.0"]
    assert (other.n_prediction, other.n_suppression) == (0, 0)


def test_folding_the_norm_weight_scales_the_unembedding_columns():
    W_U = orthonormal_unembedding()
    w = constructed_layer(W_U)
    g = torch.linspace(0.1, 3.0, D, dtype=torch.float64)
    folded = vocab_moments(w, readout_directions(W_U, norm_weight=g))
    by_hand = vocab_moments(w, readout_directions(W_U * g))
    moments = ["vocab_skew", "vocab_kurtosis"]
    assert folded[moments].to_numpy() == pytest.approx(by_hand[moments].to_numpy())
    unfolded = vocab_moments(w, readout_directions(W_U))
    assert not unfolded.vocab_skew.to_numpy() == pytest.approx(folded.vocab_skew.to_numpy())


def test_planted_prediction_neuron_in_a_looped_model():
    cfg = LoopedConfig(vocab_size=256, d_model=64, n_heads=2, d_mlp=32, n_prelude=1, n_block=2, n_coda=1,
                       recurrences=2, seed=0)
    model = LoopedLM(cfg)
    with torch.no_grad():
        model.core[1].mlp.down_proj.weight[:, 7] = 0.5 * model.unembedding[11]
    df = looped_neuron_fractions(model)
    assert df.name.tolist() == ["prelude.0", "core.0", "core.1", "coda.0"]
    assert df.n_prediction.tolist() == [0, 0, 1, 0]
    assert df.n_suppression.tolist() == [0, 0, 0, 0]
    traj = capture(model, torch.zeros(1, 3, dtype=torch.long), recurrences=2)
    spread = neuron_fractions_by_depth(df, traj)
    assert spread.depth.tolist() == [1, 2, 3, 4, 5, 6]
    assert spread.prediction_fraction.tolist() == pytest.approx([0, 0, 1 / 32, 0, 1 / 32, 0])


def test_float32_moments_match_float64_on_the_trained_default():
    """The fast float32 path (the default of `neuron_fractions`) moves the moments by < 1e-4 relative and gives the
    same prediction / suppression counts as the exact float64 path, on real trained weights."""
    from loopscope.models.load import load_model

    model = load_model("default").model
    readout = looped_readout(model)
    directions = readout_directions(readout.unembedding, readout.norm_weight)
    for name, w in down_projections(model).items():
        exact = vocab_moments(w, directions)
        fast = vocab_moments(w, directions, dtype=torch.float32)
        for col in ("cos_std", "vocab_skew", "vocab_kurtosis"):
            assert fast[col].to_numpy() == pytest.approx(exact[col].to_numpy(), rel=1e-4, abs=1e-6), (name, col)
    layers = down_projections(model)
    f64 = neuron_fractions(layers, readout.unembedding, norm_weight=readout.norm_weight, dtype=torch.float64)
    f32 = neuron_fractions(layers, readout.unembedding, norm_weight=readout.norm_weight)
    pd.testing.assert_frame_equal(f32, f64)
    assert f64["n_prediction"].sum() + f64["n_suppression"].sum() > 0  # the comparison has neurons to count
