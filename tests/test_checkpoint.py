"""Checkpoints: safetensors only, every tensor checked by name and shape, clear errors for bad paths."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from conftest import build, tiny_config
from safetensors.torch import save_file

from loopscope.capture import encode_prompts
from loopscope.data.prompts import load_prompts
from loopscope.data.tokenizer import load_tokenizer
from loopscope.errors import CheckpointError, InputError
from loopscope.models import LoopedLM, load_looped, load_model, save_model


def test_roundtrip_reproduces_outputs(tmp_path, token_ids):
    model = build(injection="concat", norm="sandwich", tie_embeddings=False, vocab_size=1024)
    save_model(model, tmp_path / "m", tokenizer=load_tokenizer())
    back = load_looped(tmp_path / "m")
    torch.testing.assert_close(back(token_ids), model(token_ids), atol=0, rtol=0)
    loaded = load_model(tmp_path / "m")
    save_model(build(), tmp_path / "small", tokenizer=load_tokenizer())
    with pytest.raises(CheckpointError, match="has 1024 tokens but the model's vocab_size is 97"):
        load_model(tmp_path / "small")
    assert loaded.kind == "looped" and len(loaded.tokenizer) == 1024 and loaded.recurrences == 3


def test_tied_embedding_stored_once(tmp_path):
    save_model(build(), tmp_path / "m")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys() and "embed.weight" in f.keys()


def test_missing_paths_and_files(tmp_path):
    with pytest.raises(CheckpointError, match="neither an existing path nor a builtin"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a model loopscope recognises"):
        load_model(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_looped(tmp_path / "empty")
    d = tmp_path / "noweights"
    d.mkdir()
    tiny_config().to_json(d / "config.json")
    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError, match=r"no model.safetensors \(found pickle files \['pytorch_model.bin'\]"):
        load_looped(d)


def test_pickle_in_place_of_safetensors_is_refused(tmp_path):
    save_model(build(), tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(pickle.dumps({"embed.weight": [1.0]}, protocol=4))
    with pytest.raises(CheckpointError, match="pickle"):
        load_looped(tmp_path / "m")


def save_with_header_length(tensors: dict, path, target: int, modulus: int) -> int:
    """Save `tensors` with metadata padded until the safetensors header length ≡ target (mod modulus)."""
    def length(pad: int) -> int:
        save_file(tensors, str(path), metadata={"format": "pt", "pad": "x" * pad})
        return int.from_bytes(path.read_bytes()[:8], "little")

    start = (target - length(0)) % modulus  # each pad character adds one byte before the 8-byte alignment
    for pad in range(max(0, start - 8), start + 16):
        n = length(pad)
        if n % modulus == target:
            return n
    raise AssertionError("no padding reached the header length")


@pytest.mark.parametrize("target, modulus", [(0x80, 0x100), (0x0280, 0x10000), (0x00, 0x100)])
def test_safetensors_whose_header_length_starts_like_a_pickle_loads(tmp_path, token_ids, target, modulus):
    """A safetensors file begins with its header length (u64, little-endian): one length in 256 starts with 0x80,
    pickle's protocol byte, and 0x…0280 starts with b"\\x80\\x02", a protocol-2 pickle's first two bytes. Such a file
    is decided by its parsed header, so it loads exactly."""
    model = build()
    save_model(model, tmp_path / "m")
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    n = save_with_header_length(tensors, tmp_path / "m" / "model.safetensors", target, modulus)
    head = (tmp_path / "m" / "model.safetensors").read_bytes()[:2]
    assert n % modulus == target and (target != 0x0280 or head == b"\x80\x02")
    torch.testing.assert_close(load_looped(tmp_path / "m")(token_ids), model(token_ids), atol=0, rtol=0)


def test_mismatched_weights_list_every_problem(tmp_path):
    model = build()
    save_model(model, tmp_path / "m")
    sd = {k: v for k, v in model.state_dict().items() if k != "core.0.mlp.up_proj.weight"}
    sd["core.1.attn.q_proj.weight"] = torch.zeros(5, 5)
    sd["extra.weight"] = torch.zeros(1)
    save_file(sd, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_looped(tmp_path / "m")
    msg = str(err.value)
    assert "missing 1: ['core.0.mlp.up_proj.weight']" in msg
    assert "unexpected 1: ['extra.weight']" in msg
    assert "core.1.attn.q_proj.weight: file (5, 5) vs config (32, 32)" in msg


def test_config_for_other_weights_is_caught(tmp_path):
    save_model(build(), tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["n_block"] = 4
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing"):
        load_looped(tmp_path / "m")
    cfg["mystery"] = 1
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unknown keys \\['mystery'\\]"):
        load_looped(tmp_path / "m")


def test_default_builtin_is_the_trained_model_and_random_one_is_seeded(token_ids):
    a, b = load_model("default-random"), load_model("default-random")
    ids = token_ids % 1024
    torch.testing.assert_close(a.model(ids), b.model(ids), atol=0, rtol=0)
    assert isinstance(a.model, LoopedLM) and a.model.cfg.signature == "(2, 4⊗8, 2)_I"

    trained = load_model("default")
    assert trained.model.cfg.signature == "(2, 4⊗4, 2)_I" and trained.recurrences == 4
    assert next(trained.model.parameters()).dtype == torch.float32
    # trained on GSM8K: it predicts GSM8K text far better than the untrained model of the same shape
    text = load_prompts("gsm-symbolic", limit=4)
    rows = trained.tokenizer(text, return_tensors="pt", padding=True)["input_ids"][:, :48]
    random = LoopedLM(trained.model.cfg).eval()  # same config, untrained seeded weights

    def loss(model):
        with torch.no_grad():
            logits = model(rows)
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), rows[:, 1:].flatten()).item()

    assert loss(trained.model) < 4.5 < 6.0 < loss(random)


def test_prompt_errors(tmp_path):
    assert len(load_prompts("gsm-symbolic")) == 16
    (tmp_path / "e.txt").write_text("\n\n")
    with pytest.raises(InputError, match="empty"):
        load_prompts(tmp_path / "e.txt")
    (tmp_path / "bad.jsonl").write_text('{"q": 1}\n')
    with pytest.raises(InputError, match="none of the fields"):
        load_prompts(tmp_path / "bad.jsonl")
    with pytest.raises(InputError, match="neither a file nor a builtin"):
        load_prompts("no-such-set")
    tok = load_tokenizer()
    with pytest.raises(InputError, match="longer than the model's context of 8"):
        encode_prompts(tok, ["one two three four five six seven eight nine ten"], max_len=8)
    with pytest.raises(InputError, match="prompt 1 is empty"):
        encode_prompts(tok, ["fine", "  "], max_len=8)


def test_encode_prompts_right_pads_with_bos():
    tok = load_tokenizer()
    ids, mask, tokens = encode_prompts(tok, ["Tom has 3 apples.", "Hi"], max_len=64)
    assert ids[:, 0].tolist() == [tok.bos_token_id] * 2
    n = int(mask[1].sum())
    assert mask[1, :n].all() and not mask[1, n:].any() and (ids[1, n:] == tok.pad_token_id).all()
    assert tokens[1][0] == "<|bos|>" and len(tokens[0]) == int(mask[0].sum())


@pytest.mark.parametrize("key, value, want", [("n_block", "four", "must be an integer"),
                                              ("rope_base", "1e4", "must be a number"),
                                              ("tie_embeddings", 1, "must be true or false"),
                                              ("n_kv_heads", 2.5, "must be an integer or null")])
def test_config_values_of_the_wrong_type_are_named_in_one_line(tmp_path, capsys, key, value, want):
    from conftest import run_cli

    save_model(build(), tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg[key] = value
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=f"config key '{key}' is .*; it {want}"):
        load_model(tmp_path / "m")
    code, _, err = run_cli(["analyze", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and f"config key '{key}'" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
