"""Streaming capture: run a prompt set batch by batch and hand every state to accumulators as it is produced.

    tables = stream_prompts(loaded, prompts, [SuccessiveChange(), Behaviour(), …], StreamSettings(recurrences=128))

Nothing of size R·K·B·T·D (or R·K·B·H·T², for attention) is ever held: each state goes to the accumulators and is
dropped, so peak memory is one batch at one recurrence plus what an accumulator chooses to keep (one layer's last
few states, one chosen token, the first r recurrences of a similarity map). Per batch:

1. if an accumulator `needs_finals`, a first pass of the same forward records the batch's `Finals` (the last two
   recurrences' block states, the last recurrence's attention, the final prediction);
2. the analysis pass runs the forward again under a `StreamRecorder`; the start state is seeded per
   (seed, position), so the pass is deterministic, and its last states are compared with the first pass's
   (`finals_max_abs_diff` in the run record: 0.0 means every distance to X* is exact);
3. each accumulator reduces the batch to a small Part, written to `cache_dir` (atomically) so that an interrupted
   run resumes with nothing lost; parts are folded in batch order, so the tables do not depend on where a run was
   interrupted, on the batch size of the reduction, or on how many processes shared the batches.

Under `torchrun`, rank r runs the batches i with i mod world = r; rank 0 receives every Part over
torch.distributed point-to-point messages (gloo on CPU, nccl on GPU) and combines them; the other ranks return None.
Hugging Face feedforward models (one recurrence) are captured whole per batch and replayed through the same
accumulators.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from loopscope.accumulate.core import Accumulator, BatchContext, Dispatcher, Finals, Part, signature
from loopscope.accumulate.distributed import World, gather_parts
from loopscope.accumulate.memory import release_free_memory
from loopscope.accumulate.parts import decode_part, encode_part
from loopscope.accumulate.replay import context_from_trajectory, replay
from loopscope.capture.prompts import encode_prompts
from loopscope.capture.record import capture
from loopscope.errors import InputError
from loopscope.models.hooks import HookPoint, Step
from loopscope.models.looped import LoopedLM, recurrence_count
from loopscope.resume import load_or_compute
from loopscope.resume import run_key as key_of

# raised when what a Part holds changes, so old parts are not read (2: the table dialect; 3: at_floor, the drift test)
CACHE_VERSION = 3


class StreamRecorder:
    """Context manager: every event of the given `sites` (see `loopscope.accumulate.core`) of a LoopedLM's forwards
    is passed to `callback(site, step, tensor)` as it happens, labelled by the model's own `Step`. Nothing is kept."""

    def __init__(self, model: LoopedLM, sites: set[str], callback) -> None:
        if not isinstance(model, LoopedLM):
            raise InputError(f"StreamRecorder attaches to a LoopedLM; got {type(model).__name__}")
        self.model, self.sites, self.callback = model, set(sites), callback
        self.handles: list[Any] = []

    def points(self) -> list[tuple[str, HookPoint]]:
        return [(site, point) for site in sorted(self.sites - {"logits"}) for point in self.model.site_points(site)]

    def __enter__(self) -> StreamRecorder:
        for site, point in self.points():
            self.handles.append(point.register_forward_hook(self._hook(site), with_kwargs=True))
        if "logits" in self.sites:
            self.handles.append(self.model.register_forward_hook(self._logits))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _hook(self, site: str):
        def fn(module, args, kwargs, output):
            self.callback(site, kwargs["step"], output.detach())
        return fn

    def _logits(self, module, args, output):
        self.callback("logits", Step("coda", 0, self.model.cfg.n_coda), output.detach())


@dataclass
class StreamSettings:
    """How a prompt set is streamed. `attention`: materialise attention probabilities (beside the fused kernel)."""

    recurrences: int
    attention: bool = False
    batch_size: int = 8
    state_seed: int | None = None
    cache_dir: Path | None = None
    progress: bool = True
    label: str = "stream"
    world: World = field(default_factory=World.current)


