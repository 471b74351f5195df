"""`loopscope.from_hf`: a model object already in memory equals loading its saved folder — states and logits
identical — for each published looped family and a feedforward Llama."""

from __future__ import annotations

import json

import pytest
import torch
from _families_reference import ids, write_huginn, write_ouro, write_retrofit
from hf_helpers import save_tiny
from safetensors.torch import load_file

import loopscope
from loopscope.errors import InputError
from loopscope.models import from_hf, load_model


class PublishedConfig:
    """What from_hf reads of a transformers PretrainedConfig: model_type, _name_or_path, to_dict()."""

    def __init__(self, data: dict, path: str) -> None:
        self.data, self.model_type, self._name_or_path = data, data["model_type"], path

    def to_dict(self) -> dict:
        return dict(self.data)


class PublishedModel(torch.nn.Module):
    """Stands in for an object built by a family's published modelling code (loopscope never imports that code):
    its `config` and a `state_dict()` by the published tensor names, as that code's modules name them."""

    def __init__(self, folder) -> None:
        super().__init__()
        self.config = PublishedConfig(json.loads((folder / "config.json").read_text()), str(folder))
        self.tensors = load_file(str(folder / "model.safetensors"))

    def state_dict(self, *args, **kwargs):
        return dict(self.tensors)


@pytest.mark.parametrize("write", [write_ouro, write_huginn, write_retrofit])
def test_an_in_memory_published_model_equals_its_saved_folder(tmp_path, write):
    folder, tensors, _ = write(tmp_path / "ckpt")
    dtype = next(iter(tensors.values())).dtype  # Ouro's are bfloat16: both keep the checkpoint's dtype
    saved = load_model(folder, dtype=dtype)
    standin = PublishedModel(folder)
    loaded = from_hf(standin, saved.tokenizer)
    assert loaded.kind == "looped" and loaded.recurrences == saved.recurrences
    def config(m):  # every field; `extra.source` says where the tensors came from (a folder, or memory)
        d = m.cfg.to_dict()
        d["extra"] = {k: v for k, v in d["extra"].items() if k != "source"}
        return d

    assert config(loaded.model) == config(saved.model)
    x = ids()
    a = loopscope.record(loaded.model, x, recurrences=5)
    b = loopscope.record(saved.model, x, recurrences=5)
    torch.testing.assert_close(a.core, b.core, atol=0, rtol=0)
    torch.testing.assert_close(loaded.model(x, recurrences=5), saved.model(x, recurrences=5), atol=0, rtol=0)
    name = next(k for k in standin.tensors if k.endswith("embed_tokens.weight") or k.endswith("wte.weight"))
    assert loaded.model.embed.weight.data_ptr() == standin.tensors[name].data_ptr()  # the same memory, no copy


def test_a_feedforward_hf_model_is_wrapped_as_it_is(tmp_path):
    model = save_tiny("llama", tmp_path / "llama")
    saved = load_model(tmp_path / "llama")
    wrapped = from_hf(model, saved.tokenizer, name="tiny-llama")
    assert wrapped.kind == "feedforward-hf" and wrapped.model is model and wrapped.name == "tiny-llama"
    x = torch.randint(0, 100, (1, 7))
    torch.testing.assert_close(wrapped.model(x).logits, saved.model(x).logits, atol=0, rtol=0)


def test_anything_else_is_refused_in_one_line():
    with pytest.raises(InputError, match="takes a Hugging Face model"):
        from_hf(torch.nn.Linear(2, 2))
    other = PublishedModel.__new__(PublishedModel)
    torch.nn.Module.__init__(other)
    other.config, other.tensors = PublishedConfig({"model_type": "mamba"}, "m"), {}
    with pytest.raises(InputError, match="'mamba' model is none of the families"):
        from_hf(other)
