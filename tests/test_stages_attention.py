"""Attention stages metrics on hand-built matrices whose values are known exactly."""

import math

import pytest
import torch

from loopscope.capture.trajectory import Trajectory
from loopscope.errors import InputError
from loopscope.stages import attention_change, attention_metrics
from loopscope.stages.attention import (
    colsum_concentration,
    head_metrics,
    mixing_entropy,
    mixing_entropy_normalised,
    previous_window,
    sink_score,
)

D = torch.float64


def causal_uniform(T: int) -> torch.Tensor:
    return torch.tril(torch.ones(T, T, dtype=D)) / torch.arange(1, T + 1, dtype=D)[:, None]


def one_hot_sink(T: int) -> torch.Tensor:
    a = torch.zeros(T, T, dtype=D)
    a[:, 0] = 1
    return a


HAND_3x3 = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]], dtype=D)


def test_fully_uniform_attention_has_zero_concentration_and_maximal_mixing():
    a = torch.full((4, 4), 0.25, dtype=D)
    assert float(colsum_concentration(a)) == pytest.approx(0.0, abs=1e-12)
    assert float(sink_score(a)) == pytest.approx(0.25)
    assert float(mixing_entropy(a)) == pytest.approx(math.log(4))
    assert float(mixing_entropy_normalised(a, causal=False)) == pytest.approx(1.0)


def test_causal_uniform_rows_match_harmonic_numbers():
    T = 7
    a = causal_uniform(T)
    # column j is attended by rows i ≥ j with weight 1/(i+1): c_j = Σ_{i=j}^{T-1} 1/(i+1)
    c = [sum(1 / (i + 1) for i in range(j, T)) / T for j in range(T)]
    expected_c = 1 + sum(x * math.log(x) for x in c) / math.log(T)
    assert float(colsum_concentration(a)) == pytest.approx(expected_c, abs=1e-12)
    assert 0 < expected_c < 1
    assert float(sink_score(a)) == pytest.approx(c[0])
    assert float(mixing_entropy(a)) == pytest.approx(sum(math.log(i + 1) for i in range(T)) / T)
    assert float(mixing_entropy_normalised(a)) == pytest.approx(1.0)
    # window 5, BOS excluded: row i puts 1/(i+1) on each key max(1, i-5) .. i-1
    rows = [(i - max(1, i - 5)) / (i + 1) for i in range(2, T)]
    assert float(previous_window(a)) == pytest.approx(sum(rows) / len(rows))


def test_one_hot_sink_on_first_token():
    a = one_hot_sink(6)[None]  # one head
    m = head_metrics(a)
    assert float(m["colsum_concentration"]) == pytest.approx(1.0)
    assert float(m["sink_score"]) == pytest.approx(1.0)
    assert float(m["sink_rate"]) == 1.0
    assert float(m["mixing_entropy"]) == pytest.approx(0.0)
    assert float(m["mixing_entropy_normalised"]) == pytest.approx(0.0)
    assert float(m["previous_window"]) == pytest.approx(0.0)  # the only key used is the excluded BOS


def test_identity_attention():
    T = 5
    m = head_metrics(torch.eye(T, dtype=D)[None], sink_threshold=0.3)
    assert float(m["colsum_concentration"]) == pytest.approx(0.0, abs=1e-12)
    assert float(m["sink_score"]) == pytest.approx(1 / T)
    assert float(m["sink_rate"]) == 0.0  # 0.2 < 0.3
    assert float(m["mixing_entropy"]) == pytest.approx(0.0)
    assert float(m["previous_window"]) == pytest.approx(0.0)


def test_three_by_three_worked_by_hand():
    # column sums (1.7, 0.8, 0.5)/3; C = 1 + Σ ĉ log ĉ / log 3
    assert float(colsum_concentration(HAND_3x3)) == pytest.approx(0.1143805, abs=1e-6)
    assert float(sink_score(HAND_3x3)) == pytest.approx(1.7 / 3)
    assert float(sink_score(HAND_3x3, position=1)) == pytest.approx(0.8 / 3)
    # rows: H = 0, log 2, 1.0296530
    assert float(mixing_entropy(HAND_3x3)) == pytest.approx(0.5742667, abs=1e-6)
    assert float(mixing_entropy_normalised(HAND_3x3)) == pytest.approx(0.9686153, abs=1e-6)
    # only row 2 has a non-BOS previous key (key 1, weight 0.3)
    assert float(previous_window(HAND_3x3)) == pytest.approx(0.3)
    # with the BOS column allowed: rows 1 and 2 put 0.5 and 0.5 on their previous tokens
    assert float(previous_window(HAND_3x3, exclude_first=False)) == pytest.approx(0.5)
    assert float(previous_window(HAND_3x3, window=1, exclude_first=False)) == pytest.approx((0.5 + 0.3) / 2)


