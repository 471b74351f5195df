"""classify(method="dynamics") on dynamical systems whose behaviour is known exactly (and with noise)."""

import math

import pandas as pd
import pytest
import torch

from loopscope.dynamics import BEHAVIOURS, classify
from loopscope.dynamics.synthetic import (
    blow_up,
    contraction,
    drift,
    expansion,
    rotation,
    trajectory_from_tokens,
)
from loopscope.errors import InputError

R, D = 64, 8


def labels(states, **kw) -> pd.DataFrame:
    return classify(trajectory_from_tokens([states]), **kw)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_contraction_is_a_fixed_point(seed):
    df = labels([contraction(R, D, rho=0.8, seed=seed), contraction(R, D, rho=0.5, seed=seed + 10)])
    assert df["behaviour"].tolist() == ["fixed_point"] * 2
    assert df["period"].isna().all()


@pytest.mark.parametrize("period", [2, 3, 5, 7])
def test_rotation_is_an_orbit_with_exact_period(period):
    states = [rotation(R, D, period, radius=1.0, offset=1.0, seed=period),
              rotation(R, D, period, radius=0.3, offset=5.0, seed=period + 1)]  # small orbit, large offset
    df = labels(states)
    assert df["behaviour"].tolist() == ["orbit", "orbit"]
    assert df["period"].tolist() == [period, period]
    assert (df["return_error"] < 1e-6).all()


def test_drift_is_a_slider():
    df = labels([drift(R, D, speed=1.0, seed=s) for s in range(3)])
    assert df["behaviour"].tolist() == ["slider"] * 3
    assert df["straightness"].tolist() == pytest.approx([1.0] * 3)


def test_expansion_and_nonfinite_states_are_divergent():
    states = [expansion(R, D, factor=1.5), blow_up(R, D, at=40, value=float("inf")),
              blow_up(R, D, at=R - 1, value=float("nan"))]
    df = labels(states)
    assert df["behaviour"].tolist() == ["divergent"] * 3
    assert df.loc[0, "growth"] == pytest.approx(1.5 ** 16, rel=1e-3)  # max-norm ratio across the window halves


def test_iid_noise_is_unknown():
    g = torch.Generator().manual_seed(0)
    df = labels([torch.randn(R, D, generator=g, dtype=torch.float64)])
    assert df["behaviour"].tolist() == ["unknown"]


@pytest.mark.parametrize("seed", [0, 1])
def test_noisy_systems_keep_label_and_period(seed):
    states = [
        contraction(R, D, seed=seed, noise=1e-3),
        *[rotation(R, D, p, seed=seed + p, noise=1e-2) for p in (2, 3, 5, 7)],
        drift(R, D, speed=1.0, seed=seed, noise=1e-2),
        expansion(R, D, seed=seed, noise=1e-2),
    ]
    df = labels(states)
    assert df["behaviour"].tolist() == ["fixed_point", "orbit", "orbit", "orbit", "orbit", "slider", "divergent"]
    assert df["period"].tolist()[1:5] == [2, 3, 5, 7]


def test_mixed_batch_with_padding():
    """Two prompts of different behaviours; prompt 0 is shorter and its padding slot holds NaN — it must be
    neither classified nor allowed to disturb the real tokens."""
    p0 = [rotation(R, D, 3), drift(R, D, speed=1.0)]
    p1 = [contraction(R, D), expansion(R, D), rotation(R, D, 5, seed=4)]
    traj = trajectory_from_tokens([p0, p1], tokens=[["a", "b"], ["c", "d", "e"]])
    traj.core[:, :, 0, 2] = float("nan")  # the pad of prompt 0
    df = classify(traj)
    assert list(df.columns[:6]) == ["batch", "token", "token_str", "layer", "behaviour", "period"]
    assert list(zip(df["batch"], df["token"])) == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    assert df["token_str"].tolist() == ["a", "b", "c", "d", "e"]
    assert df["behaviour"].tolist() == ["orbit", "slider", "fixed_point", "divergent", "orbit"]
    assert df["period"].tolist()[0] == 3 and df["period"].tolist()[4] == 5
    assert df["period"].dtype == "Int64" and df["period"].isna().tolist() == [False, True, True, True, False]
    assert set(df["behaviour"]) <= set(BEHAVIOURS)


def test_layer_argument_selects_the_block_layer():
    per_token = [torch.stack([contraction(R, D), rotation(R, D, 5)], dim=1)]  # [R, K=2, D]
    traj = trajectory_from_tokens([per_token])
    assert classify(traj, layer=0)["behaviour"].item() == "fixed_point"
    last = classify(traj)  # layer=-1
    assert (last["behaviour"].item(), last["layer"].item(), last["period"].item()) == ("orbit", 1, 5)
    with pytest.raises(InputError, match="layer=2"):
        classify(traj, layer=2)


def test_thresholds_are_used():
    slow = drift(R, D, speed=0.02)  # relative steps ≈ 0.02/‖x‖ < 1e-2: a fixed point at the default tolerance
    assert labels([slow])["behaviour"].item() == "fixed_point"
    assert labels([slow], fixed_tol=1e-4)["behaviour"].item() == "slider"
    assert labels([rotation(R, D, 7)], max_period=6)["behaviour"].item() == "unknown"
    with pytest.raises(InputError, match="unknown thresholds"):
        labels([slow], tolerance=0.1)


def test_too_few_recurrences_is_an_input_error():
    with pytest.raises(InputError, match="4 ≤ window"):
        labels([contraction(3, D)])


def test_quasi_periodic_rotation_has_no_period():
    """Rotation by the golden angle 2π/φ² never repeats; its closest return within 16 steps is at p = 13 with
    relative error |sin(13π/φ²)| / |sin(π/φ²)| ≈ 0.116 > orbit_tol = 0.1, so it is not an orbit."""
    phi = (1 + 5 ** 0.5) / 2
    df = labels([rotation(R, D, period=phi ** 2)])
    expect = abs(math.sin(13 * math.pi / phi ** 2)) / abs(math.sin(math.pi / phi ** 2))
    assert df["return_error"].item() == pytest.approx(expect, rel=1e-4)
    assert df["behaviour"].item() == "unknown"
    assert labels([rotation(R, D, period=phi ** 2)], orbit_tol=0.12)["period"].item() == 13


def test_state_resting_at_the_origin():
    """x_t = 0 for all t: a fixed point (steps are 0), not a NaN-driven 'divergent'; the paper heuristic has
    no cosine for a zero vector and says 'unknown'."""
    zero = torch.zeros(R, D, dtype=torch.float64)
    assert labels([zero])["behaviour"].item() == "fixed_point"
    assert labels([zero], method="paper")["behaviour"].item() == "unknown"
