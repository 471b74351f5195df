"""Interventions on LoopedLM: zeroing (per recurrence), deleting and swapping layers, restoring, KL."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from hf_helpers import renumbered

from loopscope.capture import Trajectory, capture
from loopscope.data.prompts import load_prompts
from loopscope.errors import InputError
from loopscope.interventions import (
    DeleteLayer,
    SwapLayers,
    ZeroSublayer,
    intervene,
    next_token_kl,
    run_intervention,
    summarize_kl,
)
from loopscope.models import LoadedModel, LoopedConfig, LoopedLM, load_model

R = 4
CONFIGS = {
    "pre": LoopedConfig(vocab_size=64, d_model=32, n_heads=4, d_mlp=48, n_prelude=2, n_block=3, n_coda=2,
                        recurrences=R, norm="pre", init_std=0.2, seed=1),
    "sandwich-concat-random": LoopedConfig(vocab_size=64, d_model=32, n_heads=4, d_mlp=48, n_prelude=2, n_block=3,
                                           n_coda=2, recurrences=R, norm="sandwich", injection="concat",
                                           state_init="random", init_std=0.2, seed=2),
    "ouro-add-gate": LoopedConfig(vocab_size=64, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=48, n_prelude=2,
                                  n_block=3, n_coda=2, recurrences=R, norm="ouro", injection="add",
                                  state_init="zeros", exit_gate=True, final_norm=False, init_std=0.2, seed=3),
}
IDS = torch.tensor([[1, 5, 9, 2, 33, 7, 40], [3, 3, 8, 60, 12, 5, 0]])
TENSORS = ("core", "injected", "prelude", "coda", "embed", "core_attention", "prelude_attention",
           "coda_attention", "exit_gate", "logits")



def loaded_of(cfg: LoopedConfig) -> LoadedModel:
    return LoadedModel(LoopedLM(cfg).eval(), None, cfg.name, "looped", cfg.recurrences)


def assert_same(a: Trajectory, b: Trajectory, atol: float = 0.0) -> None:
    for name in TENSORS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.shape == y.shape, name
            assert (x - y).abs().max().item() <= atol, (name, (x - y).abs().max().item())


def rebuilt(model: LoopedLM, segment: str, order: list[int]) -> LoopedLM:
    """An independent LoopedLM whose `segment` holds the weights of the original layers `order`."""
    count = {"prelude": "n_prelude", "core": "n_block", "coda": "n_coda"}[segment]
    other = LoopedLM(model.cfg.replace(**{count: len(order)})).eval()
    other.load_state_dict(renumbered(model.state_dict(), f"{segment}.", order), strict=True)
    return other


@pytest.mark.parametrize("name", CONFIGS)
def test_zeroing_at_no_recurrence_changes_nothing(name):
    loaded = loaded_of(CONFIGS[name])
    specs = [ZeroSublayer("core", 1, "mlp", recurrences=[]), ZeroSublayer("core", 0, "attn", recurrences=[])]
    base, changed, kl = run_intervention(loaded, IDS, specs, attention=True)
    assert_same(base, changed)
    assert len(kl) == IDS.numel() and (kl["kl"] == 0).all() and kl["top1_agrees"].all()
    assert changed.metadata["interventions"][0] == {"kind": "ZeroSublayer", "segment": "core", "layer": 1,
                                                    "sublayer": "mlp", "recurrences": []}


@pytest.mark.parametrize("name", CONFIGS)
def test_zeroing_mlp_at_recurrence_t_changes_states_from_there_on(name):
    loaded = loaded_of(CONFIGS[name])
    t, j = 2, 1
    base, changed, kl = run_intervention(loaded, IDS, [ZeroSublayer("core", j, "mlp", recurrences=[t])],
                                         attention=True)
    index = base.realized_index()
    states_b, states_c = base.realized_states(), changed.realized_states()
    first = index.index[(index.segment == "core") & (index.recurrence == t) & (index.layer == j)][0]
    assert torch.equal(states_b[:first], states_c[:first])  # everything before (t, j): bitwise identical
    for n in range(first, len(index)):  # (t, j) and every later state: changed
        assert (states_b[n] - states_c[n]).abs().max() > 1e-4, index.iloc[n].to_dict()
    assert torch.equal(base.injected[: t + 1], changed.injected[: t + 1])
    # attention at (t, j) reads the stream before the MLP: unchanged; at (t, j+1) it reads the changed stream
    assert torch.equal(base.core_attention[t, j], changed.core_attention[t, j])
    assert not torch.equal(base.core_attention[t, j + 1], changed.core_attention[t, j + 1])
    assert (kl["kl"] > 0).all()


@pytest.mark.parametrize("recurrences", [None, [1, 3]])
def test_zeroing_both_sublayers_of_a_prenorm_layer_makes_it_the_identity(recurrences):
    """Pre-norm: x' = x + Attn(n1 x) + MLP(...) → with both zeroed, x' = x exactly, at the chosen recurrences."""
    loaded = loaded_of(CONFIGS["pre"])
    j = 2
    specs = [ZeroSublayer("core", j, "attn", recurrences), ZeroSublayer("core", j, "mlp", recurrences)]
    _, changed, _ = run_intervention(loaded, IDS, specs)
    for t in range(R):
        hit = recurrences is None or t in recurrences
        assert torch.equal(changed.core[t, j], changed.core[t, j - 1]) == hit
    # in the prelude too (recurrence 0 is its only one)
    _, changed, _ = run_intervention(loaded, IDS, [ZeroSublayer("prelude", 1, s, [0]) for s in ("attn", "mlp")])
    assert torch.equal(changed.prelude[1], changed.prelude[0])


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize(("segment", "layer"), [("core", 0), ("core", 2), ("prelude", 1), ("coda", 0)])
def test_delete_layer_equals_model_built_without_it(name, segment, layer):
    loaded = loaded_of(CONFIGS[name])
    n = len(getattr(loaded.model, segment))
    other = rebuilt(loaded.model, segment, [i for i in range(n) if i != layer])
    expected = capture(other, IDS, attention=True)
    with intervene(loaded.model, [DeleteLayer(segment, layer)]):
        got = capture(loaded.model, IDS, attention=True)
    assert_same(got, expected)
    assert got.block_size == (2 if segment == "core" else 3)
    assert not torch.equal(got.logits, capture(loaded.model, IDS).logits)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize(("segment", "layer"), [("core", 1), ("prelude", 0), ("coda", 0)])
def test_swap_layers_equals_model_with_swapped_weights(name, segment, layer):
    loaded = loaded_of(CONFIGS[name])
    order = list(range(len(getattr(loaded.model, segment))))
    order[layer], order[layer + 1] = layer + 1, layer
    expected = capture(rebuilt(loaded.model, segment, order), IDS, attention=True)
    with intervene(loaded, [SwapLayers(segment, layer)]):  # a LoadedModel is accepted too
        got = capture(loaded.model, IDS, attention=True)
    assert_same(got, expected)
    assert not torch.equal(got.logits, capture(loaded.model, IDS).logits)


def test_specs_apply_in_order_and_zero_follows_its_module():
    """Delete core 0, then zero core 0's MLP = the MLP of original layer 1 (in the model without layer 0)."""
    loaded = loaded_of(CONFIGS["pre"])
    other = rebuilt(loaded.model, "core", [1, 2])
    with intervene(other, [ZeroSublayer("core", 0, "mlp")]):
        expected = capture(other, IDS)
    with intervene(loaded.model, [DeleteLayer("core", 0), ZeroSublayer("core", 0, "mlp")]):
        got = capture(loaded.model, IDS)
    assert_same(got, expected)


