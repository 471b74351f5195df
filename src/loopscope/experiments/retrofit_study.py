"""The paper's retrofit claims measured on a real pretrained looped model: the healed SmolLM2 retrofit
(`smollm2-looped`) against SmolLM2 itself (Blayney et al. 2026 §4 item 3, §5 items 2 and 4, §6.2).

Four stages, each a set of tables (`reproduce` caches them under OUT/stages/retrofit-*):

    retrofit-base         SmolLM2's stage profile over depth (one pass, with attention) on the analysis prompts
    retrofit-analyze      `loopscope analyze` of the looped model at the paper's R = 128 (dynamics, per-token
                          behaviours, attention stabilisation, stages per recurrence aligned with SmolLM2's depth
                          profile), plus `fixed_points_by_prompt` (per prompt: tokens, tokens whose last block layer
                          reached a fixed point, of them distinct) for the bootstrap over prompts
    retrofit-ablate       the Fig. 41 ablation on the looped model: zero the MLP where massive activations begin
                          (SmolLM2's layer 11, in the prelude here) at every pass, stages before / after
    retrofit-extrapolate  per R = 1 … ≥ 8 × the training R: held-out loss per text (the healing's 8 held-out GSM8K
                          texts) and task accuracy per question (`TASK`), for the looped model and for SmolLM2 (R = 1)
    retrofit-prompts      the units of the stage and attention rows' bootstrap over prompts: each prompt streamed
                          alone, the looped model at the attention run's R and SmolLM2 once — per (prompt, pass) the
                          Pearson r of the pass's ColSum profile with SmolLM2's depth profile of the same prompt, and
                          per prompt the share of its (recurrence, layer) patterns whose nearest pattern from another
                          recurrence is in the same layer

The task: reasoning-gym's `chain_sum` with two one-digit terms (a + b or a − b), four-shot, greedy, exact match.
Why: the paper only cites accuracy under extrapolation; measuring it needs a task the model can do at all.
GSM8K is beyond a 135M model (SmolLM2-135M-Instruct: ≈ 1–2 % exact match); one-digit sums are not (SmolLM2 well
above the majority-answer baseline; measured in `reproduce`'s table `retrofit_accuracy`). Chance is the
majority-answer rate of the sampled questions (the accuracy of always answering the most common result).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from loopscope.evidence import bootstrap_mean, bootstrap_ratio

LOOPED_MODEL, BASE_MODEL = "smollm2-looped", "smollm2"
TASK = "chain_sum"
TASK_OPTIONS = dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1)
FEW_SHOT = "3 + 4 = 7\n8 - 5 = 3\n2 + 6 = 8\n9 - 7 = 2\n"  # fixed, not drawn from the evaluated questions


@dataclass(frozen=True)
class RetrofitPlan:
    model: str = LOOPED_MODEL  # the looped retrofit analysed (a load_model spec)
    base: str = BASE_MODEL  # its feedforward base model
    prompts: int = 16  # GSM8K test-subset questions analysed
    recurrences: int = 128  # the paper's R for the dynamics
    attention_recurrences: int = 8  # R of the capture with attention (stages per pass, Prop. 4.2)
    extrapolate: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)  # reaches ≥ 8 × the training R (8)
    task_questions: int = 64
    task_seed: int = 0
    certificate_tokens: int = 16  # tokens of the looped model certified (block Jacobian at R)


# ---------------------------------------------------------------------------------------------- the task

def task_rows(n: int, seed: int = 0) -> list[dict]:
    """n one-digit `chain_sum` problems from reasoning-gym: {expression, answer} (answer an int)."""
    import reasoning_gym

    rows = []
    for x in reasoning_gym.create_dataset(TASK, size=n, seed=seed, **TASK_OPTIONS):
        expression = x["question"].rsplit(":", 1)[-1].strip().removesuffix("=").strip()
        rows.append({"expression": expression, "answer": int(x["answer"])})
    return rows


def majority_rate(rows: list[dict]) -> float:
    """Accuracy of always answering the most common result: the task's chance level."""
    counts = pd.Series([r["answer"] for r in rows]).value_counts()
    return float(counts.iloc[0] / len(rows))


def model_logits(model, ids: torch.Tensor, recurrences: int | None) -> torch.Tensor:
    """Logits (B, T, V) of a LoopedLM at `recurrences`, or of a Hugging Face causal LM (which runs once)."""
    from loopscope.models.looped import LoopedLM

    if isinstance(model, LoopedLM):
        return model(ids, recurrences=recurrences)
    return model(ids).logits


