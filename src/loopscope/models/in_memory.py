"""A Hugging Face model object already in memory → a `LoadedModel`, without writing it to disk.

    hf = AutoModelForCausalLM.from_pretrained("/ckpt/Ouro-1.4B", trust_remote_code=True)   # in *your* notebook
    loaded = loopscope.models.from_hf(hf, tokenizer)       # a LoopedLM holding the same tensors: analyse it

A looped model loaded with its published modelling code (Ouro, Huginn-0125, a retrofitted-recurrence Raven) is
translated exactly as its saved folder would be (`families.common.build_published`: its `config` and its
`state_dict()` by published tensor names, every name and shape checked); the LoopedLM takes the same tensors
(no copy when the dtype is kept) on the same device. A feedforward Hugging Face model (Llama family, GPT-2) is
wrapped as it is. loopscope itself never runs the published code: the object is whatever the caller built.
"""

from __future__ import annotations

from typing import Any

from loopscope.errors import InputError
from loopscope.models.load import LoadedModel


def from_hf(model: Any, tokenizer: Any = None, name: str | None = None, *, dtype=None,
            state_dtype=None) -> LoadedModel:
    """`model` (a Hugging Face `PreTrainedModel`, any family loopscope reads) as a LoadedModel; see the module doc.
    `dtype`: the LoopedLM's weights (default: the object's own, shared); `state_dtype`: its residual stream and
    recurrent state (float32 unless "weights", as `load_model`).
    `name` defaults to the last part of the config's `_name_or_path` (its folder or hub name), else the model
    type."""
    from loopscope.models.device import resolve_dtype, resolve_state_dtype
    from loopscope.models.families.common import InMemory, build_published
    from loopscope.models.families.huginn import HUGINN
    from loopscope.models.families.ouro import OURO
    from loopscope.models.families.raven import MODEL_TYPE as RAVEN
    from loopscope.models.families.raven import retrofit_config_or_names
    from loopscope.models.families.retrofit import RETROFIT
    from loopscope.models.hf_parts import LAYOUTS

    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if config is None or not hasattr(config, "to_dict") or not hasattr(model, "state_dict"):
        raise InputError(f"from_hf takes a Hugging Face model (with .config and .state_dict()); got a "
                         f"{type(model).__name__}")
    name = name or str(getattr(config, "_name_or_path", None) or kind).rstrip("/").split("/")[-1]  # as a folder
    if kind in LAYOUTS:
        model.eval()
        model.loopscope_name = name
        return LoadedModel(model, tokenizer, name, "feedforward-hf", 1)
    found = dict(model.state_dict())  # published names; the tensors themselves (build_published pops each once)
    pub = config.to_dict()
    if kind == "ouro":
        family = OURO
    elif kind == RAVEN:
        family = RETROFIT if retrofit_config_or_names(pub, lambda: set(found)) else HUGINN
    else:
        raise InputError(f"from_hf: a {kind!r} model is none of the families loopscope reads (ouro, huginn_raven "
                         f"and the feedforward {', '.join(sorted(LAYOUTS))})")
    weights = next(iter(found.values())).dtype if dtype is None else resolve_dtype(dtype)
    recurrences = family.translate(pub, InMemory(str(name), found)).recurrences
    looped = build_published(pub, found, family, str(name), dtype=weights)
    looped.stream_dtype = resolve_state_dtype(state_dtype, weights)
    return LoadedModel(looped, tokenizer, looped.cfg.name or str(name), "looped", recurrences)
