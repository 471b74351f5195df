"""Intervention specs from short strings, as the `loopscope intervene` options write them.

    site        SEGMENT:LAYER           core:2, prelude:0, coda:1   (a HF feedforward model: core:LAYER only)
    swap        SEGMENT:LAYER,LAYER+1   core:1,2                    (adjacent layers only, Lad et al. 2024)
    recurrences T[,T...] | all | none   0,1                         (0-based; zeroing only; default all;
                                                                     none = zero nowhere, a control run)

Every malformed string raises InputError naming the bad text and the form it should take.
"""

from __future__ import annotations

from collections.abc import Sequence

from loopscope.errors import InputError
from loopscope.interventions.specs import LAYER_SEGMENTS, DeleteLayer, Intervention, SwapLayers, ZeroSublayer

SITE_FORM = "SEGMENT:LAYER, e.g. core:2 (segments: prelude, core, coda; layers count from 0)"


def _index(text: str, what: str, option: str) -> int:
    text = text.strip()
    if not text.isdigit():
        raise InputError(f"{option} {what!r}: {text!r} is not a layer index ≥ 0; write {SITE_FORM}")
    return int(text)


def parse_site(text: str, option: str = "--zero-mlp") -> tuple[str, int]:
    """'core:2' → ('core', 2)."""
    segment, sep, layer = text.partition(":")
    segment = segment.strip().lower()
    if not sep or not layer.strip():
        raise InputError(f"{option} {text!r}: expected {SITE_FORM}")
    if segment not in LAYER_SEGMENTS:
        raise InputError(f"{option} {text!r}: segment {segment!r} unknown; use one of {', '.join(LAYER_SEGMENTS)}")
    return segment, _index(layer, text, option)


def parse_swap(text: str) -> SwapLayers:
    """'core:1,2' → SwapLayers('core', 1): layers 1 and 2 of the block run as 2, 1."""
    segment, sep, pair = text.partition(":")
    parts = pair.split(",")
    if not sep or len(parts) != 2:
        raise InputError(f"--swap {text!r}: expected SEGMENT:LAYER,LAYER+1, e.g. core:1,2 (two adjacent layers)")
    first, second = sorted(_index(p, text, "--swap") for p in parts)
    if second != first + 1:
        raise InputError(f"--swap {text!r}: layers {first} and {second} are not adjacent; swap neighbours, "
                         f"e.g. {segment}:{first},{first + 1}")
    return SwapLayers(parse_site(f"{segment}:{first}", "--swap")[0], first)


def parse_recurrences(text: str | None) -> tuple[int, ...] | None:
    """'0,1' → (0, 1); None or '' or 'all' → None (every recurrence); 'none' → () (nowhere: a control run that
    goes through the whole intervention machinery and must change nothing)."""
    if text is None or text.strip().lower() in ("", "all"):
        return None
    if text.strip().lower() == "none":
        return ()
    values = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit():
            raise InputError(f"--at-recurrences {text!r}: {part!r} is not a recurrence index ≥ 0; write e.g. 0,1 "
                             "(0-based), all or none")
        values.append(int(part))
    return tuple(sorted(set(values)))


def parse_interventions(
    zero_mlp: Sequence[str] = (),
    zero_attn: Sequence[str] = (),
    delete: Sequence[str] = (),
    swap: Sequence[str] = (),
    at_recurrences: str | None = None,
) -> list[Intervention]:
    """The CLI's options → specs, in the order zero-mlp, zero-attn, delete, swap.

    Zeroing hooks stay attached to their module, so zeroing first and then deleting or swapping names layers by
    their original positions; deletes and swaps apply one after another (a delete shifts later positions down).
    `at_recurrences` restricts every zeroing; it is refused without one.
    """
    recurrences = parse_recurrences(at_recurrences)
    if recurrences is not None and not (zero_mlp or zero_attn):
        raise InputError("--at-recurrences restricts zeroing only; add --zero-mlp or --zero-attn (deleting or "
                         "swapping a block layer applies at every recurrence)")
    specs: list[Intervention] = []
    for sublayer, sites in (("mlp", zero_mlp), ("attn", zero_attn)):
        for text in sites:
            segment, layer = parse_site(text, f"--zero-{sublayer}")
            specs.append(ZeroSublayer(segment, layer, sublayer, recurrences))
    specs += [DeleteLayer(*parse_site(text, "--delete")) for text in delete]
    specs += [parse_swap(text) for text in swap]
    return specs
