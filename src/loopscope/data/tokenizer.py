"""The bundled tokenizer: a 1024-token byte-level BPE trained on GSM8K train text.

Why our own: the built-in tiny models need a vocabulary small enough that the embedding does not dominate
a 5 MB checkpoint; GSM8K text is what they read. Rebuild it (deterministic) with
`python -m loopscope.data.tokenizer ../shared/data/gsm8k/train.jsonl`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path

from loopscope.errors import InputError

BUNDLED_TOKENIZER_DIR = Path(__file__).parent / "assets" / "gsm_bpe_1024"
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 1024):
    """Train a byte-level BPE (`tokenizers`) and wrap it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # prepend BOS like Llama-family tokenizers, so position 0 is a fixed sink candidate for every prompt
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def load_tokenizer(directory: str | Path | None = None):
    """A transformers fast tokenizer from `directory` (default: the bundled GSM BPE).

    Loaded as `PreTrainedTokenizerFast` from tokenizer.json so the model's own config.json is never read.
    """
    from transformers import PreTrainedTokenizerFast

    directory = Path(directory) if directory is not None else BUNDLED_TOKENIZER_DIR
    if not (directory / "tokenizer.json").exists():
        raise InputError(f"no tokenizer.json in {directory}; save one with tokenizer.save_pretrained(dir)")
    return PreTrainedTokenizerFast.from_pretrained(str(directory))


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: python -m loopscope.data.tokenizer GSM8K_TRAIN_JSONL")
    rows = [json.loads(line) for line in Path(argv[0]).read_text().splitlines() if line.strip()]
    texts = [r["question"] + "\n" + r["answer"] for r in rows]
    tok = train_bpe_tokenizer(texts)
    tok.save_pretrained(str(BUNDLED_TOKENIZER_DIR))
    print(f"wrote {BUNDLED_TOKENIZER_DIR} ({len(tok)} tokens from {len(texts)} GSM8K train examples)")


if __name__ == "__main__":
    main(sys.argv[1:])
