"""Ouro: a tiny checkpoint with the published tensor names and config keys, loaded through the public loader,
checked recurrence by recurrence against the published equations computed independently."""

import pytest
import torch
from _decoding import decode_in_steps
from _families_reference import ids, ouro_forward, write_ouro

from loopscope.capture import capture
from loopscope.models import LoopedLM
from loopscope.models.families.ouro import exit_probabilities, step_logits
from loopscope.models.load import load_model

TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def ouro(tmp_path_factory):
    path, W, c = write_ouro(tmp_path_factory.mktemp("ouro") / "Ouro-tiny", n_layers=2)
    return load_model(path), W, c


def test_config_translation_and_loop_knob(ouro):
    loaded, _, c = ouro
    cfg = loaded.model.cfg
    assert isinstance(loaded.model, LoopedLM) and loaded.kind == "looped"
    assert (cfg.n_prelude, cfg.n_block, cfg.n_coda) == (0, c["num_hidden_layers"], 0)
    assert loaded.recurrences == c["total_ut_steps"] == 4
    assert (cfg.norm, cfg.injection, cfg.exit_gate) == ("ouro", "none", True)
    assert not cfg.final_norm and not cfg.tie_embeddings
    assert cfg.rope_base == 1e6 and not cfg.rope_interleaved
    assert loaded.tokenizer("2 + 3 =").input_ids[0] == 1  # the checkpoint's own (bundled-BPE) tokenizer, BOS first


@pytest.mark.parametrize("R", [1, 6])  # 6 > total_ut_steps: the common knob, no init-time attribute
def test_forward_per_recurrence_matches_equations(ouro, R):
    loaded, W, c = ouro
    x = ids()
    ref = ouro_forward(W, c, x, R)
    traj = capture(loaded.model, x, recurrences=R, attention=True)
    assert traj.recurrences == R and traj.prelude is None and traj.coda is None
    K = c["num_hidden_layers"]
    for t in range(R):
        torch.testing.assert_close(traj.core[t, K - 1], ref["pre"][t], **TOL)  # last layer's output, pre-norm
        if t + 1 < R:  # no injection: the next recurrence starts from h_t = norm(...)
            torch.testing.assert_close(traj.injected[t + 1], ref["h"][t], **TOL)
        torch.testing.assert_close(traj.exit_gate[t], ref["gate"][t], **TOL)
        for i in range(K):
            torch.testing.assert_close(traj.core_attention[t, i], ref["probs"][(t, i)], **TOL)
    torch.testing.assert_close(traj.logits, ref["logits"][-1], **TOL)
    per_step = step_logits(loaded.model, x, recurrences=R)
    torch.testing.assert_close(per_step, torch.stack(ref["logits"]), **TOL)


def test_exit_probabilities_hand_computed():
    g = torch.tensor([[0.0], [float(torch.logit(torch.tensor(0.25)))], [3.0]])  # λ = 0.5, 0.25, σ(3)
    p = exit_probabilities(g)[:, 0]
    torch.testing.assert_close(p, torch.tensor([0.5, 0.5 * 0.25, 0.5 * 0.75]))  # last takes the remainder
    assert abs(float(p.sum()) - 1) < 1e-6


def test_kv_cached_decoding_equals_full_forward(ouro):
    model = ouro[0].model
    x = ids(B=1, T=9, seed=3)
    full = model(x, recurrences=3)
    torch.testing.assert_close(decode_in_steps(model, x, 5, recurrences=3), full, **TOL)


def test_tied_embeddings_without_head(tmp_path):
    path, W, c = write_ouro(tmp_path / "tied", n_layers=1, tied=True)
    loaded = load_model(path)  # no lm_head.weight: tied to the embedding
    assert loaded.model.lm_head is None
    torch.testing.assert_close(loaded.model.unembedding, W["model.embed_tokens.weight"].float())