ANSWER = re.compile(r"\s*(-?\d+)")


@torch.no_grad()
def task_correct(model, tokenizer, rows: list[dict], recurrences: int | None, max_new_tokens: int = 4) -> np.ndarray:
    """1/0 per question: greedy continuation of FEW_SHOT + 'a ± b =' (no cache: ≤ 4 tokens) parses to the answer."""
    newline = tokenizer("\n", add_special_tokens=False).input_ids[-1]
    out = []
    for row in rows:
        ids = tokenizer(FEW_SHOT + row["expression"] + " =", add_special_tokens=False).input_ids
        new: list[int] = []
        for _ in range(max_new_tokens):
            nxt = int(model_logits(model, torch.tensor([ids + new]), recurrences)[0, -1].argmax())
            if nxt == newline:
                break
            new.append(nxt)
        m = ANSWER.match(tokenizer.decode(new))
        out.append(int(m is not None and int(m.group(1)) == row["answer"]))
    return np.array(out, dtype=np.int64)


# ---------------------------------------------------------------------------------------------- the stages

def fixed_points_by_prompt(degeneracy: pd.DataFrame) -> pd.DataFrame:
    """Per prompt: tokens, converged (last block layer at its fixed point), distinct (converged and the layers'
    fixed points distinct). `degeneracy` is `dynamics.degeneracy`'s per-token table."""
    from loopscope.dynamics.degeneracy import DISTINCT, NO_FIXED_POINT

    g = degeneracy.assign(converged=degeneracy["verdict"] != NO_FIXED_POINT,
                          distinct=degeneracy["verdict"] == DISTINCT).groupby("batch")
    return pd.DataFrame({"tokens": g.size(), "converged": g["converged"].sum(),
                         "distinct": g["distinct"].sum()}).reset_index()


def extrapolation_tables(plan: RetrofitPlan, data: str | None, progress: bool, precision) -> dict[str, pd.DataFrame]:
    """`retrofit_loss` (model, recurrences, text, loss_sum, targets) and `retrofit_accuracy` (model, recurrences,
    question, correct, chance), the looped model at every R of the plan and SmolLM2 once."""
    from tqdm.auto import tqdm

    from loopscope.experiments.heal import encode_texts, heldout_texts, text_losses

    rows = task_rows(plan.task_questions, plan.task_seed)
    chance = majority_rate(rows)
    loss, acc, trained = [], [], {}
    for name, rs in ((plan.base, (1,)), (plan.model, plan.extrapolate)):
        loaded = precision.load(name)
        trained[name] = int(getattr(getattr(loaded.model, "cfg", None), "recurrences", 1) or 1) \
            if loaded.is_looped else 1
        texts = encode_texts(heldout_texts(data), loaded.tokenizer)
        for R in tqdm(rs, desc=f"{name}: loss and accuracy per R", disable=not progress):
            per = text_losses(_Logits(loaded.model), texts, R)
            loss += [{"model": name, "recurrences": R, "text": i, "loss_sum": p[0], "targets": int(p[1])}
                     for i, p in enumerate(per)]
            correct = task_correct(loaded.model, loaded.tokenizer, rows, R)
            acc += [{"model": name, "recurrences": R, "question": i, "correct": int(c), "chance": chance}
                    for i, c in enumerate(correct)]
        del loaded
    loss, acc = pd.DataFrame(loss), pd.DataFrame(acc)
    return {"retrofit_loss": loss, "retrofit_accuracy": acc, "summary": extrapolation_summary(loss, acc, trained)}


