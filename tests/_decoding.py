"""Incremental decoding through one KVCache, shared by the model and family tests (each compares it with the
full forward of the same tokens)."""

import torch

from loopscope.models import KVCache


def decode_in_steps(model, ids: torch.Tensor, prompt_len: int, **kwargs) -> torch.Tensor:
    """Logits of `ids` fed as a prompt of `prompt_len` tokens, then one token per call, all through one cache;
    `kwargs` (recurrences, state_seed, …) go to every call."""
    cache = KVCache()
    parts = [model(ids[:, :prompt_len], cache=cache, **kwargs)]
    parts += [model(ids[:, i:i + 1], cache=cache, **kwargs) for i in range(prompt_len, ids.shape[1])]
    return torch.cat(parts, dim=1)
