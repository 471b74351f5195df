"""`Trajectory`: every captured state of a looped (or feedforward) model, independent of where it came from.

See the class docstring (`help(Trajectory)`) for every field, its shape and its labels.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from loopscope.errors import InputError

TENSOR_FIELDS = (
    "core", "injected", "prelude", "coda", "embed", "core_attention", "prelude_attention",
    "coda_attention", "exit_gate", "logits", "token_ids", "mask",
)
BATCH_DIM = {"core": 2, "injected": 1, "prelude": 1, "coda": 1, "embed": 0, "core_attention": 2,
             "prelude_attention": 1, "coda_attention": 1, "exit_gate": 1, "logits": 0, "token_ids": 0, "mask": 0}
TIME_DIMS = {"core": [3], "injected": [2], "prelude": [2], "coda": [2], "embed": [1], "core_attention": [4, 5],
             "prelude_attention": [3, 4], "coda_attention": [3, 4], "exit_gate": [2], "logits": [1],
             "token_ids": [1], "mask": [1]}
SITE_BATCH_DIM = {"core": 2, "prelude": 1, "coda": 1}  # extra sites: [R, K, B, T, …] / [P, B, T, …] / [C, B, T, …]
EXTRA_SITES = ("attn_in", "attn_out", "resid_mid", "mlp_post", "mlp_out")  # what `sites` may hold
TRAJECTORY_TENSORS = "trajectory.safetensors"
TRAJECTORY_JSON = "trajectory.json"


@dataclass
class Trajectory:
    """Every captured state of one run of a looped (or feedforward) model, labelled by (segment, recurrence, layer).

    Fields (R recurrences, K block layers, P prelude, C coda layers, B prompts, T tokens, D width, H heads,
    V vocabulary, F MLP width):

        core              [R, K, B, T, D]     X_{j,t}: output of block layer j at recurrence t (site resid_post)
        injected          [R, B, T, D]        block input after injection at recurrence t (z_t)
        prelude           [P, B, T, D]        prelude layer outputs
        coda              [C, B, T, D]        coda layer outputs
        embed             [B, T, D]           scaled token embeddings (depth 0)
        core_attention    [R, K, B, H, T, T]  attention probabilities of block layer j at recurrence t
        prelude_attention [P, B, H, T, T]
        coda_attention    [C, B, H, T, T]
        exit_gate         [R, B, T]           Ouro's exit-gate logit after recurrence t
        logits            [B, T, V]           final next-token logits
        token_ids         [B, T]              int64; padding positions hold the pad id
        tokens            B lists of str      token strings
        mask              [B, T]              bool, True on real tokens (right padding)
        sites             {site: {"core": [R, K, B, T, …], "prelude": [P, B, T, …], "coda": [C, B, T, …]}}
                          other captured sites (`capture(..., sites=…)`): attn_in (the attention's input n1(X),
                          D), attn_out and mlp_out (what each sublayer adds to the stream, D), resid_mid (the
                          stream after attention, D), mlp_post (MLP neuron activations, F)
        metadata          dict                the model config, recurrences, state seed, state dtype, …

    Named access: `traj.get(site, segment, recurrence, layer)` → [B, T, …] for any captured site
    (`resid_post`, `pattern`, `injected`, `embed` or an extra site), e.g. `traj.get("mlp_post", "core", 5, 2)`.

    A state's realized depth is `P + t·K + j + 1` (depth 0 is the embedding), the TransformerLens layer index
    extended with a recurrence axis. Build one directly from tensors — `Trajectory(core=states)` — to analyse states
    from any source; everything in `loopscope.dynamics` and `loopscope.stages` reads only this object (or the same
    events streamed from a running model).
    """

    core: torch.Tensor
    injected: torch.Tensor | None = None
    prelude: torch.Tensor | None = None
    coda: torch.Tensor | None = None
    embed: torch.Tensor | None = None
    core_attention: torch.Tensor | None = None
    prelude_attention: torch.Tensor | None = None
    coda_attention: torch.Tensor | None = None
    exit_gate: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    token_ids: torch.Tensor | None = None
    tokens: list[list[str]] | None = None
    mask: torch.Tensor | None = None
    sites: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.core, torch.Tensor) or self.core.ndim != 5:
            shape = tuple(self.core.shape) if isinstance(self.core, torch.Tensor) else type(self.core).__name__
            raise InputError(f"Trajectory.core must be a tensor [R, K, B, T, D]; got {shape}")
        R, K, B, T, D = self.core.shape
        if R < 1 or K < 1:
            raise InputError("Trajectory.core needs at least one recurrence and one layer; got "
                             f"{tuple(self.core.shape)}")
        if self.mask is None:
            self.mask = torch.ones(B, T, dtype=torch.bool)
        self.mask = self.mask.bool()
        expect = {
            "injected": (R, B, T, D), "embed": (B, T, D), "exit_gate": (R, B, T),
            "token_ids": (B, T), "mask": (B, T),
        }
        for name, shape in expect.items():
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != shape:
                raise InputError(f"Trajectory.{name} has shape {tuple(value.shape)}; expected {shape}")
        for name in ("prelude", "coda"):
            value = getattr(self, name)
            if value is not None and (value.ndim != 4 or tuple(value.shape[1:]) != (B, T, D)):
                raise InputError(f"Trajectory.{name} has shape {tuple(value.shape)}; expected [n, {B}, {T}, {D}]")
        if self.core_attention is not None:
            a = self.core_attention
            if a.ndim != 6 or tuple(a.shape[:3]) != (R, K, B) or tuple(a.shape[-2:]) != (T, T):
                raise InputError(f"Trajectory.core_attention has shape {tuple(a.shape)}; "
                                 f"expected [{R}, {K}, {B}, H, {T}, {T}]")
        for name, states in (("prelude_attention", self.prelude), ("coda_attention", self.coda)):
            a = getattr(self, name)
            n = 0 if states is None else states.shape[0]
            if a is not None and (a.ndim != 5 or a.shape[0] != n or a.shape[1] != B or tuple(a.shape[-2:]) != (T, T)):
                raise InputError(f"Trajectory.{name} has shape {tuple(a.shape)}; expected [{n}, {B}, H, {T}, {T}]")
        if self.tokens is not None and len(self.tokens) != B:
            raise InputError(f"Trajectory.tokens has {len(self.tokens)} rows for {B} prompts")
        counts = {"core": (R, K), "prelude": (self.n_prelude,), "coda": (self.n_coda,)}
        for site, parts in self.sites.items():
            if site not in EXTRA_SITES:
                raise InputError(f"Trajectory.sites has {site!r}; extra sites are {EXTRA_SITES}")
            for segment, value in parts.items():
                if segment not in counts:
                    raise InputError(f"Trajectory.sites[{site!r}] has segment {segment!r}; use core, prelude, coda")
                lead = counts[segment]
                if tuple(value.shape[: len(lead) + 2]) != (*lead, B, T):
                    raise InputError(f"Trajectory.sites[{site!r}][{segment!r}] has shape {tuple(value.shape)}; "
                                     f"expected [{', '.join(map(str, (*lead, B, T)))}, …]")

    # --- sizes ---------------------------------------------------------------------------------------
    @property
    def recurrences(self) -> int:
        return self.core.shape[0]

    @property
    def block_size(self) -> int:
        return self.core.shape[1]

    @property
    def batch_size(self) -> int:
        return self.core.shape[2]

    @property
    def seq_len(self) -> int:
        return self.core.shape[3]

    @property
    def d_model(self) -> int:
        return self.core.shape[4]

    @property
    def n_prelude(self) -> int:
        return 0 if self.prelude is None else self.prelude.shape[0]

    @property
    def n_coda(self) -> int:
        return 0 if self.coda is None else self.coda.shape[0]

    @property
    def has_attention(self) -> bool:
        return self.core_attention is not None

    # --- realized depth ------------------------------------------------------------------------------
    def depth(self, segment: str, recurrence: int = 0, layer: int = 0) -> int:
        """Realized depth of a state: embed 0, prelude i → i+1, core (t, j) → P + t·K + j + 1, coda after."""
        P, K = self.n_prelude, self.block_size
        if segment == "embed":
            return 0
        if segment == "prelude":
            return layer + 1
        if segment == "core":
            return P + recurrence * K + layer + 1
        if segment == "coda":
            return P + self.recurrences * K + layer + 1
        raise InputError(f"unknown segment {segment!r}; use embed, prelude, core or coda")

    def realized_index(self, include_embed: bool = False) -> pd.DataFrame:
        """One row per state in realized order: segment, recurrence, layer, depth, relative_depth (0..1)."""
        rows = []
        if include_embed and self.embed is not None:
            rows.append(("embed", 0, 0))
        rows += [("prelude", 0, i) for i in range(self.n_prelude)]
        rows += [("core", t, j) for t in range(self.recurrences) for j in range(self.block_size)]
        rows += [("coda", 0, i) for i in range(self.n_coda)]
        df = pd.DataFrame(rows, columns=["segment", "recurrence", "layer"])
        df["depth"] = [self.depth(*r) for r in rows]
        last = self.n_prelude + self.recurrences * self.block_size + self.n_coda
        df["relative_depth"] = df["depth"] / max(last, 1)
        return df

    def realized_states(self, include_embed: bool = False) -> torch.Tensor:
        """States stacked in realized order, [N, B, T, D], rows matching `realized_index`."""
        parts = []
        if include_embed and self.embed is not None:
            parts.append(self.embed[None])
        if self.prelude is not None:
            parts.append(self.prelude)
        parts.append(self.core.reshape(-1, *self.core.shape[2:]))
        if self.coda is not None:
            parts.append(self.coda)
        return torch.cat(parts, dim=0)

    def realized_attention(self) -> torch.Tensor:
        """Attention in realized order, [N, B, H, T, T] (prelude, every recurrence's block, coda)."""
        if self.core_attention is None:
            raise InputError("this Trajectory has no attention; capture with attention=True")
        parts = [a for a in (self.prelude_attention,) if a is not None]
        parts.append(self.core_attention.reshape(-1, *self.core_attention.shape[2:]))
        parts += [a for a in (self.coda_attention,) if a is not None]
        return torch.cat(parts, dim=0)

    def get(self, site: str, segment: str, recurrence: int = 0, layer: int = 0) -> torch.Tensor:
        """The tensor [B, T, …] of `site` at (segment, recurrence, layer): `resid_post` (the layer's output; segment
        "embed" gives the embedding), `pattern` ([B, H, T, T]), `injected` (core only) or an extra site."""
        if site == "resid_post":
            if segment == "embed":
                value = self.embed
            elif segment == "core":
                value = self.core[recurrence, layer]
            else:
                value = (self.prelude if segment == "prelude" else self.coda)
                value = None if value is None else value[layer]
        elif site == "pattern":
            attn = {"core": self.core_attention, "prelude": self.prelude_attention, "coda": self.coda_attention}
            value = attn.get(segment)
            value = None if value is None else (value[recurrence, layer] if segment == "core" else value[layer])
        elif site == "injected":
            value = None if self.injected is None or segment != "core" else self.injected[recurrence]
        elif site in self.sites and segment in self.sites[site]:
            part = self.sites[site][segment]
            value = part[recurrence, layer] if segment == "core" else part[layer]
        else:
            value = None
        if value is None:
            have = ["resid_post", *(["pattern"] if self.has_attention else []),
                    *(["injected"] if self.injected is not None else []), *self.sites]
            raise InputError(f"no {site} at ({segment}, {recurrence}, {layer}) in this Trajectory; it holds {have} "
                             "(capture other sites with capture(..., sites=[...]))")
        return value

    def token_strings(self, b: int) -> list[str]:
        """Token strings of prompt b (real tokens only); ids or positions if no strings were stored."""
        n = int(self.mask[b].sum())
        if self.tokens is not None:
            return list(self.tokens[b][:n])
        if self.token_ids is not None:
            return [str(int(i)) for i in self.token_ids[b, :n]]
        return [f"pos{i}" for i in range(n)]

    # --- transforms ----------------------------------------------------------------------------------
    def to(self, dtype: torch.dtype) -> Trajectory:
        """Float tensors cast to `dtype` (ids and mask untouched)."""
        changes = {}
        for name in TENSOR_FIELDS:
            value = getattr(self, name)
            if value is not None and value.is_floating_point():
                changes[name] = value.to(dtype)
        changes["sites"] = {s: {g: v.to(dtype) for g, v in p.items()} for s, p in self.sites.items()}
        return dataclasses.replace(self, **changes)

    def select(self, batch: list[int] | slice) -> Trajectory:
        """The sub-trajectory of the given prompts."""
        idx = list(range(self.batch_size))[batch] if isinstance(batch, slice) else list(batch)
        ix = torch.tensor(idx, dtype=torch.long)
        changes = {n: getattr(self, n).index_select(d, ix) for n, d in BATCH_DIM.items()
                   if getattr(self, n) is not None}
        if self.tokens is not None:
            changes["tokens"] = [self.tokens[i] for i in idx]
        changes["sites"] = {s: {g: v.index_select(SITE_BATCH_DIM[g], ix) for g, v in p.items()}
                            for s, p in self.sites.items()}
        return dataclasses.replace(self, **changes)

    @staticmethod
    def concat(parts: list[Trajectory]) -> Trajectory:
        """Join trajectories of the same model along the prompt axis, right-padding tokens to the longest."""
        if not parts:
            raise InputError("nothing to concatenate")
        T = max(p.seq_len for p in parts)
        out: dict[str, Any] = {}
        for name, dims in TIME_DIMS.items():
            values = [getattr(p, name) for p in parts]
            if any(v is None for v in values):
                if not all(v is None for v in values):
                    raise InputError(f"cannot concatenate: some trajectories lack {name}")
                continue
            padded = [pad_to(v, dims, T) for v in values]
            out[name] = torch.cat(padded, dim=BATCH_DIM[name])
        tokens = None
        if all(p.tokens is not None for p in parts):
            tokens = [row for p in parts for row in p.tokens]
        sites = {}
        for site in parts[0].sites:
            sites[site] = {}
            for g, dim in SITE_BATCH_DIM.items():
                if g in parts[0].sites[site]:
                    sites[site][g] = torch.cat([pad_to(p.sites[site][g], [dim + 1], T) for p in parts], dim=dim)
        return Trajectory(**out, tokens=tokens, sites=sites, metadata=dict(parts[0].metadata))

    # --- persistence ---------------------------------------------------------------------------------
    def save(self, directory: str | Path, dtype: torch.dtype = torch.float32) -> Path:
        """Write `trajectory.safetensors` (float tensors in `dtype`: fp32 or fp16) and `trajectory.json`."""
        tensors, info = self._serialised(dtype)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(directory / TRAJECTORY_TENSORS))
        (directory / TRAJECTORY_JSON).write_text(json.dumps(info, indent=1, default=str))
        return directory

    def to_bytes(self, dtype: torch.dtype = torch.float32) -> bytes:
        """The trajectory as one safetensors blob (the JSON part in its metadata): what a resume cache stores."""
        from safetensors.torch import save

        tensors, info = self._serialised(dtype)
        return save(tensors, metadata={"trajectory": json.dumps(info, default=str)})

    @classmethod
    def from_bytes(cls, data: bytes, dtype: torch.dtype | None = torch.float32) -> Trajectory:
        """The inverse of `to_bytes`; float tensors cast to `dtype` (None keeps the stored dtype)."""
        from safetensors.torch import load

        from loopscope.models.checkpoint import safetensors_header_bytes

        header = safetensors_header_bytes(data) or {}
        info = json.loads(header.get("__metadata__", {}).get("trajectory", "{}"))
        return cls._deserialised(load(data), info, dtype)

    def _serialised(self, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict]:
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise InputError(f"save dtype {dtype} unsupported; use torch.float32 or torch.float16")
        cast = self.to(dtype)
        tensors = {n: getattr(cast, n).cpu().contiguous() for n in TENSOR_FIELDS if getattr(cast, n) is not None}
        tensors.update({f"sites.{s}.{g}": v.cpu().contiguous() for s, p in cast.sites.items() for g, v in p.items()})
        info = {"tokens": self.tokens, "metadata": self.metadata, "dtype": str(dtype).removeprefix("torch.")}
        return tensors, info

    @classmethod
    def _deserialised(cls, tensors: dict[str, torch.Tensor], info: dict, dtype: torch.dtype | None) -> Trajectory:
        sites: dict[str, dict[str, torch.Tensor]] = {}
        for key in [k for k in tensors if k.startswith("sites.")]:
            _, site, segment = key.split(".")
            sites.setdefault(site, {})[segment] = tensors.pop(key)
        traj = cls(**tensors, tokens=info.get("tokens"), sites=sites, metadata=info.get("metadata", {}))
        return traj.to(dtype) if dtype is not None else traj

    @classmethod
    def load(cls, directory: str | Path, dtype: torch.dtype | None = torch.float32) -> Trajectory:
        """Read a saved trajectory; float tensors are cast to `dtype` (None keeps the stored dtype)."""
        directory = Path(directory)
        tensor_file, json_file = directory / TRAJECTORY_TENSORS, directory / TRAJECTORY_JSON
        if not tensor_file.exists() or not json_file.exists():
            raise InputError(f"{directory} is not a saved Trajectory (needs {TRAJECTORY_TENSORS} and "
                             f"{TRAJECTORY_JSON})")
        return cls._deserialised(load_file(str(tensor_file)), json.loads(json_file.read_text()), dtype)


def pad_to(x: torch.Tensor, dims: list[int], length: int) -> torch.Tensor:
    """Right-pad `x` with zeros (False for bool) along each dim in `dims` to `length`."""
    for d in dims:
        extra = length - x.shape[d]
        if extra > 0:
            shape = list(x.shape)
            shape[d] = extra
            x = torch.cat([x, torch.zeros(shape, dtype=x.dtype, device=x.device)], dim=d)
    return x
