"""loopscope: mechanistic analysis of looped (depth-recurrent) language models.

Data flows one way: model → capture → Trajectory → analyses (dynamics, stages) → tables and figures → report.
"""

from loopscope.capture import Recorder, Trajectory, capture
from loopscope.models import KVCache, LoopedConfig, LoopedLM

__version__ = "0.1.0"
__all__ = ["KVCache", "LoopedConfig", "LoopedLM", "Recorder", "Trajectory", "capture"]
