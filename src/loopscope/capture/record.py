"""Capture: attach to a normal forward, file every state under the label the model passed, detach.

    traj = capture(model, input_ids, recurrences=32, attention=True)

or, around any sequence of forwards (e.g. KV-cached decoding, one token at a time):

    with Recorder(model, attention=True) as rec:
        model(prompt, cache=cache, recurrences=8); model(next_token, cache=cache, recurrences=8)
    traj = rec.trajectory()

Each hook reads `kwargs["step"]` (the model's own loop counter) and appends the tensor to the list for that
(site, segment, recurrence, layer); chunks from successive forwards are joined along the token axis. The
order in which hooks fired is never used, so capture stays right under caching, re-entrancy or reordering.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.nn.functional as F

from loopscope.capture.trajectory import EXTRA_SITES, Trajectory
from loopscope.errors import InputError
from loopscope.models.hooks import HookPoint, Step
from loopscope.models.looped import LAYER_SITES, LoopedLM, recurrence_count

Key = tuple[str, Step]  # (site, step)


def select_sites(sites) -> tuple[str, ...]:
    """Extra sites to record: None → none; a list of short names (`Trajectory` EXTRA_SITES); or a callable on hook
    point names, TransformerLens `names_filter` style (e.g. `lambda name: name.endswith("mlp.hook_post")`), which
    selects the sites whose hook points it accepts."""
    if sites is None:
        return ()
    if callable(sites):
        return tuple(s for s, path in LAYER_SITES.items() if s in EXTRA_SITES and sites(f"core.0.{path}"))
    names = (sites,) if isinstance(sites, str) else tuple(sites)
    bad = [s for s in names if s not in EXTRA_SITES]
    if bad:
        raise InputError(f"unknown sites {bad}; capture can add {EXTRA_SITES} (resid_post, injected, embed and, "
                         "with attention=True, pattern are always recorded)")
    return names


class Recorder:
    """Context manager recording resid_post of every layer, the injected block input, the embedding,
    the exit gate, final logits, (optionally) attention probabilities, and any extra `sites` of a `LoopedLM`."""

    def __init__(self, model: LoopedLM, attention: bool = False, dtype: torch.dtype = torch.float32,
                 sites=None) -> None:
        if not isinstance(model, LoopedLM):
            raise InputError(f"Recorder records a LoopedLM; got {type(model).__name__}. Use loopscope.capture.capture")
        self.model, self.attention, self.dtype = model, attention, dtype
        self.extra = select_sites(sites)
        self.chunks: dict[Key, list[torch.Tensor]] = defaultdict(list)
        self.logit_chunks: list[torch.Tensor] = []
        self.handles: list[Any] = []

    def _sites(self) -> list[tuple[str, HookPoint]]:
        names = ["embed", "injected", "exit_gate", "resid_post", *(["pattern"] if self.attention else []), *self.extra]
        return [(site, point) for site in names for point in self.model.site_points(site)]

    def __enter__(self) -> Recorder:
        for site, point in self._sites():
            self.handles.append(point.register_forward_hook(self._hook(site), with_kwargs=True))
        self.handles.append(self.model.register_forward_hook(self._logits_hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _hook(self, site: str):
        def fn(module, args, kwargs, output):  # kept on the CPU: a whole Trajectory is for notebooks and small runs
            self.chunks[(site, kwargs["step"])].append(output.detach().to(device="cpu", dtype=self.dtype))
        return fn

    def _logits_hook(self, module, args, output) -> None:
        self.logit_chunks.append(output.detach().to(device="cpu", dtype=self.dtype))

    # --- assembly ------------------------------------------------------------------------------------
    def _joined(self, site: str, step: Step) -> torch.Tensor:
        parts = self.chunks.get((site, step))
        if not parts:
            raise InputError(f"no {site} recorded at {step}: the forward did not reach it")
        if site != "pattern":
            return torch.cat(parts, dim=1)  # (B, T, ...) chunks along tokens
        T = sum(p.shape[-2] for p in parts)  # (B, H, t_i, S_i) rows; causal zeros pad to T columns
        return torch.cat([F.pad(p, (0, T - p.shape[-1])) for p in parts], dim=-2)

    def trajectory(self, metadata: dict | None = None, token_ids=None, tokens=None, mask=None) -> Trajectory:
        """Assemble what was recorded into a Trajectory [R, K, B, T, D] (+ prelude, coda, attention …)."""
        cfg = self.model.cfg
        core_steps = [s for (site, s) in self.chunks if site == "resid_post" and s.segment == "core"]
        if not core_steps:
            raise InputError("nothing was recorded: run a forward inside the Recorder context")
        R = 1 + max(s.recurrence for s in core_steps)
        K, P, C = cfg.n_block, cfg.n_prelude, cfg.n_coda

        def stack(site: str, segment: str, n: int, recurrences: int = 1) -> torch.Tensor | None:
            if n == 0:
                return None
            return torch.stack([
                torch.stack([self._joined(site, Step(segment, t, j)) for j in range(n)]) for t in range(recurrences)
            ])

        core = stack("resid_post", "core", K, R)
        injected = torch.stack([self._joined("injected", Step("core", t, 0)) for t in range(R)])
        gate = None
        if cfg.exit_gate:
            gate = torch.stack([self._joined("exit_gate", Step("core", t, K - 1)) for t in range(R)])
        attn = {}
        if self.attention:
            attn["core_attention"] = stack("pattern", "core", K, R)
            attn["prelude_attention"] = None if P == 0 else stack("pattern", "prelude", P)[0]
            attn["coda_attention"] = None if C == 0 else stack("pattern", "coda", C)[0]
        prelude = stack("resid_post", "prelude", P)
        coda = stack("resid_post", "coda", C)
        sites = {}
        for site in self.extra:
            sites[site] = {"core": stack(site, "core", K, R)}
            if P:
                sites[site]["prelude"] = stack(site, "prelude", P)[0]
            if C:
                sites[site]["coda"] = stack(site, "coda", C)[0]
        meta = {"model": cfg.to_dict(), "recurrences": R, **(metadata or {})}
        return Trajectory(
            core=core,
            injected=injected,
            prelude=None if prelude is None else prelude[0],
            coda=None if coda is None else coda[0],
            embed=self._joined("embed", Step("embed", 0, 0)),
            exit_gate=gate,
            logits=torch.cat(self.logit_chunks, dim=1) if self.logit_chunks else None,
            token_ids=token_ids,
            tokens=tokens,
            mask=mask,
            sites=sites,
            metadata=meta,
            **attn,
        )


@torch.no_grad()
def capture(
    model: Any,
    input_ids: torch.Tensor,
    recurrences: int | None = None,
    attention: bool = False,
    *,
    mask: torch.Tensor | None = None,
    tokens: list[list[str]] | None = None,
    state_seed: int | None = None,
    initial_state: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    sites=None,
) -> Trajectory:
    """Run one forward of `model` on `input_ids` (B, T) with R recurrences and return its Trajectory.

    Works for every model loopscope loads: a `LoopedLM` (own, Ouro, Huginn, retrofit families) directly;
    other models (Hugging Face feedforward LMs) through the adapter registered for their type. `sites` adds other
    hook points to `Trajectory.sites` (short names such as "mlp_post", "attn_out", or a names filter; see
    `select_sites`), each labelled by (segment, recurrence, layer): `traj.get("mlp_post", "core", t, j)`.
    """
    adapter = find_capture_adapter(model)
    if adapter is None and not isinstance(model, LoopedLM):
        import loopscope.capture.hf  # noqa: F401  (registers the Hugging Face adapter; transformers is slow to import)

        adapter = find_capture_adapter(model)
    if adapter is not None:
        if select_sites(sites):
            raise InputError(f"extra sites {select_sites(sites)} are recorded for looped models; a "
                             f"{type(model).__name__} is captured through its adapter (resid_post and attention)")
        return adapter(model, input_ids, recurrences=recurrences, attention=attention, mask=mask,
                       tokens=tokens, dtype=dtype)
    if not isinstance(model, LoopedLM):
        raise InputError(f"cannot capture a {type(model).__name__}: load it with loopscope.models.load_model")
    R = model.cfg.recurrences if recurrences is None else recurrence_count(recurrences)
    seed = model.cfg.seed if state_seed is None else state_seed
    device = next(model.parameters()).device
    with Recorder(model, attention=attention, dtype=dtype, sites=sites) as rec:
        model(input_ids.to(device), recurrences=R, state_seed=seed,
              initial_state=None if initial_state is None else initial_state.to(device))
    meta = {"state_init": model.cfg.state_init, "state_seed": seed if model.cfg.state_init == "random" else None,
            "initial_state_given": initial_state is not None,
            "state_dtype": str(model.stream_dtype or next(model.parameters()).dtype).removeprefix("torch.")}
    return rec.trajectory(metadata=meta, token_ids=input_ids.detach().cpu(), tokens=tokens, mask=mask)


# Other model kinds (e.g. Hugging Face feedforward LMs) register a capture function here:
# predicate(model) -> bool, fn(model, input_ids, recurrences, attention, mask, tokens, dtype) -> Trajectory.
CAPTURE_ADAPTERS: list[tuple[Any, Any]] = []


def register_capture_adapter(predicate, fn) -> None:
    CAPTURE_ADAPTERS.append((predicate, fn))


def find_capture_adapter(model: Any):
    for predicate, fn in CAPTURE_ADAPTERS:
        if predicate(model):
            return fn
    return None
