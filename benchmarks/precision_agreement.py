"""How the dynamics detector's labels move when the residual stream goes from float32 to bfloat16, on a builtin
model (`default` unless --model; not a test: it prints the table of `experiments.precision_agreement`).

    python benchmarks/precision_agreement.py [--model smollm2-looped] [--prompts 16] [--recurrences 64]
"""

from __future__ import annotations

import argparse
import time

from loopscope.experiments.precision_agreement import precision_agreement


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="a builtin or a checkpoint path")
    ap.add_argument("--prompts", type=int, default=16, help="gsm-symbolic prompts")
    ap.add_argument("--recurrences", type=int, default=64)
    args = ap.parse_args()
    start = time.perf_counter()
    per_token, table = precision_agreement(args.model, max_prompts=args.prompts, recurrences=args.recurrences)
    print(f"{args.model}, {args.prompts} prompts, R = {args.recurrences}, {len(per_token)} tokens "
          f"({time.perf_counter() - start:.0f} s): float32 label (rows) against bfloat16 label (columns)")
    print(table.to_string(index=False))
    print(f"same label: {per_token['agrees'].mean():.3f}; same up to at_floor ~ fixed_point: "
          f"{per_token['agrees_fixed'].mean():.3f}")


if __name__ == "__main__":
    main()
