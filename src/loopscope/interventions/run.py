"""`run_intervention`: baseline and intervened captures of the same inputs, and the KL between them."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from loopscope.capture.prompts import encode_prompts
from loopscope.capture.record import capture
from loopscope.capture.trajectory import Trajectory
from loopscope.errors import InputError
from loopscope.interventions.kl import next_token_kl
from loopscope.interventions.specs import Intervention, ZeroSublayer, describe
from loopscope.interventions.surgery import intervene


def check_recurrences(specs: Sequence[Intervention], recurrences: int) -> None:
    """Refuse a ZeroSublayer that names a recurrence the run does not reach."""
    for spec in specs:
        if isinstance(spec, ZeroSublayer) and spec.recurrences and max(spec.recurrences) >= recurrences:
            raise InputError(f"{describe(spec)} names recurrence {max(spec.recurrences)} but the run has "
                             f"R={recurrences} (recurrences 0..{recurrences - 1}); lower --at-recurrences or raise "
                             "--recurrences")


def run_intervention(
    loaded,
    prompts_or_ids: Sequence[str] | torch.Tensor,
    specs: Sequence[Intervention],
    recurrences: int | None = None,
    attention: bool = False,
) -> tuple[Trajectory, Trajectory, pd.DataFrame]:
    """Capture `prompts_or_ids` (list of prompts, or token ids (B, T)) without and with `specs`.

    Returns (baseline, intervened, kl) where kl is `next_token_kl(baseline, intervened)`: one row per real
    (batch, token) with KL(p_base ‖ p_intervened). R = `recurrences` (default: the model's own; 1 for a HF
    model). The intervened Trajectory's metadata lists the specs under "interventions".
    """
    R = loaded.recurrences if recurrences is None else int(recurrences)
    check_recurrences(specs, R)
    if isinstance(prompts_or_ids, torch.Tensor):
        ids, mask, tokens = prompts_or_ids, None, None
    else:
        ids, mask, tokens = encode_prompts(loaded.tokenizer, list(prompts_or_ids), loaded.max_seq_len)
    run = dict(recurrences=R, attention=attention, mask=mask, tokens=tokens)
    baseline = capture(loaded.model, ids, **run)
    with intervene(loaded.model, specs):
        intervened = capture(loaded.model, ids, **run)
    intervened.metadata["interventions"] = [describe(s) for s in specs]
    return baseline, intervened, next_token_kl(baseline, intervened)
