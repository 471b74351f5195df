"""Train a `LoopedLM` from scratch on the CPU, resumably: `train(TrainSettings(...), out)`.

Objective (Blayney et al. 2026 §6.3): standard next-token cross-entropy on the final latent only, i.e. on the
model's logits after the coda, with a constant number of recurrences (no Poisson sampling, no per-recurrence
loss terms). AdamW with decoupled weight decay on matrices, linear warmup then cosine (or linear) decay to
`min_lr_ratio · lr`, gradient-norm clipping, everything seeded.

Resuming: `OUT/checkpoint` (safetensors + JSON, see `train_state`) is written every `checkpoint_every` steps
and every `checkpoint_minutes` minutes, on Ctrl-C/SIGTERM and at the end. Running the same command again
continues from it; the batch at step s is a pure function of (seed, s), so a resumed run reproduces the
uninterrupted one exactly. Outputs: OUT/model (`load_model(OUT/model)` works), OUT/metrics.json,
OUT/history.csv (one row per step), OUT/eval.csv (one row per held-out evaluation).
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from loopscope.errors import InputError
from loopscope.experiments.evaluate import gsm8k_exact_match, heldout_loss, next_token_loss
from loopscope.experiments.presets import preset_config
from loopscope.experiments.train_state import (
    find_checkpoint,
    in_run_folder,
    load_train_state,
    rng_state,
    save_train_state,
    set_rng_state,
)
from loopscope.models.checkpoint import WEIGHTS_NAME, save_model
from loopscope.models.device import Precision
from loopscope.models.load import load_model
from loopscope.models.looped import LoopedLM

CALIBRATION_STEPS = 4  # with --minutes and no --steps: time steps 1..4, then fix the step budget
CALIBRATION_MARGIN = 0.92  # leave 8% of the budget for evaluation and checkpoints


@dataclass
class TrainSettings:
    """Everything that defines a training run. Fields in `TRAJECTORY_FIELDS` must match to resume."""

    preset: str = "looped-4"  # model preset (experiments.presets), e.g. looped-4+inject+sandwich
    steps: int | None = None  # optimizer steps in the schedule; None: derived from `minutes` after calibration
    minutes: float | None = None  # cap on training wall time, summed over resumed invocations
    seed: int = 0  # weights, document shuffle and batch order
    data: str | None = None  # GSM8K jsonl file or directory (train.jsonl/test.jsonl)
    corpus: str = "gsm8k"  # training text spec (data.corpus): gsm8k, gsm-symbolic:N, python-docs, joined by +
    batch_size: int = 16  # sequences per step
    seq_len: int = 256  # tokens per sequence (packed)
    lr: float = 2e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # final lr = min_lr_ratio · lr
    warmup_steps: int = 30  # linear warmup from lr/warmup_steps
    schedule: str = "cosine"  # "cosine" or "linear" decay after warmup
    weight_decay: float = 0.1  # AdamW decoupled decay, on ≥2-D weights only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm
    eval_every: int = 50  # steps between quick held-out evaluations (0: only at start and end)
    eval_sequences: int = 32  # held-out sequences in a quick evaluation (the final one uses all)
    heldout_sequences: int | None = None  # cap on the final evaluation's sequences (None: all; for big models)
    checkpoint_every: int = 100  # steps between checkpoints
    checkpoint_minutes: float = 2.0  # and at least this often in wall time
    accuracy_questions: int = 16  # held-out questions to greedy-decode at the end (0: skip)
    save_dtype: str = "float32"  # dtype of OUT/model weights: float32 or float16
    threads: int | None = None  # torch CPU threads (None: torch's default); 1 is faster on a busy shared CPU
    init_from: str | None = None  # continue training this looped checkpoint (e.g. a retrofit) instead of `preset`
    device: str = "cpu"  # where training runs: cpu, cuda, cuda:N, mps or auto
    dtype: str = "float32"  # weights (and optimizer state) dtype: float32, bfloat16 or float16

    TRAJECTORY_FIELDS = ("preset", "init_from", "seed", "corpus", "batch_size", "seq_len", "lr", "min_lr_ratio",
                         "warmup_steps",
                         "schedule", "weight_decay", "beta1", "beta2", "grad_clip", "dtype")

    def validate(self) -> None:
        Precision(self.device, self.dtype, "weights").device  # one clear error for a bad --device / --dtype
        if self.steps is None and self.minutes is None:
            raise InputError("give --steps N or --minutes M (or both) so the run knows when to stop")
        if self.steps is not None and self.steps < 1:
            raise InputError(f"--steps {self.steps} must be ≥ 1")
        if self.minutes is not None and self.minutes <= 0:
            raise InputError(f"--minutes {self.minutes} must be > 0")
        if self.schedule not in ("cosine", "linear"):
            raise InputError(f"schedule {self.schedule!r} is unknown; use cosine or linear")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"threads={self.threads} must be ≥ 1")
        if self.save_dtype not in ("float32", "float16"):
            raise InputError(f"save dtype {self.save_dtype!r}; use float32 or float16")
        if self.heldout_sequences is not None and self.heldout_sequences < 1:
            raise InputError(f"heldout_sequences={self.heldout_sequences} must be ≥ 1 (or None for all)")
        for name in ("batch_size", "seq_len", "warmup_steps", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise InputError(f"{name}={getattr(self, name)} must be ≥ 1")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def learning_rate(step: int, total: int | None, s: TrainSettings) -> float:
    """lr at 0-based `step`: s.lr·(step+1)/warmup during warmup, then decay to s.min_lr_ratio·s.lr at `total`:
    cosine: m + (1−m)·½(1 + cos πp), linear: 1 − (1−m)·p, with p = (step − warmup)/(total − warmup)."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    if total is None:  # step budget not fixed yet (calibrating a --minutes run)
        return s.lr
    p = min(1.0, (step - s.warmup_steps) / max(1, total - s.warmup_steps))
    m = s.min_lr_ratio
    factor = m + (1 - m) * 0.5 * (1 + math.cos(math.pi * p)) if s.schedule == "cosine" else 1 - (1 - m) * p
    return s.lr * factor


