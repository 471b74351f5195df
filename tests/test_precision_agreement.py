"""fp32-vs-bf16 label agreement on the builtin default model (`experiments.precision_agreement`)."""

from __future__ import annotations

import pytest

from loopscope.errors import InputError
from loopscope.experiments.precision_agreement import precision_agreement


def test_each_run_is_labelled_at_its_own_precision():
    per_token, table = precision_agreement(max_prompts=2, recurrences=16)
    assert per_token["floor_float32"].unique().tolist() == [16 * 2.0 ** -24]
    assert per_token["floor_bfloat16"].unique().tolist() == [16 * 2.0 ** -8]  # the bf16 run's states are bf16
    assert int(table["tokens"].sum()) == len(per_token) > 0
    for row in table.itertuples():
        kept = getattr(row, row.behaviour_float32) if row.behaviour_float32 in table.columns else 0
        assert row.agree == pytest.approx(kept / row.tokens)
    assert (per_token["agrees_fixed"] >= per_token["agrees"]).all()


def test_one_precision_is_not_a_comparison():
    with pytest.raises(InputError, match="two different state precisions"):
        precision_agreement(max_prompts=1, recurrences=16, other="float32")
