"""What the three published looped families share: reading a published checkpoint directory, mapping its
tensors by their published names onto `LoopedLM`, and refusing anything that does not fit.

A family is two things (see `Family`):

1. a config translator, published `config.json` → `LoopedConfig` (the checkpoint's own keys);
2. a weight map, a list of `Link`s: one published tensor (name, shape) ↔ one or more `LoopedLM` state_dict
   entries. A link with several entries is a fused tensor split along dim 0 in order (Huginn's `Wqkv` →
   q, k, v; `fc` → gate, up); a link with one entry is reshaped (Huginn's `qk_bias` (2,1,H,d) → (2,H,d)).

Loading checks every published tensor by name and shape before anything is built, and raises one
`CheckpointError` listing every missing, unexpected and mis-shaped tensor by its PUBLISHED name. Nothing here
imports or executes code shipped with a checkpoint (no `auto_map`, no `trust_remote_code`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loopscope.errors import CheckpointError
from loopscope.models.checkpoint import CONFIG_NAME, PICKLE_SUFFIXES, check_state_dict, config_json, read_safetensors
from loopscope.models.config import LoopedConfig
from loopscope.models.load import LoadedModel
from loopscope.models.looped import LoopedLM, rope_inverse_frequencies

INDEX_NAME = "model.safetensors.index.json"

# Load with the recurrence's input injection bypassed: s_0 = e and the block sees s_t only. With R = 1 a
# retrofitted checkpoint is then exactly its feedforward source model (prelude → core → coda). The adapter
# tensor is still checked by name and shape, then left out.
BYPASS_INJECTION: dict[str, Any] = {"injection": "none", "state_init": "embedding"}


@dataclass(frozen=True)
class Link:
    """One published tensor ↔ LoopedLM state_dict entries (several = fused along dim 0, in this order)."""

    published: str
    looped: tuple[str, ...]
    shape: tuple[int, ...]  # published shape


@dataclass
class Family:
    """A published looped architecture: how to read its config and name its tensors."""

    kind: str  # "ouro", "huginn", "retrofit"
    translate: Callable[[dict[str, Any], Path], LoopedConfig]  # published config.json → LoopedConfig
    links: Callable[[LoopedConfig], list[Link]]  # weight map for a translated config
    # Published tensors the modelling file keeps but LoopedLM does not need (checked, then dropped):
    # fn(config, found tensors, source) -> names it accepted (it raises CheckpointError on a bad value).
    extras: Callable[[LoopedConfig, Mapping[str, torch.Tensor], str], list[str]] = field(
        default=lambda cfg, found, source: []
    )


# --- reading a published directory -------------------------------------------------------------------
def read_config(path: Path) -> dict[str, Any]:
    """The published config.json as a dict (never through transformers' AutoConfig: no remote code)."""
    file = path / CONFIG_NAME
    if not file.exists():
        raise CheckpointError(f"{path} has no {CONFIG_NAME}; point loopscope at the downloaded checkpoint folder")
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {file} as JSON ({exc}); re-download config.json") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} is not a JSON object")
    return data


def model_type(path: Path) -> str | None:
    """config.json's `model_type`, or None when `path` is not a directory with a readable config.json."""
    value = (config_json(path) or {}).get("model_type")
    return value if isinstance(value, str) else None


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: those named by model.safetensors.index.json, else all *.safetensors."""
    index = path / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index ({exc}); re-download it") from exc
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index} names shards that are not in {path}: {missing}; finish the download")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        hint = f" (found pickle files {pickles}, which loopscope never loads: they can execute code)" if pickles else ""
        raise CheckpointError(f"{path} has no *.safetensors weights{hint}; download the safetensors files")
    return files


def weight_names(path: Path | InMemory) -> set[str]:
    """Tensor names in a checkpoint, read from the safetensors headers only (no tensor data)."""
    from safetensors import safe_open

    if isinstance(path, InMemory):
        return set(path.tensors)

    names: set[str] = set()
    for file in weight_files(path):
        try:
            with safe_open(str(file), framework="pt") as f:
                names.update(f.keys())
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a bad header
            raise CheckpointError(f"{file} is not a valid safetensors file ({exc})") from exc
    return names


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) checkpoint by its published name; refuses duplicates across shards."""
    tensors: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        part = read_safetensors(file)
        twice = sorted(set(part) & set(tensors))
        if twice:
            raise CheckpointError(f"tensors {twice[:5]} appear in more than one shard of {path}; re-download it")
        tensors.update(part)
    return tensors


