"""classify(method="dynamics") on systems whose long-run behaviour is known exactly, at R = 32, 64, 128 and 256.

Every system here is built by this file's own generators (not `loopscope.dynamics.synthetic`): noisy fixed points,
noisy sliders, orbits of exact period, quasi-periodic rotations, states renormalised to a sphere, long transients,
cyclic blocks of distinct affine maps, expansions, and copies scaled by 1e-3 and 1e4. A system already in its
asymptotic regime must get the same label at every R (the old detector called a steady drift a fixed point at
R = 128 and a fixed point with 0.7 % noise `unknown`).
"""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from loopscope.capture import Trajectory
from loopscope.dynamics import BEHAVIOURS, classify
from loopscope.dynamics.rule_dynamics import FIXED_BEHAVIOURS
from loopscope.errors import InputError

D = 16
RS = (32, 64, 128, 256)


# --- generators (x [R, D] float64 for one token) --------------------------------------------------------------
def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def unit(D: int, g: torch.Generator) -> torch.Tensor:
    v = torch.randn(D, generator=g, dtype=torch.float64)
    return v / v.norm()


def noisy_fixed_point(R, noise, seed, transient=0.5, scale=1.0):
    """x_t = x* + 0.5^t (x_0 − x*) + ε_t, ‖ε_t‖ ≈ noise·‖x*‖ (i.i.d. Gaussian)."""
    g = gen(seed)
    star = 3 * unit(D, g) * math.sqrt(D)
    x0 = torch.randn(D, generator=g, dtype=torch.float64) * math.sqrt(D)
    t = torch.arange(R, dtype=torch.float64)[:, None]
    eps = torch.randn(R, D, generator=g, dtype=torch.float64) * noise * star.norm() / math.sqrt(D)
    return scale * (star + transient ** t * (x0 - star) + eps)


def noisy_slider(R, step_noise, seed, speed=0.3, scale=1.0):
    """x_{t+1} = x_t + v + η_t, ‖η_t‖ ≈ step_noise·‖v‖: a steady drift with noisy steps."""
    g = gen(seed)
    v = speed * unit(D, g)
    steps = v + torch.randn(R, D, generator=g, dtype=torch.float64) * step_noise * speed / math.sqrt(D)
    x0 = torch.randn(D, generator=g, dtype=torch.float64)
    return scale * (x0 + torch.cumsum(steps, 0) - steps[0])


def rotation(R, period, seed, radius=1.0, offset=2.0, noise=0.0, scale=1.0):
    """Rotation by 2π/period in a random plane around a centre c (‖c‖ = offset); period may be irrational."""
    g = gen(seed)
    q = torch.linalg.qr(torch.randn(D, 3, generator=g, dtype=torch.float64))[0]
    angle = 2 * math.pi * torch.arange(R, dtype=torch.float64)[:, None] / period + 0.3
    x = offset * q[:, 2] + radius * (angle.cos() * q[:, 0] + angle.sin() * q[:, 1])
    x = x + torch.randn(R, D, generator=g, dtype=torch.float64) * noise * radius / math.sqrt(D)
    return scale * x


def on_sphere(R, seed, rotate_period=None):
    """States renormalised to ‖x‖ = √D every step (as an RMS-normed stream): a contraction to a point of the sphere,
    or (rotate_period) a rotation along a great circle."""
    g = gen(seed)
    if rotate_period is not None:
        return math.sqrt(D) * rotation(R, rotate_period, seed, radius=1.0, offset=0.0)
    A = 0.7 * torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))[0]
    b = torch.randn(D, generator=g, dtype=torch.float64)
    x = torch.randn(D, generator=g, dtype=torch.float64)
    out = []
    for _ in range(R):
        x = A @ x + b
        x = math.sqrt(D) * x / x.norm()
        out.append(x)
    return torch.stack(out)


def expanding(R, seed, factor=1.05):
    g = gen(seed)
    return factor ** torch.arange(R, dtype=torch.float64)[:, None] * torch.randn(D, generator=g, dtype=torch.float64)


def with_transient(x, length, seed):
    """Replace the first `length` states by a random walk ending where the behaviour starts."""
    g = gen(seed + 99)
    walk = torch.cumsum(torch.randn(length, D, generator=g, dtype=torch.float64) * 0.5, 0)
    walk = walk - walk[-1] + x[length]
    return torch.cat([walk, x[length:]])


