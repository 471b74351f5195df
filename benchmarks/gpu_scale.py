"""The paper's setting on one accelerator: Huginn-0125's exact shape, R = 128, the whole streaming analysis against the
plain forwards it needs, side by side in one run.

    .venv/bin/python benchmarks/gpu_scale.py --device cuda                 # Huginn-0125's shape (about 8 GB bf16)
    .venv/bin/python benchmarks/gpu_scale.py --device cpu --width 192 --heads 2 --tokens 24 --prompts 2 -r 8
                                                                          # the same on a CPU, reduced (the test)

The model is randomly initialised (no weights are needed to time the analysis) with Huginn-0125's layout: d 5280,
55 heads of 96, MLP 17,920, vocabulary 65,536, (2, 4⊗R, 2), sandwich norm, concat injection, random start state;
weights in bfloat16, the recurrent state in float32 (loopscope's default). Prompts are `--prompts` × `--tokens`
random token ids (the paper: 256 GSM8K questions of ~200 tokens). Measured, each as the median of `--repeats`
interleaved repeats (a change in the machine's load hits all alike):

- the plain forwards the analysis needs: per batch, two passes of the R-recurrence states run (the second checks
  the first's last states bit for bit, for exact distances to X*) and two of the attention run;
- the whole streaming analysis (`experiments.analyze.analyse`: every accumulator, the attention run at
  `--attention-recurrences`, the paper's attention maps' 8), without drawing the report;
- their ratio (target ≤ 1.3), the peak device memory (CUDA) or peak RSS (CPU), and the time the paper's 256
  questions would take at the measured rate.

On CUDA every timed region ends with `torch.cuda.synchronize()`. Prints one JSON line (and writes it to `--json`).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import resource
import statistics
import tempfile
import time
from pathlib import Path

HUGINN_0125 = dict(d_model=5280, n_heads=55, d_mlp=17920, vocab_size=65536)  # its published config.json
PAPER_QUESTIONS = 256


def huginn_shaped(width: int, heads: int, mlp: int | None, vocab: int, device: str, dtype: str):
    """A random-init LoadedModel of Huginn-0125's layout at `width`, built on `device` in `dtype`."""
    import torch

    from loopscope.data.tokenizer import load_tokenizer
    from loopscope.models import LoopedConfig, LoopedLM
    from loopscope.models.device import resolve_device, resolve_dtype
    from loopscope.models.load import LoadedModel

    std = (2 / (5 * width)) ** 0.5  # Huginn's init rule
    cfg = LoopedConfig(name=f"huginn-0125-shaped-d{width}", vocab_size=vocab, d_model=width, n_heads=heads,
                       d_mlp=mlp or int(width * 17920 / 5280), max_seq_len=4096, n_prelude=2, n_block=4, n_coda=2,
                       recurrences=32, norm="sandwich", injection="concat", state_init="random",
                       state_init_std=std, init_std=std, embed_scale=width ** 0.5, coda_input_norm=True, seed=0)
    target = resolve_device(device)
    with torch.device(target):
        model = LoopedLM(cfg).to(resolve_dtype(dtype)).eval()
    model.stream_dtype = torch.float32
    return LoadedModel(model, load_tokenizer(), cfg.name, "looped", cfg.recurrences)


