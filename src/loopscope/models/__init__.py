"""Models loopscope can analyse: its own looped transformer family and loaders for other checkpoints."""

from loopscope.models.checkpoint import load_looped, save_model
from loopscope.models.config import LoopedConfig
from loopscope.models.hooks import HookPoint, Step
from loopscope.models.looped import KVCache, LoopedLM

__all__ = ["HookPoint", "KVCache", "LoopedConfig", "LoopedLM", "Step", "load_looped", "save_model"]
from loopscope.models.in_memory import from_hf  # noqa: E402
from loopscope.models.load import LoadedModel, load_model, register_builtin, register_loader  # noqa: E402

__all__ += ["LoadedModel", "from_hf", "load_model", "register_builtin", "register_loader"]
