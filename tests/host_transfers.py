"""Count the ways a tensor reaches the host (issue 21): on a GPU each one is a device → host copy and a
synchronisation, so an analysis that makes one per (recurrence, layer, head) is bound by them, not by the forward.

On a CPU nothing moves, but the calls are the same code paths, so counting them here proves the design: what a
streamed batch hands to the host must not grow with R or with the number of heads. Counted: `Tensor.cpu`,
`.item`, `.tolist`, `.numpy`, `.to(<the CPU>)`, and the implicit syncs `float(t)`, `int(t)`, `bool(t)` (`if t:`),
each keyed by (method, file, line) of the caller inside loopscope.
"""

from __future__ import annotations

import collections
import contextlib
import sys

import torch

METHODS = ("cpu", "item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__")


def _targets_cpu(args: tuple, kwargs: dict) -> bool:
    device = kwargs.get("device", args[0] if args else None)
    if isinstance(device, torch.Tensor):
        device = device.device
    return device is not None and not isinstance(device, torch.dtype) and torch.device(device).type == "cpu"


def _caller() -> tuple[str, int] | None:
    """(file inside loopscope, line) of the code that made the call, None when it is not loopscope's own (a torch
    function's internals, e.g. `nn.init.trunc_normal_` on a CPU generator, or pandas reading a host tensor)."""
    name = sys._getframe(2).f_code.co_filename
    if "/loopscope/" in name and "/tests/" not in name:
        return name.split("/loopscope/", 1)[1], sys._getframe(2).f_lineno
    return None


@contextlib.contextmanager
def count_host_transfers():
    """Within the block, count every host transfer loopscope's code makes: yields a Counter keyed by
    (method, file, line); the patches are removed on exit."""
    counts: collections.Counter = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in (*METHODS, "to")}

    def wrap(name):
        original = originals[name]

        def counted(self, *args, **kwargs):
            if name != "to" or _targets_cpu(args, kwargs):
                where = _caller()
                if where is not None:
                    counts[(name, *where)] += 1
            return original(self, *args, **kwargs)

        return counted

    for name in originals:
        setattr(torch.Tensor, name, wrap(name))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
