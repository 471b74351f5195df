"""Intervention specs: what to change, named by (segment, layer[, sublayer, recurrences]).

Layers are positions in a segment's layer list (the same labels a Trajectory uses: core layer j is the j-th
block layer). Specs apply in the order given; each one sees the model as the previous ones left it (a
DeleteLayer shifts later positions down by one; a ZeroSublayer stays with the module it was attached to).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from loopscope.errors import InputError
from loopscope.models.hooks import SEGMENTS

LAYER_SEGMENTS = tuple(s for s in SEGMENTS if s != "embed")  # prelude, core, coda
SUBLAYERS = ("mlp", "attn")


def _check_site(kind: str, segment: str, layer: int) -> None:
    if segment not in LAYER_SEGMENTS:
        raise InputError(f"{kind}: segment {segment!r} unknown; use one of {LAYER_SEGMENTS}")
    if not isinstance(layer, int) or layer < 0:
        raise InputError(f"{kind}: layer must be an index ≥ 0; got {layer!r}")


@dataclass(frozen=True)
class ZeroSublayer:
    """Replace what the attention or MLP sublayer adds to the stream by zeros.

    recurrences=None: at every recurrence; a list: only at those recurrences t (0-based; [] = nowhere).
    Zeroing both sublayers of a pre-norm layer = deleting it (Lad et al. 2024's `ablate_model_layer`).
    """

    segment: str
    layer: int
    sublayer: Literal["mlp", "attn"]
    recurrences: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        _check_site("ZeroSublayer", self.segment, self.layer)
        if self.sublayer not in SUBLAYERS:
            raise InputError(f"ZeroSublayer: sublayer {self.sublayer!r} unknown; use 'mlp' or 'attn'")
        if self.recurrences is not None:
            rec = tuple(int(t) for t in self.recurrences)
            if any(t < 0 for t in rec):
                raise InputError(f"ZeroSublayer: recurrences {rec} must be ≥ 0")
            object.__setattr__(self, "recurrences", rec)

    def applies_at(self, recurrence: int) -> bool:
        return self.recurrences is None or recurrence in self.recurrences


@dataclass(frozen=True)
class DeleteLayer:
    """Skip a layer (output = input), at every recurrence for a block layer (Lad et al. 2024, layer deletion)."""

    segment: str
    layer: int

    def __post_init__(self) -> None:
        _check_site("DeleteLayer", self.segment, self.layer)


@dataclass(frozen=True)
class SwapLayers:
    """Run layer+1 before layer (Lad et al. 2024, adjacent-layer swap), at every recurrence for the block."""

    segment: str
    layer: int

    def __post_init__(self) -> None:
        _check_site("SwapLayers", self.segment, self.layer)


Intervention = ZeroSublayer | DeleteLayer | SwapLayers


def spec_text(spec: Intervention) -> str:
    """A spec as a person reads it, for errors and report headers: "zero the MLP of core layer 2 at recurrences
    0, 1", "delete core layer 3", "swap core layers 1 and 2"."""
    describe(spec)  # refuses non-specs with a clear message
    if isinstance(spec, ZeroSublayer):
        where = "" if spec.recurrences is None else (
            " at no recurrence" if not spec.recurrences else
            f" at recurrence{'s' if len(spec.recurrences) > 1 else ''} {', '.join(map(str, spec.recurrences))}")
        return f"zero the {spec.sublayer.upper() if spec.sublayer == 'mlp' else 'attention'} of {spec.segment} " \
               f"layer {spec.layer}{where}"
    if isinstance(spec, DeleteLayer):
        return f"delete {spec.segment} layer {spec.layer}"
    return f"swap {spec.segment} layers {spec.layer} and {spec.layer + 1}"


def describe(spec: Intervention) -> dict[str, Any]:
    """A JSON-able record of a spec: {"kind": class name, **fields}."""
    if not isinstance(spec, (ZeroSublayer, DeleteLayer, SwapLayers)):
        raise InputError(f"{spec!r} is not an intervention; use ZeroSublayer, DeleteLayer or SwapLayers")
    d = asdict(spec)
    if d.get("recurrences") is not None:
        d["recurrences"] = list(d["recurrences"])
    return {"kind": type(spec).__name__, **d}
