"""`loopscope analyze`: model + prompts → streamed accumulators → dynamics and stage tables → report.

Two streams, as in Blayney et al. §1.4: a long run without attention for the dynamics (fixed points need many
recurrences; the paper uses 128) and a short run with attention (the paper's attention maps use 8 loops). Both are
streamed (`loopscope.capture.stream`): every state goes to the accumulators as it is produced and is dropped, so
memory is one batch at one recurrence, whatever R and the number of prompts; each finished batch's reduced result
is cached under OUT/cache, so an interrupted run resumes with nothing lost. Under `torchrun` the batches are
shared between processes and rank 0 writes the report.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch

from loopscope.accumulate.distributed import World, init_distributed, shutdown_distributed
from loopscope.capture.stream import StreamSettings, stream_prompts
from loopscope.data.prompts import load_prompts
from loopscope.dynamics.behaviour import Behaviour, behaviour_counts
from loopscope.dynamics.convergence import CyclicFixedPointCheck, DistanceToFixedPoint, SuccessiveChange
from loopscope.dynamics.cooccurrence import cooccurrence_from
from loopscope.dynamics.degeneracy import Degeneracy, degeneracy_summary
from loopscope.dynamics.nonfinite import NEVER, NonFinite, non_finite_summary
from loopscope.dynamics.pca import TokenStates
from loopscope.dynamics.precision import relative_floor
from loopscope.dynamics.rule_dynamics import FIXED_BEHAVIOURS, MIN_RECURRENCES
from loopscope.dynamics.sensitivity import threshold_sweep
from loopscope.dynamics.similarity import AttentionDistance, ResidualSimilarity
from loopscope.errors import InputError
from loopscope.experiments.stage_tables import (
    STAGE_METRICS,
    alignment_table,
    model_neuron_fractions,
    model_readout,
    prop42_table_summary,
    stage_accumulators,
    stage_table_from,
)
from loopscope.models.device import resolve_device, resolve_dtype
from loopscope.models.load import LoadedModel, load_model
from loopscope.output import claim_output, settings_of
from loopscope.report import Report
from loopscope.report.dynamics_section import add_dynamics_sections
from loopscope.report.stages_section import add_stages_section
from loopscope.stages.prop42 import attention_state_relation


@dataclass
class AnalyzeSettings:
    model: str = "default"  # builtin name or checkpoint path
    prompts: str = "gsm-symbolic"  # builtin prompt set or file
    out: Path = Path("reports/analysis")
    recurrences: int = 64  # R of the dynamics run; X*_ℓ = X_{ℓ,R} is the long-run state
    attention_recurrences: int = 8  # R of the attention run (paper Fig. 2 uses 8)
    similarity_recurrences: int | None = None  # recurrences the similarity maps draw (None: all of the attention run)
    max_prompts: int | None = None  # use the first N prompts only
    batch_size: int = 8
    keep_states: tuple[tuple[int, int], ...] = ((0, -1),)  # (prompt, token) whose every state the PCA figure keeps
    classify_method: str = "dynamics"  # detector of the co-occurrence matrix ("dynamics" or "paper")
    feedforward: str | None = None  # a feedforward model whose stage profile is overlaid and aligned (e.g. smollm2)
    certificate_tokens: int = 16  # tokens whose block Jacobian's leading eigenvalues are estimated (0: none)
    lens_prompts: int | None = None  # prompts of the Jacobian / affine lens section (half fit, half read; None or 0:
    # no section; None, not 0, so that a folder written before this setting existed still resumes)
    lens_probes: int | None = None  # VJP probes per batch of the Jacobian-lens fit (None: exact, D of them)
    device: str = "auto"
    dtype: str = "float32"  # weights
    state_dtype: str = "float32"  # residual stream and recurrent state ("weights" to follow the weights)
    progress: bool = True
    overwrite: bool = False  # replace what an earlier run with other settings left in `out` (else: refused)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out = Path(self.out)  # a str from Python works as the CLI's Path does

    def output_settings(self) -> dict:
        """Every setting that decides what `out` holds: a rerun with the same ones resumes, others are refused."""
        return settings_of(self, ("out", "progress", "overwrite", "extra"))

    def check(self) -> None:
        from loopscope.models.looped import recurrence_count

        if self.recurrences < 2:
            raise InputError(f"--recurrences {self.recurrences}: dynamics need at least 2 recurrences (64–128 advised)")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise InputError(f"--max-prompts {self.max_prompts}: give 1 or more (or leave it out for every prompt)")
        if self.attention_recurrences < 1:
            raise InputError(f"--attention-recurrences {self.attention_recurrences}: give at least 1")
        if self.batch_size < 1:
            raise InputError(f"--batch-size {self.batch_size}: give at least 1")
        if self.similarity_recurrences is not None and not 1 <= self.similarity_recurrences <= \
                self.attention_recurrences:
            raise InputError(f"--similarity-recurrences {self.similarity_recurrences}: choose 1.."
                             f"{self.attention_recurrences} (the attention run's recurrences)")
        if self.lens_probes is not None and self.lens_probes < 1:
            raise InputError(f"--lens-probes {self.lens_probes}: give 1 or more (or leave it out for the exact fit)")
        if self.lens_prompts is not None and self.lens_prompts < 0:
            raise InputError(f"--lens-prompts {self.lens_prompts}: give 0 (no lens section) or more")
        if self.classify_method not in ("dynamics", "paper"):
            raise InputError(f"classify_method={self.classify_method!r}; use dynamics or paper")
        resolve_dtype(self.dtype)
        recurrence_count(self.recurrences, "--recurrences")  # whole, and not absurdly many
        recurrence_count(self.attention_recurrences, "--attention-recurrences")


def say(msg: str, progress: bool) -> None:
    if progress:
        print(msg, flush=True)


def dynamics_accumulators(s: AnalyzeSettings, n_prompts: int) -> list:
    """Everything the dynamics sections show, from the long run without attention."""
    accs = [SuccessiveChange(), DistanceToFixedPoint(), CyclicFixedPointCheck(), Degeneracy(), NonFinite()]
    if s.recurrences >= MIN_RECURRENCES:
        accs.append(Behaviour(paper_layers=None if s.classify_method == "paper" else (-1,)))
    for prompt, token in s.keep_states:
        if not 0 <= prompt < n_prompts:
            raise InputError(f"--keep-states {prompt}:{token}: prompt {prompt} is out of range for {n_prompts} "
                             "prompts")
        acc = TokenStates(prompt, token)
        acc.name = f"pca_{prompt}_{token}"
        accs.append(acc)
    return accs


def attention_accumulators(loaded: LoadedModel, s: AnalyzeSettings) -> list:
    """The stage metrics, attention stabilisation, similarity maps and Prop. 4.2, from the run with attention."""
    from loopscope.models.weights import attention_projections
    from loopscope.stages.attention_change import AttentionChange
    from loopscope.stages.prop42 import Prop42Check

    accs = stage_accumulators(model_readout(loaded), attention=True)
    if loaded.is_looped:
        att = DistanceToFixedPoint()
        att.name = "attention_to_fixed_point"
        r = s.similarity_recurrences
        accs += [att, ResidualSimilarity(r), AttentionDistance(r)]
        if s.attention_recurrences >= 2:
            accs += [AttentionChange(["batch"]), Prop42Check(attention_projections(loaded.model))]
    return accs


def dynamics_tables(states: dict, attn: dict, s: AnalyzeSettings) -> dict[str, pd.DataFrame]:
    """The dynamics tables the report shows, from the two streams' combined accumulators."""
    t = {
        "successive_change": states["successive_change"],
        "distance_to_fixed_point": states["distance_to_fixed_point"],
        "cyclic_fixed_point_check": states["cyclic_fixed_point_check"],
        "degeneracy": states["degeneracy"],
        "degeneracy_summary": degeneracy_summary(states["degeneracy"]),
        "non_finite_summary": non_finite_summary(states["non_finite"]),
        "non_finite_tokens": states["non_finite"][states["non_finite"]["first_recurrence"] != NEVER],
        "attention_to_fixed_point": attn["attention_to_fixed_point"],
        "residual_similarity": attn["residual_similarity"],
        "attention_distance": attn["attention_distance"],
    }
    if "behaviour" in states:
        stats = states["behaviour"]
        t["behaviour_dynamics"] = stats.frame(-1, "dynamics")
        t["behaviour_paper"] = stats.frame(-1, "paper")
        t["behaviour_counts"] = behaviour_counts({"dynamics detector": t["behaviour_dynamics"],
                                                  "paper heuristic": t["behaviour_paper"]})
        dyn = t["behaviour_dynamics"]
        t["behaviour_non_fixed"] = dyn[~dyn["behaviour"].isin(FIXED_BEHAVIOURS)]
        t["cooccurrence"] = cooccurrence_from(stats, s.classify_method)
        t["sensitivity"] = threshold_sweep(stats)
    for prompt, token in s.keep_states:
        points, variance = states[f"pca_{prompt}_{token}"]
        t.setdefault("pca_points", points)
        t.setdefault("pca_variance", variance)
    return t