def batch_rows(sequences: torch.Tensor, step: int, batch_size: int, seed: int) -> tuple[torch.Tensor, int, int]:
    """The rows (B, L+1) of step `step`: epoch e = step // (N // B) visits a permutation seeded by (seed, e).
    Returns (rows, epoch, batch index within the epoch)."""
    per_epoch = sequences.shape[0] // batch_size
    if per_epoch < 1:
        raise InputError(f"only {sequences.shape[0]} training sequences for a batch of {batch_size}; use more "
                         "text or a smaller --batch-size")
    epoch, b = divmod(step, per_epoch)
    perm = torch.randperm(sequences.shape[0], generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return sequences[perm[b * batch_size:(b + 1) * batch_size]], epoch, b


def build_optimizer(model: LoopedLM, s: TrainSettings) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=s.lr, betas=(s.beta1, s.beta2), eps=1e-8, foreach=False)


@dataclass
class TrainData:
    """Packed token rows (N, L+1) for training and held-out evaluation; `heldout_rows` are question/answer
    dicts for greedy exact-match scoring (may be empty)."""

    train: torch.Tensor
    heldout: torch.Tensor
    heldout_name: str
    heldout_rows: list[dict]


def build_data(s: TrainSettings, tokenizer) -> TrainData:
    """Training rows from `s.corpus`; held-out = the fixed 256-question GSM8K test subset when GSM8K is
    reachable (`s.data`), else 256 GSM-Symbolic problems from a seed the training text never uses."""
    from loopscope.data.corpus import corpus_documents, encode_documents, pack_sequences
    from loopscope.data.gsm8k import document_text, gsm8k_test_subset

    train = pack_sequences(encode_documents(corpus_documents(s.corpus, s.data, s.seed), tokenizer), s.seq_len,
                           shuffle_seed=s.seed)
    if s.data is not None or "gsm8k" in s.corpus:
        rows = gsm8k_test_subset(s.data)
        name = "gsm8k-test-256"
        docs = [document_text(r) for r in rows]
    else:
        from loopscope.data.prompts import generate_gsm_symbolic

        rows = [{"question": r["question"], "answer": r["solution"]}
                for r in generate_gsm_symbolic(256, seed=1_000_000 + s.seed)]
        name = "gsm-symbolic-heldout-256"
        docs = [f"{r['question']}\n{r['answer']}" for r in rows]
    heldout = pack_sequences(encode_documents(docs, tokenizer), s.seq_len)
    return TrainData(train, heldout, name, rows)


