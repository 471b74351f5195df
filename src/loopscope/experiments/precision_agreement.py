"""Do the behaviour labels survive a change of state precision? The same model and prompts run with the residual
stream in float32 and in bfloat16, each token labelled by the dynamics detector at the block's last layer, and the
two labellings compared token by token.

A bfloat16 state carries a rounding floor of 16·2⁻⁸ ≈ 6 % per step (`dynamics.precision`), float32 one of ≈ 1e-6: a
token that float32 sees converge or slide may sit under bfloat16's floor, where the detector says `at_floor` (a
fixed point as far as that precision can tell) rather than a confident label. The table says how often each
float32 label keeps its name in bfloat16 and what it becomes otherwise.
"""

from __future__ import annotations

import pandas as pd
import torch

from loopscope.capture.prompts import capture_prompts
from loopscope.data.prompts import load_prompts
from loopscope.dynamics import FIXED_BEHAVIOURS, classify
from loopscope.errors import InputError
from loopscope.models.load import load_model


def labels_at(model: str, prompts: list[str], recurrences: int, state_dtype: str) -> pd.DataFrame:
    """Per-token labels (dynamics detector, block's last layer) of `prompts` run with states in `state_dtype`."""
    loaded = load_model(model, device="cpu", dtype="float32", state_dtype=state_dtype)
    if not loaded.is_looped:
        raise InputError(f"{model} is feedforward: there is no recurrence to label")
    with torch.inference_mode():
        traj = capture_prompts(loaded, prompts, recurrences, progress=False)
    return classify(traj, layer=-1, method="dynamics")


def precision_agreement(model: str = "default", prompts: str = "gsm-symbolic", max_prompts: int = 8,
                        recurrences: int = 64, reference: str = "float32", other: str = "bfloat16",
                        ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per_token, table). per_token: one row per real token — batch, token, behaviour_<reference>,
    behaviour_<other>, agrees (the same label), agrees_fixed (both in FIXED_BEHAVIOURS, or the same label: at_floor
    and fixed_point count as one), and each run's floor. table: counts of (reference label, other label) with the
    share of the reference label's tokens that keep it (`agree`)."""
    if reference == other:
        raise InputError(f"reference and other are both {reference}: compare two different state precisions")
    texts = load_prompts(prompts, limit=max_prompts)
    runs = {p: labels_at(model, texts, recurrences, p) for p in (reference, other)}
    keys = ["batch", "token"]
    a = runs[reference][keys + ["behaviour", "floor"]].rename(
        columns={"behaviour": f"behaviour_{reference}", "floor": f"floor_{reference}"})
    b = runs[other][keys + ["behaviour", "floor"]].rename(
        columns={"behaviour": f"behaviour_{other}", "floor": f"floor_{other}"})
    per_token = a.merge(b, on=keys, how="inner", validate="one_to_one")
    ra, rb = per_token[f"behaviour_{reference}"], per_token[f"behaviour_{other}"]
    per_token["agrees"] = ra == rb
    per_token["agrees_fixed"] = per_token["agrees"] | (ra.isin(FIXED_BEHAVIOURS) & rb.isin(FIXED_BEHAVIOURS))
    table = pd.crosstab(ra, rb)
    table.columns.name = None
    table["agree"] = per_token.groupby(f"behaviour_{reference}")["agrees"].mean()
    table["tokens"] = per_token.groupby(f"behaviour_{reference}").size()
    return per_token, table.reset_index()