class _Logits(torch.nn.Module):
    """`model(ids, recurrences=R)` → logits for a LoopedLM or a HF LM (what `heal.text_losses` calls)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.inner = model

    def forward(self, ids: torch.Tensor, recurrences: int | None = None) -> torch.Tensor:
        return model_logits(self.inner, ids, recurrences)


# ---------------------------------------------------------------------------------------------- summaries

def extrapolation_summary(loss: pd.DataFrame, accuracy: pd.DataFrame, trained: dict[str, int]) -> pd.DataFrame:
    """Per (model, R): pooled held-out loss with a bootstrap interval over texts, accuracy with an interval over
    questions, the chance rate, and the mean per-text loss minus the same model's at R = 1 (the loop's use) and at
    its training R (extrapolation), each with its paired bootstrap interval over texts. The first model of `loss`
    is the feedforward base (`looped` False)."""
    out = []

    def per_text(model: str, R: int) -> np.ndarray:
        part = loss[(loss["model"] == model) & (loss["recurrences"] == R)].sort_values("text")
        return part["loss_sum"].to_numpy() / part["targets"].to_numpy()

    for (model, R), part in loss.groupby(["model", "recurrences"]):
        part = part.sort_values("text")
        mean, lo, hi = bootstrap_ratio(part["loss_sum"].to_numpy(), part["targets"].to_numpy())
        row = {"model": model, "recurrences": int(R), "trained_recurrences": trained.get(model, 1),
               "looped": model != loss["model"].iloc[0], "loss": mean, "loss_lo": lo, "loss_hi": hi}
        for ref, name in ((1, "r1"), (trained.get(model, 1), "trained")):
            have = ((loss["model"] == model) & (loss["recurrences"] == ref)).any()
            g = bootstrap_mean(per_text(model, R) - per_text(model, ref)) if have else (np.nan,) * 3
            row.update({f"loss_minus_{name}": g[0], f"loss_minus_{name}_lo": g[1], f"loss_minus_{name}_hi": g[2]})
        a = accuracy[(accuracy["model"] == model) & (accuracy["recurrences"] == R)]
        acc, alo, ahi = bootstrap_mean(a["correct"].to_numpy()) if len(a) else (np.nan,) * 3
        row.update({"accuracy": acc, "accuracy_lo": alo, "accuracy_hi": ahi,
                    "chance": float(a["chance"].iloc[0]) if len(a) else np.nan, "questions": len(a),
                    "texts": len(part)})
        out.append(row)
    return pd.DataFrame(out)


def fixed_point_summary(by_prompt: pd.DataFrame) -> dict[str, float]:
    """Fractions of tokens converged and distinct at R, with bootstrap intervals over prompts."""
    out = {}
    for col in ("converged", "distinct"):
        p, lo, hi = bootstrap_ratio(by_prompt[col].to_numpy(), by_prompt["tokens"].to_numpy())
        out.update({f"fraction_{col}": p, f"fraction_{col}_lo": lo, f"fraction_{col}_hi": hi})
    out["tokens"] = int(by_prompt["tokens"].sum())
    out["prompts"] = len(by_prompt)
    return out


def alignment_summary(alignment: pd.DataFrame, metric: str = "colsum_concentration") -> dict[str, float]:
    """Median over passes of the Pearson r between a pass's profile and SmolLM2's depth profile, with a bootstrap
    interval over passes; and the last pass's r."""
    a = alignment[alignment["metric"] == metric].sort_values("recurrence")
    r = a["pearson"].to_numpy(dtype=float)
    if not len(r):
        return {"alignment_median": np.nan, "alignment_lo": np.nan, "alignment_hi": np.nan, "alignment_last": np.nan}
    rng = np.random.default_rng(0)
    reps = np.median(rng.choice(r, size=(2000, len(r)), replace=True), axis=1)
    return {"alignment_median": float(np.median(r)), "alignment_lo": float(np.quantile(reps, 0.025)),
            "alignment_hi": float(np.quantile(reps, 0.975)), "alignment_last": float(r[-1]), "passes": len(r)}


# ---------------------------------------------------------------------------------------------- the run

def model_id(spec: str) -> str:
    """What the analyses depend on: for the shipped builtin, its delta's sha256 (a new delta reruns every retrofit
    stage); otherwise the spec itself."""
    if spec != LOOPED_MODEL:
        return spec
    from loopscope.models.builtin import SMOLLM2_LOOPED_DIR
    from loopscope.models.healed import DELTA_TENSORS, file_sha256

    return file_sha256(SMOLLM2_LOOPED_DIR / DELTA_TENSORS)[:16]