def pack(series: list[torch.Tensor], dtype=torch.float32) -> Trajectory:
    """One prompt of len(series) tokens, one block layer: core [R, 1, 1, N, D]."""
    core = torch.stack(series, dim=1)[:, None, None].to(dtype)
    return Trajectory(core=core)


def labels(series, **kw) -> pd.DataFrame:
    return classify(pack(series), **kw)


# --- the same label at every R --------------------------------------------------------------------------------
@pytest.mark.parametrize("R", RS)
def test_noisy_fixed_points_are_fixed_points(R):
    xs = [noisy_fixed_point(R, noise, seed) for noise in (0.0, 0.007, 0.01, 0.03, 0.05) for seed in range(3)]
    df = labels(xs)
    # without noise the state reaches float32's rounding floor once R/2 ≥ 32 halvings: at_floor, a fixed point as
    # far as float32 can tell; with noise it moves, and is a fixed point
    at_floor = ["at_floor" if R >= 64 else "fixed_point"] * 3
    assert df["behaviour"].tolist() == at_floor + ["fixed_point"] * (len(xs) - 3), \
        df[["behaviour", "noise_level", "step_rate"]]


@pytest.mark.parametrize("R", RS)
def test_noisy_sliders_are_sliders(R):
    xs = [noisy_slider(R, noise, seed) for noise in (0.0, 0.05, 0.1) for seed in range(3)]
    df = labels(xs)
    assert df["behaviour"].tolist() == ["slider"] * len(xs), df[["behaviour", "step_rate", "step_cosine"]]


@pytest.mark.parametrize("R", RS)
def test_orbits_with_exact_periods(R):
    periods = [2, 3, 5, 7] + ([13] if R >= 64 else [])  # searched up to min(16, window // 2): 8 at R = 32
    df = labels([rotation(R, p, seed=p) for p in periods])
    assert df["behaviour"].tolist() == ["orbit"] * len(periods)
    assert df["period"].tolist() == periods


@pytest.mark.parametrize("R", RS)
def test_quasi_periodic_rotation_is_an_orbit_without_period(R):
    phi = (1 + 5 ** 0.5) / 2
    df = labels([rotation(R, phi ** 2, seed=1), rotation(R, 29.3, seed=2)])  # golden angle; slow irrational
    assert df["behaviour"].tolist() == ["orbit", "orbit"]
    assert df["period"].isna().all()


@pytest.mark.parametrize("R", RS)
def test_states_on_a_sphere_converge_or_rotate(R):
    df = labels([on_sphere(R, 0), on_sphere(R, 1), on_sphere(R, 2, rotate_period=5)])
    assert set(df["behaviour"][:2]) <= set(FIXED_BEHAVIOURS) and df["behaviour"].iloc[2] == "orbit"
    assert df["period"].iloc[2] == 5


