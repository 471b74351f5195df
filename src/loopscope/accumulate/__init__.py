"""Streaming analysis: metrics as accumulators fed state by state, reduced per batch, combined at the end.

    model ──► capture (StreamRecorder, or a Trajectory replayed) ──► Accumulator.observe(site, step, x)
          ──► Accumulator.end() → one small Part per batch ──► Accumulator.combine(parts) → tidy DataFrame

Every metric loopscope reports is one `Accumulator` (written next to its formula in `loopscope.dynamics` or
`loopscope.stages`). The in-memory API (`dynamics.successive_change(traj)` …) replays a `Trajectory` through the
same accumulator as one batch, so each metric exists once. A batch's `Part` holds only reduced results (per-cell
moments, per-token scalars, per-prompt rows), never states: it is what the resume cache stores and what
`torch.distributed` ranks send to rank 0. Parts are folded in batch order, so a run split into batches, resumed,
or sharded over processes gives the same tables as one uninterrupted run.
"""

from loopscope.accumulate.core import Accumulator, BatchContext, Finals, Part, run_accumulators
from loopscope.accumulate.parts import decode_part, encode_part
from loopscope.accumulate.replay import context_from_trajectory, replay
from loopscope.accumulate.stats import LogHistogram, Moments

__all__ = ["Accumulator", "BatchContext", "Finals", "LogHistogram", "Moments", "Part", "context_from_trajectory",
           "decode_part", "encode_part", "replay", "run_accumulators"]
