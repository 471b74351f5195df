"""`LoopedConfig`: every architectural knob of a looped transformer `(p, k⊗l, c)`, saved as JSON.

Notation follows Blayney et al. (2026) §1.1: p prelude layers, a block ("core") of k layers run l times,
c coda layers. A feedforward model is the same config with `recurrences=1`; there is no second code path.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from loopscope.errors import CheckpointError

NormKind = Literal["pre", "sandwich", "ouro"]
InjectionKind = Literal["none", "add", "concat"]
StateInitKind = Literal["embedding", "zeros", "random"]

NORM_KINDS = ("pre", "sandwich", "ouro")
INJECTION_KINDS = ("none", "add", "concat")
STATE_INIT_KINDS = ("embedding", "zeros", "random")


@dataclass
class LoopedConfig:
    """Architecture of a looped decoder-only transformer. Defaults give a tiny CPU-sized model."""

    vocab_size: int = 1024  # tokenizer size; the bundled GSM BPE tokenizer has 1024
    d_model: int = 64  # residual width D; small so that 128 recurrences run in seconds on a CPU
    n_heads: int = 4  # query heads H
    n_kv_heads: int | None = None  # key/value heads (GQA); None = n_heads (plain multi-head)
    head_dim: int | None = None  # per-head width d; None = d_model // n_heads
    d_mlp: int = 172  # SwiGLU hidden width; ≈ 8/3·D as in Llama
    max_seq_len: int = 512  # longest sequence (context) the model accepts; RoPE needs no table
    rope_base: float = 10000.0  # RoPE θ
    rope_interleaved: bool = False  # False: Llama "rotate half" pairs (i, i+d/2); True: pairs (2i, 2i+1)
    rope_scaling: dict[str, Any] | None = None  # Llama-3 style {"rope_type": "llama3", ...} or None
    rope_fp32: bool = False  # compute RoPE inverse frequencies in float32, as transformers' Llama/Ouro and Huginn
    #                          do (bit-faithful to published checkpoints); False: float64, then rounded
    n_prelude: int = 2  # p: layers run once before the block
    n_block: int = 4  # k: layers in the looped block
    n_coda: int = 2  # c: layers run once after the block
    recurrences: int = 4  # l at train time; any R can be asked for per call (`forward(recurrences=R)`)
    norm: NormKind = "pre"  # "pre" (n1,n3 before sublayers), "sandwich" (Huginn: norm after each add,
    #                          on the stream), "ouro" (norms on sublayer outputs + stream norm per recurrence)
    injection: InjectionKind = "none"  # how the prelude output e re-enters each recurrence: none, s+e, W[s;e]
    state_init: StateInitKind = "embedding"  # s_0: prelude output, zeros, or seeded truncated normal
    state_init_std: float = 1.0  # std of the random s_0 (Huginn: sqrt(2/5h)·sqrt(h))
    norm_eps: float = 1e-6  # RMSNorm ε
    embed_scale: float = 1.0  # multiplies token embeddings (Huginn: sqrt(D))
    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2-style)
    qk_bias: bool = False  # Huginn's extra learned bias added to q and k per head
    tie_embeddings: bool = True  # lm_head shares the embedding matrix
    final_norm: bool = True  # RMSNorm before lm_head (Ouro: False, its per-recurrence norm is the last)
    coda_input_norm: bool = False  # apply the final norm to the block output before the coda (Huginn)
    exit_gate: bool = False  # Ouro's learned exit gate Linear(D→1) read after every recurrence
    init_std: float = 0.02  # weight init std for a model built from scratch
    seed: int = 0  # weights seed for a model built from scratch; also the default random-state seed
    name: str = "looped"  # free-form label used in reports
    extra: dict[str, Any] = field(default_factory=dict)  # provenance (family, source keys); not architecture

    def __post_init__(self) -> None:
        self.validate()

    # --- derived sizes -------------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def n_layers(self) -> int:
        """Distinct (weight-carrying) layers: p + k + c."""
        return self.n_prelude + self.n_block + self.n_coda

    def realized_depth(self, recurrences: int | None = None) -> int:
        """Layers actually run: p + R·k + c."""
        r = self.recurrences if recurrences is None else recurrences
        return self.n_prelude + r * self.n_block + self.n_coda

    @property
    def signature(self) -> str:
        """The paper's notation, e.g. `(2, 4⊗4, 2)_I` (subscript I = input injection)."""
        sub = "_I" if self.injection != "none" else ""
        return f"({self.n_prelude}, {self.n_block}⊗{self.recurrences}, {self.n_coda}){sub}"

    # --- checks --------------------------------------------------------------------------------------
    def validate(self) -> None:
        def bad(msg: str) -> CheckpointError:
            return CheckpointError(f"invalid LoopedConfig: {msg}")

        if self.norm not in NORM_KINDS:
            raise bad(f"norm={self.norm!r}; choose one of {NORM_KINDS}")
        if self.injection not in INJECTION_KINDS:
            raise bad(f"injection={self.injection!r}; choose one of {INJECTION_KINDS}")
        if self.state_init not in STATE_INIT_KINDS:
            raise bad(f"state_init={self.state_init!r}; choose one of {STATE_INIT_KINDS}")
        for name in ("vocab_size", "d_model", "n_heads", "d_mlp", "max_seq_len", "n_block", "recurrences"):
            if int(getattr(self, name)) < 1:
                raise bad(f"{name}={getattr(self, name)} must be ≥ 1")
        for name in ("n_prelude", "n_coda"):
            if int(getattr(self, name)) < 0:
                raise bad(f"{name}={getattr(self, name)} must be ≥ 0")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise bad(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; set head_dim")
        if self.n_heads % self.kv_heads:
            raise bad(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.kv_heads}")
        if self.qk_bias and self.kv_heads != self.n_heads:
            raise bad("qk_bias (Huginn) needs plain multi-head attention: set n_kv_heads to n_heads or None")
        if self.injection == "none" and self.state_init != "embedding":
            raise bad(
                f"state_init={self.state_init!r} with injection='none' means the block never sees the input; "
                "use state_init='embedding' or an injection ('add' or 'concat')"
            )
        if self.head_size % 2:
            raise bad(f"head size {self.head_size} must be even for RoPE")

    # --- JSON ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": "loopscope", **dataclasses.asdict(self)}

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoopedConfig:
        data = {k: v for k, v in data.items() if k != "format"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointError(
                f"config has unknown keys {unknown}; it was written by another tool or version. "
                f"Known keys: {sorted(known)}"
            )
        for key, value in data.items():
            check_type(key, value, FIELD_TYPES.get(key))
        return cls(**data)

    @classmethod
    def from_json(cls, path: str | Path) -> LoopedConfig:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path} is not valid JSON ({exc}); re-save the config") from exc
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> LoopedConfig:
        return dataclasses.replace(self, **changes)


def _field_types() -> dict[str, tuple[type, ...]]:
    """JSON types each LoopedConfig field accepts (None where the annotation allows it)."""
    import types
    import typing

    allowed = {}
    for name, hint in typing.get_type_hints(LoopedConfig).items():
        args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        args = tuple(typing.get_origin(a) or a for a in args)  # dict[str, Any] → dict
        if not all(a in (int, float, bool, str, type(None), dict, list, tuple) for a in args):
            continue  # an annotation this check does not know: leave it to validate()
        kinds = tuple(list if a is tuple else a for a in args)  # JSON has lists
        if float in kinds:
            kinds = (*kinds, int)  # 1 is a fine float
        if kinds:
            allowed[name] = kinds
    return allowed


def check_type(key: str, value: Any, kinds: tuple[type, ...] | None) -> None:
    """A config value of the wrong JSON type (e.g. "n_block": "four") is named with what it must be."""
    if kinds is None:
        return
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "an object",
                 list: "a list", type(None): "null"}
        want = " or ".join(dict.fromkeys(names[k] for k in kinds if not (k is int and float in kinds)))
        raise CheckpointError(f"config key {key!r} is {value!r} ({type(value).__name__}); it must be {want}. "
                              "Fix the value in config.json")


FIELD_TYPES: dict[str, tuple[type, ...] | None] = _field_types()