def load_tokenizer_from(path: Path):
    """The checkpoint's own tokenizer through transformers, never reading config.json (whose `auto_map` would
    make AutoTokenizer offer to run the checkpoint's code) and never trusting remote code."""
    from transformers import AutoTokenizer, PretrainedConfig

    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        raise CheckpointError(
            f"{path} has no tokenizer files (tokenizer.json / tokenizer_config.json); download them with the weights"
        )
    try:
        return AutoTokenizer.from_pretrained(str(path), config=PretrainedConfig(), trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"cannot load the tokenizer in {path} with transformers ({exc})") from exc


# --- config helpers ----------------------------------------------------------------------------------
def rope_theta(pub: dict[str, Any], *keys: str, default: float | None = None) -> float:
    """RoPE base from the first present key, also looking inside transformers-5 `rope_parameters`."""
    for key in keys:
        if pub.get(key) is not None:
            return float(pub[key])
    params = pub.get("rope_parameters")
    if isinstance(params, dict) and params.get("rope_theta") is not None:
        return float(params["rope_theta"])
    if default is None:
        raise CheckpointError(f"config.json has none of {list(keys)}; cannot place rotary embeddings")
    return float(default)


def rope_scaling(pub: dict[str, Any]) -> dict[str, Any] | None:
    """`rope_scaling` if it is Llama-3 style (the only non-default rule LoopedLM implements), None if default."""
    sc = pub.get("rope_scaling")
    if sc is None and isinstance(pub.get("rope_parameters"), dict):
        params = pub["rope_parameters"]
        sc = params if params.get("rope_type", "default") != "default" else None
    if not sc:
        return None
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise CheckpointError(f"config.json rope scaling {sc} is not supported (only 'llama3' and default RoPE)")
    return {k: sc[k] for k in ("rope_type", "factor", "low_freq_factor", "high_freq_factor",
                               "original_max_position_embeddings") if k in sc} | {"rope_type": "llama3"}


def require(pub: dict[str, Any], key: str, allowed: tuple, source: str) -> None:
    """Refuse a config value the published modelling file would not run the way LoopedLM does."""
    if key in pub and pub[key] not in allowed:
        raise CheckpointError(
            f"{source}: config.json has {key}={pub[key]!r}; loopscope implements this family only with "
            f"{key} in {list(allowed)}"
        )


def apply_overrides(cfg: LoopedConfig, overrides: Mapping[str, Any] | None) -> LoopedConfig:
    """Config with analysis-time overrides (e.g. BYPASS_INJECTION, state_init='zeros') applied and validated."""
    if not overrides:
        return cfg
    known = set(LoopedConfig.__dataclass_fields__)
    bad = sorted(set(overrides) - known)
    if bad:
        raise CheckpointError(f"unknown LoopedConfig overrides {bad}; known fields: {sorted(known)}")
    return cfg.replace(**dict(overrides))


# --- the weight map ----------------------------------------------------------------------------------
def looped_shapes(cfg: LoopedConfig) -> dict[str, tuple[int, ...]]:
    """LoopedLM state_dict shapes for `cfg`, from a model built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = LoopedLM(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def expected_published(links: list[Link]) -> dict[str, torch.Tensor]:
    """Shape holders (meta tensors) for every published tensor the links expect."""
    return {link.published: torch.empty(link.shape, device="meta") for link in links}


def to_looped(links: list[Link], published: Mapping[str, torch.Tensor], cfg: LoopedConfig,
              dtype: torch.dtype | None = None, consume: bool = False) -> dict[str, torch.Tensor]:
    """Published tensors → LoopedLM state_dict (split fused tensors along dim 0, reshape the rest).
    `consume=True` pops each tensor from `published` (a dict) once used, so a 3.5B checkpoint is not held twice."""
    shapes = looped_shapes(cfg)
    out: dict[str, torch.Tensor] = {}
    for link in links:
        t = published.pop(link.published) if consume else published[link.published]
        t = t if dtype is None else t.to(dtype)
        if link.looped == ():
            continue  # checked, not used (e.g. the adapter when the injection is bypassed)
        sizes = [shapes[name][0] for name in link.looped]
        parts = torch.split(t, sizes, dim=0) if len(link.looped) > 1 else (t,)
        for name, part in zip(link.looped, parts):
            out[name] = part.reshape(shapes[name]).contiguous()
    return out


def to_published(links: list[Link], state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LoopedLM state_dict → published tensors (the inverse of `to_looped`), for writing a checkpoint."""
    out = {}
    for link in links:
        if not link.looped:
            continue
        parts = [state_dict[name] for name in link.looped]
        t = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
        out[link.published] = t.reshape(link.shape).contiguous()
    return out


