"""Capture a prompt set: tokenize, batch, run, join — with a progress bar and resume from a cache folder."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from loopscope.capture.record import capture
from loopscope.capture.trajectory import Trajectory
from loopscope.errors import InputError
from loopscope.resume import load_or_compute, run_key


def encode_prompts(tokenizer, prompts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor, list[list[str]]]:
    """Right-padded ids (B, T), mask (B, T) and token strings, with the tokenizer's own BOS behaviour.

    Right padding is exact for causal models: no real token attends to a pad that comes after it.
    """
    if not prompts:
        raise InputError("no prompts given; pass at least one prompt")
    rows = []
    for i, p in enumerate(prompts):
        if not p.strip():
            raise InputError(f"prompt {i} is empty; remove it or give text")
        ids = tokenizer(p).input_ids
        if len(ids) > max_len:
            raise InputError(
                f"prompt {i} is {len(ids)} tokens, longer than the model's context of {max_len}; shorten it"
            )
        rows.append(ids)
    ids, mask = pad_right(rows, pad_id(tokenizer))
    tokens = [tokenizer.convert_ids_to_tokens(r) for r in rows]
    return ids, mask, tokens


def pad_id(tokenizer) -> int:
    """The tokenizer's pad id, or 0 when it has none (right padding is never attended to, so any id works)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def pad_right(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists → right-padded ids (B, T) and the real-token mask (B, T), T = the longest row."""
    if not rows or not all(rows):
        raise InputError("pad_right needs at least one row and no empty row")
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r)
        mask[b, : len(r)] = True
    return ids, mask


def capture_prompts(
    loaded,
    prompts: list[str],
    recurrences: int,
    attention: bool = False,
    batch_size: int = 4,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
    sites=None,
) -> Trajectory:
    """Capture `prompts` through `loaded.model` in batches and join them into one Trajectory.

    With `cache_dir`, each finished batch is saved there, keyed by model, prompts and settings; a rerun after
    an interruption loads finished batches and computes only the rest.
    """
    if recurrences < 1:
        raise InputError(f"recurrences={recurrences}: give at least 1")
    if batch_size < 1:
        raise InputError(f"batch_size={batch_size}: give at least 1")
    batches = [prompts[i: i + batch_size] for i in range(0, len(prompts), batch_size)]
    parts = []
    def compute(batch: list[str]) -> Trajectory:
        ids, mask, tokens = encode_prompts(loaded.tokenizer, batch, loaded.max_seq_len)
        return capture(loaded.model, ids, recurrences=recurrences, attention=attention, mask=mask, tokens=tokens,
                       dtype=dtype, sites=sites)

    stored = dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
    for n, batch in enumerate(tqdm(batches, desc=f"capture R={recurrences}", disable=not progress, unit="batch")):
        key = batch_key(loaded, batch, recurrences, attention, sites, dtype)
        path = Path(cache_dir) / f"batch{n:04d}-{key}.trajectory" if cache_dir is not None else None
        parts.append(load_or_compute(path, lambda: compute(batch), lambda t: t.to_bytes(stored),
                                     lambda b: Trajectory.from_bytes(b, dtype=dtype)))
    joined = Trajectory.concat(parts)
    joined.metadata.update({"model_name": loaded.name, "n_prompts": len(prompts)})
    return joined


def batch_key(loaded, batch: list[str], recurrences: int, attention: bool, sites=None, dtype=None) -> str:
    """The key of one captured batch: the model's name, configuration and weights, and every capture setting."""
    return run_key([loaded.name, loaded.config_dict(), loaded.fingerprint(), batch, recurrences, attention,
                    None if sites is None else repr(sites), str(dtype)])
