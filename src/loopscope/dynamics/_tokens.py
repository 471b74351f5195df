"""Real tokens of a Trajectory (mask True), flattened, and the vector helpers every analysis shares.

Every analysis in `loopscope.dynamics` works on the states of real tokens only (mask True), laid out as
`[..., N, D]` with N = number of real tokens, in (batch, token) order. Large trajectories (R=128, K=12,
N≈4000, D=576 is 14 GB in fp32) are never copied whole: `token_chunks` yields slices of at most
`max_elements` floats (default CHUNK_ELEMENTS), upcast to fp32 (fp64 stays fp64) and moved to the CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from loopscope.capture.trajectory import Trajectory
from loopscope.errors import InputError

CHUNK_ELEMENTS = 2**23  # 32 MB of fp32 per chunk: measured fastest (vs 2^19..2^25) with 1 and 2 threads


@dataclass(frozen=True)
class RealTokens:
    """Positions of the real tokens: `batch[i]`, `token[i]` for i in 0..N-1 (row-major over (batch, token))."""

    batch: torch.Tensor  # [N] int64
    token: torch.Tensor  # [N] int64

    @property
    def count(self) -> int:
        return int(self.batch.numel())


def real_tokens(traj: Trajectory) -> RealTokens:
    """Indices of every real token (mask True); raises InputError if there is none."""
    b, t = traj.mask.cpu().nonzero(as_tuple=True)
    if b.numel() == 0:
        raise InputError("the Trajectory has no real tokens (mask is all False); check the mask you passed")
    return RealTokens(batch=b, token=t)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp64 stays fp64; everything else (fp16, bf16, fp32) is analysed in fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def token_chunks(traj: Trajectory, tokens: RealTokens | None = None, *, recurrences: slice = slice(None),
                 layers: slice = slice(None), max_elements: int | None = None,
                 ) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield `(rows, states)`: states = core[recurrences, layers, batch[rows], token[rows], :] as [R', K', n, D].

    `rows` is a slice into the real-token list, so per-token results can be written into [..., N] arrays.
    A chunk may be a view of the Trajectory's own storage: never modify it in place.
    """
    tokens = real_tokens(traj) if tokens is None else tokens
    core = traj.core[recurrences][:, layers]  # views: only each chunk of tokens is copied
    R, K, B, T, D = core.shape
    try:
        flat = core.view(R, K, B * T, D)  # possible for captured (contiguous) trajectories
    except RuntimeError:
        flat = None  # exotic strides: gather (b, t) pairs per chunk instead of copying everything
    position = tokens.batch * T + tokens.token  # increasing, since tokens are row-major
    n = max(1, (CHUNK_ELEMENTS if max_elements is None else max_elements) // max(1, R * K * D))
    dtype = compute_dtype(core)
    for start in range(0, tokens.count, n):
        rows = slice(start, min(start + n, tokens.count))
        pos = position[rows]
        first, last = int(pos[0]), int(pos[-1])
        if flat is None:
            device = core.device
            chunk = core[:, :, tokens.batch[rows].to(device), tokens.token[rows].to(device)]
        elif last - first + 1 == pos.numel():  # all real: a slice instead of a gather
            chunk = flat[:, :, first:last + 1]
        else:
            chunk = flat.index_select(2, pos.to(flat.device))
        yield rows, chunk.to(device="cpu", dtype=dtype)  # analyses run on the CPU, whatever device holds states


def batch_tokens(x: torch.Tensor, batch: torch.Tensor, token: torch.Tensor,
                 dtype: torch.dtype | None = None) -> torch.Tensor:
    """The real tokens' vectors x[batch[i], token[i]] of one state x [B, T, D] → [N, D], on x's device, in `dtype`
    (default: the analysis dtype `compute_dtype`, float64 stays float64, everything else float32). Distances and
    cosines between successive states use float64: their 1 − cos reaches 1e-14 at a float32 fixed point, far below
    what float32 arithmetic resolves (≈ 6e-8)."""
    dev = x.device
    if batch.device != dev:
        batch, token = batch.to(dev), token.to(dev)
    return x[batch, token].to(dtype or compute_dtype(x))


def resolve_layer(traj: Trajectory, layer: int) -> int:
    """Block-layer index with Python negatives (-1 = last block layer); InputError if out of range."""
    K = traj.block_size
    if not -K <= layer < K:
        raise InputError(f"layer={layer} is out of range for a block of {K} layers; use 0..{K - 1} or -1 for the last")
    return layer % K


def need_recurrences(traj: Trajectory, minimum: int, what: str) -> None:
    if traj.recurrences < minimum:
        raise InputError(
            f"{what} needs at least {minimum} recurrences; this Trajectory has {traj.recurrences}. "
            f"Capture with recurrences ≥ {minimum}"
        )


def token_strings(traj: Trajectory, tokens: RealTokens) -> list[str]:
    """The string of every real token (from traj.tokens, else ids, else `pos{t}`)."""
    per_prompt = {int(b): traj.token_strings(int(b)) for b in tokens.batch.unique()}
    out = []
    for b, t in zip(tokens.batch.tolist(), tokens.token.tolist()):
        row = per_prompt[b]
        out.append(row[t] if t < len(row) else f"pos{t}")
    return out


# --- vector helpers (last axis = D) ------------------------------------------------------------------------
def norm(x: torch.Tensor) -> torch.Tensor:
    """‖x‖₂ over the last axis (non-finite inputs give inf/NaN, never an error)."""
    return torch.linalg.vector_norm(x, dim=-1)


def cosine(a: torch.Tensor, b: torch.Tensor, norm_a: torch.Tensor | None = None,
           norm_b: torch.Tensor | None = None) -> torch.Tensor:
    """cos(a, b) = ⟨a, b⟩ / (‖a‖ ‖b‖) over the last axis; NaN where either vector is zero or non-finite.
    Precomputed norms may be passed to save a pass over the data."""
    norm_a = norm(a) if norm_a is None else norm_a
    norm_b = norm(b) if norm_b is None else norm_b
    dot = (a.unsqueeze(-2) @ b.unsqueeze(-1))[..., 0, 0]  # batched matmul: faster than vecdot on CPU
    c = dot / (norm_a * norm_b)
    return c.clamp(-1.0, 1.0)  # rounding can step just past ±1; clamp keeps NaN as NaN


def cosine_from_distance(norm_a: torch.Tensor, norm_b: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """cos(a, b) from ‖a‖, ‖b‖ and ‖a − b‖ by the polarisation identity ⟨a, b⟩ = (‖a‖² + ‖b‖² − ‖a − b‖²) / 2,
    in fp64. Saves a pass over the data when the distance is needed anyway; rounding error ≈ ε·(‖a‖/‖b‖ +
    ‖b‖/‖a‖), i.e. ≈ 1e-7 for the comparable norms of one layer's successive states. NaN as in `cosine`."""
    na, nb, d = norm_a.double(), norm_b.double(), distance.double()
    return ((na * na + nb * nb - d * d) / (2 * na * nb)).clamp(-1.0, 1.0)