@pytest.mark.parametrize("R", RS)
def test_expansion_and_nonfinite_states_are_divergent(R):
    blown = noisy_fixed_point(R, 0.0, 4).clone()
    blown[R // 3:, 0] = float("inf")
    df = labels([expanding(R, 0), expanding(R, 1, factor=1.5), blown])
    assert df["behaviour"].tolist() == ["divergent"] * 3


@pytest.mark.parametrize("R", (128, 256))
def test_long_transients_do_not_change_the_label(R):
    length = 40  # in the first half: the tail window starts at R/2 ≥ 64
    xs = [with_transient(noisy_fixed_point(R, 0.02, 0), length, 0), with_transient(noisy_slider(R, 0.05, 1), length, 1),
          with_transient(rotation(R, 6, 2), length, 2)]
    assert labels(xs)["behaviour"].tolist() == ["fixed_point", "slider", "orbit"]


@pytest.mark.parametrize("scale", [1e-3, 1e4])
def test_scaled_copies_get_the_same_labels(scale):
    R = 128
    xs = [noisy_fixed_point(R, 0.02, 0, scale=scale), noisy_slider(R, 0.05, 1, scale=scale),
          rotation(R, 4, 2, scale=scale), rotation(R, 9.7, 3, scale=scale)]
    base = [noisy_fixed_point(R, 0.02, 0), noisy_slider(R, 0.05, 1), rotation(R, 4, 2), rotation(R, 9.7, 3)]
    a, b = labels(xs), labels(base)
    assert a["behaviour"].tolist() == b["behaviour"].tolist() == ["fixed_point", "slider", "orbit", "orbit"]
    assert a["period"].astype(str).tolist() == b["period"].astype(str).tolist()


def test_cyclic_block_of_distinct_affine_maps_reaches_a_fixed_point_at_every_layer():
    """s ← A_j s + b_j for three distinct contractions A_j (a looped block of three layers): every layer converges to
    its own point (a cyclic fixed point); three distinct rotations compose into an orbit seen at every layer."""
    g = gen(5)
    K, R, n = 3, 64, 4
    maps = [(0.8 * torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))[0],
             torch.randn(D, generator=g, dtype=torch.float64)) for _ in range(K)]
    s = torch.randn(n, D, generator=g, dtype=torch.float64)
    core = torch.empty(R, K, 1, n, D, dtype=torch.float64)
    for t in range(R):
        for j, (A, b) in enumerate(maps):
            s = s @ A.T + b
            core[t, j, 0] = s
    traj = Trajectory(core=core.float())
    for j in range(K):
        assert set(classify(traj, layer=j)["behaviour"]) <= set(FIXED_BEHAVIOURS)
    theta = [2 * math.pi / 12, 2 * math.pi / 12, 2 * math.pi / 12]  # composite: a rotation by 2π/4
    q = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))[0]
    rots = []
    for th in theta:
        rot = torch.eye(D, dtype=torch.float64)
        rot[0, 0] = rot[1, 1] = math.cos(th)
        rot[0, 1], rot[1, 0] = -math.sin(th), math.sin(th)
        rots.append(q @ rot @ q.T)
    s = torch.randn(n, D, generator=g, dtype=torch.float64)
    for t in range(R):
        for j, rot in enumerate(rots):
            s = s @ rot.T
            core[t, j, 0] = s
    traj = Trajectory(core=core.float())
    df = classify(traj, layer=1)
    assert df["behaviour"].tolist() == ["orbit"] * n and df["period"].tolist() == [4] * n


def test_linear_drift_is_a_slider_at_every_r_the_old_r128_bug():
    """x_t = x_0 + v·t: the old detector compared the last steps with the state's norm (≈ 1/t) and called it a fixed
    point from R ≈ 100 on. The step size is constant at every R: a slider."""
    for R in RS:
        assert labels([noisy_slider(R, 0.0, 0, speed=0.02)])["behaviour"].item() == "slider", R


def test_iid_states_are_unknown():
    g = gen(3)
    assert labels([torch.randn(64, D, generator=g, dtype=torch.float64)])["behaviour"].item() == "unknown"


def test_state_resting_at_the_origin():
    """x_t = 0 for all t: no motion at any precision, at_floor (not a NaN-driven label); the paper heuristic has no
    cosine for a zero vector and says 'unknown'."""
    zero = torch.zeros(64, D, dtype=torch.float64)
    assert labels([zero])["behaviour"].item() == "at_floor"
    assert labels([zero], method="paper")["behaviour"].item() == "unknown"


def test_the_paper_heuristic_cannot_see_radial_growth_or_drift():
    """The cosine to the final state tends to 1 for a state growing along one direction or drifting away from the
    origin: the App. C heuristic calls both fixed points (its blind spot, stated in the report); the default does
    not."""
    R = 128
    xs = [expanding(R, 0, factor=1.02), noisy_slider(R, 0.0, 1, speed=3.0)]
    assert labels(xs, method="paper")["behaviour"].tolist() == ["fixed_point", "fixed_point"]
    assert labels(xs)["behaviour"].tolist() == ["divergent", "slider"]


def test_deciding_thresholds_are_used():
    R = 64
    noisy = noisy_fixed_point(R, 0.05, 0)
    assert labels([noisy])["behaviour"].item() == "fixed_point"
    assert labels([noisy], noise_tol=0.01)["behaviour"].item() == "unknown"  # 5 % noise is no longer "noise"
    assert labels([rotation(R, 7, 0)], max_period=6)["period"].isna().item()  # found only as quasi-periodic
    phi = (1 + 5 ** 0.5) / 2
    assert labels([rotation(R, phi ** 2, 1)], orbit_tol=0.12)["period"].item() == 13  # its near-return counts
    with pytest.raises(InputError, match="unknown thresholds"):
        labels([noisy], tolerance=0.1)