def add_certificate(tables: dict, loaded: LoadedModel, prompts: list[str], s: AnalyzeSettings) -> None:
    """tables["certificate"] (per token: ρ, λ₁, prediction, convergence) joined with the detector's label, the
    agreement, and tables["certificate_ritz"] (every Ritz value of every token's own block with its residual)."""
    from loopscope.dynamics.spectrum import agreement, agreement_table
    from loopscope.experiments.certificate import certificates_for_prompts

    ritz: list[pd.DataFrame] = []
    cert = certificates_for_prompts(loaded, prompts, s.recurrences, s.certificate_tokens, ritz=ritz,
                                    progress=s.progress)
    joined = agreement(cert, tables["behaviour_dynamics"])
    tables["certificate"] = joined
    tables["certificate_ritz"] = pd.concat(ritz, ignore_index=True)
    tables["certificate_agreement"] = agreement_table(joined)
    tables["certificate_timing"] = pd.DataFrame([{"tokens": len(joined),
                                                  "seconds_per_token": float(joined["seconds_per_token"].mean())}])


@dataclass
class Analysis:
    """What one model's streams give: dynamics tables (None for a feedforward model), the stage table, the
    Prop. 4.2 summary (None without one) and a record of each stream (batches, tokens, cache, exactness)."""

    dynamics: dict[str, pd.DataFrame] | None
    stages: pd.DataFrame
    prop42: pd.DataFrame | None
    runs: dict[str, dict]
    floor: float | None
    prop42_relation: dict | None = None  # `stages.prop42.attention_state_relation` (the empirical Prop. 4.2)