def initial_model(s: TrainSettings) -> LoopedLM:
    """The model at step 0: the preset built from `s.seed`, or the looped checkpoint `s.init_from` as loaded
    (healing a retrofitted model, McLeish et al. 2025: continue training after surgery)."""
    precision = Precision(s.device, s.dtype, "weights")
    if s.init_from is None:
        return precision.place(LoopedLM(preset_config(s.preset, seed=s.seed)))
    loaded = precision.load(s.init_from)
    if not loaded.is_looped:
        raise InputError(f"--from-retrofit {s.init_from}: a {loaded.kind} model cannot be trained here; give a looped "
                         "checkpoint (e.g. the output of `loopscope retrofit`)")
    return loaded.model


class _StopFlag:
    """Set by SIGTERM so the loop checkpoints and exits cleanly."""

    def __init__(self) -> None:
        self.set = False
        self._previous = None

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: setattr(self, "set", True))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def train(
    settings: TrainSettings,
    out: str | Path,
    *,
    data: TrainData | None = None,
    tokenizer=None,
    progress: bool = True,
    simulate_kill_after: int | None = None,
) -> dict:
    """Train (or resume) the run in `out`; return the metrics dict also written to OUT/metrics.json.

    `data` overrides the corpus (tests); `simulate_kill_after=k` stops dead after k steps of this call,
    writing nothing (as a `kill -9` would), to test resuming. Returns {} in that case.
    """
    s = settings
    s.validate()
    previous_threads = torch.get_num_threads()
    if s.threads is not None:
        torch.set_num_threads(s.threads)
    try:
        return in_run_folder(Path(out), "train", s, lambda: _train(s, out, data, tokenizer, progress,
                                                                   simulate_kill_after))
    finally:
        torch.set_num_threads(previous_threads)


