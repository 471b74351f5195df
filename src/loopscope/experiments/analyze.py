"""`loopscope analyze`: model + prompts → captured trajectories → dynamics tables → report.

Two captures, as in Blayney et al. §1.4: a long run without attention for the dynamics (fixed points need many
recurrences; the paper uses 128) and a short run with attention (the paper's attention maps use 8 loops), because
attention memory grows as R·K·B·H·T². Finished capture batches are cached under OUT/cache, so an interrupted run
resumes without recomputing them.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch

from loopscope import dynamics
from loopscope.capture import Trajectory, capture_prompts
from loopscope.data.prompts import load_prompts
from loopscope.errors import InputError
from loopscope.models.load import LoadedModel, load_model
from loopscope.report import Report
from loopscope.experiments.stage_tables import STAGE_METRICS, alignment_table, stage_table, model_readout, \
    model_neuron_fractions, prop42_summary
from loopscope.report.dynamics_section import add_dynamics_sections
from loopscope.report.stages_section import add_stages_section


@dataclass
class AnalyzeSettings:
    model: str = "default"  # builtin name or checkpoint path
    prompts: str = "gsm-symbolic"  # builtin prompt set or file
    out: Path = Path("reports/analysis")
    recurrences: int = 64  # R of the dynamics capture; X*_ℓ = X_{ℓ,R} is the long-run state
    attention_recurrences: int = 8  # R of the attention capture (paper Fig. 2 uses 8)
    max_prompts: int | None = None  # use the first N prompts only
    batch_size: int = 8
    pca_prompt: int = 0  # which prompt's final token the PCA figure follows
    classify_method: str = "dynamics"  # default behaviour detector ("dynamics" or "paper")
    feedforward: str | None = None  # a feedforward model whose stage profile is overlaid and aligned (e.g. smollm2)
    prop42_prompts: int = 4  # prompts used for the Proposition 4.2 check (it recaptures layer inputs)
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        if self.recurrences < 2:
            raise InputError(f"--recurrences {self.recurrences}: dynamics need at least 2 recurrences (64–128 advised)")
        if self.attention_recurrences < 1:
            raise InputError(f"--attention-recurrences {self.attention_recurrences}: give at least 1")
        if self.batch_size < 1:
            raise InputError(f"--batch-size {self.batch_size}: give at least 1")


def say(msg: str, progress: bool) -> None:
    if progress:
        print(msg, flush=True)


def capture_both(loaded: LoadedModel, prompts: list[str], s: AnalyzeSettings) -> tuple[Trajectory, Trajectory]:
    cache = s.out / "cache"
    say(f"[1/3] capturing {len(prompts)} prompts at R={s.recurrences} (states) and R={s.attention_recurrences} "
        "(states + attention)", s.progress)
    states = capture_prompts(loaded, prompts, s.recurrences, attention=False, batch_size=s.batch_size,
                             cache_dir=cache, progress=s.progress)
    attn = capture_prompts(loaded, prompts, s.attention_recurrences, attention=True, batch_size=s.batch_size,
                           cache_dir=cache, progress=s.progress)
    return states, attn


def dynamics_tables(states: Trajectory, attn: Trajectory, s: AnalyzeSettings) -> dict[str, pd.DataFrame]:
    """Every dynamics table the report shows, computed once (the figures only draw these)."""
    pca_points, pca_var = dynamics.pca_trajectory(states, batch=s.pca_prompt, token=-1)
    return {
        "successive_change": dynamics.successive_change(states),
        "distance_to_fixed_point": dynamics.distance_to_fixed_point(states),
        "attention_to_fixed_point": dynamics.distance_to_fixed_point(attn),
        "residual_similarity": dynamics.residual_similarity(attn),
        "attention_distance": dynamics.attention_distance(attn),
        "degeneracy": dynamics.degeneracy(states),
        "degeneracy_summary": dynamics.degeneracy_summary(states),
        "behaviour_dynamics": dynamics.classify(states, method="dynamics"),
        "behaviour_paper": dynamics.classify(states, method="paper"),
        "cooccurrence": dynamics.cooccurrence(states, method=s.classify_method),
        "pca_points": pca_points,
        "pca_variance": pca_var,
        "cyclic_fixed_point_check": dynamics.cyclic_fixed_point_check(states),
    }


def is_feedforward(loaded: LoadedModel) -> bool:
    """A model that runs once (a Hugging Face feedforward LM): no recurrences, so no dynamics."""
    return loaded.kind != "looped"


def run_analyze(s: AnalyzeSettings) -> Path:
    """Run the whole analysis and write OUT/index.html; returns its path.

    A feedforward model (R = 1) gets the stages-of-inference report only: one capture with attention, and a note
    in place of the dynamics sections (fixed points, orbits and attention stabilisation need R ≥ 2).
    """
    s.check()
    start = time.perf_counter()
    loaded = load_model(s.model)
    feedforward_model = is_feedforward(loaded)
    prompts = load_prompts(s.prompts, limit=s.max_prompts)
    if not 0 <= s.pca_prompt < len(prompts):
        raise InputError(f"--pca-prompt {s.pca_prompt} is out of range for {len(prompts)} prompts")
    s.out.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        if feedforward_model:
            say(f"[1/3] capturing {len(prompts)} prompts once with attention ({loaded.name} is feedforward)",
                s.progress)
            states = attn = capture_prompts(loaded, prompts, 1, attention=True, batch_size=s.batch_size,
                                            cache_dir=s.out / "cache", progress=s.progress)
        else:
            states, attn = capture_both(loaded, prompts, s)
    say("[2/3] computing dynamics and stage tables", s.progress)
    tables = None if feedforward_model else dynamics_tables(states, attn, s)
    stage = stage_table(attn, model_readout(loaded))
    ff_name, ff_stage, aligned = None, None, None
    if s.feedforward:
        ff = load_model(s.feedforward)
        ff_name = ff.name
        with torch.inference_mode():
            ff_traj = capture_prompts(ff, prompts, 1, attention=True, batch_size=s.batch_size,
                                      cache_dir=s.out / "cache", progress=s.progress)
        ff_stage = stage_table(ff_traj, model_readout(ff))
        aligned = alignment_table(stage, ff_stage)
    prop42 = prop42_summary(loaded, prompts[: s.prop42_prompts], s.attention_recurrences)
    say("[3/3] drawing figures and writing the report", s.progress)
    cfg = getattr(loaded.model, "cfg", None)
    report = Report(
        title=f"loopscope analysis — {loaded.name}",
        out_dir=s.out,
        meta={
            "model": f"{loaded.name} {cfg.signature if cfg else ''}".strip(),
            "architecture": (f"norm={cfg.norm}, injection={cfg.injection}, state_init={cfg.state_init}, "
                             f"d_model={cfg.d_model}, heads={cfg.n_heads}") if cfg else loaded.kind,
            "prompts": f"{s.prompts} ({len(prompts)} prompts, {int(states.mask.sum())} tokens)",
            "recurrences": ("1 (feedforward model)" if feedforward_model else
                            f"{s.recurrences} for dynamics, {s.attention_recurrences} with attention"),
            "settings": {k: str(v) for k, v in asdict(s).items() if k not in ("extra",)},
        },
    )
    if tables is None:
        report.section("Dynamics (skipped)", f"{loaded.name} is a feedforward model: it runs once (R = 1), so there "
                       "is no recurrence to converge, orbit or stabilise over. Fixed points, per-token behaviour, "
                       "similarity across recurrences and Proposition 4.2 need a looped model (R ≥ 2); only the "
                       "stages of inference are reported.")
    else:
        add_dynamics_sections(report, tables, s.recurrences)
    add_stages_section(report, stage, STAGE_METRICS, model_name=loaded.name, feedforward=ff_stage,
                       ff_name=ff_name or "feedforward", alignment=aligned, prop42=prop42,
                       neurons=model_neuron_fractions(loaded))
    report.meta["wall time"] = f"{time.perf_counter() - start:.1f} s"
    index = report.write()
    say(f"wrote {index}", s.progress)
    return index