def prompt_texts(tokenizer, prompts: int, tokens: int, seed: int = 0) -> list[str]:
    """`prompts` texts of `tokens` tokens each under the bundled tokenizer (random ids, decoded and re-checked)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    texts = []
    while len(texts) < prompts:
        ids = torch.randint(100, len(tokenizer), (tokens,), generator=gen).tolist()
        text = tokenizer.decode(ids)
        again = tokenizer(text, add_special_tokens=False).input_ids
        texts.append(tokenizer.decode(again[:tokens]))
    return texts


def measure(a: argparse.Namespace) -> dict:
    import torch

    from loopscope.capture import encode_prompts
    from loopscope.experiments.analyze import AnalyzeSettings, analyse

    torch.set_num_threads(a.threads)
    loaded = huginn_shaped(a.width, a.heads, a.mlp, a.vocab, a.device, a.dtype)
    device = next(loaded.model.parameters()).device
    cuda = device.type == "cuda"
    texts = prompt_texts(loaded.tokenizer, a.prompts, a.tokens)
    batches = [encode_prompts(loaded.tokenizer, texts[i:i + a.batch_size], 4096)[0].to(device)
               for i in range(0, len(texts), a.batch_size)]

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def forwards() -> float:
        sync()
        start = time.perf_counter()
        with torch.inference_mode():
            for ids in batches:
                for _ in range(2):  # the finals pass and the analysis pass, of each run
                    loaded.model(ids, recurrences=a.recurrences)
                    loaded.model(ids, recurrences=a.attention_recurrences)
        sync()
        return time.perf_counter() - start

    def analysis(profile: Path | None = None) -> tuple[float, dict]:
        s = AnalyzeSettings(out=Path(tempfile.mkdtemp()), recurrences=a.recurrences,
                            attention_recurrences=a.attention_recurrences, batch_size=a.batch_size,
                            progress=False, certificate_tokens=0)
        profiler = cProfile.Profile() if profile is not None else None
        sync()
        start = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        result = analyse(loaded, texts, s)
        sync()
        seconds = time.perf_counter() - start
        if profiler is not None:
            profiler.disable()
            with open(profile, "w") as f:
                stats = pstats.Stats(profiler, stream=f)
                stats.sort_stats("cumulative").print_stats(60)
                stats.sort_stats("tottime").print_stats(40)
        return seconds, result.runs

    forwards()  # warm-up (kernels, allocator)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    plain, full, runs = [], [], {}
    for i in range(a.repeats):
        plain.append(forwards())
        seconds, runs = analysis(a.profile if i == a.repeats - 1 else None)
        full.append(seconds)
    ratios = [f / p for f, p in zip(full, plain)]
    analysis_s = statistics.median(full)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    cfg = loaded.model.cfg
    return {
        "device": str(device), "model": cfg.name, "d_model": cfg.d_model, "heads": cfg.n_heads, "d_mlp": cfg.d_mlp,
        "parameters_b": sum(p.numel() for p in loaded.model.parameters()) / 1e9, "weights": a.dtype,
        "state": "float32", "prompts": a.prompts, "tokens_per_prompt": runs["states"]["tokens"] / a.prompts,
        "recurrences": a.recurrences, "attention_recurrences": a.attention_recurrences, "batch_size": a.batch_size,
        "plain_forwards_s": statistics.median(plain), "analysis_s": analysis_s,
        "ratio": statistics.median(ratios), "ratios": ratios, "target_ratio": 1.3,
        "peak_memory_gib": peak, "peak_memory_kind": "cuda max_memory_allocated" if cuda else "process peak RSS",
        "finals_max_abs_diff": runs["states"]["finals_max_abs_diff"],
        "paper_questions": PAPER_QUESTIONS,
        "paper_questions_s": analysis_s * PAPER_QUESTIONS / a.prompts,  # at the measured rate per prompt
    }


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="bfloat16", help="weights (the state stays float32)")
    ap.add_argument("--width", type=int, default=HUGINN_0125["d_model"])
    ap.add_argument("--heads", type=int, default=HUGINN_0125["n_heads"])
    ap.add_argument("--mlp", type=int, default=None, help="MLP width (default: Huginn's 17,920 scaled by width)")
    ap.add_argument("--vocab", type=int, default=HUGINN_0125["vocab_size"])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--recurrences", "-r", type=int, default=128)
    ap.add_argument("--attention-recurrences", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    ap.add_argument("--profile", type=Path, default=None, help="profile the last repeat's analysis (cProfile, "
                    "cumulative and own time) into this text file")
    return ap


def main(argv: list[str] | None = None) -> dict:
    a = parser().parse_args(argv)
    result = measure(a)
    line = json.dumps(result)
    print(line, flush=True)
    if a.json is not None:
        a.json.write_text(line + "\n")
    return result


if __name__ == "__main__":
    main()