def analyse(loaded: LoadedModel, prompts: list[str], s: AnalyzeSettings, world: World | None = None,
            ) -> Analysis | None:
    """Stream `prompts` through every accumulator the report needs; None on ranks other than 0."""
    world = world or World.current()
    progress = s.progress and world.rank == 0
    stream = dict(batch_size=s.batch_size, cache_dir=s.out / "cache", progress=progress, world=world)
    runs: dict[str, dict] = {}
    states = None
    with torch.inference_mode(), loaded.weights_held():
        if not loaded.is_looped:
            say(f"[1/3] streaming {len(prompts)} prompts once with attention ({loaded.name} is feedforward)", progress)
            attn, runs["attention"] = stream_prompts(loaded, prompts, attention_accumulators(loaded, s),
                                                     StreamSettings(1, attention=True, label="attention", **stream))
        else:
            say(f"[1/3] streaming {len(prompts)} prompts at R={s.recurrences} (states) and "
                f"R={s.attention_recurrences} (states + attention)", progress)
            states, runs["states"] = stream_prompts(loaded, prompts, dynamics_accumulators(s, len(prompts)),
                                                    StreamSettings(s.recurrences, label="states", **stream))
            attn, runs["attention"] = stream_prompts(loaded, prompts, attention_accumulators(loaded, s),
                                                     StreamSettings(s.attention_recurrences, attention=True,
                                                                    label="attention", **stream))
    if world.rank != 0:
        return None
    floor = None
    tables = None
    if states is not None:
        floor = relative_floor(s.dtype, runs["states"]["state_dtype"] or s.state_dtype)
        tables = dynamics_tables(states, attn, s)
        if s.certificate_tokens and "behaviour_dynamics" in tables:
            say(f"[2/3] stability certificate of {s.certificate_tokens} tokens (Arnoldi on the block's Jacobian) …",
                progress)
            t0 = time.perf_counter()
            add_certificate(tables, loaded, prompts, s)
            say(f"[2/3] stability certificate: {time.perf_counter() - t0:.0f} s", progress)
    return Analysis(
        dynamics=tables,
        stages=stage_table_from(attn),
        prop42=prop42_table_summary(attn["prop42"]) if "prop42" in attn else None,
        runs=runs, floor=floor,
        prop42_relation=attention_state_relation(attn["prop42"]) if "prop42" in attn else None,
    )


