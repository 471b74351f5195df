"""Held-out metrics for a trained LM: next-token loss / bits per token, and GSM8K exact match by greedy decoding.

Loss is the mean next-token cross-entropy over every target token of packed held-out sequences:
    L = −(1/N) Σ_n log p(x_{n+1} | x_{≤n})   [nats];   bits per token = L / ln 2.
An untrained model with near-uniform logits over V = 1024 tokens gives L ≈ ln 1024 ≈ 6.93 nats (10 bits).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from loopscope.data.gsm8k import exact_match, extract_answer
from loopscope.models.looped import KVCache


def next_token_loss(model: torch.nn.Module, rows: torch.Tensor, recurrences: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of rows (B, L+1): inputs rows[:, :-1], targets rows[:, 1:]; a scalar (nats)."""
    rows = rows.to(next(model.parameters()).device)
    logits = model(rows[:, :-1], recurrences=recurrences)  # (B, L, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), rows[:, 1:].reshape(-1))


@torch.no_grad()
def sequence_losses(model: torch.nn.Module, sequences: torch.Tensor, batch_size: int = 16,
                    recurrences: int | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of each row of `sequences` (N, L+1): a float64 tensor (N,) — the units
    of a bootstrap over held-out sequences (rows have equal length, so their mean is the pooled loss)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, sequences.shape[0], batch_size):
        rows = sequences[i:i + batch_size].to(device)
        logits = model(rows[:, :-1], recurrences=recurrences)  # (B, L, V)
        loss = F.cross_entropy(logits.transpose(1, 2).float(), rows[:, 1:], reduction="none")  # (B, L)
        out.append(loss.double().mean(dim=1).cpu())
    model.train(was_training)
    return torch.cat(out)


def heldout_loss(model: torch.nn.Module, sequences: torch.Tensor, batch_size: int = 16,
                 recurrences: int | None = None) -> dict[str, float]:
    """{"loss": nats per token, "bits_per_token", "tokens"} over all rows of `sequences` (N, L+1)."""
    loss = float(sequence_losses(model, sequences, batch_size, recurrences).mean())
    return {"loss": loss, "bits_per_token": loss / math.log(2), "tokens": sequences[:, 1:].numel()}


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int, stop_ids: set[int],
                    recurrences: int | None = None) -> list[int]:
    """Greedy continuation of one prompt with the model's own KV cache; stops at a stop id (not returned),
    after `max_new_tokens`, or at the model's context length."""
    cache = KVCache()
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], dtype=torch.int64, device=device)
    limit = min(max_new_tokens, model.cfg.max_seq_len - len(prompt_ids))
    out: list[int] = []
    for _ in range(max(limit, 0)):
        logits = model(ids, recurrences=recurrences, cache=cache)  # (1, T, V)
        nxt = int(logits[0, -1].argmax())
        if nxt in stop_ids:
            break
        out.append(nxt)
        ids = torch.tensor([[nxt]], dtype=torch.int64, device=device)
    return out


def gsm8k_exact_match(model: torch.nn.Module, tokenizer, rows: list[dict], max_new_tokens: int = 256,
                      recurrences: int | None = None) -> dict:
    """Greedy-decode the worked answer of each question (prompt = BOS + question + newline, the training
    format) and score the `#### N` line by exact match. Returns {"accuracy", "answered", "n", "predictions"}
    where `answered` is the fraction of generations that contained a `#### N` line at all."""
    was_training = model.training
    model.eval()
    stop = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    predictions = []
    for row in rows:
        prompt = bos + list(tokenizer(row["question"] + "\n", add_special_tokens=False)["input_ids"])
        text = tokenizer.decode(greedy_generate(model, prompt, max_new_tokens, stop, recurrences))
        predictions.append(extract_answer(text))
    model.train(was_training)
    correct = [exact_match(p, r["answer"]) for p, r in zip(predictions, rows)]
    return {
        "accuracy": sum(correct) / max(len(rows), 1),
        "answered": sum(p is not None for p in predictions) / max(len(rows), 1),
        "n": len(rows),
        "predictions": predictions,
    }