def test_context_manager_restores_the_model_exactly():
    model = loaded_of(CONFIGS["sandwich-concat-random"]).model
    before = capture(model, IDS, attention=True)
    lists, cfg, names = (model.prelude, model.core, model.coda), model.cfg, dict(model.hook_points)
    specs = [DeleteLayer("core", 1), SwapLayers("prelude", 0), ZeroSublayer("coda", 1, "attn")]
    with intervene(model, specs):
        assert model.cfg.n_block == 2 and len(model.core) == 2
        assert not torch.equal(capture(model, IDS).logits, before.logits)
    with pytest.raises(RuntimeError, match="boom"), intervene(model, specs):
        raise RuntimeError("boom")
    assert (model.prelude, model.core, model.coda) == lists and model.cfg is cfg
    assert {k: v.name for k, v in model.hook_points.items()} == {k: v.name for k, v in names.items()}
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert_same(capture(model, IDS, attention=True), before)


def test_kl_by_hand_and_summary():
    logits = torch.tensor([[[0.0, 0.0], [5.0, 1.0]]])  # token 1 is padding (masked out)
    other = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]])
    mask = torch.tensor([[True, False]])
    a = Trajectory(core=torch.zeros(1, 1, 1, 2, 2), logits=logits, mask=mask)
    b = Trajectory(core=torch.zeros(1, 1, 1, 2, 2), logits=other, mask=mask)
    kl = next_token_kl(a, b)  # p = (1/2, 1/2), q = (1/4, 3/4)
    assert list(kl.columns[:3]) == ["batch", "token", "kl"] and len(kl) == 1
    assert kl["kl"][0] == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), abs=1e-7)  # float32 logits
    assert kl["base_entropy_bits"][0] == pytest.approx(1.0)
    assert kl["intervened_entropy_bits"][0] == pytest.approx(-(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75)))
    assert not kl["top1_agrees"][0]
    assert next_token_kl(b, a)["kl"][0] == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), abs=1e-7)
    s = summarize_kl(pd.concat([kl, next_token_kl(a, a)]))
    assert len(s) == 1 and s["n"][0] == 2 and s["mean_kl"][0] == pytest.approx(kl["kl"][0] / 2)
    assert s["top1_agreement"][0] == 0.5


