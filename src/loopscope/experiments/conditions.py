"""`loopscope conditions`: orbit / slider rates of GSM8K questions under system-prompt conditions.

Blayney et al. (2026) App. C.1 (spec §2, §7): per token, the final recurrent layer's trajectory is classified as
fixed point / orbit / slider / unknown; about 0.02% of tokens are not fixed points without a system prompt and
0.14% with the Long Persona prompt, and a same-length padded prompt raises the rate less, so length alone does not
explain it. We repeat this for a model under the four conditions of `data.system_prompts` (three of whose texts
are reconstructed, see that module), with both classifiers (`dynamics.classify`, method "dynamics" and the
reconstructed App. C heuristic "paper"), at the last block layer.

Which tokens count: the **question tokens only**. The paper classifies "all tokens of the GSM8k test set"; under
a system prompt the GSM8K tokens are the question's, and counting the system prompt's own tokens would make the
padded condition (hundreds of identical pad tokens) and the persona incomparable with `none`. A second table
(`tables/conditions_all_tokens.csv`, returned as `table.attrs["all_tokens"]`) counts every real token, BOS and
system prompt included.

Which questions: the first `questions` of the fixed GSM8K test subset that fit the model's context after the
longest requested system prompt (the long persona is ≈ 420 tokens with the bundled tokenizer, so questions over
≈ 90 tokens do not fit a 512-token context); the same questions serve every condition, so the rates compare.
A model trained on shorter sequences (the builtin `default`: 256) sees the persona's question at untrained positions.

Recurrences: the paper classifies over 128 recurrences (App. C.1); our default is 64 to halve the CPU cost.
Each condition's per-token labels are cached under OUT/cache/conditions, so an interrupted run resumes.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from loopscope import dynamics
from loopscope.capture import capture
from loopscope.capture.prompts import pad_id, pad_right
from loopscope.data.gsm8k import gsm8k_test_subset
from loopscope.data.system_prompts import SYSTEM_PROMPT_CONDITIONS, apply_condition, get_condition, system_token_ids
from loopscope.dynamics.behaviour import METHODS
from loopscope.dynamics.rule_dynamics import MIN_RECURRENCES
from loopscope.errors import InputError
from loopscope.models.device import Precision
from loopscope.models.load import LoadedModel
from loopscope.output import claim_output
from loopscope.report import Report
from loopscope.report.conditions_section import add_conditions_section
from loopscope.resume import cached_table, run_key

BATCH_SIZE = 4  # questions per capture: R=64, K=4, T≈300, D=128 is ≈ 40 MB per question in fp32

__all__ = ["run_conditions", "add_conditions_section", "condition_labels", "behaviour_fractions"]


def encode(loaded: LoadedModel, questions: list[str], condition: str) -> tuple[list[list[int]], int]:
    """Token ids of each question under `condition`, and the position where the question starts."""
    ids = [apply_condition(q, condition, loaded.tokenizer) for q in questions]
    start = (loaded.tokenizer.bos_token_id is not None) + len(system_token_ids(condition, loaded.tokenizer))
    too_long = [len(x) for x in ids if len(x) > loaded.max_seq_len]
    if too_long:
        raise InputError(f"condition {condition!r}: a question is {max(too_long)} tokens, longer than the model's "
                         f"context of {loaded.max_seq_len}; use fewer/shorter questions or another condition")
    return ids, start


def fitting_questions(loaded: LoadedModel, subset: list[dict], names: list[str], n: int) -> tuple[list[dict], int]:
    """The first n questions of the subset that fit the model's context under every condition (the same
    questions for all conditions, so rates compare), and how many were passed over."""
    longest = max(len(system_token_ids(c, loaded.tokenizer)) for c in names) + 1  # + BOS
    fit = [r for r in subset
           if longest + len(loaded.tokenizer(r["question"], add_special_tokens=False)["input_ids"])
           <= loaded.max_seq_len]
    if not fit:
        raise InputError(f"no question fits the model's context of {loaded.max_seq_len} tokens after the longest "
                         f"system prompt ({longest} tokens); drop that condition with --condition")
    chosen = fit[:n]
    return chosen, subset.index(chosen[-1]) + 1 - len(chosen)


def condition_labels(loaded: LoadedModel, questions: list[str], condition: str, recurrences: int) -> pd.DataFrame:
    """Per real token of every question: batch, token, question (bool: a question token), method, behaviour."""
    ids, start = encode(loaded, questions, condition)
    parts = []
    for b0 in range(0, len(ids), BATCH_SIZE):
        x, mask = pad_right(ids[b0: b0 + BATCH_SIZE], pad_id(loaded.tokenizer))
        with torch.inference_mode():
            traj = capture(loaded.model, x, recurrences=recurrences, mask=mask)  # states only, right-padded
        for method in METHODS:
            labels = dynamics.classify(traj, layer=-1, method=method)[["batch", "token", "behaviour"]]
            labels["batch"] += b0
            labels["method"] = method
            parts.append(labels)
    out = pd.concat(parts, ignore_index=True)
    out["question"] = out["token"] >= start
    return out


def behaviour_fractions(labels: pd.DataFrame) -> pd.DataFrame:
    """One row per method: n (tokens), the fraction of tokens per behaviour (these sum to 1), and the non-fixed-point
    rate's 95 % bootstrap interval over questions (`non_fixed_low`, `non_fixed_high`: the tokens of one question
    share its context, so questions are the units; `evidence.bootstrap_ratio`)."""
    from loopscope.evidence import bootstrap_ratio

    counts = pd.crosstab(labels["method"], labels["behaviour"]).reindex(columns=list(dynamics.BEHAVIOURS),
                                                                        fill_value=0)
    n = counts.sum(axis=1)
    frac = counts.div(n, axis=0)
    frac.insert(0, "n", n)
    bounds = {}
    for method, per_q in question_counts(labels).groupby("method"):
        _, lo, hi = bootstrap_ratio(per_q["non_fixed"].to_numpy(float), per_q["n"].to_numpy(float))
        bounds[method] = (float(lo), float(hi))
    frac["non_fixed_low"] = [bounds[m][0] for m in frac.index]
    frac["non_fixed_high"] = [bounds[m][1] for m in frac.index]
    return frac.reset_index()


def question_counts(labels: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, question): question (its position in the questions passed, the same under every
    condition), n (its tokens), non_fixed (of them, not at a fixed point) — the units of the paired bootstrap
    between conditions (`claims.rule_persona`)."""
    flagged = labels.assign(non_fixed=~labels["behaviour"].isin(dynamics.FIXED_BEHAVIOURS))
    out = flagged.groupby(["method", "batch"])["non_fixed"].agg(n="size", non_fixed="sum").reset_index()
    return out.rename(columns={"batch": "question"}).astype({"n": int, "non_fixed": int})


