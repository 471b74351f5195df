"""The stability certificate: Arnoldi on operators whose spectrum is known, and on a tiny looped model whose
per-token Jacobian the test forms densely."""

from __future__ import annotations

import math

import pytest
import torch

from loopscope.dynamics.spectrum import (
    CertificateThresholds,
    Ritz,
    agreement,
    arnoldi,
    power_rate,
    predict,
    prefix_converged,
    prefix_spectra,
)
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
    return arnoldi(lambda v: v @ A.T, 1, A.shape[0], steps).values[0]


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
    ritz = Ritz(values=ritz, residual=torch.zeros(ritz.shape, dtype=torch.float64))
    p = predict(ritz, residual)
    assert p["predicted"].tolist() == ["stable fixed point", "marginal rotation", "marginal neutral", "marginal flip",
                                       "unstable", "not at a fixed point"]
    assert p["predicted_period"].iloc[1] == pytest.approx(4.0)
    shrunk = Ritz(values=ritz.values[2:3] * 0.99, residual=ritz.residual[2:3])
    assert predict(shrunk, residual[2:3], CertificateThresholds(marginal=0.05))["predicted"].item() == \
        "marginal neutral"


@pytest.mark.parametrize("kind", [dict(norm="sandwich", injection="concat", state_init="random"),
                                  dict(norm="pre", injection="add", state_init="zeros"),
                                  dict(norm="ouro", injection="none", final_norm=False),
                                  dict(norm="sandwich", injection="concat", state_init="random", n_heads=4,
                                       n_kv_heads=2)])  # GQA: a key/value head serves two query heads
def test_certificate_matches_the_dense_per_token_jacobian(kind):
    """ρ(J_ii) from Arnoldi on vector-Jacobian products equals the spectral radius of the D × D Jacobian of token
    i's next state w.r.t. its own state, formed densely here (D = 16, so Arnoldi with 16 steps is exact)."""
    cfg = LoopedConfig(**{**dict(vocab_size=50, d_model=16, n_heads=2, d_mlp=24, n_prelude=1, n_block=2, n_coda=1,
                              recurrences=4, init_std=0.3, seed=3), **kind})
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

    def prefix_rho(i: int) -> float:  # the whole prefix 0..i as one map of its (i + 1)·D numbers, formed densely
        def prefix_map(flat):
            states = s.clone()
            states[0, : i + 1] = flat.view(i + 1, -1)
            return model.block_map(states, e, R)[0, : i + 1].reshape(-1)
        J = torch.autograd.functional.jacobian(prefix_map, s[0, : i + 1].reshape(-1).clone())
        return float(torch.linalg.eigvals(J).abs().max())

    for row, i in zip(cert.itertuples(), tokens):  # every token's own block comes from one product over the prefix
        assert row.rho_own == pytest.approx(own_rho(i), rel=1e-8), (kind, i)
        assert row.rho == pytest.approx(prefix_rho(i), rel=1e-6), (kind, i)
        assert row.converged and row.converged_own and row.ritz_residual < 1e-8, (kind, i)
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


def test_arnoldi_on_a_non_normal_clustered_operator_matches_dense_eigenvalues():
    """steps ≪ D: the outlying eigenvalues converge, their residuals say so, and a short run says it has not."""
    import numpy as np

    D = 300
    g = torch.Generator().manual_seed(5)
    Q = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))[0]
    blocks = [torch.tensor([[1.1]], dtype=torch.float64), rotation_block(0.4, 0.97)]
    cluster = 0.3 * (2 * torch.rand(D - 3, generator=g, dtype=torch.float64) - 1)
    U = torch.block_diag(*blocks, torch.diag(cluster)) + 0.5 / math.sqrt(D) * torch.triu(
        torch.randn(D, D, generator=g, dtype=torch.float64), 2)  # strictly above the 2 × 2 block: non-normal
    S = Q @ torch.diag(torch.logspace(0, 1, D, dtype=torch.float64))  # non-orthogonal basis, condition 10
    A = S @ U @ torch.linalg.inv(S)
    dense = np.linalg.eigvals(A.numpy())
    dense = dense[np.argsort(-np.abs(dense))]
    assert np.linalg.norm(A.numpy() @ A.numpy().T - A.numpy().T @ A.numpy()) > 1.0  # genuinely non-normal
    ritz = arnoldi(lambda v: v @ A.T, 1, D, steps=40)
    got = ritz.values[0, :3].numpy()
    assert np.allclose(np.sort_complex(got), np.sort_complex(dense[:3]), atol=1e-8)
    assert (ritz.residual[0, :3] < 1e-8).all()
    assert predict(ritz, torch.zeros(1))["converged"].item()
    short = arnoldi(lambda v: v @ A.T, 1, D, steps=5)
    assert not predict(short, torch.zeros(1))["converged"].item()
    # the residual is a true backward error: (A − λ I) has a unit vector it maps to that size, so σ_min ≤ residual
    for lam, res in zip(short.values[0].numpy(), short.residual[0].numpy()):
        sigma = np.linalg.svd(A.numpy() - lam * np.eye(D), compute_uv=False)[-1]
        assert sigma <= res * (1 + 1e-8) + 1e-12


def test_prefix_spectra_is_the_running_maximum_of_the_blocks():
    values = torch.tensor([[0.5, 0.1], [0.9j, 0.2], [0.3, 0.2], [-1.2, 0.95]], dtype=torch.complex128)
    residual = torch.tensor([[1e-9, 0.0], [1e-3, 0.0], [0.0, 0.0], [2e-9, 0.0]], dtype=torch.float64)
    prefix, slowest = prefix_spectra(Ritz(values, residual))
    assert prefix.values[:, 0].abs().tolist() == pytest.approx([0.5, 0.9, 0.9, 1.2])
    assert slowest.tolist() == [0, 1, 1, 3]
    assert prefix.values[:, 1].abs().tolist() == pytest.approx([0.1, 0.5, 0.5, 0.95])
    assert prefix.residual[:, 0].tolist() == [1e-9, 1e-3, 1e-3, 2e-9]
    # block 1 is unconverged (1e-3 > 1e-4 · 0.9): every prefix that holds it is flagged, even token 3's, whose own
    # block converged and holds the maximum — an unconverged block may hide a larger |λ|
    assert prefix_converged(Ritz(values, residual), CertificateThresholds()).tolist() == [True, False, False, False]