def _train(s: TrainSettings, out: str | Path, data: TrainData | None, tokenizer, progress: bool,
           simulate_kill_after: int | None) -> dict:
    from tqdm import tqdm

    from loopscope.data.corpus import fingerprint
    from loopscope.data.tokenizer import load_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        tokenizer = load_model(s.init_from).tokenizer if s.init_from else load_tokenizer()
    data = data if data is not None else build_data(s, tokenizer)
    data_id = {"sequences": int(data.train.shape[0]), "fingerprint": fingerprint(data.train)}

    torch.manual_seed(s.seed)
    model = initial_model(s).train()
    cfg = model.cfg
    if len(tokenizer) > cfg.vocab_size:
        raise InputError(f"tokenizer has {len(tokenizer)} tokens, the model's vocabulary {cfg.vocab_size}")
    optimizer = build_optimizer(model, s)

    step, total, elapsed = 0, s.steps, 0.0
    resumed_from = None
    history: dict[str, list] = {"loss": [], "lr": [], "grad_norm": []}
    evals: list[dict] = []
    ckpt = find_checkpoint(out)
    if ckpt is not None:
        meta = load_train_state(ckpt, model, optimizer)
        _check_resumable(meta, s, data_id, out)
        step, total, elapsed = meta["step"], meta["total_steps"], meta["elapsed_s"]
        resumed_from = step
        history, evals = meta["history"], meta["evals"]
        set_rng_state(meta["rng"])

    def meta_now() -> dict:
        epoch, b = divmod(step, data.train.shape[0] // s.batch_size)
        return {"step": step, "total_steps": total, "elapsed_s": elapsed, "settings": s.to_dict(),
                "model_config": cfg.to_dict(), "data": {**data_id, "epoch": epoch, "batch_in_epoch": b},
                "heldout": data.heldout_name, "rng": rng_state(), "history": history, "evals": evals}

    def quick_eval() -> None:
        ev = heldout_loss(model, data.heldout[: s.eval_sequences], s.batch_size)
        evals.append({"step": step, "loss": ev["loss"], "bits_per_token": ev["bits_per_token"]})

    cap_s = s.minutes * 60 if s.minutes is not None else math.inf
    if step == 0 and not evals:
        quick_eval()  # the untrained baseline
    desc = s.preset if s.init_from is None else "healing"
    bar = tqdm(total=total, initial=step, disable=not progress, desc=desc, unit="step", mininterval=2.0,
               dynamic_ncols=True)
    run_steps, run_time, calib_times = 0, 0.0, []
    last_ckpt = time.monotonic()
    interrupted = False
    with _StopFlag() as stop:
        try:
            while (total is None or step < total) and elapsed < cap_s and not stop.set:
                t0 = time.monotonic()
                rows, _, _ = batch_rows(data.train, step, s.batch_size, s.seed)
                lr = learning_rate(step, total, s)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                loss = next_token_loss(model, rows)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
                optimizer.step()
                step += 1
                dt = time.monotonic() - t0
                elapsed += dt
                run_steps, run_time = run_steps + 1, run_time + dt
                history["loss"].append(loss.item())
                history["lr"].append(lr)
                history["grad_norm"].append(float(grad_norm))
                if total is None:
                    calib_times.append(dt)
                    if len(calib_times) > CALIBRATION_STEPS:  # drop step 0 (allocation warm-up)
                        per_step = sum(calib_times[1:]) / CALIBRATION_STEPS
                        total = step + int(max(0.0, cap_s - elapsed) * CALIBRATION_MARGIN / per_step)
                        total = max(total, step)
                        bar.total = total
                if s.eval_every and step % s.eval_every == 0:
                    quick_eval()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.1e}",
                                tok_s=f"{run_steps * rows.numel() / max(run_time, 1e-9):.0f}", refresh=False)
                if step % s.checkpoint_every == 0 or time.monotonic() - last_ckpt > 60 * s.checkpoint_minutes:
                    save_train_state(out, model, optimizer, meta_now())
                    last_ckpt = time.monotonic()
                if simulate_kill_after is not None and run_steps >= simulate_kill_after:
                    bar.close()
                    return {}
        except KeyboardInterrupt:
            interrupted = True
    bar.close()
    if total is None and elapsed >= cap_s:
        total = step  # the time cap ran out before the budget was calibrated: the steps taken are the budget
    save_train_state(out, model, optimizer, meta_now())
    if interrupted or stop.set:
        raise KeyboardInterrupt(f"stopped at step {step}; checkpoint saved in {out}; run the same command to resume")
    done = out / "metrics.json"
    if run_steps == 0 and done.exists() and json.loads(done.read_text()).get("steps") == step:
        if progress:
            print(f"{out} already finished at step {step}; its metrics.json stands", flush=True)
        return json.loads(done.read_text())
    run = {"steps": step, "total_steps": total, "train_wall_s": elapsed, "resumed_from_step": resumed_from,
           "steps_per_s_this_call": run_steps / run_time if run_time else None, "time_cap_reached": elapsed >= cap_s}
    return _finish(out, s, cfg, model, tokenizer, data, run, history, evals, progress)


