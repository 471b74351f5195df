"""`loopscope exit`: certified early exit against Huginn's KL rule and fixed R, on live looped models.

Per prompt: the stability certificate at the long-run state (ρ of every causal prefix, `experiments.certificate`),
then one run of R_max recurrences recording, after each recurrence t, every token's step ‖s_t − s_{t−1}‖, the
readout (coda, final norm, W_U: `LoopedLM.readout`) of every position — its margin, argmax, log-probability of the
next token, KL to the previous recurrence's distribution — and σ_t, the norm of the readout's Jacobian at s_t
(power iteration on J·v / vᵀ·J products, never the matrix; only at recurrences where some position's bound is
finite). The rules themselves are pure functions of that trace (`loopscope.dynamics.early_exit`, where the
bound, its assumptions and Huginn's rule are written out).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from loopscope.dynamics.early_exit import (
    HUGINN_KL,
    MEASURED_WINDOW,
    RATE_SOURCES,
    ExitTrace,
    bound_violations,
    contraction_rate,
    exit_summary,
    measured_rate,
    prefix_steps,
    rule_outcomes,
    tail_bound,
)
from loopscope.errors import InputError
from loopscope.models.device import Precision
from loopscope.models.looped import LoopedLM, recurrence_count

SIGMA_ITERATIONS = 12  # power-iteration steps for σ_t (a lower estimate that rises to σ; 12 settle to ~1e-3 here)
WARM_ITERATIONS = 3  # steps at later recurrences, started from the previous recurrence's vector (σ moves slowly)
DEFAULT_EPS = (1.0, 0.1)  # logit-change bounds (nats of logit) of the certified-logit rows


def readout_norm(model: LoopedLM, s: torch.Tensor, iterations: int = SIGMA_ITERATIONS, seed: int = 0,
                 start: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
    """σ = ‖∂ readout(S)/∂S‖₂ at S (1, T, D), the exit path's Jacobian over the whole sequence (coda attention mixes
    tokens), by power iteration v ← Jᵀ J v / ‖·‖ with one JVP and one VJP per step; returns (σ, the last v, to warm-
    start the next recurrence's iteration from). Power iteration approaches σ from below; the certificate built on
    it is first-order (the Jacobian at s_t stands for the whole ball)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if start is None:
        gen = torch.Generator().manual_seed(seed)
        start = torch.randn(s.shape, generator=gen, dtype=torch.float64)
    v = start.to(s)
    v = v / v.norm()
    f = model.readout
    sigma = 0.0
    with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):  # the fused CPU kernel has no forward-mode AD
        for _ in range(iterations):
            _, jv = torch.func.jvp(f, (s,), (v,))
            jv = jv.detach()
            sigma = float(jv.norm())
            if sigma == 0:
                return 0.0, v
            _, vjp = torch.func.vjp(f, s)
            (w,) = vjp(jv)
            v = w.detach() / w.norm()
    return sigma, v


def certificate_rho(model: LoopedLM, ids: torch.Tensor, recurrences: int) -> np.ndarray:
    """[T] prefix ρ = max_{j ≤ i} |λ₁(J_jj)| at the state after `recurrences` (float64 Arnoldi, own blocks)."""
    from loopscope.dynamics.spectrum import prefix_spectra
    from loopscope.experiments.certificate import float64_copy, long_run_state, own_spectra

    work = float64_copy(model)
    device = next(work.parameters()).device
    e, s = long_run_state(work, ids.to(device), recurrences)
    prefix, _ = prefix_spectra(own_spectra(work, e, s, recurrences))
    return prefix.values[:, 0].abs().numpy()


