"""The numerical floor of a run: the relative change below which rounding, not the dynamics, moves a state.

    u(dtype)          unit roundoff: half the spacing of floats just above 1 — float64 2⁻⁵³, float32 2⁻²⁴ ≈ 6.0e-8,
                      float16 2⁻¹¹ ≈ 4.9e-4, bfloat16 2⁻⁸ ≈ 3.9e-3 (Higham, Accuracy and Stability of Numerical
                      Algorithms, §2.1)
    relative floor    f = max(u(weights), u(state)): a block applied to its own fixed point returns it perturbed by
                      the rounding of every sublayer output (relative error ~u of the weights' dtype, the sublayers
                      being of the state's size) and cannot represent a change below u of the state's dtype.
                      ‖X_t − X_{t−1}‖ / ‖X_{t−1}‖ at or below ~f is rounding; 1 − cos at or below ~f²/2 likewise.

The report states f for every run and draws it on the convergence figures. It is an order of magnitude, not a
sharp line: rounding accumulates over the K layers of a block, so the observed floor can sit a few times above f.
"""

from __future__ import annotations

import torch

from loopscope.errors import InputError

UNIT_ROUNDOFF = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8,
                 torch.float16: 2.0 ** -11}


def unit_roundoff(dtype: torch.dtype | str) -> float:
    """u of a floating dtype (a torch dtype or its name, e.g. "bfloat16")."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if dtype not in UNIT_ROUNDOFF:
        raise InputError(f"no unit roundoff known for {dtype}; states must be float64/32/16 or bfloat16")
    return UNIT_ROUNDOFF[dtype]


def relative_floor(weights: torch.dtype | str, state: torch.dtype | str) -> float:
    """f = max(u(weights), u(state)) (see the module doc)."""
    return max(unit_roundoff(weights), unit_roundoff(state))
