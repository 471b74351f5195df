"""loopscope: mechanistic analysis of looped (depth-recurrent) language models.

Data flows one way: model → capture (streamed to accumulators, or into a Trajectory) → analyses (dynamics,
stages) → tables → report.

    import loopscope
    loaded = loopscope.load_model("default")                # a builtin, a checkpoint path, or from_hf(model, tok)
    traj = loopscope.record(loaded.model, ids, recurrences=64)  # the function; `loopscope.capture` is the package
    loopscope.dynamics.classify(traj)                        # subpackages are reachable after `import loopscope`
"""

from loopscope import accumulate, capture, dynamics, stages  # noqa: F401  (subpackages, as numpy exposes its own)
from loopscope.capture import Recorder, Trajectory
from loopscope.capture.record import capture as record
from loopscope.models import KVCache, LoopedConfig, LoopedLM, from_hf, load_model

__version__ = "0.1.0"
__all__ = ["KVCache", "LoopedConfig", "LoopedLM", "Recorder", "Trajectory", "accumulate", "capture", "dynamics",
           "from_hf", "load_model", "record", "stages"]
