"""Paper scale on this machine: memory and time of the streaming `analyze`, side by side in one run.

    .venv/bin/python benchmarks/stream_scale.py [--threads 1] [--skip-paper-shape]

1. Peak RSS of `loopscope analyze` (the default model, attention run at R = 8) in a fresh process per setting, for
   R ∈ {16, 64, 256} at 16 prompts and for 16 / 64 prompts at R = 64, beside the peak RSS of the old design
   (`capture_prompts` holding every state of the same run in memory). Targets: R = 256 ≤ 1.2× the R = 16 peak,
   64 prompts ≤ 1.2× the 16-prompt peak.
2. Time of the whole streaming analysis (both runs, every accumulator; without drawing the report) against the plain
   forwards it needs (two passes per batch of each run: the finals pass and the analysis pass), and against one
   plain forward per run; and the states alone (one pass per run with every state handed to a consumer as it is
   produced, no metric) against one plain pass; five interleaved repeats: the median of the per-repeat ratios, and
   the ratio of the fastest repeats (noise on a shared machine only adds time). Targets: ≤ 1.3× the forwards it
   needs; states alone ≤ 1.05×.
3. A paper-shaped dry run sized for this CPU: a random-init model with Huginn-0125's layout (2, 4⊗R, 2), concat
   injection, sandwich norm, random start, d 1024, 16 heads, 200-token prompts, R = 128: its peak RSS and time,
   and the memory the old design would have needed for the same run.

Timings are ratios measured side by side in one process; the machine is shared, absolute seconds are not the point.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(args: list[str]) -> dict:
    """Run this file's `--child` mode in a fresh interpreter; return what it printed (JSON, last line)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(Path(__file__)), "--child", *args], capture_output=True, text=True,
                          env=env)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(mode: str, recurrences: int, prompts: str, out: str) -> None:
    import torch

    torch.set_num_threads(1)
    from loopscope.data.prompts import load_prompts
    from loopscope.models import load_model

    base = peak_rss_mb()
    loaded = load_model("default")
    texts = load_prompts(prompts)
    if mode == "stream":
        from loopscope.experiments.analyze import AnalyzeSettings, analyse

        s = AnalyzeSettings(out=Path(out), recurrences=recurrences, progress=False, certificate_tokens=0)
        analyse(loaded, texts, s)
    else:  # the old design: every state of the dynamics run, and the attention run, held in memory
        from loopscope.capture import capture_prompts

        with torch.inference_mode():
            states = capture_prompts(loaded, texts, recurrences, batch_size=8, progress=False)
            attn = capture_prompts(loaded, texts, 8, attention=True, batch_size=8, progress=False)
        del states, attn
    print(json.dumps({"peak_mb": peak_rss_mb(), "start_mb": base}))


def write_prompts(n: int, folder: Path) -> str:
    """The 16 bundled prompts repeated n / 16 times: every batch holds the same prompts (so the same longest T),
    and what changes with n is only how many batches' results accumulate."""
    from loopscope.data.prompts import load_prompts

    base = load_prompts("gsm-symbolic")
    path = folder / f"prompts_{n}.jsonl"
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"question": base[i % len(base)]}) + "\n")
    return str(path)


def memory_table(tmp: Path) -> list[dict]:
    p16, p64 = write_prompts(16, tmp), write_prompts(64, tmp)
    rows = []
    for label, R, prompts in (("R=16", 16, p16), ("R=64", 64, p16), ("R=256", 256, p16), ("64 prompts, R=64", 64, p64)):
        new = child(["stream", str(R), prompts, str(tmp / f"out-{R}-{Path(prompts).stem}")])
        old = child(["memory", str(R), prompts, str(tmp / "unused")])
        rows.append({"setting": label, "stream_peak_mb": round(new["peak_mb"]),
                     "in_memory_peak_mb": round(old["peak_mb"])})
    return rows


