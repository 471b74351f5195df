"""Training throughput: achieved FLOP/s of a training step against this CPU's matmul rate, measured in one run.

    .venv/bin/python benchmarks/train_throughput.py [--preset looped-4] [--steps 8] [--threads 1] [--profile]

1. The reference: one-thread fp32 matmul (1024 × 1024 @ 1024 × 1024, 2·n³ FLOPs), median of several.
2. Training steps of `--preset` exactly as `loopscope train` runs them (its batch 16 × 256 tokens, AdamW, gradient
   clipping, the model's own recurrences): median step time, tokens/s, and FLOP/s counted as
       6 · N_eff · tokens  +  6 · Σ_layers-run (T · d_model) · tokens     per step (forward 1/3, backward 2/3),
   N_eff = the non-embedding weights each token passes through (prelude and coda once, the block R times, the
   unembedding once; Kaplan et al. 2020's C ≈ 6N per token, with the looped block counted once per recurrence),
   the second term the attention scores and weighted sums (2 · T · d each, per layer run, causal half not
   discounted, as Kaplan et al. count it). Target: achieved ≥ 50 % of the matmul rate.
3. `--profile`: where a step's time goes (torch.profiler, self CPU time by operator).

Ratios are measured side by side in one process; absolute seconds on a shared machine are not the point.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def matmul_rate(n: int = 1024, repeats: int = 7) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / statistics.median(times)


def step_flops(cfg, batch: int, seq: int) -> float:
    D, F, V = cfg.d_model, cfg.d_mlp, cfg.vocab_size
    heads_kv = cfg.n_kv_heads or cfg.n_heads
    attn = D * D * 2 + 2 * D * (D // cfg.n_heads) * heads_kv  # q, o and k, v projections
    layer = attn + 3 * D * F  # SwiGLU
    runs = cfg.n_prelude + cfg.n_coda + cfg.recurrences * cfg.n_block
    adapter = 2 * D * D if cfg.injection == "concat" else 0
    n_eff = runs * layer + cfg.recurrences * adapter + D * V
    tokens = batch * seq
    return 6 * n_eff * tokens + 6 * runs * seq * D * tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="looped-4")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from loopscope.experiments.evaluate import next_token_loss
    from loopscope.experiments.presets import preset_config
    from loopscope.experiments.train import TrainSettings, build_optimizer
    from loopscope.models import LoopedLM

    s = TrainSettings(preset=a.preset)
    cfg = preset_config(a.preset)
    model = LoopedLM(cfg).train()
    optimizer = build_optimizer(model, s)
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(0, cfg.vocab_size, (s.batch_size, s.seq_len + 1), generator=gen)

    def step() -> None:
        loss = next_token_loss(model, rows)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        optimizer.step()

    reference_before = matmul_rate()
    step()  # warm-up (allocations)
    times = []
    for _ in range(a.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    reference = statistics.median([reference_before, matmul_rate()])  # before and after the steps
    per_step = statistics.median(times)
    flops = step_flops(cfg, s.batch_size, s.seq_len)
    achieved = flops / per_step
    print(f"{a.preset}: {s.batch_size} × {s.seq_len} tokens per step, {a.threads} thread(s), torch {torch.__version__}")
    print(f"  matmul 1024² fp32: {reference / 1e9:.1f} GFLOP/s")
    print(f"  training step: {per_step:.3f} s (median of {a.steps}), "
          f"{s.batch_size * s.seq_len / per_step:.0f} tokens/s, "
          f"{flops / 1e9:.1f} GFLOP counted, {achieved / 1e9:.1f} GFLOP/s")
    print(f"  achieved / matmul: {achieved / reference:.1%} (target ≥ 50 %)")
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(2):
                step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
