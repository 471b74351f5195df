"""What the family loaders refuse, and how: one error naming every bad tensor by its PUBLISHED name, unsupported
config values named by key, no pickle, sharded checkpoints, dispatch by config.json model_type; the CLI."""

import json

import pytest
import torch
from _families_reference import write_huginn, write_ouro, write_retrofit
from safetensors.torch import load_file, save_file

from loopscope.errors import CheckpointError, InputError
from loopscope.models.load import load_model


def rewrite(path, change):
    W = load_file(str(path / "model.safetensors"))
    change(W)
    save_file(W, str(path / "model.safetensors"))


def edit_config(path, **changes):
    c = json.loads((path / "config.json").read_text())
    c.update(changes)
    (path / "config.json").write_text(json.dumps(c))


def test_one_error_lists_missing_unexpected_and_misshaped_by_published_name(tmp_path):
    path, _, _ = write_ouro(tmp_path / "o", n_layers=2)

    def break_it(W):
        del W["model.layers.1.mlp.up_proj.weight"]
        W["model.layers.7.self_attn.q_proj.weight"] = torch.zeros(2, 2)
        W["model.norm.weight"] = torch.ones(31)

    rewrite(path, break_it)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    msg = str(err.value)
    assert "missing 1: ['model.layers.1.mlp.up_proj.weight']" in msg
    assert "unexpected 1: ['model.layers.7.self_attn.q_proj.weight']" in msg
    assert "model.norm.weight: file (31,) vs config (32,)" in msg


def test_fused_tensor_shape_checked_before_splitting(tmp_path):
    path, _, _ = write_huginn(tmp_path / "h", n_pre=1, n_core=1, n_coda=1)
    rewrite(path, lambda W: W.__setitem__("transformer.core_block.0.attn.Wqkv.weight", torch.zeros(64, 32)))
    msg = r"transformer.core_block.0.attn.Wqkv.weight: file \(64, 32\) vs config \(96, 32\)"
    with pytest.raises(CheckpointError, match=msg):
        load_model(path)


def test_huginn_rope_buffer_must_match_the_config(tmp_path):
    path, _, _ = write_huginn(tmp_path / "h", n_pre=1, n_core=1, n_coda=1)
    edit_config(path, rope_base=10000)  # freqs_cis was computed with 50000
    with pytest.raises(CheckpointError, match="freqs_cis differs"):
        load_model(path)


def test_tied_head_copy_accepted_only_when_equal(tmp_path):
    path, W, _ = write_huginn(tmp_path / "h", n_pre=1, n_core=1, n_coda=1)
    rewrite(path, lambda T: T.__setitem__("lm_head.weight", T["transformer.wte.weight"].clone()))
    assert load_model(path).model.lm_head is None  # the duplicate upload of the tied embedding is fine
    rewrite(path, lambda T: T.__setitem__("lm_head.weight", T["transformer.wte.weight"] + 1))
    with pytest.raises(CheckpointError, match="differs from transformer.wte.weight"):
        load_model(path)


@pytest.mark.parametrize("key,value,match", [
    ("block_class_name", "TransformerPreNormBlock", "block_class_name"),
    ("injection_type", "add", "injection_type"),
    ("test_time_noise", 0.1, "test_time_noise"),
])
def test_raven_values_the_published_file_hardcodes(tmp_path, key, value, match):
    path, _, _ = write_huginn(tmp_path / "h", n_pre=1, n_core=1, n_coda=1)
    edit_config(path, **{key: value})
    with pytest.raises(CheckpointError, match=match):
        load_model(path)


def test_ouro_sliding_window_refused(tmp_path):
    path, _, _ = write_ouro(tmp_path / "o", n_layers=1)
    edit_config(path, layer_types=["sliding_attention"])
    with pytest.raises(CheckpointError, match="sliding-window"):
        load_model(path)


def test_olmo_retrofit_refused(tmp_path):
    path, _, _ = write_retrofit(tmp_path / "r", n_pre=1, n_core=1, n_coda=1)
    rewrite(path, lambda W: W.__setitem__("transformer.core_block.0.attn.q_norm.weight", torch.ones(32)))
    with pytest.raises(CheckpointError, match="OLMo-2"):
        load_model(path)


