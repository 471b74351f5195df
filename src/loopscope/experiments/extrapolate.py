"""`loopscope extrapolate`: run trained looped models at R = 1 … ≥ 8× their training recurrences.

Blayney et al. (2026) §6.2 (Sec. 5.2, App. E.5; Figs. 11, 12, 47–52) argue that models which reach a fixed point
keep enacting the same stages at any number of test-time recurrences, and cite (do not measure) that task
accuracy under extrapolation tracks this. We measure both on our own trained models, per R:

    loss                  held-out next-token loss (nats) on the fixed GSM8K test subset, `heldout_loss` at R;
    accuracy              GSM8K exact match of greedy decoding at R (`gsm8k_exact_match`);
    fixed_point_distance  mean over real tokens of ‖X_{K−1,R−1} − X*‖ / ‖X*‖, X* = X_{K−1,Rmax−1}: the last
                          block layer's state after R recurrences against the long-run state at the largest R
                          of the grid (the paper's Fig. 4 distance, made relative so it reads across models);
    successive_change     mean relative change ‖X_{K−1,R−1} − X_{K−1,R−2}‖ / ‖X_{K−1,R−2}‖ (Fig. 3; NaN at R=1);
    fixed_point … unknown fractions of real tokens per behaviour (`dynamics.classify`, method "dynamics", last
                          block layer, on the first R recurrences; NaN for R < 4, which the classifier needs);
    alignment_corr        mean over stage metrics of the Pearson correlation between the run's last-pass profile
                          (prelude + pass R + coda, relative depth) and the feedforward control's
                          (`alignment_table`, `stages.alignment`); NaN without a control.

One capture at the largest R serves every R of the dynamics columns: the state after recurrence t does not depend
on how many recurrences follow (only the coda and logits do), which `tests/test_extrapolate.py` checks. Loss,
accuracy and alignment need the coda, so they run at each R. Every finished (model, R) row is cached as JSON under
OUT/cache/extrapolate, keyed by everything that changes it, so an interrupted run resumes where it stopped.

Units for intervals: tables["per_text"] holds each held-out sequence's loss per (model, R) and
tables["per_prompt"] each dynamics prompt's successive change, so a claim can take a paired bootstrap over texts
(loss at R_max − loss at R_train) or a bootstrap over prompts (`experiments.claims`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from loopscope import dynamics
from loopscope.capture import Trajectory, capture_prompts
from loopscope.data.corpus import encode_documents, pack_sequences
from loopscope.data.gsm8k import document_text, gsm8k_test_subset
from loopscope.dynamics.rule_dynamics import MIN_RECURRENCES
from loopscope.errors import InputError
from loopscope.experiments.evaluate import gsm8k_exact_match, sequence_losses
from loopscope.experiments.stage_tables import alignment_table, model_readout, stage_table
from loopscope.models.device import Precision
from loopscope.models.load import LoadedModel
from loopscope.report import Report
from loopscope.report.extrapolate_section import add_extrapolate_section
from loopscope.resume import cached_json, cached_table, run_key

HELDOUT_SEQ_LEN = 256  # packed held-out rows, the length `loopscope train` evaluates with (TrainSettings.seq_len)
BEHAVIOUR_MIN_R = MIN_RECURRENCES  # the dynamics detector reads a tail window of at least this many recurrences
CACHE_VERSION = 3  # 3: per-text losses and per-prompt changes beside each row

__all__ = ["ExtrapolateSettings", "run_extrapolate", "add_extrapolate_section", "recurrence_grid",
           "first_recurrences"]


@dataclass
class ExtrapolateSettings:
    models: list[str]  # load_model specs (builtin names or checkpoint dirs) of trained looped models
    out: Path  # report directory (index.html, figures/, tables/, cache/)
    control: str | None = None  # feedforward model spec for stage alignment (None: skip alignment)
    data: str | None = None  # GSM8K jsonl file or directory; None → HF datasets hub (clear error offline)
    recurrences: list[int] | None = None  # None: default grid up to max_factor × trained R
    max_factor: int = 8  # default grid reaches max_factor × the training recurrences
    loss_questions: int = 256  # questions of the fixed test subset used for loss
    accuracy_questions: int = 16  # greedy-decoded for exact match; 0 skips (≈ 1.9 s/question at R=4, 10 s at R=32)
    dynamics_prompts: int = 16  # questions captured for fixed-point distance / behaviours / alignment
    progress: bool = True
    max_new_tokens: int = 256  # greedy decoding budget per question
    batch_size: int = 8  # prompts per capture batch
    precision: Precision = field(default_factory=Precision)
    overwrite: bool = False  # replace what an earlier run with other settings left in `out`

    def check(self) -> None:
        self.precision.device  # a bad --device fails first, in one line
        if not self.models:
            raise InputError("no models given; pass at least one --model (a trained looped model)")
        if self.recurrences is not None:
            check_grid(self.recurrences)
        if self.max_factor < 1:
            raise InputError(f"--max-factor {self.max_factor}: give at least 1 (8 reaches 8× the training R)")
        for name in ("loss_questions", "dynamics_prompts"):
            value = getattr(self, name)
            if not 1 <= value <= 256:
                raise InputError(f"--{name.replace('_', '-')} {value}: give 1..256 (the fixed subset has 256)")
        if not 0 <= self.accuracy_questions <= 256:
            raise InputError(f"--accuracy-questions {self.accuracy_questions}: give 0..256 (0 skips accuracy)")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise InputError("--batch-size and --max-new-tokens must be at least 1")


def check_grid(recurrences: list[int]) -> None:
    bad = [r for r in recurrences if not isinstance(r, (int, np.integer)) or r < 1]
    if bad or not recurrences:
        raise InputError(f"--recurrences {recurrences}: give positive integers, e.g. 1,2,4,8,16,32")


def recurrence_grid(trained: int, max_factor: int = 8) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, … (powers of two and 1.5× them) up to max_factor·trained, plus trained and the end.

    For trained = 4, max_factor = 8: [1, 2, 3, 4, 6, 8, 12, 16, 24, 32].
    """
    end = max(1, trained * max_factor)
    grid = {1, trained, end}
    p = 1
    while p <= end:
        grid.add(p)
        if 3 * p // 2 <= end and p >= 2:
            grid.add(3 * p // 2)
        p *= 2
    return sorted(grid)


def first_recurrences(traj: Trajectory, R: int) -> Trajectory:
    """The states of the first R recurrences of `traj`, as if captured at R: core and injected are sliced; coda,
    coda attention and logits are dropped (they are computed after the last recurrence, so they depend on R)."""
    if not 1 <= R <= traj.recurrences:
        raise InputError(f"R={R} is outside the captured 1..{traj.recurrences} recurrences")
    cut = {n: getattr(traj, n)[:R] for n in ("core", "injected", "core_attention", "exit_gate")
           if getattr(traj, n) is not None}
    return dataclasses.replace(traj, **cut, coda=None, coda_attention=None, logits=None)


def say(msg: str, progress: bool) -> None:
    if progress:
        print(msg, flush=True)


# --- per-model pieces --------------------------------------------------------------------------------------------
def require_looped(loaded: LoadedModel, spec: str):
    if not loaded.is_looped:
        raise InputError(f"model {spec!r} is a {loaded.kind} model; extrapolate needs a looped model "
                         "(pass a feedforward model as --control instead)")
    return loaded.model


def heldout_sequences(loaded: LoadedModel, rows: list[dict]) -> torch.Tensor:
    """Packed held-out rows (N, L+1) of the questions with their worked answers, as `loopscope train` evaluates."""
    seq_len = min(HELDOUT_SEQ_LEN, loaded.max_seq_len)
    return pack_sequences(encode_documents([document_text(r) for r in rows], loaded.tokenizer), seq_len)


def dynamics_columns(states: Trajectory, R: int) -> tuple[dict[str, float], list[float]]:
    """fixed_point_distance, successive_change and behaviour fractions at R, from a capture at R_max ≥ R; and each
    prompt's successive change (mean over its real tokens; empty at R = 1)."""
    K = states.block_size
    dist = dynamics.distance_to_fixed_point(states, per_token=True)
    dist = dist[(dist.layer == K - 1) & (dist.recurrence == R - 1)]
    star = states.core[-1, -1].norm(dim=-1)  # [B, T]: ‖X*‖ per token
    rel = dist["l2"].to_numpy() / star.numpy()[dist["batch"].to_numpy(), dist["token"].to_numpy()]
    out = {"fixed_point_distance": float(np.mean(rel)), "successive_change": float("nan")}
    sliced = first_recurrences(states, R)
    per_prompt: list[float] = []
    if R >= 2:  # one pass, per token: the row's mean (over all real tokens, non-finite kept) and each prompt's
        tokens = dynamics.successive_change(sliced, per_token=True)
        tokens = tokens[(tokens.layer == K - 1) & (tokens.recurrence == R - 1)]
        out["successive_change"] = float(np.mean(tokens["relative"].to_numpy()))
        per_prompt = [float(x) for x in tokens.groupby("batch")["relative"].mean().sort_index()]
    fractions = dict.fromkeys(dynamics.BEHAVIOURS, float("nan"))
    if R >= BEHAVIOUR_MIN_R:
        labels = dynamics.classify(sliced, layer=-1, method="dynamics")["behaviour"]
        fractions = {b: float((labels == b).mean()) for b in dynamics.BEHAVIOURS}
    # a fixed point reached to the rounding floor (at_floor) is a fixed point: the figure's "converged" share
    fractions["converged"] = sum(fractions[b] for b in dynamics.FIXED_BEHAVIOURS)
    return {**out, **fractions}, per_prompt


def alignment_at(loaded: LoadedModel, prompts: list[str], R: int, control_stage: pd.DataFrame,
                 s: ExtrapolateSettings) -> pd.DataFrame:
    """alignment_table rows (metric, recurrence, pearson, …) of the run at R against the control's profile."""
    with torch.inference_mode():
        traj = capture_prompts(loaded, prompts, R, attention=True, batch_size=s.batch_size, progress=False)
    return alignment_table(stage_table(traj, model_readout(loaded)), control_stage)


def row_key(loaded: LoadedModel, spec: str, R: int, r_max: int, s: ExtrapolateSettings) -> str:
    """The key of one cached (model, R) row: the model's spec, name and weights, and every setting of the row."""
    return run_key([CACHE_VERSION, str(spec), loaded.name, loaded.fingerprint(), R, r_max, s.control,
                    s.loss_questions, s.accuracy_questions, s.dynamics_prompts, s.max_new_tokens, str(s.data),
                    repr(s.precision)])


def distinct_names(loaded: dict[str, LoadedModel]) -> None:
    """Rename models that share a name (two seeds of one preset: a checkpoint's name is its preset) to
    "name [spec]", so no two models' rows are ever read as one model's."""
    names = [m.name for m in loaded.values()]
    for spec, m in loaded.items():
        if names.count(m.name) > 1:
            m.name = f"{m.name} [{spec}]"


class LazyStates:
    """The R_max capture of one model, made only when a (model, R) row is not cached."""

    def __init__(self, loaded: LoadedModel, prompts: list[str], r_max: int, s: ExtrapolateSettings) -> None:
        self.args, self.value = (loaded, prompts, r_max, s), None

    def get(self) -> Trajectory:
        if self.value is None:
            loaded, prompts, r_max, s = self.args
            with torch.inference_mode():
                self.value = capture_prompts(loaded, prompts, r_max, batch_size=s.batch_size,
                                             cache_dir=s.out / "cache" / "capture", progress=False)
        return self.value


def compute_row(loaded: LoadedModel, spec: str, R: int, states: LazyStates, heldout: torch.Tensor,
                rows: list[dict], prompts: list[str], control_stage: pd.DataFrame | None,
                s: ExtrapolateSettings) -> tuple[dict, pd.DataFrame, dict[str, list[float]]]:
    """The (model, R) row, its alignment rows, and its units: "text_loss" per held-out sequence and
    "prompt_change" per dynamics prompt."""
    model = loaded.model
    t0 = time.perf_counter()
    row: dict = {"model": loaded.name, "spec": str(spec), "trained_recurrences": loaded.recurrences,
                 "recurrences": R}
    text_loss = sequence_losses(model, heldout, batch_size=16, recurrences=R)
    row["loss"] = float(text_loss.mean())
    t1 = time.perf_counter()
    row["accuracy"], row["answered"] = float("nan"), float("nan")
    if s.accuracy_questions:
        acc = gsm8k_exact_match(model, loaded.tokenizer, rows[: s.accuracy_questions], s.max_new_tokens, R)
        row["accuracy"], row["answered"] = acc["accuracy"], acc["answered"]
    t2 = time.perf_counter()
    columns, prompt_change = dynamics_columns(states.get(), R)
    row.update(columns)
    aligned = pd.DataFrame()
    row["alignment_corr"] = row["alignment_corr_all"] = float("nan")
    if control_stage is not None:
        aligned = alignment_at(loaded, prompts, R, control_stage, s)
        if not aligned.empty:
            row["alignment_corr"] = float(np.nanmean(aligned[aligned.recurrence == R - 1]["pearson"]))
            row["alignment_corr_all"] = float(np.nanmean(aligned["pearson"]))
        aligned.insert(0, "recurrences", R)
        aligned.insert(0, "model", loaded.name)
    t3 = time.perf_counter()
    row.update({"loss_s": t1 - t0, "accuracy_s": t2 - t1, "dynamics_s": t3 - t2})
    return row, aligned, {"text_loss": [float(x) for x in text_loss], "prompt_change": prompt_change}


def control_stage_table(s: ExtrapolateSettings, prompts: list[str]) -> tuple[str, pd.DataFrame] | None:
    """The control's stage table (one pass, with attention), cached as CSV."""
    if s.control is None:
        return None
    ff = s.precision.load(s.control)

    def compute() -> pd.DataFrame:
        with torch.inference_mode():
            traj = capture_prompts(ff, prompts, 1, attention=True, batch_size=s.batch_size, progress=False)
        return stage_table(traj, model_readout(ff))

    return ff.name, cached_table(s.out / "cache" / "extrapolate" / f"control-{row_key(ff, s.control, 1, 1, s)}.csv",
                                 compute)


def last_pass_alignment(aligned: pd.DataFrame) -> pd.DataFrame:
    """Pearson r of the last pass's stage profile with the control: one row per (model, R), one column per metric."""
    if aligned.empty:
        return pd.DataFrame()
    last = aligned[aligned.recurrence == aligned.recurrences - 1]
    pivot = last.pivot_table(index=["model", "recurrences"], columns="metric", values="pearson")
    return pivot.reset_index().rename_axis(columns=None)


def run_extrapolate(s: ExtrapolateSettings) -> dict[str, pd.DataFrame]:
    """Writes the report to s.out; returns tables; tables["per_r"] has one row per (model, R) with columns
    model, trained_recurrences, recurrences, loss, accuracy, fixed_point_distance, successive_change,
    fixed_point, orbit, slider, divergent, unknown (fractions of tokens), alignment_corr (mean over stage
    metrics; NaN without control), plus spec, answered, alignment_corr_all (mean over every pass of the run)
    and the seconds each part took (loss_s, accuracy_s, dynamics_s; those of the run that computed the row);
    tables["per_text"]: model, recurrences, text, loss; tables["per_prompt"]: model, recurrences, prompt,
    successive_change."""
    s.check()
    from loopscope.output import claim_output, settings_of

    with claim_output(s.out, "extrapolate", settings_of(s), overwrite=s.overwrite) as folder:
        return write_extrapolate(s, folder)


def write_extrapolate(s: ExtrapolateSettings, folder) -> dict[str, pd.DataFrame]:
    """The body of `run_extrapolate`, in a folder it owns."""
    start = time.perf_counter()
    subset = gsm8k_test_subset(s.data)
    prompts = [r["question"] for r in subset[: s.dynamics_prompts]]
    s.out.mkdir(parents=True, exist_ok=True)
    torch_threads = torch.get_num_threads()
    say(f"extrapolate: {len(s.models)} model(s); loss on {s.loss_questions} questions, accuracy on "
        f"{s.accuracy_questions}, dynamics on {len(prompts)}", s.progress)
    control = control_stage_table(s, prompts)
    loaded_models = {}
    plan = []
    for spec in s.models:
        loaded = s.precision.load(spec)
        require_looped(loaded, spec)
        folder.record_weights(str(spec), loaded.fingerprint())
        grid = sorted(set(s.recurrences or recurrence_grid(loaded.recurrences, s.max_factor)))
        loaded_models[spec] = loaded
        plan += [(spec, R, max(grid)) for R in grid]
    distinct_names(loaded_models)
    cache = s.out / "cache" / "extrapolate"
    cache.mkdir(parents=True, exist_ok=True)
    per_r, aligned_parts, per_text, per_prompt, reused = [], [], [], [], 0

    def keep_units(row: dict, units: dict[str, list[float]]) -> None:
        key = {"model": row["model"], "recurrences": row["recurrences"]}
        per_text.extend({**key, "text": i, "loss": x} for i, x in enumerate(units["text_loss"]))
        per_prompt.extend({**key, "prompt": i, "successive_change": x} for i, x in enumerate(units["prompt_change"]))

    lazy: dict[str, tuple[LazyStates, torch.Tensor]] = {}
    bar = tqdm(plan, desc="extrapolate (model, R)", disable=not s.progress, unit="run")
    for spec, R, r_max in bar:
        bar.set_postfix_str(f"{spec} R={R}")
        loaded = loaded_models[spec]
        path = cache / f"R{R:04d}-{row_key(loaded, spec, R, r_max, s)}.json"
        reused += path.exists()

        def compute() -> dict:
            if spec not in lazy:
                lazy[spec] = (LazyStates(loaded, prompts, r_max, s),
                              heldout_sequences(loaded, subset[: s.loss_questions]))
            states, heldout = lazy[spec]
            row, aligned, units = compute_row(loaded, spec, R, states, heldout, subset, prompts,
                                              None if control is None else control[1], s)
            return {"row": row, "alignment": aligned.to_dict(orient="list"), "units": units}

        saved = cached_json(path, compute)  # the (model, R) row, its alignment and its units, whole or absent
        saved["row"]["model"] = loaded.name  # as named in this run (two checkpoints sharing a name: by path)
        per_r.append(saved["row"])
        aligned_parts.append(pd.DataFrame(saved["alignment"]).assign(model=loaded.name)
                             if saved["alignment"] else pd.DataFrame())
        keep_units(saved["row"], saved["units"])
    tables = {"per_r": pd.DataFrame(per_r),
              "per_text": pd.DataFrame(per_text, columns=["model", "recurrences", "text", "loss"]),
              "per_prompt": pd.DataFrame(per_prompt, columns=["model", "recurrences", "prompt", "successive_change"])}
    aligned_parts = [a for a in aligned_parts if not a.empty]
    tables["alignment"] = pd.concat(aligned_parts, ignore_index=True) if aligned_parts else pd.DataFrame()
    tables["alignment_last_pass"] = last_pass_alignment(tables["alignment"])
    report = Report(title="loopscope extrapolation — " + ", ".join(m.name for m in loaded_models.values()),
                    out_dir=s.out, meta={
                        "models": ", ".join(f"{m.name} (trained R = {m.recurrences})" for m in loaded_models.values()),
                        "control": control[0] if control else "none (alignment skipped)",
                        "data": f"fixed GSM8K test subset ({s.data or 'datasets hub'})",
                        "settings": {k: str(v) for k, v in dataclasses.asdict(s).items()},
                        "rows reused from cache": f"{reused} of {len(plan)}",
                        "torch threads": torch_threads,
                    })
    add_extrapolate_section(report, tables)
    report.meta["wall time"] = f"{time.perf_counter() - start:.1f} s"
    index = report.write()
    folder.finish(index)
    say(f"wrote {index}", s.progress)
    return tables
