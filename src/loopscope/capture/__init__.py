"""Capture every layer's state (and attention) at every recurrence into a `Trajectory`."""

from loopscope.capture.record import Recorder, capture, register_capture_adapter
from loopscope.capture.trajectory import Trajectory

__all__ = ["Recorder", "Trajectory", "capture", "register_capture_adapter"]
from loopscope.capture.prompts import capture_prompts, encode_prompts  # noqa: E402

__all__ += ["capture_prompts", "encode_prompts"]