@torch.no_grad()
def exit_trace(model: LoopedLM, ids: torch.Tensor, recurrences: int, rho: np.ndarray | None = None,
               sigma_iterations: int = SIGMA_ITERATIONS) -> ExitTrace:
    """The `ExitTrace` of one prompt ids (1, T) over `recurrences` recurrences (see the module doc); σ_t is computed
    where the bound of some position is finite under the certificate's ρ or the measured rate."""
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise InputError(f"exit_trace takes one prompt (1, T); got shape {tuple(ids.shape)}")
    R = recurrence_count(recurrences)
    device = next(model.parameters()).device
    ids = ids.to(device)
    T = ids.shape[1]
    target = torch.cat([ids[0, 1:], ids.new_full((1,), -1)]).cpu().numpy()
    rho = np.full(T, np.nan) if rho is None else np.asarray(rho, float)
    e = model.prelude_output(ids)
    s = model.initial_state(e, 0, None)
    steps, margin, pred, logp_t, kl = (np.full((R, T), np.nan) for _ in range(5))
    sigma = np.full(R, np.nan)
    prev_logp, v = None, None
    history = []  # every state, on the host: the distances to the last one (the bound's empirical check)
    for t in range(R):
        new = model.block_map(s, e, t)
        steps[t] = torch.linalg.vector_norm((new - s).double(), dim=-1)[0].cpu().numpy()
        s = new
        history.append(s[0].double().cpu())
        logits = model.readout(s)[0].float()  # (T, V)
        logp = F.log_softmax(logits, dim=-1)
        top = logits.topk(2, dim=-1)
        margin[t] = (top.values[:, 0] - top.values[:, 1]).cpu().numpy()
        pred[t] = top.indices[:, 0].cpu().numpy()
        tgt = torch.as_tensor(np.maximum(target, 0), device=logp.device)
        logp_t[t] = np.where(target >= 0, logp.gather(-1, tgt[:, None])[:, 0].cpu().numpy(), np.nan)
        if prev_logp is not None:
            kl[t] = (logp.exp() * (logp - prev_logp)).sum(-1).cpu().numpy()
        prev_logp = logp
        partial = ExitTrace(steps[: t + 1], margin[: t + 1], pred[: t + 1], logp_t[: t + 1], target, kl[: t + 1],
                            sigma[: t + 1], rho)
        finite = [np.isfinite(tail_bound(prefix_steps(partial.steps), contraction_rate(partial, r))[-1]).any()
                  for r in ("certificate", "measured")]
        if any(finite):  # σ only where some position could be certified; warm-started after the first
            sigma[t], v = readout_norm(model, s, sigma_iterations if v is None else WARM_ITERATIONS, start=v)
    states = torch.stack(history)  # (R, T, D)
    distance = (states - states[-1]).pow(2).sum(-1).cumsum(-1).sqrt().numpy()  # prefix ‖s_t − s_{R−1}‖
    return ExitTrace(steps, margin, pred.astype(np.int64), logp_t, target, kl, sigma, rho, distance)


# --- the command ------------------------------------------------------------------------------------------------
@dataclass
class ExitSettings:
    models: list[str] = field(default_factory=lambda: ["default"])  # builtin, checkpoint path, or preset:NAME
    prompts: str = "gsm-symbolic"  # builtin prompt set or file; next-token loss / accuracy on these texts
    out: Path = Path("reports/exit")
    recurrences: int = 32  # R_max: what every rule is compared with (fixed R = R_max is the reference)
    fixed: list[int] | None = None  # fixed-R rows (None: 1, 2, 4, … up to R_max)
    eps: list[float] = field(default_factory=lambda: list(DEFAULT_EPS))  # certified-logit bounds
    huginn: list[float] = field(default_factory=lambda: [HUGINN_KL])  # KL thresholds of Huginn's rule
    rates: list[str] = field(default_factory=lambda: list(RATE_SOURCES))  # ρ sources of the certified rows
    certificate: bool = True  # run the stability certificate per prompt (else ρ comes from the steps only)
    max_prompts: int | None = 8
    precision: Precision = field(default_factory=Precision)
    progress: bool = True
    overwrite: bool = False

    def __post_init__(self) -> None:
        self.out = Path(self.out)

    def check(self) -> None:
        self.precision.device  # a bad --device fails first, in one line
        if not self.models:
            raise InputError("no models given; pass at least one --model")
        recurrence_count(self.recurrences, "--recurrences")
        if self.recurrences < MEASURED_WINDOW + 2:
            raise InputError(f"--recurrences {self.recurrences}: the exit needs at least {MEASURED_WINDOW + 2} "
                             "(the measured rate reads a window of steps)")
        for r in self.fixed or []:
            if not 1 <= r <= self.recurrences:
                raise InputError(f"--fixed {r}: choose 1..{self.recurrences} (--recurrences)")
        if any(not e > 0 for e in self.eps) or any(not h > 0 for h in self.huginn):
            raise InputError("--eps and --huginn-kl take positive numbers")
        if not self.rates or any(r not in RATE_SOURCES for r in self.rates):
            raise InputError(f"--rate {','.join(self.rates)}: use one or more of {', '.join(RATE_SOURCES)}")
        if "certificate" in self.rates and not self.certificate:
            raise InputError("--rate certificate needs the certificate; drop --no-certificate or use --rate measured")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise InputError(f"--max-prompts {self.max_prompts}: give 1 or more")

    def fixed_grid(self) -> list[int]:
        if self.fixed:
            return sorted(set(self.fixed) | {self.recurrences})
        grid, r = {self.recurrences}, 1
        while r < self.recurrences:
            grid.add(r)
            r *= 2
        return sorted(grid)


def load_exit_model(spec: str, precision: Precision):
    """A looped model: `preset:NAME` builds an untrained preset (`experiments.presets`, seed 0) with the bundled
    tokenizer; anything else goes to `load_model`."""
    from loopscope.models.load import LoadedModel

    if str(spec).startswith("preset:"):
        from loopscope.data.tokenizer import load_tokenizer
        from loopscope.experiments.presets import preset_config

        cfg = preset_config(str(spec).removeprefix("preset:"))
        model = precision.place(LoopedLM(cfg)).eval()
        return LoadedModel(model, load_tokenizer(), str(spec), "looped", cfg.recurrences)
    loaded = precision.load(spec)
    if not loaded.is_looped:
        raise InputError(f"model {spec!r} is a {loaded.kind} model; the early exit needs a looped model")
    return loaded


