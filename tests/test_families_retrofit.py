"""Retrofitted recurrence: tiny checkpoints in the published Raven/Llama format (GQA, pre-norm, no norm between
core and coda, rotate-half RoPE with rope_theta), loaded through the public loader and checked against the
equations; and `retrofit_from_hf` on a tiny transformers Llama, checked against transformers' own forward."""

import pytest
import torch
from _decoding import decode_in_steps
from _families_reference import ids, raven_forward, write_retrofit

from loopscope.capture import capture
from loopscope.errors import InputError
from loopscope.models.families import BYPASS_INJECTION, load_retrofit, retrofit_from_hf
from loopscope.models.families.retrofit import fresh_adapter, is_retrofit, parse_layers
from loopscope.models.load import load_model

TOL = dict(rtol=1e-4, atol=2e-5)


@pytest.fixture(scope="module")
def retro(tmp_path_factory):
    path, W, c = write_retrofit(tmp_path_factory.mktemp("retro") / "Recurrent-tiny", n_pre=1, n_core=2, n_coda=1)
    return path, load_model(path), W, c


def test_recognised_as_retrofit_not_huginn(retro):
    path, loaded, _, c = retro
    cfg = loaded.model.cfg
    assert is_retrofit(path) and cfg.extra["family"] == "retrofit"
    assert (cfg.norm, cfg.coda_input_norm, cfg.rope_interleaved, cfg.qk_bias, cfg.tie_embeddings) == \
        ("pre", False, False, False, False)
    assert cfg.rope_base == c["rope_theta"] != c["rope_base"]  # the Llama file reads rope_theta
    assert (cfg.n_kv_heads, cfg.embed_scale, cfg.norm_eps, loaded.recurrences) == (2, 1.0, 1e-5, 4)


@pytest.mark.parametrize("R", [1, 3])
def test_forward_step_by_step_matches_equations(retro, R):
    _, loaded, W, c = retro
    x = ids()
    s0 = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(3))
    ref = raven_forward(W, c, x, R, s0=s0, style="retrofit")
    traj = capture(loaded.model, x, recurrences=R, attention=True, initial_state=s0)
    torch.testing.assert_close(traj.prelude[0], ref["prelude"][0], **TOL)
    for t in range(R):
        torch.testing.assert_close(traj.injected[t], ref["injected"][t], **TOL)
        for j in range(2):
            torch.testing.assert_close(traj.core[t, j], ref["core"][t][j], **TOL)
            torch.testing.assert_close(traj.core_attention[t, j], ref["probs"][("core", t, j)], **TOL)
    torch.testing.assert_close(traj.coda[0], ref["coda"][0], **TOL)
    torch.testing.assert_close(traj.logits, ref["logits"], **TOL)


def test_bypass_loads_the_feedforward_stack(retro):
    path, _, W, c = retro
    ff = load_retrofit(path, overrides=BYPASS_INJECTION)
    assert ff.model.adapter is None and ff.recurrences == 4
    x = ids(seed=5)
    ref = raven_forward(W, c, x, 2, style="retrofit", bypass=True)  # s_0 = e, z_t = s_t
    torch.testing.assert_close(ff.model(x, recurrences=2), ref["logits"], **TOL)


def test_kv_cached_decoding_equals_full_forward(retro):
    model = retro[1].model
    x = ids(B=1, T=8, seed=6)
    full = model(x, recurrences=2, state_seed=9)
    torch.testing.assert_close(decode_in_steps(model, x, 3, recurrences=2, state_seed=9), full, **TOL)


def test_parse_layers():
    assert parse_layers("0-3") == [0, 1, 2, 3]
    assert parse_layers("4-6,9") == [4, 5, 6, 9]
    assert parse_layers("") == []
    with pytest.raises(InputError, match="A-B"):
        parse_layers("5-2")


def test_fresh_adapters():
    D = 6
    s, e = torch.randn(3, D), torch.randn(3, D)
    z = torch.cat([s, e], -1)
    torch.testing.assert_close(z @ fresh_adapter(D, "passthrough", 0).T, e)
    torch.testing.assert_close(z @ fresh_adapter(D, "add", 0).T, s + e)
    w = fresh_adapter(512, "random", 0)
    bound = 1 / (2 * 512) ** 0.5
    assert w.abs().max() <= bound and w.std() == pytest.approx(bound / 3 ** 0.5, rel=0.02)  # U(-b, b)
    torch.testing.assert_close(w, fresh_adapter(512, "random", 0))


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=48, intermediate_size=96, num_hidden_layers=6,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
                      rms_norm_eps=1e-5, rope_theta=20000.0, tie_word_embeddings=False, attn_implementation="eager")
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return model


def test_retrofit_from_hf_reproduces_transformers_and_loops(tiny_llama, tmp_path):
    from loopscope.data.tokenizer import load_tokenizer

    out = retrofit_from_hf(tiny_llama, load_tokenizer(), prelude=[0, 1], core=[2, 3], coda=[4, 5],
                           out_dir=tmp_path / "r", recurrences=3)
    ff = load_retrofit(out, overrides=BYPASS_INJECTION)
    x = ids(B=2, T=12, seed=7)
    with torch.no_grad():
        want = tiny_llama(x).logits
    torch.testing.assert_close(ff.model(x, recurrences=1), want, rtol=0, atol=1e-5)
    # skipping layers (the published TinyLlama retrofit drops 4–9) changes the function
    skip = retrofit_from_hf(tiny_llama, load_tokenizer(), prelude=[0], core=[3], coda=[5], out_dir=tmp_path / "s")
    skipped = load_retrofit(skip, BYPASS_INJECTION).model
    assert (ff.model(x, recurrences=1) - skipped(x, recurrences=1)).abs().max() > 1e-2
    looped = load_model(out)
    assert looped.recurrences == 3 and looped.model.cfg.injection == "concat"
    traj = capture(looped.model, x, recurrences=5)
    assert traj.core.shape[:2] == (5, 2) and torch.isfinite(traj.core).all()


def test_retrofit_refuses_bad_layers(tiny_llama, tmp_path):
    with pytest.raises(InputError, match="outside"):
        retrofit_from_hf(tiny_llama, None, prelude=[0], core=[2, 9], coda=[5], out_dir=tmp_path / "x")
    with pytest.raises(InputError, match="at least one layer"):
        retrofit_from_hf(tiny_llama, None, prelude=[0], core=[], coda=[5], out_dir=tmp_path / "x")
