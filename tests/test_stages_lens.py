"""Logit lens / coda lens: a toy unembedding with known entropy and rank, norms against torch, and the
lens reproducing the model's own output where it must."""

import math

import pytest
import torch
import torch.nn.functional as F

from loopscope.capture.record import capture
from loopscope.capture.trajectory import Trajectory
from loopscope.errors import InputError
from loopscope.experiments.stage_tables import looped_readout
from loopscope.models.config import LoopedConfig
from loopscope.models.looped import LoopedLM
from loopscope.stages import Readout, logit_lens


def entropy_of_one_peak(s: float, others: int) -> float:
    z = math.exp(s) + others
    p, q = math.exp(s) / z, 1 / z
    return -(p * math.log(p) + others * q * math.log(q))


def test_toy_unembedding_entropy_and_rank():
    s = 2.0
    V = D = 4
    readout = Readout(None, 0.0, torch.eye(V), norm_kind="none")
    core = torch.zeros(2, 1, 1, 3, D)  # R=2 states of one prompt with 3 tokens
    core[0, 0, 0, :, 0] = s  # recurrence 0: every token peaks on token 0
    core[1, 0, 0, :, 2] = s  # recurrence 1: every token peaks on token 2
    final = torch.zeros(1, 3, V)
    final[..., 2] = 10.0  # the model's final answer is token 2 everywhere
    traj = Trajectory(core=core, logits=final)
    df = logit_lens(traj, readout)
    assert df.lens.tolist() == ["logit", "logit"]
    assert df.entropy_mean.tolist() == pytest.approx([entropy_of_one_peak(s, 3)] * 2)
    # recurrence 0: only token 0 outranks token 2 → rank 1; recurrence 1: token 2 is the argmax → rank 0
    assert df.final_top1_rank_mean.tolist() == [1.0, 0.0]
    assert df.final_top1_match_mean.tolist() == [0.0, 1.0]


def test_rank_counts_every_token_above_the_answer():
    readout = Readout(None, 0.0, torch.eye(5), norm_kind="none")
    core = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0]).reshape(1, 1, 1, 1, 5)
    final = torch.zeros(1, 1, 5)
    final[..., 3] = 1.0
    df = logit_lens(Trajectory(core=core, logits=final), readout)
    assert df.final_top1_rank_mean.iloc[0] == 3.0  # tokens 0, 1, 2 have larger lens logits than token 3


def test_rms_and_layer_norm_readouts_match_torch():
    torch.manual_seed(0)
    D, V = 6, 9
    x = torch.randn(3, D) * 4 + 1
    w, b, W_U = torch.randn(D), torch.randn(D), torch.randn(V, D)
    rms = Readout(w, 1e-5, W_U, norm_kind="rms")
    expected = (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w) @ W_U.T
    assert torch.allclose(rms.logits(x), expected, atol=1e-5)
    assert torch.allclose(rms.logits(7 * x), rms.logits(x), atol=1e-4)  # RMSNorm is scale invariant
    layer = Readout(w, 1e-5, W_U, norm_kind="layer", norm_bias=b)
    assert torch.allclose(layer.logits(x), F.layer_norm(x, (D,), w, b, 1e-5) @ W_U.T, atol=1e-5)
    with pytest.raises(InputError, match="norm_kind"):
        Readout(w, 1e-5, W_U, norm_kind="batch")


KINDS = {
    "pre+coda": dict(norm="pre", n_coda=1),
    "huginn": dict(norm="sandwich", injection="concat", state_init="random", coda_input_norm=True, qk_bias=True,
                   n_coda=1),
    "ouro": dict(norm="ouro", final_norm=False, n_coda=0),
    "ouro+coda": dict(norm="ouro", final_norm=False, n_coda=1, injection="add"),
}


def small_model(**kw) -> LoopedLM:
    base = dict(vocab_size=48, d_model=16, n_heads=2, d_mlp=24, n_prelude=1, n_block=2, recurrences=3,
                init_std=0.2, seed=3)
    return LoopedLM(LoopedConfig(**{**base, **kw}))


@pytest.mark.parametrize("kind", KINDS)
def test_lens_reproduces_the_model_where_it_must(kind):
    model = small_model(**KINDS[kind])
    ids = torch.randint(0, 48, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2], dtype=torch.bool)
    traj = capture(model, ids, attention=False, mask=mask)
    readout = looped_readout(model)
    final_entropy = -(traj.logits.log_softmax(-1).exp() * traj.logits.log_softmax(-1)).sum(-1)
    expected = [float(final_entropy[b, : int(mask[b].sum())].mean()) for b in range(2)]
    # logit lens on the last realized state = the model's own logits
    raw = logit_lens(traj, readout, per_prompt=True)
    last = raw[raw.depth == raw.depth.max()]
    assert last.final_top1_match.tolist() == [1.0, 1.0]
    assert last.entropy.tolist() == pytest.approx(expected, abs=1e-4)
    if model.cfg.n_coda:
        # coda lens on the last block state runs the model's exit path: the model's logits again
        last_core = traj.core[-1, -1]
        assert torch.allclose(readout.logits(readout.coda(last_core, 0)), traj.logits, atol=1e-4)
        coda = logit_lens(traj, readout, lens="coda", per_prompt=True)
        row = coda[(coda.segment == "core") & (coda.recurrence == 2) & (coda.layer == 1)]
        assert row.final_top1_match.tolist() == [1.0, 1.0]
        assert row.entropy.tolist() == pytest.approx(expected, abs=1e-4)
        earlier = coda[(coda.segment == "core") & (coda.recurrence == 0)]
        assert not earlier.entropy.to_numpy() == pytest.approx(expected * 2, abs=1e-4)
    else:
        with pytest.raises(InputError, match="lens='logit'"):
            logit_lens(traj, readout, lens="coda")