def test_step_rate_is_the_contraction_rate():
    """For x_t = x* + ρ^t (x_0 − x*) the step size shrinks by ρ per recurrence: step_rate recovers it."""
    R = 32
    g = gen(0)
    star, x0 = torch.randn(D, generator=g, dtype=torch.float64), torch.randn(D, generator=g, dtype=torch.float64)
    t = torch.arange(R, dtype=torch.float64)[:, None]
    rates = [0.6, 0.9, 0.97]
    df = classify(pack([star + r ** t * (x0 - star) for r in rates], dtype=torch.float64))
    assert df["step_rate"].tolist() == pytest.approx(rates, rel=1e-6)
    assert df["behaviour"].tolist() == ["fixed_point"] * 3


def test_too_few_recurrences_is_an_input_error():
    with pytest.raises(InputError, match="at least 8 recurrences"):
        labels([noisy_fixed_point(6, 0.0, 0)])


def test_padding_and_behaviours_listed():
    core = torch.zeros(64, 1, 2, 3, D)
    core[:, 0, 0, 0] = noisy_slider(64, 0.0, 0).float()
    core[:, 0, 1, 0] = rotation(64, 3, 0).float()
    core[:, 0, 1, 1] = noisy_fixed_point(64, 0.0, 0).float()
    core[:, 0, 0, 1:] = float("nan")  # padding: never read
    mask = torch.tensor([[True, False, False], [True, True, False]])
    df = classify(Trajectory(core=core, mask=mask))
    assert list(zip(df.batch, df.token)) == [(0, 0), (1, 0), (1, 1)]
    assert df["behaviour"].tolist() == ["slider", "orbit", "at_floor"]  # exactly converged in float32
    assert set(BEHAVIOURS) == {"fixed_point", "orbit", "slider", "divergent", "unknown", "at_floor"}


# --- drift against noise, and periods through noise (issue 23) ------------------------------------------------
def slide_under_state_noise(R, step, seed, norm=80.0, noise=0.01):
    """x_t = x_0 + v·t (‖v‖ = step, ‖x_0‖ = norm) seen through observation noise of `noise` of each state's norm
    (‖ε_t‖ ≈ noise·‖x_t‖, as a low-precision state's rounding): with step 0.2–0.6 and norm 80 the per-step noise
    (≈ 0.8) is larger than the step, while a 32-step tail moves 8–24× the noise."""
    g = gen(seed)
    x0, v = norm * unit(D, g), step * unit(D, g)
    x = x0 + torch.arange(R, dtype=torch.float64)[:, None] * v
    return x + torch.randn(R, D, generator=g, dtype=torch.float64) * noise * x.norm(dim=-1, keepdim=True) / math.sqrt(D)


@pytest.mark.parametrize("R", RS)
def test_slow_drift_under_state_relative_noise_is_a_slider(R):
    xs = [slide_under_state_noise(R, step, seed) for step in (0.2, 0.4, 0.6) for seed in range(4)]
    df = labels(xs)
    assert df["behaviour"].tolist() == ["slider"] * len(xs), df[["behaviour", "drift_f", "drift_persistence"]]


@pytest.mark.parametrize("R", RS)
def test_drift_with_step_noise_up_to_twice_the_step_is_a_slider(R):
    xs = [noisy_slider(R, noise, seed) for noise in (0.5, 1.0, 1.5, 2.0) for seed in range(4)]
    df = labels(xs)
    assert df["behaviour"].tolist() == ["slider"] * len(xs), df[["behaviour", "step_drift_f", "step_persistence"]]


@pytest.mark.parametrize("R", RS)
def test_noisy_fixed_points_without_drift_stay_fixed_points(R):
    """Noise up to 10 % of the state around a point, with or without a decaying transient, never reads as a drift."""
    xs = [noisy_fixed_point(R, noise, seed, transient=rate) for noise in (0.01, 0.05, 0.08)
          for rate in (0.5, 0.9) for seed in range(3)]
    df = labels(xs)
    assert df["behaviour"].tolist() == ["fixed_point"] * len(xs), df[["behaviour", "drift_f", "drift_persistence"]]


