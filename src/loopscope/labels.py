"""Where a state sits in realized depth: the (segment, recurrence, layer) label every layer of data in loopscope
carries. A plain data type, shared by the model (which passes it to its hook points), the capture (which stores it)
and the analyses (which read it) — so analyses need nothing from `loopscope.models`."""

from __future__ import annotations

from typing import NamedTuple

SEGMENTS = ("embed", "prelude", "core", "coda")


class Step(NamedTuple):
    """Where a state sits in realized depth.

    segment: "embed", "prelude", "core" or "coda"; recurrence: t (0 outside the core);
    layer: index within the segment (j for the core).
    """

    segment: str
    recurrence: int
    layer: int
