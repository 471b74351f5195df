"""The early-exit rules (`dynamics.early_exit`) on linear maps with known ρ, hand-made traces, and the default model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loopscope.dynamics.early_exit import (
    ExitTrace,
    bound_violations,
    certified_stops,
    exit_outcome,
    exit_summary,
    first_exit,
    huginn_stops,
    measured_rate,
    prefix_steps,
    rule_outcomes,
    tail_bound,
)
from loopscope.errors import InputError


def linear_run(A: np.ndarray, b: np.ndarray, s0: np.ndarray, R: int) -> tuple[np.ndarray, np.ndarray]:
    """Steps ‖s_t − s_{t−1}‖ and distances ‖s_t − s*‖ of s_{t+1} = A s_t + b, t = 1..R (s* = (I − A)⁻¹ b)."""
    star = np.linalg.solve(np.eye(len(b)) - A, b)
    s, steps, dist = s0, [], []
    for _ in range(R):
        new = A @ s + b
        steps.append(np.linalg.norm(new - s))
        dist.append(np.linalg.norm(new - star))
        s = new
    return np.array(steps), np.array(dist)


def test_bound_is_exact_for_a_scaled_identity():
    # s_t − s* = ρ^t (s0 − s*), step = ρ^(t−1)(1 − ρ)‖s0 − s*‖, so ρ/(1−ρ)·step = ρ^t‖s0 − s*‖ = the distance
    rho = 0.9
    steps, dist = linear_run(rho * np.eye(3), np.array([1.0, -2.0, 0.5]), np.array([4.0, 0.0, -1.0]), 30)
    np.testing.assert_allclose(tail_bound(steps, rho), dist, rtol=1e-9)


def test_bound_never_violated_on_random_linear_contractions():
    rng = np.random.default_rng(0)
    worst = []
    for _ in range(200):
        D = int(rng.integers(2, 8))
        rho = float(rng.uniform(0.3, 0.97))
        U, _, Vt = np.linalg.svd(rng.normal(size=(D, D)))
        A = U @ np.diag(rng.uniform(0.2, 1.0, D)) @ Vt
        A *= rho / np.linalg.norm(A, 2)  # ‖A‖₂ = ρ exactly: a contraction with Lipschitz constant ρ
        steps, dist = linear_run(A, rng.normal(size=D), rng.normal(size=D) * 10, 40)
        bound = tail_bound(steps, rho)
        assert (bound >= dist - 1e-12 * dist[0]).all()  # up to float64 rounding once both reach ~1e-16
        worst.append((dist[:20] / bound[:20]).max())  # before both reach rounding
    assert max(worst) > 0.5  # the bound is not vacuous: some starts come close to it


def test_expansion_is_never_certified():
    A = 1.1 * np.eye(2)
    steps, _ = linear_run(A, np.array([1.0, 0.0]), np.array([0.0, 1.0]), 20)
    assert np.isinf(tail_bound(steps, 1.1)).all() and np.isinf(tail_bound(steps, np.nan)).all()
    rate = measured_rate(steps[:, None], window=3)
    np.testing.assert_allclose(rate[3:, 0], 1.1, rtol=1e-9)  # the measured step ratio of x ↦ 1.1x + b
    trace = make_trace(steps[:, None], rho=np.array([1.1]), sigma=np.ones(20), margin=np.full((20, 1), 1e9))
    for source in ("certificate", "measured", "max"):
        stop = certified_stops(trace, "margin", source=source)
        assert not stop.any()  # refuses, even with an enormous margin
        assert first_exit(stop)[0] == 19  # so it runs every recurrence


def test_bound_check_catches_a_rate_that_is_too_small():
    # x ↦ 0.8x + b with 3 independent "tokens": a claimed 0.9 bounds every distance, a claimed 0.5 none
    R = 30
    runs = [linear_run(0.8 * np.eye(2), np.array([1.0, 2.0]), np.array([5.0 * k, -3.0]), R) for k in range(3)]
    steps = np.stack([r[0] for r in runs], 1)
    star_gap = np.stack([r[1] for r in runs], 1)  # ‖s_t − s*‖ per token
    trace = make_trace(steps, rho=np.full(3, 0.9), sigma=np.ones(R))
    trace.distance = np.sqrt(np.cumsum(star_gap ** 2, axis=1))
    ok = bound_violations(trace, "certificate")
    assert ok["checked"] == 15 * 3 and ok["violated"] == 0
    trace.rho = np.full(3, 0.5)
    assert bound_violations(trace, "certificate")["violated"] == 1.0


def make_trace(steps, rho, sigma, margin=None, pred=None, kl=None, logp=None, target=None) -> ExitTrace:
    R, T = steps.shape
    return ExitTrace(steps=steps, margin=np.ones((R, T)) if margin is None else margin,
                     prediction=np.zeros((R, T), np.int64) if pred is None else pred,
                     logp_target=np.zeros((R, T)) if logp is None else logp,
                     target=np.zeros(T, np.int64) if target is None else target,
                     kl_prev=np.full((R, T), np.nan) if kl is None else kl, sigma=sigma, rho=rho)


def test_measured_rate_and_prefix_steps_by_hand():
    steps = np.array([[1.0, 0.0], [0.5, 0.0], [0.4, 3.0], [0.1, 4.0]])
    rate = measured_rate(steps, window=2)
    assert np.isnan(rate[:2]).all()
    np.testing.assert_allclose(rate[2, 0], max(0.5, 0.8))  # max(0.5/1, 0.4/0.5)
    np.testing.assert_allclose(rate[3, 0], max(0.8, 0.25))
    assert rate[2, 1] == np.inf and rate[3, 1] == np.inf  # 3/0: a step out of rest is no contraction
    np.testing.assert_allclose(prefix_steps(steps)[3], [0.1, np.hypot(0.1, 4.0)])


def test_certified_margin_stops_where_the_bound_fits_under_the_margin():
    # ρ = 0.5: B = step; σ = 2 → logit bound 2·step; margin test √2·2·step < margin = 1 ⇔ step < 0.3536
    steps = np.array([[1.0], [0.45], [0.3], [0.1]])  # without the √2, 0.45 would pass (2·0.45 < 1)
    trace = make_trace(steps, rho=np.array([0.5]), sigma=np.full(4, 2.0))
    np.testing.assert_array_equal(certified_stops(trace, "margin", source="certificate")[:, 0],
                                  [False, False, True, True])
    np.testing.assert_array_equal(certified_stops(trace, "logit", 0.7, source="certificate")[:, 0],
                                  [False, False, True, True])  # 2·0.3 = 0.6 < 0.7
    trace.sigma[2] = np.nan  # σ not computed there: no certificate at that recurrence
    assert not certified_stops(trace, "margin", source="certificate")[2, 0]
    with pytest.raises(InputError):
        certified_stops(trace, "logit", None)


def test_huginn_rule_and_outcomes_by_hand():
    R, T = 4, 3
    kl = np.array([[np.nan] * 3, [1e-2, 1e-4, 1e-2], [1e-3, 1e-2, 1e-4], [1e-5, 1e-5, 1e-5]])
    pred = np.array([[1, 1, 1], [2, 5, 1], [5, 6, 3], [5, 5, 3]])
    logp = -np.arange(1, R * T + 1, dtype=float).reshape(R, T)
    trace = make_trace(np.ones((R, T)), np.full(T, np.nan), np.full(R, np.nan), pred=pred, kl=kl, logp=logp,
                       target=np.array([5, 5, -1]))
    np.testing.assert_array_equal(first_exit(huginn_stops(trace)), [3, 1, 2])
    out = exit_outcome(trace, huginn_stops(trace))  # the last position has no next token: dropped
    assert out["token"].tolist() == [0, 1]
    assert out["recurrences_run"].tolist() == [4, 2]
    assert out["loss"].tolist() == [10.0, 5.0]  # −logp[3, 0], −logp[1, 1]
    assert out["correct"].tolist() == [True, True] and out["agrees"].tolist() == [True, True]
    assert out["stopped_early"].tolist() == [False, True]
    rows = rule_outcomes(trace, [1, 4], [], sources=()).assign(model="m", batch=0)
    table = exit_summary(rows, 4).set_index(["rule", "parameter"])
    r1 = table.loc[("fixed R", 1.0)]
    assert r1["recurrences_mean"] == 1 and r1["saved"] == 0.75
    assert r1["loss_mean"] == 1.5 and r1["accuracy"] == 0 and r1["agreement"] == 0 and r1["changed_early"] == 2
    np.testing.assert_allclose(r1["loss_change"], 1.5 - 10.5)  # R_max: (10 + 11) / 2
    huginn = table.loc[("Huginn KL", 5e-4)]
    assert huginn["recurrences_mean"] == 3 and huginn["changed_early"] == 0


def test_certified_answers_never_change_on_the_default_model():
    from loopscope.capture.prompts import encode_prompts
    from loopscope.data.prompts import load_prompts
    from loopscope.experiments.early_exit import certificate_rho, exit_trace
    from loopscope.models.load import load_model

    loaded = load_model("default")
    ids, _, _ = encode_prompts(loaded.tokenizer, load_prompts("gsm-symbolic", limit=1), loaded.max_seq_len)
    ids = ids[:, :32]  # a prefix of the prompt: the test's cost is the readout's power iteration over every token
    R = 32
    rho = certificate_rho(loaded.model, ids, R)
    assert np.nanmax(rho) < 1  # the default block is a contraction at its long-run state
    trace = exit_trace(loaded.model, ids, R, rho)
    with torch.no_grad():
        limit = loaded.model(ids, recurrences=128)[0].argmax(-1).numpy()  # the answer far beyond R_max
    early = 0
    for source in ("certificate", "max"):
        stop = certified_stops(trace, "margin", source=source)
        t = first_exit(stop)
        fired = stop.any(0)
        early += int(fired.sum())
        pos = np.nonzero(fired)[0]
        np.testing.assert_array_equal(trace.prediction[t[pos], pos], limit[pos])
    assert early > 10  # the test has teeth: the rule did stop early


def test_exit_command_writes_the_table_and_refuses_bad_input(tmp_path):
    from loopscope.experiments.early_exit import ExitSettings, run_exit
    from loopscope.models.device import Precision

    s = ExitSettings(models=["preset:micro"], out=tmp_path / "exit", recurrences=8, max_prompts=1, eps=[0.1],
                     precision=Precision("cpu"), progress=False)
    tables = run_exit(s)
    summary = tables["summary"]
    assert (tmp_path / "exit" / "tables" / "exit_summary.csv").exists()
    assert (tmp_path / "exit" / "figures" / "exit_compute_quality.png").exists()
    full = summary[(summary.rule == "fixed R") & (summary.parameter == 8)].iloc[0]
    assert full["saved"] == 0 and full["agreement"] == 1 and full["loss_change"] == 0
    assert set(summary.rule) >= {"fixed R", "Huginn KL", "certified margin (max ρ)", "certified logit (measured ρ)"}
    for bad in (dict(rates=["sometimes"]), dict(recurrences=3), dict(fixed=[99]), dict(eps=[-1.0])):
        with pytest.raises(InputError):
            ExitSettings(**{**dict(models=["preset:micro"], out=tmp_path / "x", precision=Precision("cpu")),
                            **bad}).check()