@pytest.mark.parametrize("R", (64, 128, 256))
@pytest.mark.parametrize("noise", (0.01, 0.016, 0.02))
def test_noisy_orbits_report_their_smallest_period(R, noise):
    """Per-coordinate noise of 1–2 % of the state's norm puts the return error near or above orbit_tol, where a
    multiple of the period (10, 15) could pass while the period itself just misses (the old rule said 15 at R = 64,
    1.6 %), or none passes (it said quasi-periodic): the smallest period consistent with the data is reported."""
    xs = [rotation(R, p, seed, radius=1.0, offset=1.0, noise=noise * math.sqrt(2) * math.sqrt(D)) for p in (3, 4, 5)
          for seed in range(8)]
    df = labels(xs)
    assert df["behaviour"].tolist() == ["orbit"] * len(xs)
    assert df["period"].tolist() == [p for p in (3, 4, 5) for _ in range(8)], df[["period", "return_error"]]


def test_period_rule_reduces_a_multiple_to_its_divisor_and_leaves_near_returns_alone():
    """Return errors per lag 2..16 (rows) for three tokens: (a) lag 15 passes orbit_tol while 5 just misses it and
    10 is noisier still: the data is as consistent with 5 as with 15, so 5; (b) an exact period 4 at the noise's
    level, its multiples as close: 4; (c) a quasi-periodic near-return at 8 that misses twice as far at 16: none."""
    from loopscope.dynamics.rule_dynamics import DynamicsThresholds, _period

    ret = torch.ones(15, 3, dtype=torch.float64)
    ret[[3, 8, 13], 0] = torch.tensor([0.105, 0.2, 0.095], dtype=torch.float64)  # lags 5, 10, 15
    ret[[2, 6, 10, 14], 1] = torch.tensor([0.2, 0.21, 0.19, 0.2], dtype=torch.float64)  # lags 4, 8, 12, 16
    ret[[6, 14], 2] = torch.tensor([0.19, 0.38], dtype=torch.float64)  # lags 8, 16
    has_period, period = _period(ret, DynamicsThresholds())
    assert has_period.tolist() == [True, True, False]
    assert period.tolist() == [5, 4, 0]


# --- precision: motion below the rounding floor is at_floor, never a confident fixed point ----------------------
def slide(R, per_step, seed):
    """x_0 + t·v with ‖v‖ = per_step·‖x_0‖ (a slow slide, no noise)."""
    g = gen(seed)
    x0 = 8 * unit(D, g)
    return x0 + torch.arange(R, dtype=torch.float64)[:, None] * (per_step * 8) * unit(D, g)


@pytest.mark.parametrize("R", RS)
def test_a_slow_slide_in_bfloat16_is_a_slider_or_at_floor_never_a_fixed_point(R):
    """bfloat16 states: the floor is 16·2⁻⁸ ≈ 6 % of the state per step. Slides of 1 % and 0.15 % per step are
    under it step by step, but their drift over a 16-step tail clears the rounding noise and moves the state more
    than its rounding u ≈ 0.4 %: sliders at every R. One of 0.01 % per step moves 0.16–1.3 % over 16–128 steps in
    bfloat16's 0.4 % quanta, with no clean drift its rounding lets through: at_floor, or unknown where a trend shows
    but not a straight one — never a confident fixed_point (float32 says slider) — until the 128-step tail of
    R = 256 resolves it."""
    fast = [slide(R, rate, seed) for rate in (0.01, 0.0015) for seed in range(3)]
    slow = [slide(R, 0.0001, seed) for seed in range(3)]
    bf16 = classify(pack(fast + slow, dtype=torch.bfloat16))["behaviour"].tolist()
    assert bf16[:6] == ["slider"] * 6
    if R <= 128:  # what bfloat16 can say of it: at_floor or unknown, or (the truth, once its drift clears) slider
        assert set(bf16[6:]) <= {"at_floor", "unknown", "slider"}
    else:
        assert bf16[6:] == ["slider"] * 3
    assert classify(pack(fast + slow))["behaviour"].tolist() == ["slider"] * 9  # float32 sees every step


def contraction_carrying_its_noise(R, rho, noise, seed):
    """x_{t+1} = x* + ρ(x_t − x*) + η_t, ‖η_t‖ ≈ noise·‖x*‖: each step's perturbation (a recurrence's rounding) is
    contracted and carried into the next, so the states wander around x* as AR(1) noise of lag-1 correlation ρ."""
    g = gen(seed)
    star = 3 * unit(D, g) * math.sqrt(D)
    x = star + torch.randn(D, generator=g, dtype=torch.float64) * math.sqrt(D)
    out = []
    for _ in range(R):
        x = star + rho * (x - star) + torch.randn(D, generator=g, dtype=torch.float64) * noise * star.norm() / D ** 0.5
        out.append(x)
    return torch.stack(out)