def _check_resumable(meta: dict, s: TrainSettings, data_id: dict, out: Path) -> None:
    old = meta["settings"]
    defaults = TrainSettings(steps=1).to_dict()  # a checkpoint written before a field existed had its default
    diffs = [f"{k}: checkpoint {old.get(k, defaults[k])!r} vs now {getattr(s, k)!r}"
             for k in TrainSettings.TRAJECTORY_FIELDS if old.get(k, defaults[k]) != getattr(s, k)]
    if s.steps is not None and meta["total_steps"] is not None and s.steps != meta["total_steps"]:
        diffs.append(f"steps: checkpoint {meta['total_steps']} vs now {s.steps}")
    if meta["data"]["fingerprint"] != data_id["fingerprint"]:
        diffs.append(f"training data: checkpoint {meta['data']['fingerprint']} vs now {data_id['fingerprint']}")
    if diffs:
        raise InputError(f"{out} holds a run with other settings ({'; '.join(diffs)}); rerun with the same "
                         "options to resume it, or give a new --out to start another run")


def _finish(out: Path, s: TrainSettings, cfg, model: LoopedLM, tokenizer, data: TrainData, run: dict,
            history: dict, evals: list[dict], progress: bool = False) -> dict:
    """Save OUT/model, evaluate on the whole held-out set (+ greedy exact match), write metrics and tables."""
    import pandas as pd

    model_dir = save_model(model, out / "model", tokenizer, dtype=getattr(torch, s.save_dtype))
    heldout = data.heldout[: s.heldout_sequences]
    start = time.monotonic()
    if progress:
        print(f"final evaluation: {heldout.shape[0]} held-out sequences (trained and untrained model)"
              + (f", exact match on {s.accuracy_questions} questions" if s.accuracy_questions else "") + " …",
              flush=True)
    final = heldout_loss(model, heldout, s.batch_size)
    untrained = heldout_loss(initial_model(s).eval(), heldout, s.batch_size)  # the step-0 model
    accuracy = None
    if s.accuracy_questions and data.heldout_rows:
        accuracy = gsm8k_exact_match(model, tokenizer, data.heldout_rows[: s.accuracy_questions])
    tail = history["loss"][-20:]
    metrics = {
        "preset": s.preset if s.init_from is None else f"from {s.init_from}",
        "signature": cfg.signature,
        "parameters": sum(p.numel() for p in model.parameters()),
        **run,
        "finished": run["time_cap_reached"] or (run["total_steps"] is not None and run["steps"] >= run["total_steps"]),
        "tokens_seen": run["steps"] * s.batch_size * s.seq_len,
        "train_loss_last20": sum(tail) / len(tail) if tail else None,
        "heldout_name": data.heldout_name,
        "heldout_indices": [r["index"] for r in data.heldout_rows if "index" in r],  # GSM8K test rows used
        "heldout_untrained": untrained,
        "heldout": final,
        "exact_match": accuracy,
        "model_dir": str(model_dir),
        "model_bytes": (model_dir / WEIGHTS_NAME).stat().st_size,
        "settings": s.to_dict(),
    }
    from loopscope.resume import write_atomic

    history_frame = pd.DataFrame({"step": range(1, len(history["loss"]) + 1), **history})
    write_atomic(out / "history.csv", history_frame.to_csv(index=False).encode())
    write_atomic(out / "eval.csv", pd.DataFrame(evals).to_csv(index=False).encode())
    # last, whole or absent: a finished run is one whose metrics.json exists (a rerun returns it as it is)
    write_atomic(out / "metrics.json", (json.dumps(metrics, indent=1) + "\n").encode())
    if progress:
        print(f"final evaluation: {time.monotonic() - start:.0f} s; held-out loss {final['loss']:.3f}", flush=True)
    return metrics