def model_outcomes(loaded, prompts: list[str], s: ExitSettings) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every rule's per-position outcome on every prompt (`rule_outcomes` + model, batch), and one row per prompt
    describing its contraction (max prefix ρ, last measured rate, seconds)."""
    from tqdm.auto import tqdm

    from loopscope.capture.prompts import encode_prompts

    rows, info = [], []
    for b, prompt in enumerate(tqdm(prompts, desc=f"exit {loaded.name}", unit="prompt", disable=not s.progress)):
        t0 = time.perf_counter()
        ids, _, _ = encode_prompts(loaded.tokenizer, [prompt], loaded.max_seq_len)
        rho = certificate_rho(loaded.model, ids, s.recurrences) if s.certificate else None
        trace = exit_trace(loaded.model, ids, s.recurrences, rho)
        out = rule_outcomes(trace, s.fixed_grid(), s.eps, s.huginn, tuple(s.rates))
        rows.append(out.assign(model=loaded.name, batch=b))
        last_rate = measured_rate(prefix_steps(trace.steps))[-1, -1]
        checks = {f"bound_{k}_{r}": v for r in s.rates for k, v in bound_violations(trace, r).items()}
        info.append({"model": loaded.name, "batch": b, "tokens": ids.shape[1], **checks,
                     "rho_certificate": float(np.nanmax(trace.rho)) if rho is not None else float("nan"),
                     "rate_measured_last": float(last_rate),
                     "sigma_computed": int(np.isfinite(trace.sigma).sum()), "seconds": time.perf_counter() - t0})
    return pd.concat(rows, ignore_index=True), pd.DataFrame(info)


def contraction_note(info: pd.DataFrame) -> pd.DataFrame:
    """Per model: the largest certificate ρ and last measured step rate over prompts, and whether the certificate
    says the block is a contraction (else the certified rules refuse: nothing stops early)."""
    g = info.groupby("model", sort=False)
    out = g.agg(rho_certificate_max=("rho_certificate", "max"), rate_measured_max=("rate_measured_last", "max"),
                prompts=("batch", "size"), seconds=("seconds", "sum")).reset_index()
    for checked in [c for c in info.columns if c.startswith("bound_checked_")]:  # pooled over prompts
        source = checked.removeprefix("bound_checked_")
        bad = (info[f"bound_violated_{source}"].fillna(0) * info[checked]).groupby(info["model"], sort=False).sum()
        n = info[checked].groupby(info["model"], sort=False).sum()
        out[f"bound_checked_{source}"] = out["model"].map(n).to_numpy()
        out[f"bound_violated_{source}"] = out["model"].map(bad / n.where(n > 0)).to_numpy()
    rho = out["rho_certificate_max"]
    out["certifies"] = np.where(rho < 1, "yes: ρ < 1 at the long-run state",
                                np.where(rho.isna(), "ρ unknown (no certificate)",
                                         "no: not a contraction (ρ ≥ 1); certified exit refused"))
    return out


def run_exit(s: ExitSettings) -> dict[str, pd.DataFrame]:
    """Writes OUT/index.html with the compute-vs-quality figure and tables; returns the tables: "summary" (one row
    per model, rule, parameter: `exit_summary`), "contraction" (per model), "prompts" (per prompt), "positions"
    (every rule's outcome per position)."""
    s.check()
    from loopscope.data.prompts import load_prompts
    from loopscope.output import claim_output, settings_of

    prompts = load_prompts(s.prompts, limit=s.max_prompts)
    with claim_output(s.out, "exit", settings_of(s), overwrite=s.overwrite) as folder:
        start = time.perf_counter()
        outcomes, info = [], []
        for spec in s.models:
            loaded = load_exit_model(spec, s.precision)
            folder.record_weights(str(spec), loaded.fingerprint())
            rows, meta = model_outcomes(loaded, prompts, s)
            outcomes.append(rows)
            info.append(meta)
        positions = pd.concat(outcomes, ignore_index=True)
        info = pd.concat(info, ignore_index=True)
        tables = {"summary": exit_summary(positions, s.recurrences), "contraction": contraction_note(info),
                  "prompts": info, "positions": positions}
        from loopscope.report import Report
        from loopscope.report.exit_section import add_exit_section

        report = Report(title="loopscope early exit — " + ", ".join(map(str, s.models)), out_dir=s.out, meta={
            "models": ", ".join(map(str, s.models)), "prompts": f"{s.prompts} ({len(prompts)} prompts)",
            "R_max": s.recurrences, "rate sources": ", ".join(s.rates),
            "settings": {k: str(v) for k, v in dataclasses.asdict(s).items()},
        })
        add_exit_section(report, tables, s.recurrences)
        report.meta["wall time"] = f"{time.perf_counter() - start:.1f} s"
        index = report.write()
        folder.finish(index)
        if s.progress:
            print(f"wrote {index}", flush=True)
    return tables
