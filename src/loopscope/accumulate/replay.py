"""Feed a stored `Trajectory` to accumulators as if its model were running: the in-memory path of every metric."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from loopscope.accumulate.core import Accumulator, BatchContext, Finals, Part, run_accumulators
from loopscope.capture.trajectory import Trajectory
from loopscope.errors import InputError
from loopscope.labels import Step
from loopscope.models.looped import LAYER_SITES


def context_from_trajectory(traj: Trajectory, index: int = 0, first_prompt: int = 0) -> BatchContext:
    """A BatchContext for a whole Trajectory; its finals are its own last recurrences and final logits."""
    R = traj.recurrences
    finals = Finals(
        core_last=traj.core[-1],
        core_prev=traj.core[-2] if R >= 2 else None,
        attention_last=traj.core_attention[-1] if traj.core_attention is not None else None,
        prediction=traj.logits.argmax(-1).cpu() if traj.logits is not None else None,
    )
    dtype = traj.metadata.get("state_dtype")
    return BatchContext(
        index=index, first_prompt=first_prompt, mask=traj.mask.cpu().bool(), recurrences=R,
        block_size=traj.block_size, n_prelude=traj.n_prelude, n_coda=traj.n_coda, token_ids=traj.token_ids,
        tokens=traj.tokens, state_dtype=getattr(torch, dtype) if isinstance(dtype, str) else traj.core.dtype,
        finals=finals, extra={"metadata": traj.metadata}, device=traj.core.device,
    )


def replay(traj: Trajectory) -> Iterator[tuple[str, Step, torch.Tensor]]:
    """The Trajectory's tensors as the events a forward would have produced, in realized order."""
    if traj.embed is not None:
        yield "embed", Step("embed", 0, 0), traj.embed
    for i in range(traj.n_prelude):
        yield from layer_events(traj, Step("prelude", 0, i))
    K = traj.block_size
    for t in range(traj.recurrences):
        if traj.injected is not None:
            yield "injected", Step("core", t, 0), traj.injected[t]
        for j in range(K):
            yield from layer_events(traj, Step("core", t, j))
        if traj.exit_gate is not None:
            yield "exit_gate", Step("core", t, K - 1), traj.exit_gate[t]
    for i in range(traj.n_coda):
        yield from layer_events(traj, Step("coda", 0, i))
    if traj.logits is not None:
        yield "logits", Step("coda", 0, traj.n_coda), traj.logits


def layer_events(traj: Trajectory, step: Step) -> Iterator[tuple[str, Step, torch.Tensor]]:
    """One layer's captured sites in the order its forward reaches them (LAYER_SITES)."""
    for site in LAYER_SITES:
        if site == "resid_post" or (site == "pattern" and traj.has_attention) or site in traj.sites:
            try:
                yield site, step, traj.get(site, *step)
            except InputError:  # e.g. attention captured for the block only
                continue


def run_on_trajectory(accumulators: Accumulator | list[Accumulator], traj: Trajectory):
    """Replay `traj` as one batch through the accumulator(s) and combine: the table(s) of the in-memory API."""
    single = isinstance(accumulators, Accumulator)
    accs = [accumulators] if single else list(accumulators)
    parts: dict[str, Part] = run_accumulators(accs, context_from_trajectory(traj), replay(traj))
    tables = {acc.name: acc.combine([parts[acc.name]]) for acc in accs}
    return tables[accs[0].name] if single else tables
