"""GPU-ready streaming (issue 21): what a streamed batch hands to the host does not grow with R or with the heads.

Every accumulator reduces on the states' device and crosses to the host once per batch with its reduced Part; a
metric that moved each (recurrence, layer, head) to the host, or synchronised on each (`float(t)`, `.item()`),
would make the count below grow with R and with H. On a GPU every counted call is a device → host copy and a
synchronisation of the stream, which a slow CPU forward hides (the reason this is counted, not timed)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from host_transfers import count_host_transfers

from loopscope.capture.stream import StreamSettings, run_batch
from loopscope.data.tokenizer import load_tokenizer
from loopscope.experiments.analyze import AnalyzeSettings, attention_accumulators, dynamics_accumulators
from loopscope.models.builtin import RANDOM_CONFIG
from loopscope.models.load import LoadedModel
from loopscope.models.looped import LoopedLM

PROMPTS = ["The quick brown fox jumps over the lazy dog.", "2 + 3 = 5, and 4 + 4 = 8 apples."]


def loaded_with(heads: int) -> LoadedModel:
    cfg = dataclasses.replace(RANDOM_CONFIG, n_heads=heads, name=f"h{heads}")
    torch.manual_seed(0)
    return LoadedModel(LoopedLM(cfg).eval(), load_tokenizer(), cfg.name, "looped", 8)


def batch_transfers(loaded: LoadedModel, R: int, stream: str):
    """Host transfers of one batch of the analyze stream `stream` ("states" or "attention") at R recurrences."""
    s = AnalyzeSettings(recurrences=R, attention_recurrences=R, similarity_recurrences=2, progress=False)
    if stream == "states":
        accs, settings = dynamics_accumulators(s, len(PROMPTS)), StreamSettings(R, progress=False)
    else:
        accs, settings = attention_accumulators(loaded, s), StreamSettings(R, attention=True, progress=False)
    with torch.inference_mode(), count_host_transfers() as counts:
        run_batch(loaded, PROMPTS, 0, 0, accs, settings)
    return counts


@pytest.mark.parametrize("stream", ["states", "attention"])
def test_host_transfers_per_batch_do_not_grow_with_recurrences_or_heads(stream):
    base = batch_transfers(loaded_with(4), 16, stream)
    longer = batch_transfers(loaded_with(4), 32, stream)
    wider = batch_transfers(loaded_with(8), 16, stream)
    grew = {k: (base[k], longer[k]) for k in longer if longer[k] != base[k]}
    assert not grew, f"host transfers that grow with R (at R = 16, 32): {grew}"
    grew = {k: (base[k], wider[k]) for k in wider if wider[k] != base[k]}
    assert not grew, f"host transfers that grow with the heads (H = 4, 8): {grew}"
    # and few in all: per batch, not per state (a batch at R = 16 holds 2 + 16·4 + 2 = 68 states per prompt)
    assert sum(base.values()) < 68, dict(base)
