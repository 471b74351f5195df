"""Training corpora as lists of documents, and packing them into fixed-length token sequences.

Corpus specs (join several with "+", e.g. `gsm8k+gsm-symbolic:5000`):

- `gsm8k`: GSM8K train questions with their worked answers (`question\\nanswer`, ending `#### N`); needs the
  official jsonl (`data` argument) unless the optional `datasets` package is installed.
- `gsm-symbolic:N`: N procedurally generated GSM-Symbolic problems with worked solutions (reasoning-gym,
  offline, unlimited; seeded by the run seed).
- `python-docs`: the non-reasoning text control. The paper uses HellaSwag (spec §2), which cannot be
  fetched offline; we use the Python language-reference help topics that CPython ships
  (`pydoc_data.topics`, ~0.5 MB of English technical prose, no arithmetic word problems).
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import torch

from loopscope.data.gsm8k import document_text, load_gsm8k
from loopscope.errors import InputError

CORPUS_KINDS = ("gsm8k", "gsm-symbolic", "python-docs")


def python_docs_documents() -> list[str]:
    """The non-reasoning control: CPython's bundled help topics, one document per topic, sorted by name."""
    from pydoc_data.topics import topics

    return [topics[name].strip() for name in sorted(topics) if topics[name].strip()]


def corpus_documents(spec: str, data: str | Path | None = None, seed: int = 0) -> list[str]:
    """Documents (plain text) of a corpus spec; see the module docstring for the grammar."""
    docs: list[str] = []
    for part in spec.split("+"):
        name, _, arg = part.strip().partition(":")
        if name == "gsm8k":
            docs += [document_text(r) for r in load_gsm8k("train", data)]
        elif name == "gsm-symbolic":
            from loopscope.data.prompts import generate_gsm_symbolic

            if not arg.isdigit() or int(arg) < 1:
                raise InputError(f"corpus part {part!r}: write gsm-symbolic:N with N ≥ 1 problems to generate")
            docs += [f"{r['question']}\n{r['solution']}" for r in generate_gsm_symbolic(int(arg), seed=seed)]
        elif name == "python-docs":
            docs += python_docs_documents()
        else:
            raise InputError(f"corpus part {part!r} is unknown; use {CORPUS_KINDS} (gsm-symbolic:N), joined with +")
    return docs


def encode_documents(docs: list[str], tokenizer) -> list[list[int]]:
    """Each document as [BOS] + tokens + [EOS] (BOS/EOS where the tokenizer has them)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    return [bos + list(x) + eos for x in ids]


def pack_sequences(token_lists: list[list[int]], seq_len: int, shuffle_seed: int | None = None) -> torch.Tensor:
    """Concatenate documents and cut into rows of seq_len + 1 tokens: (N, seq_len + 1) int64.

    Row r holds tokens [r·(L+1), (r+1)·(L+1)) of the stream; inputs are row[:-1], targets row[1:]. The
    incomplete last row is dropped. With `shuffle_seed`, documents are shuffled (random.Random) first.
    """
    if seq_len < 1:
        raise InputError(f"seq_len={seq_len} must be ≥ 1")
    order = list(range(len(token_lists)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    stream = [t for i in order for t in token_lists[i]]
    n = len(stream) // (seq_len + 1)
    if n == 0:
        raise InputError(
            f"the corpus has {len(stream)} tokens, fewer than one sequence of {seq_len + 1}; use more text "
            "or a shorter sequence length"
        )
    return torch.tensor(stream[: n * (seq_len + 1)], dtype=torch.int64).view(n, seq_len + 1)


def fingerprint(sequences: torch.Tensor) -> str:
    """sha256 of the packed token tensor: a resumed run checks it still trains on the same data."""
    return hashlib.sha256(sequences.numpy().tobytes()).hexdigest()[:16]
