"""The stages accumulators reduce on the states' device and hand a batch's values to the host once, in `end`
(issue 21): on a GPU a copy or synchronisation per state, prompt or head is what the analysis would wait on. Counted
on the CPU (tests/host_transfers.py): what the stages code hands to the host must not grow with R or the heads."""

import torch
from host_transfers import count_host_transfers

from loopscope.capture.stream import stream_tensors
from loopscope.experiments.stage_tables import looped_readout
from loopscope.models.config import LoopedConfig
from loopscope.models.looped import LoopedLM
from loopscope.models.weights import attention_projections
from loopscope.stages.attention import AttentionMetrics
from loopscope.stages.attention_change import AttentionChange
from loopscope.stages.compression import ResidualEntropy
from loopscope.stages.lens import LogitLens
from loopscope.stages.prop42 import Prop42Check
from loopscope.stages.residual import ResidualNorms


def stages_transfers(R: int, heads: int) -> dict:
    model = LoopedLM(LoopedConfig(vocab_size=48, d_model=16, n_heads=heads, d_mlp=24, n_prelude=1, n_block=2,
                                  recurrences=R, init_std=0.2, seed=3))
    ids = torch.randint(0, 48, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2], dtype=torch.bool)
    accs = [ResidualNorms(["batch"]), ResidualEntropy(["batch"]), AttentionMetrics(["batch", "head"]),
            LogitLens(looped_readout(model)), AttentionChange(["batch"], per_head=True),
            Prop42Check(attention_projections(model))]
    with torch.inference_mode(), count_host_transfers() as counts:
        tables = stream_tensors(model, ids, R, accs, mask=mask, attention=True)
    assert all(len(tables[a.name]) for a in accs)
    return {k: v for k, v in counts.items() if k[1].startswith("stages/")}


def test_stages_hand_each_batch_to_the_host_once():
    base, longer, wider = stages_transfers(3, 2), stages_transfers(6, 2), stages_transfers(3, 4)
    assert base == longer == wider, (base, longer, wider)
    assert sum(base.values()) <= 2 * 7, base  # one .cpu() (+ .numpy() of the host copy) per accumulator, and a mask