def padded_trajectory() -> Trajectory:
    """R=1, K=1, B=2, H=2, T=4; prompt 1 has 3 real tokens and garbage in its padding row/column."""
    attn = torch.zeros(1, 1, 2, 2, 4, 4)
    attn[0, 0, 0, 0] = causal_uniform(4)
    attn[0, 0, 0, 1] = one_hot_sink(4)
    garbage = torch.full((4, 4), 0.9)
    for h, block in enumerate([HAND_3x3, torch.eye(3, dtype=D)]):
        g = garbage.clone()
        g[:3, :3] = block
        attn[0, 0, 1, h] = g
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    return Trajectory(core=torch.randn(1, 1, 2, 4, 3), core_attention=attn, mask=mask)


def test_trajectory_metrics_restrict_to_real_tokens_and_keep_the_spread():
    traj = padded_trajectory()
    raw = attention_metrics(traj, per_head=True, per_prompt=True, sink_threshold=0.4)
    assert list(raw.columns[:5]) == ["segment", "recurrence", "layer", "depth", "relative_depth"]
    assert len(raw) == 4
    assert raw.n_tokens.tolist() == [4, 4, 3, 3]
    expected_c = [float(colsum_concentration(causal_uniform(4))), 1.0, 0.1143805, 0.0]
    assert raw.colsum_concentration.tolist() == pytest.approx(expected_c, abs=1e-6)
    # sink scores: 25/48, 1, 1.7/3, 1/3 → with τ = 0.4 the identity head is not a sink
    assert raw.sink_score.tolist() == pytest.approx([25 / 48, 1.0, 1.7 / 3, 1 / 3])
    assert raw.sink_rate.tolist() == [1.0, 1.0, 1.0, 0.0]

    layer = attention_metrics(traj, sink_threshold=0.4)
    assert len(layer) == 1 and int(layer.n.iloc[0]) == 4
    assert float(layer.sink_rate_mean.iloc[0]) == pytest.approx(0.75)
    assert float(layer.colsum_concentration_mean.iloc[0]) == pytest.approx(sum(expected_c) / 4, abs=1e-6)
    assert float(layer.colsum_concentration_std.iloc[0]) == pytest.approx(
        float(torch.tensor(expected_c, dtype=D).std()), abs=1e-6)

    per_head = attention_metrics(traj, per_head=True, sink_threshold=0.4)
    assert per_head["head"].tolist() == [0, 1] and per_head.n.tolist() == [2, 2]
    assert per_head.sink_rate_mean.tolist() == pytest.approx([1.0, 0.5])


def test_attention_change_is_frobenius_of_consecutive_recurrences_on_real_tokens():
    T = 4
    attn = torch.zeros(3, 1, 1, 2, T, T)
    attn[0, 0, 0, 0, :3, :3] = torch.eye(3)
    attn[1, 0, 0, 0, :3, :3] = one_hot_sink(3)
    attn[2, 0, 0, 0, :3, :3] = one_hot_sink(3)
    attn[:, 0, 0, 1, :3, :3] = causal_uniform(3).float()  # head 1 never changes
    attn[1, 0, 0, :, 3, :] = 0.7  # padding row differs between recurrences: must be ignored
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    traj = Trajectory(core=torch.randn(3, 1, 1, T, 2), core_attention=attn, mask=mask)
    raw = attention_change(traj, per_head=True, per_prompt=True)
    # identity → one-hot sink: rows 1 and 2 each move (−1 on the diagonal, +1 on column 0): ‖·‖_F = 2
    assert raw.attention_change.tolist() == pytest.approx([2.0, 0.0, 0.0, 0.0])
    assert raw.recurrence.tolist() == [1, 1, 2, 2]
    stack = attention_change(traj)
    assert stack.attention_change_mean.tolist() == pytest.approx([2.0, 0.0])


def test_missing_attention_is_refused_with_the_fix():
    with pytest.raises(InputError, match="attention=True"):
        attention_metrics(Trajectory(core=torch.randn(1, 1, 1, 3, 2)))


def test_sink_rate_counts_a_head_at_exactly_the_threshold():
    """score_k ≥ τ, not > τ (Gu et al.): a head putting exactly 0.3 of its mean attention on token 0 is a sink at
    τ = 0.3, and one at 0.3 − 1e-6 is not."""
    from loopscope.stages.attention import head_metrics

    T = 4
    def head(score: float) -> torch.Tensor:  # every row gives `score` to token 0 (row 0 must give it all: causal)
        a = torch.zeros(T, T, dtype=torch.float64)
        a[0, 0] = 1.0
        for t in range(1, T):
            a[t, 0] = (T * score - 1.0) / (T - 1)
            a[t, t] = 1.0 - a[t, 0]
        return a

    m = head_metrics(torch.stack([head(0.3), head(0.3 - 1e-6)]), sink_threshold=0.3)
    assert m["sink_score"].tolist() == pytest.approx([0.3, 0.3 - 1e-6], abs=1e-12)
    assert m["sink_rate"].tolist() == [1.0, 0.0]
