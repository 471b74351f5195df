"""`loopscope compare`: a looped model's stages of inference against a feedforward model's, with alignment scores.

The looped model is streamed at R recurrences with attention, the feedforward model once; both profiles go on
relative depth (prelude + pass + coda = 0..100 %) and every recurrence gets an alignment score per metric.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loopscope.capture.stream import StreamSettings, stream_prompts
from loopscope.data.prompts import load_prompts
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
from loopscope.models.device import Precision
from loopscope.output import claim_output, settings_of
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
    precision: Precision = field(default_factory=Precision)
    overwrite: bool = False  # replace what an earlier run with other settings left in `out`


def stream_stages(loaded, prompts: list[str], recurrences: int, s: CompareSettings, label: str):
    """(stage table, Prop. 4.2 checks or None) of one model, streamed with attention."""
    from loopscope.models.weights import attention_projections
    from loopscope.stages.prop42 import Prop42Check

    accs = stage_accumulators(model_readout(loaded))
    if loaded.is_looped and recurrences >= 2:
        accs.append(Prop42Check(attention_projections(loaded.model)))
    with torch.inference_mode():
        tables, _ = stream_prompts(loaded, prompts, accs, StreamSettings(
            recurrences, attention=True, batch_size=s.batch_size, cache_dir=s.out / "cache", progress=s.progress,
            label=label))
    return stage_table_from(tables), tables.get("prop42")


def run_compare(s: CompareSettings) -> Path:
    if s.recurrences < 1:
        raise InputError(f"--recurrences {s.recurrences}: give at least 1")
    prompts = load_prompts(s.prompts, limit=s.max_prompts)
    with claim_output(s.out, "compare", settings_of(s), overwrite=s.overwrite) as folder:
        return write_compare(s, prompts, folder)


def write_compare(s: CompareSettings, prompts: list[str], folder) -> Path:
    start = time.perf_counter()
    looped, ff = s.precision.load(s.looped), s.precision.load(s.feedforward)
    folder.record_weights(f"looped {looped.name}", looped.fingerprint())
    folder.record_weights(f"feedforward {ff.name}", ff.fingerprint())
    looped_table, checks = stream_stages(looped, prompts, s.recurrences, s, "looped")
    ff_table, _ = stream_stages(ff, prompts, 1, s, "feedforward")
    aligned = alignment_table(looped_table, ff_table)
    if s.progress:
        print("drawing figures and writing the report …", flush=True)
    report = Report(f"loopscope compare — {looped.name} vs {ff.name}", s.out, meta={
        "looped": looped.name, "feedforward": ff.name,
        "prompts": f"{s.prompts} ({len(prompts)} prompts)", "recurrences": s.recurrences,
        "precision": s.precision.describe(),
    })
    add_stages_section(report, looped_table, STAGE_METRICS, model_name=looped.name, feedforward=ff_table,
                       ff_name=ff.name, alignment=aligned,
                       prop42=None if checks is None else prop42_table_summary(checks),
                       neurons=model_neuron_fractions(looped))
    add_stages_section(report, ff_table, STAGE_METRICS, model_name=f"{ff.name} (feedforward)",
                       neurons=model_neuron_fractions(ff), prefix="feedforward_")  # own file names: no overwrite
    report.meta["wall time"] = f"{time.perf_counter() - start:.1f} s"
    index = report.write()
    folder.finish(index)
    if s.progress:
        print(f"wrote {index} ({time.perf_counter() - start:.0f} s)", flush=True)
    return index
