"""Errors loopscope raises on bad input.

Every message says what is wrong and how to fix it; the CLI prints the message alone (no traceback)
and exits with status 2.
"""


class LoopscopeError(Exception):
    """Base class: a problem with what the user gave us (a path, a prompt, a number)."""


class CheckpointError(LoopscopeError):
    """A model directory or weight file is missing, malformed, or does not match its config."""


class InputError(LoopscopeError):
    """A prompt, token sequence or argument is unusable (empty, too long, out of range)."""
