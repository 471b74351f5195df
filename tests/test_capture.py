"""Capture: labels come from the model's loop counter, never from the order hooks fired."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import build

from loopscope.capture import Recorder, Trajectory, capture
from loopscope.errors import InputError
from loopscope.models import KVCache, Step


def test_core_holds_each_layer_at_each_recurrence(token_ids):
    """core[t, j] is the output of block layer j at recurrence t: re-derive it by running layers by hand."""
    model = build(injection="add", state_init="zeros", norm="pre")
    traj = capture(model, token_ids, recurrences=3)
    with torch.no_grad():
        kw = dict(rope=model.rope, offset=0, cache=None)
        e = traj.prelude[-1]
        s = torch.zeros_like(e)
        for t in range(3):
            s = s + e
            torch.testing.assert_close(traj.injected[t], s)
            for j, layer in enumerate(model.core):
                s = layer(s, step=Step("core", t, j), **kw)
                torch.testing.assert_close(traj.core[t, j], s)
    assert traj.core.shape == (3, 3, 2, 9, 32)
    assert traj.prelude.shape == (1, 2, 9, 32) and traj.coda.shape == (1, 2, 9, 32)


def test_recorder_files_by_label_not_call_order():
    """Fire the hook points by hand in a shuffled order: every tensor must land at its labelled slot."""
    model = build(n_prelude=0, n_coda=0)
    R, K = 4, model.cfg.n_block
    calls = [(t, j) for t in range(R) for j in range(K)]
    random.Random(0).shuffle(calls)
    with Recorder(model) as rec:
        for t, j in calls:
            model.core[j].hook_resid_post(torch.full((1, 2, 32), 10.0 * t + j), step=Step("core", t, j))
        for t in reversed(range(R)):
            model.hook_injected(torch.full((1, 2, 32), -1.0 * t), step=Step("core", t, 0))
        model.hook_embed(torch.zeros(1, 2, 32), step=Step("embed", 0, 0))
    traj = rec.trajectory()
    expect = torch.tensor([[10.0 * t + j for j in range(K)] for t in range(R)])
    torch.testing.assert_close(traj.core[:, :, 0, 0, 0], expect)
    torch.testing.assert_close(traj.injected[:, 0, 0, 0], -torch.arange(R, dtype=torch.float32))


def test_capture_under_kv_cached_decoding_equals_full(token_ids):
    """Decoding token by token fires every hook T times per recurrence; a call counter would mislabel them."""
    model = build(injection="concat", state_init="random")
    full = capture(model, token_ids, recurrences=3, attention=True)
    cache = KVCache()
    with Recorder(model, attention=True) as rec, torch.no_grad():
        model(token_ids[:, :6], recurrences=3, cache=cache)
        for i in range(6, 9):
            model(token_ids[:, i: i + 1], recurrences=3, cache=cache)
    inc = rec.trajectory()
    for name in ("core", "injected", "prelude", "coda", "core_attention", "prelude_attention", "logits"):
        torch.testing.assert_close(getattr(inc, name), getattr(full, name), atol=3e-5, rtol=1e-4, msg=name)


def test_capture_detaches_cleanly(token_ids):
    model = build()
    capture(model, token_ids, recurrences=2, attention=True)
    assert not any(p.active for p in model.hook_points.values())
    assert not model._forward_hooks


def test_exit_gate_recorded(token_ids):
    model = build(norm="ouro", exit_gate=True)
    traj = capture(model, token_ids, recurrences=3)
    with torch.no_grad():
        # the gate reads the state after the loop norm, which is what hook_state sees
        states = []
        h = model.hook_state.register_forward_hook(lambda m, a, k, o: states.append(o), with_kwargs=True)
        model(token_ids, recurrences=3)
        h.remove()
    expect = torch.stack([model.exit_gate(s).squeeze(-1) for s in states])
    torch.testing.assert_close(traj.exit_gate, expect)


def test_trajectory_from_tensors_validates_shapes():
    Trajectory(core=torch.zeros(3, 2, 1, 4, 5))
    with pytest.raises(InputError, match=r"\[R, K, B, T, D\]"):
        Trajectory(core=torch.zeros(3, 2, 4, 5))
    with pytest.raises(InputError, match="mask"):
        Trajectory(core=torch.zeros(3, 2, 1, 4, 5), mask=torch.ones(1, 3))
    with pytest.raises(InputError, match="core_attention"):
        Trajectory(core=torch.zeros(3, 2, 1, 4, 5), core_attention=torch.zeros(3, 2, 1, 2, 4, 3))


def test_realized_order_and_depth(token_ids):
    traj = capture(build(), token_ids, recurrences=2)
    idx = traj.realized_index()
    assert list(idx.segment) == ["prelude"] + ["core"] * 6 + ["coda"]
    assert list(idx.depth) == list(range(1, 9))  # P + t·K + j + 1
    states = traj.realized_states()
    torch.testing.assert_close(states[1 + 1 * 3 + 2], traj.core[1, 2])
    torch.testing.assert_close(states[-1], traj.coda[0])


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 0.0), (torch.float16, 2e-3)])
def test_save_load_roundtrip(tmp_path, token_ids, dtype, tol):
    traj = capture(build(), token_ids, recurrences=2, attention=True, tokens=[list("abcdefghi")] * 2)
    traj.save(tmp_path / "t", dtype=dtype)
    back = Trajectory.load(tmp_path / "t")
    torch.testing.assert_close(back.core, traj.core, atol=tol * traj.core.abs().max().item(), rtol=tol)
    torch.testing.assert_close(back.core_attention, traj.core_attention, atol=tol, rtol=tol)
    assert back.tokens == traj.tokens and back.metadata["recurrences"] == 2
    assert torch.equal(back.token_ids, traj.token_ids) and back.mask.dtype == torch.bool


def test_concat_pads_and_masks(token_ids):
    model = build()
    a = capture(model, token_ids[:1, :5], recurrences=2, attention=True)
    b = capture(model, token_ids[1:, :9], recurrences=2, attention=True)
    joined = Trajectory.concat([a, b])
    assert joined.core.shape == (2, 3, 2, 9, 32)
    assert joined.mask[0].tolist() == [True] * 5 + [False] * 4
    torch.testing.assert_close(joined.core[:, :, 0, :5], a.core[:, :, 0])
    torch.testing.assert_close(joined.select([1]).core, b.core)
    assert joined.core_attention.shape[-2:] == (9, 9)