def run_analyze(s: AnalyzeSettings) -> Path | None:
    """Run the whole analysis and write OUT/index.html; returns its path (None on ranks other than 0).

    A feedforward model (R = 1) gets the stages-of-inference report only: one stream with attention, and a note
    in place of the dynamics sections (fixed points, orbits and attention stabilisation need R ≥ 2).
    """
    s.check()
    start = time.perf_counter()
    device = resolve_device(s.device)
    world = init_distributed(device)
    if device.type == "cuda" and world.size > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    prompts = load_prompts(s.prompts, limit=s.max_prompts)  # a bad prompt file fails before the model loads
    with claim_output(s.out, "analyze", s.output_settings(), overwrite=s.overwrite, rank=world.rank) as folder:
        loaded = load_model(s.model, device=device, dtype=s.dtype, state_dtype=s.state_dtype)
        with loaded.weights_held():  # one hash of the weights for the manifest and every stream's cache key
            folder.record_weights(loaded.name, loaded.fingerprint())
            index = write_analysis(loaded, prompts, s, world, folder, start)
    shutdown_distributed()
    return index


def write_analysis(loaded: LoadedModel, prompts: list[str], s: AnalyzeSettings, world: World, folder,
                   start: float) -> Path | None:
    """The streams, the report and the manifest of one analysis, in a folder `run_analyze` owns."""
    device = next(loaded.model.parameters()).device
    progress = s.progress and world.rank == 0
    width = getattr(getattr(loaded.model, "cfg", None), "d_model", None)
    if s.lens_prompts and s.lens_probes and width and s.lens_probes > width:  # refused before any stream runs
        raise InputError(f"--lens-probes {s.lens_probes}: choose 1..{width} (the model width), or leave it out")
    result = analyse(loaded, prompts, s, world)
    ff_name, ff_stage, aligned = None, None, None
    if s.feedforward:
        ff = load_model(s.feedforward, device=device, dtype=s.dtype, state_dtype=s.state_dtype)
        folder.record_weights(f"feedforward {ff.name}", ff.fingerprint())
        ff_name = ff.name
        with torch.inference_mode():
            ff_tables, ff_run = stream_prompts(
                ff, prompts, stage_accumulators(model_readout(ff)),
                StreamSettings(1, attention=True, label=f"feedforward-{ff.name}", batch_size=s.batch_size,
                               cache_dir=s.out / "cache", progress=progress, world=world))
    if world.rank != 0:
        return None
    if s.feedforward:
        result.runs["feedforward"] = ff_run
        ff_stage = stage_table_from(ff_tables)
        aligned = alignment_table(result.stages, ff_stage)
    say("[3/3] drawing figures and writing the report", progress)
    report = Report(title=f"loopscope analysis — {loaded.name}", out_dir=s.out,
                    meta=run_meta(loaded, s, prompts, result.runs, result.dynamics is None, world))
    if result.dynamics is None:
        report.section("Dynamics (skipped)", f"{loaded.name} is a feedforward model: it runs once (R = 1), so there "
                       "is no recurrence to converge, orbit or stabilise over. Fixed points, per-token behaviour, "
                       "similarity across recurrences and Proposition 4.2 need a looped model (R ≥ 2); only the "
                       "stages of inference are reported.")
    else:
        t0 = time.perf_counter()
        add_dynamics_sections(report, result.dynamics, s.recurrences, floor=result.floor,
                              floor_note=floor_note(s, result.runs["states"], result.floor),
                              behaviour_min_r=MIN_RECURRENCES)
        say(f"      dynamics figures: {time.perf_counter() - t0:.0f} s", progress)
    t0 = time.perf_counter()
    add_stages_section(report, result.stages, STAGE_METRICS, model_name=loaded.name, feedforward=ff_stage,
                       ff_name=ff_name or "feedforward", alignment=aligned, prop42=result.prop42,
                       neurons=model_neuron_fractions(loaded))
    say(f"      stages figures: {time.perf_counter() - t0:.0f} s", progress)
    if s.lens_prompts and loaded.is_looped:
        add_lens(report, loaded, prompts[: s.lens_prompts], s, progress)
    report.meta["wall time"] = f"{time.perf_counter() - start:.1f} s"
    index = report.write()
    folder.finish(index)
    say(f"wrote {index}", progress)
    return index


