"""Where a streamed batch reaches the host, per source line, at R = 16 and 32 and H = 4 and 8 (issue 21).

Each counted call (`.cpu`, `.item`, `.tolist`, `.numpy`, `.to(cpu)`, `float(t)`, `int(t)`, `bool(t)`) is a device →
host copy and a synchronisation on a GPU; a line whose count grows with R or H is what the GPU would wait on.
tests/test_host_transfers.py asserts none grows; this script shows where they are:

    python benchmarks/host_transfers.py states      # the dynamics stream of `loopscope analyze`
    python benchmarks/host_transfers.py attention   # the stage / attention stream
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_host_transfers import batch_transfers, loaded_with  # noqa: E402


def main(stream: str) -> None:
    torch.set_num_threads(1)
    a = batch_transfers(loaded_with(4), 16, stream)
    b = batch_transfers(loaded_with(4), 32, stream)
    c = batch_transfers(loaded_with(8), 16, stream)
    print(f"{stream}: host transfers per batch: {sum(a.values())} (R = 16, H = 4), {sum(b.values())} (R = 32), "
          f"{sum(c.values())} (H = 8)")
    for k in sorted(set(a) | set(b) | set(c), key=lambda k: (k[1], k[2])):
        flag = "" if a[k] == b[k] == c[k] else "   <-- grows"
        print(f"  {k[1]}:{k[2]} {k[0]}  R16={a[k]} R32={b[k]} H8={c[k]}{flag}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "states")
