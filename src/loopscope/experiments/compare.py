"""`loopscope compare`: a looped model's stages of inference against a feedforward model's, with alignment scores.

The looped model is captured at R recurrences with attention, the feedforward model once; both profiles go on
relative depth (prelude + pass + coda = 0..100 %) and every recurrence gets an alignment score per metric.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from loopscope.capture import capture_prompts
from loopscope.data.prompts import load_prompts
from loopscope.errors import InputError
from loopscope.experiments.stage_tables import (
    STAGE_METRICS,
    alignment_table,
    model_neuron_fractions,
    model_readout,
    prop42_summary,
    stage_table,
)
from loopscope.models.load import load_model
from loopscope.report import Report
from loopscope.report.stages_section import add_stages_section


@dataclass
class CompareSettings:
    looped: str
    feedforward: str
    prompts: str = "gsm-symbolic"
    out: Path = Path("reports/compare")
    recurrences: int = 8
    max_prompts: int | None = None
    batch_size: int = 8
    progress: bool = True


def run_compare(s: CompareSettings) -> Path:
    if s.recurrences < 1:
        raise InputError(f"--recurrences {s.recurrences}: give at least 1")
    start = time.perf_counter()
    looped, ff = load_model(s.looped), load_model(s.feedforward)
    prompts = load_prompts(s.prompts, limit=s.max_prompts)
    cache = s.out / "cache"
    with torch.inference_mode():
        lt = capture_prompts(looped, prompts, s.recurrences, attention=True, batch_size=s.batch_size,
                             cache_dir=cache, progress=s.progress)
        ft = capture_prompts(ff, prompts, 1, attention=True, batch_size=s.batch_size, cache_dir=cache,
                             progress=s.progress)
    looped_table, ff_table = stage_table(lt, model_readout(looped)), stage_table(ft, model_readout(ff))
    aligned = alignment_table(looped_table, ff_table)
    report = Report(f"loopscope compare — {looped.name} vs {ff.name}", s.out, meta={
        "looped": looped.name, "feedforward": ff.name,
        "prompts": f"{s.prompts} ({len(prompts)} prompts)", "recurrences": s.recurrences,
    })
    add_stages_section(report, looped_table, STAGE_METRICS, model_name=looped.name, feedforward=ff_table,
                       ff_name=ff.name, alignment=aligned, prop42=prop42_summary(looped, prompts[:4], s.recurrences),
                       neurons=model_neuron_fractions(looped))
    add_stages_section(report, ff_table, STAGE_METRICS, model_name=f"{ff.name} (feedforward)",
                       neurons=model_neuron_fractions(ff), prefix="feedforward_")  # own file names: no overwrite
    report.meta["wall time"] = f"{time.perf_counter() - start:.1f} s"
    return report.write()
