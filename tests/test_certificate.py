"""The stability certificate: Arnoldi on operators whose spectrum is known, and on a tiny looped model whose
per-token Jacobian the test forms densely."""

from __future__ import annotations

import math

import pytest
import torch

from loopscope.dynamics.spectrum import CertificateThresholds, agreement, arnoldi, power_rate, predict
from loopscope.experiments.certificate import long_run_state, spread_tokens, token_certificates
from loopscope.models import LoopedConfig, LoopedLM


def rotation_block(theta: float, radius: float) -> torch.Tensor:
    return radius * torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]],
                                 dtype=torch.float64)


def operator(D: int, eigen_blocks: list[torch.Tensor], seed: int) -> torch.Tensor:
    """Q diag(blocks) Q⁻¹ with a random orthogonal Q: a known spectrum in a random basis."""
    g = torch.Generator().manual_seed(seed)
    A = torch.block_diag(*eigen_blocks)
    q = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))[0]
    return q @ A @ q.T


def leading(A: torch.Tensor, steps: int = 24) -> torch.Tensor:
    return arnoldi(lambda v: v @ A.T, 1, A.shape[0], steps)[0]


def test_contraction_rotation_and_expansion_spectra():
    D = 12
    contraction = operator(D, [torch.diag(torch.linspace(0.2, 0.7, D, dtype=torch.float64))], 0)
    assert leading(contraction)[0].abs() == pytest.approx(0.7, rel=1e-9)
    rotation = operator(D, [rotation_block(2 * math.pi / 5, 1.0), torch.diag(torch.full((D - 2,), 0.5).double())], 1)
    lam = leading(rotation)[0]
    assert lam.abs() == pytest.approx(1.0, rel=1e-9) and abs(lam.angle()) == pytest.approx(2 * math.pi / 5, rel=1e-9)
    expansion = operator(D, [torch.diag(torch.tensor([1.3, -0.4] + [0.1] * (D - 2), dtype=torch.float64))], 2)
    assert leading(expansion)[0].real == pytest.approx(1.3, rel=1e-9)
    assert power_rate(lambda v: v @ expansion.T, 1, D, steps=200)[0] == pytest.approx(1.3, rel=1e-2)


def test_predictions_follow_the_leading_eigenvalue():
    ritz = torch.tensor([[0.6 + 0j, 0.1], [0.0 + 1j, 0.5], [1.0 + 0j, 0.2], [-1.0 + 0j, 0.2], [1.4 + 0j, 0.3],
                         [0.5 + 0j, 0.1]], dtype=torch.complex128)
    residual = torch.tensor([1e-9, 1e-9, 1e-9, 1e-9, 1e-9, 0.5])
    p = predict(ritz, residual)
    assert p["predicted"].tolist() == ["stable fixed point", "marginal rotation", "marginal neutral", "marginal flip",
                                       "unstable", "not at a fixed point"]
    assert p["predicted_period"].iloc[1] == pytest.approx(4.0)
    assert predict(ritz[2:3] * 0.99, residual[2:3], CertificateThresholds(marginal=0.05))["predicted"].item() == \
        "marginal neutral"


@pytest.mark.parametrize("kind", [dict(norm="sandwich", injection="concat", state_init="random"),
                                  dict(norm="pre", injection="add", state_init="zeros"),
                                  dict(norm="ouro", injection="none", final_norm=False)])
def test_certificate_matches_the_dense_per_token_jacobian(kind):
    """ρ(J_ii) from Arnoldi on vector-Jacobian products equals the spectral radius of the D × D Jacobian of token
    i's next state w.r.t. its own state, formed densely here (D = 16, so Arnoldi with 16 steps is exact)."""
    cfg = LoopedConfig(vocab_size=50, d_model=16, n_heads=2, d_mlp=24, n_prelude=1, n_block=2, n_coda=1,
                       recurrences=4, init_std=0.3, seed=3, **kind)
    model = LoopedLM(cfg).double().eval()
    model.stream_dtype = torch.float64
    ids = torch.randint(0, 50, (1, 7), generator=torch.Generator().manual_seed(0))
    R, tokens = 12, [0, 3, 6]
    cert = token_certificates(model, ids, R, tokens, steps=48)
    e, s = long_run_state(model, ids, R)
    def own_rho(i: int) -> float:
        def token_map(si):
            states = s.clone()
            states[0, i] = si
            return model.block_map(states, e, R)[0, i]
        J = torch.autograd.functional.jacobian(token_map, s[0, i].clone())
        return float(torch.linalg.eigvals(J).abs().max())

    for row, i in zip(cert.itertuples(), tokens):
        assert row.rho_own == pytest.approx(own_rho(i), rel=1e-8), (kind, i)
        # the causal prefix 0..i: its Jacobian is block lower-triangular, so ρ = max_{j ≤ i} ρ(J_jj)
        assert row.rho == pytest.approx(max(own_rho(j) for j in range(i + 1)), rel=1e-6), (kind, i)
    assert (cert["seconds_per_token"] > 0).all()


def test_agreement_joins_labels_and_counts():
    import pandas as pd

    cert = pd.DataFrame({"batch": [0, 0, 1], "token": [0, 1, 0], "rho": [0.5, 1.0, 1.5],
                         "predicted": ["stable fixed point", "marginal rotation", "unstable"]})
    labels = pd.DataFrame({"batch": [0, 0, 1], "token": [0, 1, 0], "behaviour": ["fixed_point", "slider", "divergent"],
                           "period": pd.array([None, None, None], dtype="Int64"), "step_rate": [0.5, 1.0, 1.4]})
    joined = agreement(cert, labels)
    assert joined["agrees"].tolist() == [True, False, True]
    assert spread_tokens([5, 9], 4) == [(0, 0), (0, 4), (1, 0), (1, 8)]