def test_pickle_only_and_missing_tokenizer_refused(tmp_path):
    path, _, _ = write_ouro(tmp_path / "o", n_layers=1)
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        load_model(path)
    path, _, _ = write_ouro(tmp_path / "o2", n_layers=1)
    (path / "tokenizer.json").unlink()
    (path / "tokenizer_config.json").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        load_model(path)


def test_sharded_checkpoint_with_index(tmp_path):
    path, W, _ = write_ouro(tmp_path / "o", n_layers=2)
    full = load_file(str(path / "model.safetensors"))
    names = sorted(full)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in shards.items():
        save_file({k: full[k] for k in keys}, str(path / file))
    (path / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    model = load_model(path).model
    torch.testing.assert_close(model.loop_norm.weight, W["model.norm.weight"].float())


def test_dispatch_by_model_type(tmp_path):
    for write, family in ((write_ouro, "ouro"), (write_huginn, "huginn"), (write_retrofit, "retrofit")):
        path = write(tmp_path / family)[0]
        assert load_model(path).model.cfg.extra["family"] == family
    path = write_ouro(tmp_path / "other")[0]
    edit_config(path, model_type="qwen3_next")
    with pytest.raises(CheckpointError, match="not a model loopscope recognises"):
        load_model(path)


def test_cli_retrofit(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    from typer.testing import CliRunner

    from loopscope.cli.main import app
    from loopscope.data.tokenizer import load_tokenizer

    torch.manual_seed(0)
    src = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(src)
    load_tokenizer().save_pretrained(src)
    runner = CliRunner()
    out = tmp_path / "retro"
    result = runner.invoke(app, ["retrofit", str(src), str(out), "--prelude", "0", "--core", "1-2", "--coda", "3",
                                 "--recurrences", "6", "--adapter", "add"])
    assert result.exit_code == 0, result.output
    assert "(1, 2⊗6, 1)_I" in result.output
    loaded = load_model(out)
    assert (loaded.recurrences, loaded.model.cfg.n_block, loaded.model.cfg.extra["family"]) == (6, 2, "retrofit")
    torch.testing.assert_close(loaded.model.adapter.weight, torch.cat([torch.eye(32), torch.eye(32)], dim=1))
    bad = runner.invoke(app, ["retrofit", str(src), str(tmp_path / "x"), "--prelude", "0", "--core", "1-7",
                              "--coda", "3"])
    assert isinstance(bad.exception, InputError) and "outside" in str(bad.exception)
    assert "SYNOPSIS" in runner.invoke(app, ["retrofit", "--help"]).output


def test_loaders_are_tried_in_one_explicit_order_whatever_the_import_order():
    """Re-registering the generic HF loader (as importing `loopscope.models.hf` first would) does not put it before
    the families: a retrofit checkpoint (config.json + safetensors, which the HF loader also accepts) stays a
    retrofit."""
    from loopscope.models import load as load_module
    from loopscope.models.hf import hf_recognises, load_hf

    load_module._import_loaders()
    load_module.register_loader("feedforward-hf", hf_recognises, load_hf)
    kinds = [k for k, _, _ in load_module.LOADERS]
    assert kinds == [k for k in load_module.LOADER_ORDER if k in kinds] and kinds[-1] == "feedforward-hf"
    with pytest.raises(ValueError, match="LOADER_ORDER"):
        load_module.register_loader("mystery", lambda p: False, load_hf)


def test_family_modules_do_not_import_each_other():
    """huginn and retrofit share the Raven format through families/raven.py, never through each other."""
    import ast
    from pathlib import Path

    import loopscope.models.families as families

    folder = Path(families.__file__).parent
    for name in ("huginn", "retrofit", "ouro"):
        tree = ast.parse((folder / f"{name}.py").read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        others = {f"loopscope.models.families.{o}" for o in ("huginn", "retrofit", "ouro") if o != name}
        assert not imported & others, (name, imported & others)
