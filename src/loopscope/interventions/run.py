"""`capture_under`: the one capture of inputs with interventions in place; `run_intervention`: baseline and
intervened captures of the same inputs, and the KL between them."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from loopscope.capture.prompts import capture_prompts
from loopscope.capture.record import capture
from loopscope.capture.trajectory import Trajectory
from loopscope.errors import InputError
from loopscope.interventions.kl import next_token_kl
from loopscope.interventions.specs import Intervention, ZeroSublayer, describe, spec_text
from loopscope.interventions.surgery import intervene


def check_recurrences(specs: Sequence[Intervention], recurrences: int) -> None:
    """Refuse a ZeroSublayer that names a recurrence the run does not reach."""
    for spec in specs:
        if isinstance(spec, ZeroSublayer) and spec.recurrences and max(spec.recurrences) >= recurrences:
            raise InputError(f"{spec_text(spec)} names recurrence {max(spec.recurrences)} but the run has "
                             f"R={recurrences} (recurrences 0..{recurrences - 1}); lower --at-recurrences or raise "
                             "--recurrences")


def capture_under(loaded, prompts_or_ids: Sequence[str] | torch.Tensor, specs: Sequence[Intervention],
                  recurrences: int, *, attention: bool = False, batch_size: int | None = None,
                  progress: bool = False) -> Trajectory:
    """Capture `prompts_or_ids` (prompts, batched by `batch_size`, all at once by default; or token ids (B, T))
    while `specs` are in place (none: the unchanged model). The Trajectory's metadata lists the specs under
    "interventions". Every before/after comparison captures through here, so both sides are captured alike."""
    check_recurrences(specs, recurrences)
    with intervene(loaded.model, specs):
        if isinstance(prompts_or_ids, torch.Tensor):
            traj = capture(loaded.model, prompts_or_ids, recurrences=recurrences, attention=attention)
        else:
            prompts = list(prompts_or_ids)
            # no cache_dir: the capture cache is keyed by model and prompts, not by interventions
            traj = capture_prompts(loaded, prompts, recurrences, attention=attention,
                                   batch_size=batch_size or max(len(prompts), 1), progress=progress)
    traj.metadata["interventions"] = [describe(s) for s in specs]
    return traj


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
    check_recurrences(specs, R)  # before the first capture: a bad spec fails at once
    baseline = capture_under(loaded, prompts_or_ids, [], R, attention=attention)
    intervened = capture_under(loaded, prompts_or_ids, specs, R, attention=attention)
    return baseline, intervened, next_token_kl(baseline, intervened)
