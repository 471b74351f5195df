"""Run the stability certificate (`loopscope.dynamics.spectrum`) on a LoopedLM: per chosen token, the leading
eigenvalues of J_ii = ∂F(s)_i/∂s_i at the state after R recurrences, from vector-Jacobian products of one
recurrence of the block (`LoopedLM.block_map`), never forming the D × D matrix."""

from __future__ import annotations

import time

import pandas as pd
import torch

from loopscope.dynamics.spectrum import (
    CertificateThresholds,
    Ritz,
    arnoldi,
    predict,
    prefix_converged,
    prefix_spectra,
    ritz_table,
)
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


# Krylov dimension of each own block's Arnoldi. One product now serves every token, so 48 costs little (0.69 s vs
# 0.49 s for 24 on the default model's 35-token prompt) and converges every block there: own ρ within 4e-11 and
# the prefix ρ within 4e-15 of dense Jacobians, where 24 steps left 13 of 35 blocks unconverged (4e-4).
ARNOLDI_STEPS = 48


def own_spectra(work: LoopedLM, e: torch.Tensor, s: torch.Tensor, recurrences: int,
                steps: int = ARNOLDI_STEPS) -> Ritz:
    """Ritz values of every token's own block J_jj = ∂F(s)_j/∂s_j, j = 0..T−1, at states s (1, T, D) with the
    injected input e (1, T, D): Arnoldi on vector-Jacobian products of one forward of the block over the whole
    prefix in `own_token_jacobians` mode (each token's key and value pass gradients only through its own query), so
    one product gives J_jjᵀ u_j for every token at once."""
    from loopscope.models.looped import own_token_jacobians

    T, D = s.shape[1], s.shape[2]
    with torch.enable_grad(), own_token_jacobians(work):
        out, vjp_fn = torch.func.vjp(lambda states: work.block_map(states, e, recurrences), s)

        def matvec(u: torch.Tensor) -> torch.Tensor:  # J_jjᵀ u_j for every token j at once
            (grad,) = vjp_fn(u.to(out.dtype)[None])
            return grad[0].detach()  # else each product keeps the graph of all the earlier ones

        return arnoldi(matvec, T, D, steps, dtype=s.dtype, device=s.device)


def token_certificates(model: LoopedLM, ids: torch.Tensor, recurrences: int, tokens: list[int],
                       steps: int = ARNOLDI_STEPS,
                       float64: bool = True, state_seed: int | None = None,
                       th: CertificateThresholds = CertificateThresholds(), ritz: list | None = None,
                       ) -> pd.DataFrame:
    """Certificates of the given token positions of one prompt ids (1, T). Columns: token, rho, lambda_real,
    lambda_imag, angle, predicted_period, second_modulus, residual (‖F(s*)_i − s*_i‖ / ‖s*_i‖), ritz_residual,
    converged, predicted, slowest_token, rho_own, ritz_residual_own, converged_own, predicted_own,
    seconds_per_token.

    Two spectra per token. `*_own`: J_ii, the token's own block, by Arnoldi (`own_spectra`). `rho`/`predicted`:
    the Jacobian of the whole causal prefix 0..i, which is block lower-triangular, so its spectrum is exactly the
    union of the J_jj, j ≤ i (`prefix_spectra`): ρ = max_{j ≤ i} ρ(J_jj), held by block `slowest_token`. Token i's
    state is driven by every earlier token's, so its steps decay at the slowest rate of its prefix — that is the
    rate the trajectory shows, and the behaviour it predicts. `converged` (prefix) holds when the leading Ritz
    value of every block j ≤ i converged (an unconverged block may hide a larger |λ|). `ritz`: a list to which
    the per-Ritz-value table (`ritz_table`, every own block j ≤ max(tokens)) is appended. `float64` runs the
    products on a float64 copy of the model (pass a copy from `float64_copy` and float64=False to reuse one
    across prompts)."""
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
    own = own_spectra(work, e, s, recurrences, steps)
    prefix, slowest = prefix_spectra(own)
    with torch.no_grad():
        out = work.block_map(s, e, recurrences)
    pos = torch.tensor(tokens)
    mine, moved = s[0, pos.to(device)], out[0, pos.to(device)]
    residual = torch.linalg.vector_norm(moved - mine, dim=-1) / torch.linalg.vector_norm(mine, dim=-1)
    frame = predict(Ritz(prefix.values[pos], prefix.residual[pos]), residual, th)
    frame["converged"] = prefix_converged(own, th)[pos].numpy()  # every block j ≤ i converged
    frame.insert(0, "token", tokens)
    own_here = predict(Ritz(own.values[pos], own.residual[pos]), residual, th)
    frame["slowest_token"] = slowest[pos].numpy()
    frame["rho_own"] = own_here["rho"].to_numpy()
    frame["ritz_residual_own"] = own_here["ritz_residual"].to_numpy()
    frame["converged_own"] = own_here["converged"].to_numpy()
    frame["predicted_own"] = own_here["predicted"].to_numpy()
    frame["seconds_per_token"] = (time.perf_counter() - start) / len(tokens)
    if ritz is not None:
        ritz.append(ritz_table(own, list(range(T))))
    return frame


def spread_tokens(lengths: list[int], total: int) -> list[tuple[int, int]]:
    """`total` (prompt, token) pairs spread evenly over the prompts and, within each, over its real tokens."""
    per = max(1, total // max(len(lengths), 1))
    out = []
    for b, n in enumerate(lengths):
        k = min(per, n)
        out += [(b, int(round(i * (n - 1) / max(k - 1, 1)))) for i in range(k)]
    return out[:total]


def certificates_for_prompts(loaded, prompts: list[str], recurrences: int, total: int = 16,
                             steps: int = ARNOLDI_STEPS,
                             max_prompts: int = 4, ritz: list | None = None, progress: bool = False) -> pd.DataFrame:
    """Certificates of `total` tokens spread over the first `max_prompts` prompts (each run on its own, unpadded,
    on one float64 copy of the model). Adds `batch` (the prompt's index) for joining with the behaviour tables;
    `ritz`, if given, receives each prompt's per-Ritz-value table (`ritz_table`, with `batch`). `progress`: a bar
    over the prompts (each costs one own-block Arnoldi per token up to its last certified one)."""
    from tqdm.auto import tqdm

    from loopscope.capture.prompts import encode_prompts

    lengths = [len(loaded.tokenizer(p).input_ids) for p in prompts[:max_prompts]]
    chosen = spread_tokens(lengths, total)
    work = float64_copy(loaded.model)
    frames = []
    for b in tqdm(sorted({b for b, _ in chosen}), desc="certificate", unit="prompt", disable=not progress):
        ids, _, _ = encode_prompts(loaded.tokenizer, [prompts[b]], loaded.max_seq_len)
        tokens = [t for bb, t in chosen if bb == b]
        tables: list[pd.DataFrame] = []
        frame = token_certificates(work, ids, recurrences, tokens, steps, float64=False, ritz=tables)
        frame.insert(0, "batch", b)
        if ritz is not None:
            ritz.append(tables[0].assign(batch=b)[["batch", *tables[0].columns]])
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)