@pytest.mark.parametrize("R, rhos", [(128, (0.5, 0.8)), (256, (0.5, 0.8, 0.9))])
def test_a_contraction_carrying_its_rounding_noise_is_never_a_slider(R, rhos):
    """Correlated noise around a fixed point puts (1 + ρ)/(1 − ρ) times white noise's energy into a fitted line
    (3× at ρ = 0.5): before the drift test deflated by it, 1–3 in 10 such tokens read as sliders at ρ = 0.5 (and
    20 % of the healed SmolLM2's float32 tokens at R = 128, whose certificate says ρ ≤ 0.84). Noise from below the
    float32 floor (1e-7 of the state) to 1 %: fixed_point or at_floor, and the correlation is reported."""
    xs = [contraction_carrying_its_noise(R, rho, noise, seed) for rho in rhos for noise in (1e-7, 1e-4, 1e-2)
          for seed in range(6)]
    df = labels(xs)
    assert set(df["behaviour"]) <= set(FIXED_BEHAVIOURS), df["behaviour"].value_counts()
    above_floor = df.iloc[[i for i, noise in enumerate(n for _ in rhos for n in (1e-7, 1e-4, 1e-2) for _ in range(6))
                           if noise >= 1e-4]]
    assert above_floor["noise_correlation"].between(0.2, 0.98).mean() > 0.9, above_floor["noise_correlation"]


def test_a_converged_bfloat16_state_is_at_floor():
    R = 64
    x = noisy_fixed_point(R, 0.0, 0)
    assert classify(pack([x], dtype=torch.bfloat16))["behaviour"].item() == "at_floor"


@pytest.mark.parametrize("R", (32, 64))
def test_slow_growth_under_the_bfloat16_floor_is_divergent(R):
    """x_t = 1.02^t x_0 in bfloat16: each step (2 %) is under the 6 % floor, but the steps grow: divergent, not a
    slider (a slide's steps do not grow) and not at_floor (the window moves 37 % or more)."""
    xs = [expanding(R, seed, factor=1.02) for seed in range(3)]
    assert classify(pack(xs, dtype=torch.bfloat16))["behaviour"].tolist() == ["divergent"] * 3


@pytest.mark.parametrize("R", (128, 256))
def test_a_slide_towards_the_origin_under_state_noise_is_a_slider(R):
    """Noise ∝ the state shrinks with a state sliding towards the origin (‖x‖ from 80 to 48 or 16), so the steps,
    all noise, shrink: a drift, not a converging fixed point."""
    xs = []
    for seed in range(3):
        g = gen(seed)
        u, w = unit(D, g), unit(D, g)
        x = 80 * u - torch.arange(R, dtype=torch.float64)[:, None] * 0.25 * u + 3 * w
        xs.append(x + torch.randn(R, D, generator=g, dtype=torch.float64) * 0.01 * x.norm(dim=-1, keepdim=True)
                  / math.sqrt(D))
    df = labels(xs)
    assert df["behaviour"].tolist() == ["slider"] * 3, df[["behaviour", "step_rate", "drift_f"]]


def test_every_label_names_its_measurement():
    """estimator, state precision and its floor, horizon R, tail window and readout space are columns of every
    behaviour table, so that a fixed-point statement from one run can be compared with another's."""
    R = 64
    xs = [noisy_fixed_point(R, 0.02, 0), rotation(R, 5, 1)]
    bf16 = classify(pack(xs, dtype=torch.bfloat16))
    assert bf16["state_precision"].unique().tolist() == ["bfloat16"]
    assert bf16["floor"].unique().tolist() == [16 * 2.0 ** -8]
    assert bf16["recurrences"].unique().tolist() == [R] and bf16["window"].unique().tolist() == [R // 2]
    assert bf16["readout"].unique().tolist() == ["resid_post of block layer 0"]
    assert bf16["estimator"].str.startswith("dynamics detector").all()
    fp32 = classify(pack(xs), method="paper")
    assert fp32["state_precision"].unique().tolist() == ["float32"]
    assert fp32["floor"].unique().tolist() == [16 * 2.0 ** -24]
    assert fp32["estimator"].str.startswith("paper heuristic").all() and (fp32["recurrences"] == R).all()