def run_conditions(model: str, out: Path, data: str | None = None, questions: int = 16, recurrences: int = 64,
                   conditions: list[str] | None = None, progress: bool = True,
                   precision: Precision | None = None, overwrite: bool = False) -> pd.DataFrame:
    """One row per (condition, method): condition, method, reconstructed, n (question tokens), fixed_point, orbit,
    slider,
    divergent, unknown (fractions of question tokens). `table.attrs["all_tokens"]` is the same over every real
    token; `table.attrs["by_question"]` counts the question tokens per (condition, method, question)
    (`question_counts`). Writes OUT/index.html, figures, tables."""
    start = time.perf_counter()
    precision = precision or Precision()
    precision.device  # a bad --device fails first, in one line
    names = list(SYSTEM_PROMPT_CONDITIONS) if conditions is None else list(conditions)
    if not names:
        raise InputError("--conditions is empty; give one or more of " + ", ".join(SYSTEM_PROMPT_CONDITIONS))
    for name in names:
        get_condition(name)  # InputError naming the valid ones
    if not 1 <= questions <= 256:
        raise InputError(f"--questions {questions}: give 1..256 (the fixed GSM8K test subset has 256)")
    if recurrences < MIN_RECURRENCES:
        raise InputError(f"--recurrences {recurrences}: both classifiers need at least {MIN_RECURRENCES} (the paper "
                         "uses 128)")
    subset = gsm8k_test_subset(data)
    settings = {"model": model, "data": data, "questions": questions, "recurrences": recurrences,
                "conditions": names, "precision": repr(precision)}
    with claim_output(Path(out), "conditions", settings, overwrite=overwrite) as folder:
        table = write_conditions(model, Path(out), subset, names, questions, recurrences, progress, precision,
                                 folder, start)
    return table


def write_conditions(model: str, out: Path, subset: list[dict], names: list[str], questions: int, recurrences: int,
                     progress: bool, precision: Precision, folder, start: float) -> pd.DataFrame:
    """The body of `run_conditions`, in a folder it owns."""
    loaded = precision.load(model)
    folder.record_weights(loaded.name, loaded.fingerprint())
    if not loaded.is_looped:
        raise InputError(f"model {model!r} is a {loaded.kind} model; conditions needs a looped model")
    rows, skipped = fitting_questions(loaded, subset, names, questions)
    weights = loaded.fingerprint()  # in every cached label table's key: a retrained model never reads old labels
    out = Path(out)
    cache = out / "cache" / "conditions"
    cache.mkdir(parents=True, exist_ok=True)
    tables: dict[str, list] = {"question": [], "all": [], "by_question": []}
    for name in tqdm(names, desc=f"conditions R={recurrences}", disable=not progress, unit="condition"):
        key = run_key([model, weights, [r["index"] for r in rows], recurrences, name, repr(precision)])
        labels = cached_table(cache / f"{name}-{key}.csv",
                              lambda: condition_labels(loaded, [r["question"] for r in rows], name, recurrences))
        cond = get_condition(name)
        tables["by_question"].append(question_counts(labels[labels["question"]]).assign(condition=name))
        for scope, part in (("question", labels[labels["question"]]), ("all", labels)):
            frac = behaviour_fractions(part)
            frac.insert(0, "condition", name)
            frac.insert(2, "reconstructed", cond.reconstructed)
            tables[scope].append(frac)
    table = pd.concat(tables["question"], ignore_index=True)
    table.columns.name = None
    table.attrs["all_tokens"] = pd.concat(tables["all"], ignore_index=True).rename_axis(columns=None)
    by_question = pd.concat(tables["by_question"], ignore_index=True)
    table.attrs["by_question"] = by_question[["condition", "method", "question", "n", "non_fixed"]]
    report = Report(title=f"loopscope system-prompt conditions — {loaded.name}", out_dir=out, meta={
        "model": loaded.name,
        "questions": f"first {len(rows)} of the fixed GSM8K test subset that fit the context under every condition "
                     f"({skipped} longer ones passed over)",
        "recurrences": f"{recurrences} (the paper classifies over 128)",
        "conditions": ", ".join(names),
    })
    add_conditions_section(report, table)
    report.meta["wall time"] = f"{time.perf_counter() - start:.1f} s"
    index = report.write()
    folder.finish(index)
    if progress:
        print(f"wrote {index}", flush=True)
    return table
