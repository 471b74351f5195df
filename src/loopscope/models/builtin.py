"""Builtin models: the embedded default and other names `load_model` resolves without a path."""

from __future__ import annotations

from loopscope.models.config import LoopedConfig
from loopscope.models.load import LoadedModel, register_builtin
from loopscope.models.looped import LoopedLM

DEFAULT_CONFIG = LoopedConfig(
    name="default",
    vocab_size=1024, d_model=64, n_heads=4, d_mlp=172, max_seq_len=512,
    n_prelude=2, n_block=4, n_coda=2, recurrences=8,
    norm="sandwich", injection="concat", state_init="random", seed=0,
    init_std=(2 / (5 * 64)) ** 0.5,  # Huginn's init rule sqrt(2/5D) (Geiping et al. 2025); 0.02 gives a degenerate block
)


def build_default() -> LoadedModel:
    """`(2, 4⊗8, 2)_I`, Huginn-style (concat injection, sandwich norm, random start), seeded weights."""
    from loopscope.data.tokenizer import load_tokenizer

    return LoadedModel(LoopedLM(DEFAULT_CONFIG), load_tokenizer(), "default", "looped", DEFAULT_CONFIG.recurrences)


register_builtin("default", "(2, 4⊗8, 2)_I looped model, concat injection, sandwich norm, seed 0", build_default)
