"""Huginn-0125: a tiny checkpoint with the published tensor names (fused Wqkv and fc, qk_bias (2,1,H,d), the
persistent freqs_cis buffer) and config keys, loaded through the public loader, checked step by step against
the published equations computed independently (adjacent-pair RoPE, sandwich norms, ln_f twice)."""

import math

import pytest
import torch
from _decoding import decode_in_steps
from _families_reference import ids, raven_forward, write_huginn

from loopscope.capture import capture
from loopscope.models.families.huginn import load_huginn
from loopscope.models.load import load_model

TOL = dict(rtol=1e-4, atol=2e-5)


@pytest.fixture(scope="module")
def huginn(tmp_path_factory):
    path, W, c = write_huginn(tmp_path_factory.mktemp("huginn") / "huginn-tiny", n_pre=1, n_core=2, n_coda=1)
    return path, load_model(path), W, c


def test_config_translation(huginn):
    _, loaded, _, c = huginn
    cfg = loaded.model.cfg
    assert (cfg.n_prelude, cfg.n_block, cfg.n_coda, loaded.recurrences) == (1, 2, 1, 32)
    assert (cfg.norm, cfg.injection, cfg.state_init, cfg.rope_interleaved) == ("sandwich", "concat", "random", True)
    assert cfg.coda_input_norm and cfg.final_norm and cfg.qk_bias and cfg.tie_embeddings
    assert cfg.embed_scale == pytest.approx(math.sqrt(32))
    assert cfg.state_init_std == pytest.approx(c["init_values"]["std"] * math.sqrt(32))


@pytest.mark.parametrize("R", [1, 4])
def test_forward_step_by_step_matches_equations(huginn, R):
    _, loaded, W, c = huginn
    x = ids()
    s0 = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(7))
    ref = raven_forward(W, c, x, R, s0=s0, style="huginn")
    traj = capture(loaded.model, x, recurrences=R, attention=True, initial_state=s0)
    torch.testing.assert_close(traj.prelude[0], ref["prelude"][0], **TOL)
    for t in range(R):
        torch.testing.assert_close(traj.injected[t], ref["injected"][t], **TOL)  # adapter([s_t; e])
        for j in range(2):
            torch.testing.assert_close(traj.core[t, j], ref["core"][t][j], **TOL)
            torch.testing.assert_close(traj.core_attention[t, j], ref["probs"][("core", t, j)], **TOL)
    torch.testing.assert_close(traj.prelude_attention[0], ref["probs"][("prelude", 0, 0)], **TOL)
    torch.testing.assert_close(traj.coda[0], ref["coda"][0], **TOL)
    torch.testing.assert_close(traj.coda_attention[0], ref["probs"][("coda", 0, 0)], **TOL)
    torch.testing.assert_close(traj.logits, ref["logits"], **TOL)


def test_zero_start_state_on_request(huginn):
    path, _, W, c = huginn
    zeros = load_huginn(path, overrides={"state_init": "zeros"})
    x = ids(seed=2)
    ref = raven_forward(W, c, x, 3, s0=torch.zeros(2, 10, 32))
    torch.testing.assert_close(zeros.model(x, recurrences=3), ref["logits"], **TOL)


def test_seeded_start_state_is_recorded_and_has_the_published_law(huginn):
    _, loaded, _, c = huginn
    model, x = loaded.model, ids(seed=4)
    a = capture(model, x, recurrences=2, state_seed=11)
    b = capture(model, x, recurrences=2, state_seed=11)
    other = capture(model, x, recurrences=2, state_seed=12)
    assert a.metadata["state_seed"] == 11 and a.metadata["state_init"] == "random"
    torch.testing.assert_close(a.core, b.core)
    assert not torch.allclose(a.core, other.core)
    # s_0 = TruncNormal(0, σ²) on [-3σ, 3σ] · γ: std = σγ·0.98658 (truncation at 3σ), never beyond 3σγ
    e = torch.zeros(4, 500, 32)
    s0 = model.initial_state(e, offset=0, state_seed=5)
    sigma_gamma = c["init_values"]["std"] * c["init_values"]["embed_scale"]
    assert s0.abs().max() <= 3 * sigma_gamma + 1e-6
    assert float(s0.std()) == pytest.approx(0.98658 * sigma_gamma, rel=0.02)


def test_kv_cached_decoding_equals_full_forward(huginn):
    model = huginn[1].model
    x = ids(B=1, T=9, seed=5)
    full = model(x, recurrences=3, state_seed=3)
    torch.testing.assert_close(decode_in_steps(model, x, 4, recurrences=3, state_seed=3), full, **TOL)


def test_loads_without_the_rope_buffer(tmp_path):
    path, W, c = write_huginn(tmp_path / "h", n_pre=1, n_core=1, n_coda=1, freqs_cis=False)
    model = load_model(path).model
    x = ids(B=1, T=6)
    ref = raven_forward(W, c, x, 2, s0=torch.zeros(1, 6, 32))
    torch.testing.assert_close(model(x, recurrences=2, initial_state=torch.zeros(1, 6, 32)), ref["logits"], **TOL)