def timing(threads: int, repeats: int = 5) -> dict:
    import torch

    torch.set_num_threads(threads)
    from loopscope.capture import encode_prompts
    from loopscope.data.prompts import load_prompts
    from loopscope.experiments.analyze import AnalyzeSettings, analyse
    from loopscope.models import load_model

    loaded = load_model("default")
    texts = load_prompts("gsm-symbolic")
    s = AnalyzeSettings(out=Path(tempfile.mkdtemp()), recurrences=64, progress=False, certificate_tokens=0)
    batches = [encode_prompts(loaded.tokenizer, texts[i:i + 8], 512)[0] for i in range(0, len(texts), 8)]

    def forwards(passes: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for ids in batches:
                for _ in range(passes):
                    loaded.model(ids, recurrences=s.recurrences)
                    loaded.model(ids, recurrences=s.attention_recurrences)
        return time.perf_counter() - start

    from loopscope.capture.stream import StreamRecorder

    def states_only() -> float:
        """One pass per run with every block, prelude and coda state handed to a consumer as it is produced (the
        capture of states, without any metric): the hook cost alone."""
        seen = []
        start = time.perf_counter()
        with torch.inference_mode(), StreamRecorder(loaded.model, {"resid_post"}, lambda *a: seen.append(a[1])):
            for ids in batches:
                loaded.model(ids, recurrences=s.recurrences)
                loaded.model(ids, recurrences=s.attention_recurrences)
        assert len(seen) == len(batches) * (s.recurrences + s.attention_recurrences) * loaded.model.cfg.n_block + \
            2 * len(batches) * (loaded.model.cfg.n_prelude + loaded.model.cfg.n_coda)
        return time.perf_counter() - start

    forwards(1)  # warm-up
    ones, twos, streams, hooked = [], [], [], []
    for _ in range(repeats):  # interleaved, so that a change in the machine's load hits all alike
        ones.append(forwards(1))
        hooked.append(states_only())
        twos.append(forwards(2))
        s.out = Path(tempfile.mkdtemp())  # a fresh cache: nothing is resumed
        start = time.perf_counter()
        analyse(loaded, texts, s)
        streams.append(time.perf_counter() - start)
    one, two, stream = (statistics.median(v) for v in (ones, twos, streams))
    ratios = [a / b for a, b in zip(streams, twos)]
    hook_ratios = [a / b for a, b in zip(hooked, ones)]
    return {"plain_one_pass_s": one, "plain_two_passes_s": two, "analysis_s": stream,
            "ratio_to_forwards_it_needs": statistics.median(ratios), "ratio_to_one_pass": stream / one,
            "ratios": ratios, "states_only_s": statistics.median(hooked),
            "states_only_ratio": statistics.median(hook_ratios), "states_only_ratios": hook_ratios,
            # the least-disturbed repeat of each (timeit's rule: noise on a shared machine only ever adds time)
            "min_ratio_to_forwards_it_needs": min(streams) / min(twos),
            "min_states_only_ratio": min(hooked) / min(ones)}


def paper_shape(threads: int, prompts: int = 2, tokens: int = 200, recurrences: int = 128) -> dict:
    import torch

    torch.set_num_threads(threads)
    from loopscope.data.tokenizer import load_tokenizer
    from loopscope.experiments.analyze import AnalyzeSettings, analyse
    from loopscope.models import LoopedConfig, LoopedLM
    from loopscope.models.load import LoadedModel

    D = 1024
    cfg = LoopedConfig(name="huginn-shaped-d1024", vocab_size=1024, d_model=D, n_heads=16, d_mlp=2816, max_seq_len=512,
                       n_prelude=2, n_block=4, n_coda=2, recurrences=32, norm="sandwich", injection="concat",
                       state_init="random", state_init_std=(2 / (5 * D)) ** 0.5, init_std=(2 / (5 * D)) ** 0.5,
                       embed_scale=D ** 0.5, coda_input_norm=True, seed=0)
    base = peak_rss_mb()
    loaded = LoadedModel(LoopedLM(cfg).eval(), load_tokenizer(), cfg.name, "looped", 32)
    after_model = peak_rss_mb()
    tok = loaded.tokenizer
    from loopscope.data.prompts import generate_gsm_symbolic

    texts = []
    for row in generate_gsm_symbolic(50, seed=7):
        ids = tok(row["question"] + "\n" + row["solution"]).input_ids
        if len(ids) >= tokens:
            texts.append(tok.decode(ids[:tokens]))
        if len(texts) == prompts:
            break
    s = AnalyzeSettings(out=Path(tempfile.mkdtemp()), recurrences=recurrences, attention_recurrences=8, batch_size=1,
                        progress=False, certificate_tokens=0)
    start = time.perf_counter()
    result = analyse(loaded, texts, s)
    seconds = time.perf_counter() - start
    T = result.runs["states"]["tokens"] / prompts
    K, H = cfg.n_block, cfg.n_heads
    old_states = (recurrences * K + cfg.n_prelude + cfg.n_coda) * prompts * T * D * 4 / 2 ** 20
    old_attention = 8 * (K + 4) * prompts * H * T * T * 4 / 2 ** 20
    return {"prompts": prompts, "tokens_per_prompt": T, "recurrences": recurrences, "d_model": D,
            "model_mb": round(after_model - base), "peak_rss_mb": round(peak_rss_mb()), "seconds": round(seconds),
            "old_design_states_mb": round(old_states), "old_design_attention_at_R8_mb": round(old_attention),
            "finals_max_abs_diff": result.runs["states"]["finals_max_abs_diff"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=4, metavar=("MODE", "R", "PROMPTS", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-paper-shape", action="store_true")
    ap.add_argument("--skip-memory", action="store_true", help="only the time ratios (and the paper-shaped run)")
    a = ap.parse_args()
    if a.child:
        if a.child[0] == "paper":
            print(json.dumps(paper_shape(1)))
        else:
            run_child(a.child[0], int(a.child[1]), a.child[2], a.child[3])
        return
    import pandas as pd

    if not a.skip_memory:
        with tempfile.TemporaryDirectory() as tmp:
            mem = pd.DataFrame(memory_table(Path(tmp)))
        r16 = float(mem.loc[mem.setting == "R=16", "stream_peak_mb"].iloc[0])
        r64 = float(mem.loc[mem.setting == "R=64", "stream_peak_mb"].iloc[0])
        mem["stream_vs_R16"] = (mem["stream_peak_mb"] / r16).round(3)
        print("peak RSS (MB), fresh process per setting:")
        print(mem.to_string(index=False))
        r256 = float(mem.loc[mem.setting == "R=256", "stream_peak_mb"].iloc[0])
        p64 = float(mem.loc[mem.setting == "64 prompts, R=64", "stream_peak_mb"].iloc[0])
        print(f"R=256 / R=16 peak: {r256 / r16:.3f} (target ≤ 1.2); "
              f"64 / 16 prompts peak: {p64 / r64:.3f} (target ≤ 1.2)")
    t = timing(a.threads)
    print(f"\ntime, default model, 16 prompts, R=64 states + R=8 attention, {a.threads} thread(s):")
    print(f"  plain forwards, one pass per run: {t['plain_one_pass_s']:.2f} s; two passes (what the exact distances "
          f"need): {t['plain_two_passes_s']:.2f} s; streaming analysis: {t['analysis_s']:.2f} s")
    print(f"  analysis / forwards it needs: {t['ratio_to_forwards_it_needs']:.3f} (median of "
          f"{', '.join(f'{r:.3f}' for r in t['ratios'])}; target ≤ 1.3); / one pass: {t['ratio_to_one_pass']:.3f}")
    print("  least-disturbed repeats (min / min): analysis / forwards it needs "
          f"{t['min_ratio_to_forwards_it_needs']:.3f}, "
          f"states alone / one pass {t['min_states_only_ratio']:.3f}")
    print(f"  states alone (every state handed over as produced, no metric): {t['states_only_s']:.2f} s, "
          f"{t['states_only_ratio']:.3f}× one plain pass (median of "
          f"{', '.join(f'{r:.3f}' for r in t['states_only_ratios'])}; target ≤ 1.05)")
    if not a.skip_paper_shape:
        p = child(["paper", "0", "-", "-"])  # its own process: its peak is its own
        print("\npaper-shaped dry run (random-init Huginn layout, d 1024):")
        print("  " + json.dumps(p))


if __name__ == "__main__":
    main()
