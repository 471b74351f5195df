"""Named model presets for training from scratch: the paper's §6.3 configurations, scaled down for a CPU.

Blayney et al. (2026) §6.3 (App. B) train (2, k⊗4, 2) for k ∈ {4, 8, 12} with d = 512 (4 heads × 128),
constant 4 recurrences, pre-norm, no injection, against a depth-12 feedforward control. Ours keep the
depths, recurrences, norm and head count and shrink the width to d = 128 (4 heads × 32, SwiGLU 344 ≈ 8/3·d),
which trains at ~1.2 s per 16×256-token step for looped-4 on 2 CPU cores.

Names: a base, then optional modifiers joined with "+":

    looped-4 | looped-8 | looped-12   (2, k⊗4, 2), pre-norm, no injection, state_init = prelude output
    feedforward-12                    (0, 12⊗1, 0): depth 12, one pass (same class, recurrences = 1)
    micro                             (1, 2⊗2, 1), d = 32: for tests only
    micro-feedforward                 (0, 4⊗1, 0), d = 32: the control of `reproduce --quick` and tests
    +inject     concat injection W_I[s; e] each recurrence (the paper's Figs. 57–59 variant)
    +noprelude  (0, k⊗4, 0): prelude and coda removed (Figs. 60–62)
    +sandwich   Huginn sandwich norm instead of pre-norm
"""

from __future__ import annotations

from loopscope.errors import InputError
from loopscope.models.config import LoopedConfig

WIDTH = dict(d_model=128, n_heads=4, d_mlp=344)  # d = 128 (4 × 32); see the module docstring
CONTEXT = 512  # max_seq_len of the config; training uses 256 (positions beyond it are untrained)

BASES: dict[str, dict] = {
    **{
        f"looped-{k}": dict(n_prelude=2, n_block=k, n_coda=2, recurrences=4, **WIDTH)
        for k in (4, 8, 12)
    },
    "feedforward-12": dict(n_prelude=0, n_block=12, n_coda=0, recurrences=1, **WIDTH),
    "micro": dict(n_prelude=1, n_block=2, n_coda=1, recurrences=2, d_model=32, n_heads=2, d_mlp=64),
    "micro-feedforward": dict(n_prelude=0, n_block=4, n_coda=0, recurrences=1, d_model=32, n_heads=2, d_mlp=64),
}
MODIFIERS = {
    "inject": dict(injection="concat"),
    "noprelude": dict(n_prelude=0, n_coda=0),
    "sandwich": dict(norm="sandwich"),
}


def preset_names() -> list[str]:
    """The base names; any of them may carry modifiers (`+inject`, `+noprelude`, `+sandwich`)."""
    return list(BASES)


def preset_config(name: str, seed: int = 0) -> LoopedConfig:
    """The LoopedConfig of a preset name like `looped-4+inject+sandwich`, with weights seed `seed`."""
    base, *mods = name.split("+")
    if base not in BASES:
        raise InputError(f"model preset {base!r} is unknown; choose one of {sorted(BASES)} (modifiers: "
                         f"{', '.join('+' + m for m in MODIFIERS)})")
    fields = dict(norm="pre", injection="none", state_init="embedding", vocab_size=1024, max_seq_len=CONTEXT)
    fields.update(BASES[base])
    for mod in mods:
        if mod not in MODIFIERS:
            raise InputError(f"preset modifier +{mod} is unknown; choose from {['+' + m for m in MODIFIERS]}")
        if mod == "noprelude" and base.startswith(("feedforward", "micro-feedforward")):
            raise InputError(f"{base} already has no prelude/coda; drop +noprelude")
        fields.update(MODIFIERS[mod])
    return LoopedConfig(name=name, seed=seed, extra={"preset": name}, **fields)