@torch.no_grad()
def finals_pass(model: LoopedLM, ids: torch.Tensor, R: int, attention: bool, state_seed: int | None,
                initial_state: torch.Tensor | None = None) -> Finals:
    """Run the forward once and keep only what the batch ends with (see `Finals`)."""
    K = model.cfg.n_block
    last: dict[int, torch.Tensor] = {}
    prev: dict[int, torch.Tensor] = {}
    att: dict[int, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}

    def keep(site: str, step: Step, x: torch.Tensor) -> None:
        if site == "logits":
            out["prediction"] = x.argmax(-1).cpu()
        elif step.segment == "core" and step.recurrence == R - 1:
            (att if site == "pattern" else last)[step.layer] = x
        elif site == "resid_post" and step.segment == "core" and step.recurrence == R - 2:
            prev[step.layer] = x

    late: list = []

    def attach_patterns(module, args, kwargs, output):  # at the start of the last recurrence only: before it,
        if kwargs["step"].recurrence == R - 1:              # the probabilities would be computed for nothing
            for layer in model.core:
                late.append(layer.attn.hook_pattern.register_forward_hook(
                    lambda m, a, kw, out: keep("pattern", kw["step"], out.detach()), with_kwargs=True))

    handles = [model.hook_injected.register_forward_hook(attach_patterns, with_kwargs=True)] if attention else []
    try:
        with StreamRecorder(model, {"resid_post", "logits"}, keep):
            model(ids, recurrences=R, state_seed=state_seed, initial_state=initial_state)
    finally:
        for h in handles + late:
            h.remove()
    return Finals(
        core_last=torch.stack([last[j] for j in range(K)]),
        core_prev=torch.stack([prev[j] for j in range(K)]) if R >= 2 else None,
        attention_last=torch.stack([att[j] for j in range(K)]) if attention else None,
        prediction=out.get("prediction"),
    )


@torch.no_grad()
def stream_tensors(model: LoopedLM, input_ids: torch.Tensor, recurrences: int, accumulators: list[Accumulator], *,
                   mask: torch.Tensor | None = None, attention: bool | None = None, state_seed: int | None = None,
                   initial_state: torch.Tensor | None = None) -> dict[str, Any]:
    """One forward of `model` on `input_ids` (B, T) through `accumulators`; returns their combined tables. The
    batch version of `stream_prompts` for callers holding token ids (and, optionally, a given start state)."""
    R = int(recurrences)
    mask = torch.ones(input_ids.shape, dtype=torch.bool) if mask is None else mask.bool().cpu()
    attention = any(a.needs_attention for a in accumulators) if attention is None else attention
    seed = model.cfg.seed if state_seed is None else state_seed
    finals = None
    if any(a.needs_finals for a in accumulators):
        finals = finals_pass(model, input_ids, R, attention, seed, initial_state)
    ctx = BatchContext(index=0, first_prompt=0, mask=mask, recurrences=R, block_size=model.cfg.n_block,
                       n_prelude=model.cfg.n_prelude, n_coda=model.cfg.n_coda, token_ids=input_ids.cpu(),
                       state_dtype=compute_dtype_of(model), finals=finals,
                       device=next(model.parameters()).device)
    dispatch = Dispatcher(accumulators, ctx)
    sites = dispatch.sites if attention else dispatch.sites - {"pattern"}
    with StreamRecorder(model, sites, dispatch.push):
        model(input_ids, recurrences=R, state_seed=seed, initial_state=initial_state)
    parts = dispatch.finish()
    return {a.name: a.combine([parts[a.name]]) for a in accumulators}


@torch.no_grad()
def run_batch(loaded, prompts: list[str], index: int, first_prompt: int, accumulators: list[Accumulator],
              s: StreamSettings) -> tuple[dict[str, Part], dict[str, Any]]:
    """One batch through every accumulator; returns (parts by accumulator name, a record of the batch)."""
    model = loaded.model
    device = next(model.parameters()).device
    ids, mask, tokens = encode_prompts(loaded.tokenizer, prompts, loaded.max_seq_len)
    ids = ids.to(device)
    record: dict[str, Any] = {"index": index, "prompts": len(prompts), "tokens": int(mask.sum())}
    if not isinstance(model, LoopedLM):  # a Hugging Face feedforward model: one recurrence, captured whole
        traj = capture(model, ids, recurrences=1, attention=s.attention, mask=mask, tokens=tokens)
        ctx = context_from_trajectory(traj, index=index, first_prompt=first_prompt)
        dispatch = Dispatcher(accumulators, ctx)
        for site, step, x in replay(traj):
            dispatch.push(site, step, x)
        return dispatch.finish(), record
    R = s.recurrences
    seed = model.cfg.seed if s.state_seed is None else s.state_seed
    needs_finals = any(a.needs_finals for a in accumulators)
    finals = finals_pass(model, ids, R, s.attention, seed) if needs_finals else None
    state_dtype = compute_dtype_of(model)
    ctx = BatchContext(index=index, first_prompt=first_prompt, mask=mask, recurrences=R,
                       block_size=model.cfg.n_block, n_prelude=model.cfg.n_prelude, n_coda=model.cfg.n_coda,
                       token_ids=ids.cpu(), tokens=tokens, state_dtype=state_dtype, finals=finals, device=device)
    dispatch = Dispatcher(accumulators, ctx)
    sites = set(dispatch.sites)
    if not s.attention:
        sites.discard("pattern")
    check: list[torch.Tensor] = []  # per block layer, on the device: read once, after the forward

    def push(site: str, step: Step, x: torch.Tensor) -> None:
        if finals is not None and site == "resid_post" and step.segment == "core" and step.recurrence == R - 1:
            check.append((x.float() - finals.core_last[step.layer].float()).abs().max())
        dispatch.push(site, step, x)

    if finals is not None:
        sites.add("resid_post")
    with StreamRecorder(model, sites, push):
        model(ids, recurrences=R, state_seed=seed)
    record["finals_max_abs_diff"] = float(torch.stack(check).max()) if finals is not None else None
    record["state_dtype"] = str(state_dtype).removeprefix("torch.")
    return dispatch.finish(), record