def build_model(cfg: LoopedConfig, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype) -> LoopedLM:
    """A LoopedLM holding exactly `state_dict`, built on the meta device (no random init of billions of weights)."""
    with torch.device("meta"):
        model = LoopedLM(cfg)
    model.load_state_dict({k: v.to(dtype) for k, v in state_dict.items()}, strict=True, assign=True)
    model.rope.inv_freq = rope_inverse_frequencies(cfg)  # non-persistent buffer: recompute off the meta device
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"internal: tensors {left[:5]} were not loaded")  # a weight-map bug, not user input
    return model.eval()


def load_published(
    path: str | Path,
    family: Family,
    overrides: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    tokenizer: bool = True,
) -> LoadedModel:
    """Load a published checkpoint directory of `family` into a LoopedLM by the published tensor names
    (`build_published` on its config.json and tensors), with the checkpoint's own tokenizer."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; give the downloaded checkpoint folder")
    pub = read_config(path)
    native = family.translate(pub, path)
    model = build_published(pub, read_tensors(path), family, str(path), overrides, dtype, path=path)
    tok = load_tokenizer_from(path) if tokenizer else None
    if tok is not None and len(tok) > model.cfg.vocab_size:
        raise CheckpointError(
            f"tokenizer in {path} has {len(tok)} tokens but the model's vocabulary is {model.cfg.vocab_size}"
        )
    return LoadedModel(model, tok, model.cfg.name, "looped", native.recurrences)


def build_published(
    pub: dict[str, Any],
    found: dict[str, torch.Tensor],
    family: Family,
    source: str,
    overrides: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    path: Path | None = None,
) -> LoopedLM:
    """A LoopedLM from a published config (dict) and its tensors by published name (a dict, consumed: each tensor
    is popped once used, so a 3.5B checkpoint is not held twice).

    Checks, in order: config keys the family needs (clear error naming the key), then every published tensor by
    name and shape (one error listing all missing/unexpected/mis-shaped tensors), then the values of tensors the
    modelling file carries but LoopedLM derives (e.g. Huginn's `freqs_cis`). `overrides` change the LoopedConfig
    after translation (see `BYPASS_INJECTION`). `path` is what the family's translator may read besides the
    config (tensor names); None for an in-memory checkpoint, whose names are `found`'s keys.
    """
    native = family.translate(pub, path if path is not None else InMemory(source, found))
    cfg = apply_overrides(native, overrides)
    links = family.links(cfg)
    if cfg.injection != native.injection and native.injection == "concat":
        links += [Link(p, (), s) for p, s in adapter_links(native)]  # bypassed adapter: check name + shape only
    accepted = set(family.extras(native, found, source))
    check_state_dict(expected_published(links), {k: v for k, v in found.items() if k not in accepted}, source)
    model = build_model(cfg, to_looped(links, found, cfg, dtype, consume=True), dtype)
    found.clear()
    return model


@dataclass(frozen=True)
class InMemory:
    """Stands in for a checkpoint directory when a translator asks for the tensor names of an in-memory one."""

    name: str
    tensors: Mapping[str, torch.Tensor]

    def __str__(self) -> str:
        return self.name


def adapter_links(cfg: LoopedConfig) -> list[tuple[str, tuple[int, ...]]]:
    """The Raven-format adapter (`transformer.adapter.weight`, (D, 2D)) — shared by Huginn and retrofit."""
    return [("transformer.adapter.weight", (cfg.d_model, 2 * cfg.d_model))]


def tied_copy_extra(cfg: LoopedConfig, found: Mapping[str, torch.Tensor], source: str,
                    head: str, embed: str) -> list[str]:
    """Accept a stored copy of a tied head (`head`) only if it equals the embedding (`embed`)."""
    if not cfg.tie_embeddings or head not in found or embed not in found:
        return []
    if found[head].shape != found[embed].shape or not torch.equal(found[head], found[embed]):
        raise CheckpointError(
            f"{source}: config ties the embeddings but {head} differs from {embed}; "
            "set tie_embeddings/tie_word_embeddings to false in config.json if the head is separate"
        )
    return [head]