def add_lens(report: Report, loaded: LoadedModel, prompts: list[str], s: AnalyzeSettings, progress: bool) -> None:
    """The Jacobian / affine / logit lens section at R = the attention run's recurrences."""
    from loopscope.experiments.jacobian_lens import agreement_at_last_recurrence, fit_and_read_lenses, lens_views
    from loopscope.report.lens_section import add_lens_section

    t0 = time.perf_counter()
    say(f"      lenses: fitting the Jacobian and affine lenses on {max(1, len(prompts) // 2)} prompt(s) at "
        f"R={s.attention_recurrences} …", progress)
    summary, _, info = fit_and_read_lenses(loaded, prompts, s.attention_recurrences, probes=s.lens_probes)
    add_lens_section(report, summary, lens_views(summary), agreement_at_last_recurrence(summary), info, loaded.name)
    say(f"      lenses: {time.perf_counter() - t0:.0f} s", progress)


def floor_note(s: AnalyzeSettings, run: dict, floor: float) -> str:
    exact = run.get("finals_max_abs_diff")
    check = ("the second pass reproduced the first pass's last states bit for bit, so every distance to X* is exact"
             if exact == 0.0 else f"the second pass differed from the first by up to {exact:.3g} (max |Δ|): "
             "distances to X* carry that error")
    return (f"Weights in {s.dtype}, states in {run.get('state_dtype')}: relative changes at or below f ≈ {floor:.1e} "
            f"(1 − cos ≲ f²/2 ≈ {floor * floor / 2:.1e}) are rounding, not dynamics (dotted line). Distances to the "
            f"fixed point come from a second deterministic pass of each batch; {check}.")


def run_meta(loaded: LoadedModel, s: AnalyzeSettings, prompts: list[str], runs: dict, feedforward_model: bool,
             world: World) -> dict:
    cfg = getattr(loaded.model, "cfg", None)
    tokens = runs["attention"]["tokens"]
    return {
        "model": f"{loaded.name} {cfg.signature if cfg else ''}".strip(),
        "architecture": (f"norm={cfg.norm}, injection={cfg.injection}, state_init={cfg.state_init}, "
                         f"d_model={cfg.d_model}, heads={cfg.n_heads}") if cfg else loaded.kind,
        "prompts": f"{s.prompts} ({len(prompts)} prompts, {tokens} tokens)",
        "recurrences": ("1 (feedforward model)" if feedforward_model else
                        f"{s.recurrences} for dynamics, {s.attention_recurrences} with attention"),
        "precision": f"weights {s.dtype}, states {runs['attention'].get('state_dtype') or s.state_dtype}, "
                     f"device {next(loaded.model.parameters()).device}",
        "processes": f"{world.size} (torch.distributed)" if world.size > 1 else "1",
        "streams": {name: {k: v for k, v in run.items() if k != "seconds_rank0"} | {
            "seconds": round(run["seconds_rank0"], 1)} for name, run in runs.items()},
        "settings": {k: str(v) for k, v in asdict(s).items() if k not in ("extra",)},
    }
