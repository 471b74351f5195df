"""Run the stability certificate (`loopscope.dynamics.spectrum`) on a LoopedLM: per chosen token, the leading
eigenvalues of J_ii = ∂F(s)_i/∂s_i at the state after R recurrences, from vector-Jacobian products of one
recurrence of the block (`LoopedLM.block_map`), never forming the D × D matrix."""

from __future__ import annotations

import time

import pandas as pd
import torch

from loopscope.dynamics.spectrum import CertificateThresholds, arnoldi, predict
from loopscope.errors import InputError
from loopscope.models.looped import LoopedLM


@torch.no_grad()
def long_run_state(model: LoopedLM, ids: torch.Tensor, recurrences: int, state_seed: int | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(e, s_R): the injected prelude output and the state after R recurrences, (1, T, D) each."""
    e = model.prelude_output(ids)
    seed = model.cfg.seed if state_seed is None else state_seed
    s = model.initial_state(e, 0, seed)
    for t in range(recurrences):
        s = model.block_map(s, e, t)
    return e, s


def float64_copy(model: LoopedLM) -> LoopedLM:
    """A float64 copy of a model (states and products exact enough to read ρ to ~1e-12)."""
    import copy

    work = copy.deepcopy(model).double().requires_grad_(False)  # no graph through the weights: J·v only
    work.stream_dtype = torch.float64
    return work


def token_certificates(model: LoopedLM, ids: torch.Tensor, recurrences: int, tokens: list[int], steps: int = 24,
                       float64: bool = True, state_seed: int | None = None,
                       th: CertificateThresholds = CertificateThresholds()) -> pd.DataFrame:
    """Certificates of the given token positions of one prompt ids (1, T). Columns: token, rho, lambda_real,
    lambda_imag, angle, predicted_period, second_modulus, residual (‖F(s*)_i − s*_i‖ / ‖s*_i‖), predicted,
    rho_prefix, predicted_own, seconds_per_token.

    Two spectra per token. `rho_own`/`predicted_own`: J_ii, the token's own block. `rho`/`predicted`: the Jacobian
    of the whole causal prefix 0..i (block lower-triangular, so its spectrum is the union of J_jj for j ≤ i): token
    i's state is driven by every earlier token's, so its steps decay at the slowest rate of its prefix — that is
    the rate the trajectory shows, and the behaviour it predicts. `float64` runs the products on a float64 copy of the model (pass a copy from
    `float64_copy` and float64=False to reuse one across prompts)."""
    if not isinstance(model, LoopedLM):
        raise InputError(f"the certificate needs a LoopedLM; got {type(model).__name__}")
    if not tokens:
        raise InputError("no tokens to certify")
    if max(tokens) >= ids.shape[1] or min(tokens) < 0:
        raise InputError(f"token positions {tokens} are outside the prompt's {ids.shape[1]} tokens")
    start = time.perf_counter()
    work = float64_copy(model) if float64 else model
    device = next(work.parameters()).device
    e, s = long_run_state(work, ids.to(device), recurrences, state_seed)
    T = max(tokens) + 1  # causal: tokens after the last one asked about do not matter
    e, s = e[:, :T], s[:, :T]
    n, D = len(tokens), s.shape[-1]
    rows = torch.arange(n, device=device)
    pos = torch.tensor(tokens, device=device)
    E, S = e.expand(n, T, D).contiguous(), s.expand(n, T, D).contiguous()

    def F(states: torch.Tensor) -> torch.Tensor:
        return work.block_map(states, E, recurrences)

    with torch.enable_grad():
        out, vjp_fn = torch.func.vjp(F, S)

        def matvec(u: torch.Tensor) -> torch.Tensor:  # J_iiᵀ u for every chosen token at once
            cot = torch.zeros_like(out)
            cot[rows, pos] = u.to(cot.dtype)
            (grad,) = vjp_fn(cot)
            return grad[rows, pos].detach()  # else each product keeps the graph of all the earlier ones

        ritz = arnoldi(matvec, n, D, steps, dtype=S.dtype, device=device)
        keep = (torch.arange(T, device=device)[None, :] <= pos[:, None]).to(S.dtype)[..., None]  # [n, T, 1]

        def prefix_matvec(u: torch.Tensor) -> torch.Tensor:  # the prefix 0..i's Jacobianᵀ, one operator per token
            (grad,) = vjp_fn(u.view(n, T, D).to(out.dtype) * keep)
            return (grad * keep).reshape(n, T * D).detach()

        prefix = arnoldi(prefix_matvec, n, T * D, steps, dtype=S.dtype, device=device)
    mine = s[0, pos]
    residual = torch.linalg.vector_norm(out[rows, pos].detach() - mine, dim=-1) / torch.linalg.vector_norm(mine, dim=-1)
    own = predict(ritz, residual, th)
    frame = predict(prefix, residual, th)
    frame.insert(0, "token", tokens)
    frame["rho_own"] = own["rho"].to_numpy()
    frame["predicted_own"] = own["predicted"].to_numpy()
    frame["seconds_per_token"] = (time.perf_counter() - start) / n
    return frame


def spread_tokens(lengths: list[int], total: int) -> list[tuple[int, int]]:
    """`total` (prompt, token) pairs spread evenly over the prompts and, within each, over its real tokens."""
    per = max(1, total // max(len(lengths), 1))
    out = []
    for b, n in enumerate(lengths):
        k = min(per, n)
        out += [(b, int(round(i * (n - 1) / max(k - 1, 1)))) for i in range(k)]
    return out[:total]


def certificates_for_prompts(loaded, prompts: list[str], recurrences: int, total: int = 16, steps: int = 24,
                             max_prompts: int = 4) -> pd.DataFrame:
    """Certificates of `total` tokens spread over the first `max_prompts` prompts (each run on its own, unpadded,
    on one float64 copy of the model). Adds `batch` (the prompt's index) for joining with the behaviour tables."""
    from loopscope.capture.prompts import encode_prompts

    lengths = [len(loaded.tokenizer(p).input_ids) for p in prompts[:max_prompts]]
    chosen = spread_tokens(lengths, total)
    work = float64_copy(loaded.model)
    frames = []
    for b in sorted({b for b, _ in chosen}):
        ids, _, _ = encode_prompts(loaded.tokenizer, [prompts[b]], loaded.max_seq_len)
        tokens = [t for bb, t in chosen if bb == b]
        frame = token_certificates(work, ids, recurrences, tokens, steps, float64=False)
        frame.insert(0, "batch", b)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)
