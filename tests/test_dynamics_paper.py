"""classify(method="paper"): the App. C heuristic reconstruction, on hand-built cosine-to-final sequences."""

import math

import pytest
import torch

from loopscope.dynamics import classify
from loopscope.dynamics.synthetic import trajectory_from_tokens
from loopscope.errors import InputError

R = 40  # window = recurrences 20..38 (19 values); recurrence 39 is the final state


def states_with_cosines(c: list[float]) -> torch.Tensor:
    """x_t = (c_t, sqrt(1 − c_t²), 0) so that cos(x_t, x_{R-1}) = c_t exactly (x_{R-1} = (1, 0, 0))."""
    assert len(c) == R - 1
    c = torch.tensor([*c, 1.0], dtype=torch.float64)
    return torch.stack([c, (1 - c * c).clamp(min=0).sqrt(), torch.zeros(R, dtype=torch.float64)], dim=1)


def paper(sequences: list[list[float]], **kw):
    return classify(trajectory_from_tokens([[states_with_cosines(c) for c in sequences]], dtype=torch.float64),
                    method="paper", **kw)


FIXED = [0.2] * 20 + [0.99] * 19  # far away early, inside the τ-band for the whole later window
ORBIT = [1.0 if t % 2 else 0.5 for t in range(R - 1)]  # period-2 orbit: returns to the final state every 2 steps
SLIDER = [0.3 + 0.6 * t / (R - 2) for t in range(R - 1)]  # cosine to the end rises steadily, never in the band
UNKNOWN = [0.45 + 0.15 * math.sin(2 * math.pi * t / 6) for t in range(R - 1)]  # oscillates, never returns


def test_each_branch():
    df = paper([FIXED, ORBIT, SLIDER, UNKNOWN])
    assert df["behaviour"].tolist() == ["fixed_point", "orbit", "slider", "unknown"]
    assert df["period"].isna().all()  # the heuristic defines no period
    assert df["fixed_fraction"].tolist()[0] == pytest.approx(1.0)
    assert df["monotone_fraction"].tolist()[2] == pytest.approx(1.0)
    assert df["n_returns"].tolist()[3] == 0 and df["n_peaks"].tolist()[3] >= 2


def test_rho_boundary_and_band_edge():
    """19 window values: 18 in the band is 0.947 ≥ ρ → fixed; 17 is 0.895 < ρ → not fixed; a cosine just
    above 1 − τ is in the band."""
    in_band = [0.2] * 20 + [0.951] * 19
    eighteen = [0.2] * 20 + [0.5] + [0.96] * 18
    seventeen = [0.2] * 20 + [0.5, 0.5] + [0.96] * 17
    df = paper([in_band, eighteen, seventeen])
    assert df["fixed_fraction"].tolist() == pytest.approx([1.0, 18 / 19, 17 / 19])
    assert df["behaviour"].tolist()[:2] == ["fixed_point", "fixed_point"]
    assert df["behaviour"].tolist()[2] != "fixed_point"


def test_window_start_reads_the_later_recurrences():
    """A cosine rising steadily that enters the band at recurrence 30: over the second half (20..38) only 9 of
    19 values are in the band, so it drifts (slider); with window_start=0.75 (30..38, all in band) it is a
    fixed point."""
    late = [0.3 + 0.66 * t / 30 for t in range(30)] + [0.96 + 0.03 * t / 8 for t in range(9)]
    assert paper([late])["behaviour"].item() == "slider"
    assert paper([late], window_start=0.75)["behaviour"].item() == "fixed_point"
    with pytest.raises(InputError, match="unknown thresholds"):
        paper([late], tau_band=0.1)


def test_tau_changes_the_verdict():
    near = [0.2] * 20 + [0.9] * 19  # 1 − cos = 0.1 > τ = 0.05
    assert paper([near])["behaviour"].item() != "fixed_point"
    assert paper([near], tau=0.2)["behaviour"].item() == "fixed_point"


def test_nonfinite_state_is_divergent_and_padding_ignored():
    bad = states_with_cosines(FIXED)
    bad[25, 1] = float("nan")
    traj = trajectory_from_tokens([[bad], [states_with_cosines(ORBIT), states_with_cosines(SLIDER)]],
                                  dtype=torch.float64)
    traj.core[:, :, 0, 1] = float("inf")  # padding of prompt 0
    df = classify(traj, method="paper")
    assert list(zip(df["batch"], df["token"])) == [(0, 0), (1, 0), (1, 1)]
    assert df["behaviour"].tolist() == ["divergent", "orbit", "slider"]


def test_orbit_needs_two_strict_peaks_and_a_return():
    """decide_window on hand-made cosine windows: two strict local maxima (0.90, 0.97) and one re-entry into the
    τ-band → orbit; the same window with one peak → not an orbit (and not monotone: unknown); a flat top is no
    strict peak."""
    import torch

    from loopscope.dynamics.rule_dynamics import ORBIT, UNKNOWN
    from loopscope.dynamics.rule_paper import PaperThresholds, decide_window

    th = PaperThresholds()
    two = [0.80, 0.90, 0.80, 0.97, 0.80, 0.75, 0.80, 0.85]
    one = [0.80, 0.85, 0.90, 0.97, 0.80, 0.75, 0.70, 0.65]
    flat = [0.80, 0.90, 0.90, 0.80, 0.97, 0.97, 0.80, 0.75]
    w = torch.tensor([two, one, flat], dtype=torch.float64).T
    labels = decide_window(w, th)
    assert labels.diagnostics["n_peaks"].tolist() == [2, 1, 0]
    assert labels.diagnostics["n_returns"].tolist() == [1, 1, 1]
    assert labels.code.tolist() == [ORBIT, UNKNOWN, UNKNOWN]