def retrofit_stages(p, questions: list[str], data: str | None, plan: RetrofitPlan) -> dict[str, dict]:
    """Run (or load) the four retrofit stages through `p.stage` (a `reproduce.Pipeline`)."""
    from loopscope.experiments.reproduce_stages import ablation_stage, analyse_model, control_tables

    s = p.s
    prompts = questions[: plan.prompts]
    delta = model_id(plan.model)
    work = p.cache.dir("retrofit-base") / "work"
    base = p.stage("retrofit-base", {"model": plan.base, "prompts": plan.prompts},
                   lambda: control_tables(plan.base, prompts, work, s.progress, s.precision), scratch=work)
    work_a = p.cache.dir("retrofit-analyze") / "work"

    def analyse() -> dict[str, pd.DataFrame]:
        tables = analyse_model(plan.model, plan.model, prompts, base["stages"], plan, work_a, s.progress,
                               s.precision)
        tables["fixed_points_by_prompt"] = fixed_points_by_prompt(tables["degeneracy"])
        return tables

    analysis = p.stage("retrofit-analyze", {"delta": delta, "prompts": plan.prompts, "recurrences": plan.recurrences,
                                            "attention_recurrences": plan.attention_recurrences}, analyse,
                       scratch=work_a)
    ablation = p.stage("retrofit-ablate", {"delta": delta, "prompts": plan.prompts, "R": plan.attention_recurrences},
                       lambda: ablation_stage(plan.model, plan.model, prompts, plan.attention_recurrences,
                                              s.progress, s.precision))

    extrap = p.stage("retrofit-extrapolate", {"delta": delta, "base": plan.base, "R": list(plan.extrapolate),
                                              "questions": plan.task_questions, "seed": plan.task_seed},
                     lambda: extrapolation_tables(plan, data, s.progress, s.precision))
    work_u = p.cache.dir("retrofit-prompts") / "work"
    units = p.stage("retrofit-prompts", {"delta": delta, "base": plan.base, "prompts": plan.prompts,
                                         "R": plan.attention_recurrences},
                    lambda: prompt_units(plan, prompts, work_u, s.progress, s.precision), scratch=work_u)
    return {"base": base, "analysis": analysis, "ablation": ablation, "extrapolate": extrap, "prompts": units}


def prompt_units(plan: RetrofitPlan, prompts: list[str], work, progress: bool, precision) -> dict[str, pd.DataFrame]:
    """`alignment_by_prompt` (prompt, recurrence, pearson) and `attention_by_prompt` (prompt, self_match, patterns):
    one prompt at a time, so that the stage and attention rows resample prompts, not passes or patterns."""
    from tqdm.auto import tqdm

    from loopscope.capture.stream import StreamSettings, stream_prompts
    from loopscope.dynamics.attention_stability import attention_self_match
    from loopscope.dynamics.similarity import AttentionDistance
    from loopscope.experiments.pretrained_study import PROFILE_COLUMNS, alignment_by_prompt, profiles_by_prompt
    from loopscope.experiments.stage_tables import model_readout, stage_accumulators, stage_table_from

    base = profiles_by_prompt(precision.load(plan.base), prompts, 1, work / "base", progress)
    looped = precision.load(plan.model)
    R = plan.attention_recurrences
    profiles, attention = [], []
    for i, prompt in enumerate(tqdm(prompts, desc=f"{looped.name}: prompt by prompt", disable=not progress)):
        with torch.inference_mode():
            tables, _ = stream_prompts(looped, [prompt], [*stage_accumulators(model_readout(looped)),
                                                          AttentionDistance()],
                                       StreamSettings(R, attention=True, batch_size=1, cache_dir=work / f"p{i:04d}",
                                                      progress=False, label="units"))
        t = stage_table_from(tables)
        profiles.append(t[[c for c in PROFILE_COLUMNS if c in t]].assign(prompt=i))
        distance = tables["attention_distance"]
        attention.append({"prompt": i, "self_match": attention_self_match(distance) if R >= 2 else np.nan,
                          "patterns": len(distance)})
    return {"alignment_by_prompt": alignment_by_prompt(pd.concat(profiles, ignore_index=True), base),
            "attention_by_prompt": pd.DataFrame(attention)}


def retrofit_measurements(r: dict[str, dict]) -> dict[str, pd.DataFrame]:
    """The tables `experiments.retrofit_claims` reads, from the stages' tables."""
    summary = r["analysis"]["summary"].iloc[0]
    row = {**fixed_point_summary(r["analysis"]["fixed_points_by_prompt"]),
           **alignment_summary(r["analysis"]["alignment"]),
           "recurrences": int(summary["recurrences"]),
           **{k: float(summary[k]) for k in ("stage_repeat_error", "attention_self_match", "attention_shrink",
                                             "massive_ratio")}}
    row["model"] = str(summary["model"])
    distances = r["analysis"].get("attention_distance")  # one row per (layer, recurrence) pattern compared
    row["attention_patterns"] = len(distances) if distances is not None else float("nan")
    out = {"retrofit": pd.DataFrame([row]), "retrofit_ablation": r["ablation"]["summary"],
           "retrofit_extrapolate": r["extrapolate"]["summary"]}
    if "prompts" in r:
        out["retrofit_alignment_by_prompt"] = r["prompts"]["alignment_by_prompt"]
        out["retrofit_attention_by_prompt"] = r["prompts"]["attention_by_prompt"]
    return out