def test_run_intervention_on_prompts_with_the_default_model():
    loaded = load_model("default")
    prompts = load_prompts("gsm-symbolic", limit=2)
    base, changed, kl = run_intervention(loaded, prompts, [DeleteLayer("core", 3)], recurrences=3)
    assert len(kl) == int(base.mask.sum()) and base.recurrences == 3 and changed.block_size == 3
    assert set(kl["batch"]) == {0, 1} and kl.groupby("batch")["token"].max().tolist() == (
        base.mask.sum(1) - 1).tolist()
    assert (kl["kl"] > 0).all() and changed.tokens == base.tokens


def test_bad_specs_are_refused_with_the_fix():
    loaded = loaded_of(CONFIGS["pre"])
    with pytest.raises(InputError, match="0..2"):
        with intervene(loaded.model, [DeleteLayer("core", 3)]):
            pass
    with pytest.raises(InputError, match="layer and layer\\+1"):
        with intervene(loaded.model, [SwapLayers("core", 2)]):
            pass
    with pytest.raises(InputError, match="only block layer"):
        with intervene(loaded.model, [DeleteLayer("core", 0)] * 3):
            pass
    assert len(loaded.model.core) == 3  # restored after the failure
    with pytest.raises(InputError, match="runs once"):
        with intervene(loaded.model, [ZeroSublayer("prelude", 0, "mlp", [1])]):
            pass
    with pytest.raises(InputError, match="R=4"):
        run_intervention(loaded, IDS, [ZeroSublayer("core", 0, "mlp", [4])])
    with pytest.raises(InputError, match="'mlp' or 'attn'"):
        ZeroSublayer("core", 0, "ffn")
    with pytest.raises(InputError, match="segment"):
        DeleteLayer("block", 0)
    with pytest.raises(InputError, match="not an intervention"):
        with intervene(loaded.model, ["delete core 0"]):
            pass