def compute_dtype_of(model: LoopedLM) -> torch.dtype:
    """The dtype the model's states are computed in (its stream dtype; the weights' otherwise)."""
    return getattr(model, "stream_dtype", None) or next(model.parameters()).dtype


def run_key(loaded, prompts: list[str], accumulators: list[Accumulator], s: StreamSettings) -> str:
    """The key of a stream's cached parts: every setting that changes them, and the weights themselves."""
    model = loaded.model
    cfg = getattr(model, "cfg", None)
    return key_of({
        "cache_version": CACHE_VERSION, "model": loaded.name, "config": loaded.config_dict(),
        "weights": loaded.fingerprint(),
        "dtype": str(next(model.parameters()).dtype), "stream": str(compute_dtype_of(model)) if cfg else "",
        "prompts": prompts, "R": s.recurrences, "attention": s.attention, "batch_size": s.batch_size,
        "seed": s.state_seed, "accumulators": [signature(a) for a in accumulators],
    })


def stream_prompts(loaded, prompts: list[str], accumulators: list[Accumulator], s: StreamSettings
                   ) -> tuple[dict[str, Any], dict[str, Any]] | tuple[None, None]:
    """Stream `prompts` through every accumulator; returns (tables by accumulator name, run record) on rank 0 (and
    in a single process), (None, None) on the other ranks. See the module doc."""
    recurrence_count(s.recurrences)
    if s.batch_size < 1:
        raise InputError(f"batch_size={s.batch_size}: give at least 1")
    if not prompts:
        raise InputError("no prompts given; pass at least one prompt")
    names = [a.name for a in accumulators]
    if len(set(names)) != len(names):
        raise InputError(f"accumulator names must be unique in one stream; got {names}")
    batches = [prompts[i: i + s.batch_size] for i in range(0, len(prompts), s.batch_size)]
    key = run_key(loaded, prompts, accumulators, s)
    folder = None if s.cache_dir is None else Path(s.cache_dir) / f"{s.label}-{key}"
    world = s.world
    mine = [i for i in range(len(batches)) if i % world.size == world.rank]
    local: dict[int, Part] = {}
    records: dict[int, dict] = {}
    start = time.perf_counter()
    bar = tqdm(mine, desc=f"{s.label} R={s.recurrences}", unit="batch", disable=not s.progress or world.rank != 0)
    def compute(i: int) -> Part:
        parts, record = run_batch(loaded, batches[i], i, i * s.batch_size, accumulators, s)
        release_free_memory()
        return {**parts, "__record__": record}

    for i in bar:
        path = None if folder is None else folder / f"batch{i:05d}.part"
        cached = path is not None and path.exists()
        local[i] = load_or_compute(path, lambda: compute(i), encode_part, decode_part)  # atomic: never half a part
        records[i] = {**local[i]["__record__"], "cached": cached}
    decoded = gather_parts(local, len(batches), world)
    if decoded is None:
        return None, None
    decoded = [decoded[i] for i in range(len(batches))]
    tables = {acc.name: acc.combine([d[acc.name] for d in decoded]) for acc in accumulators}
    diffs = [d["__record__"].get("finals_max_abs_diff") for d in decoded]
    diffs = [x for x in diffs if x is not None]
    run = {
        "batches": len(batches), "prompts": len(prompts), "tokens": sum(d["__record__"]["tokens"] for d in decoded),
        "recurrences": s.recurrences, "attention": s.attention, "world_size": world.size,
        "cached_batches_on_rank0": sum(r["cached"] for r in records.values()),
        "finals_max_abs_diff": max(diffs) if diffs else None,
        "state_dtype": decoded[0]["__record__"].get("state_dtype"),
        "seconds_rank0": time.perf_counter() - start,
    }
    return tables, run


__all__ = ["StreamRecorder", "StreamSettings", "finals_pass", "run_batch", "stream_prompts", "stream_tensors"]
