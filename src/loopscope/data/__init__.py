"""Data: the bundled tokenizer, prompt sets, and (later) GSM8K and training corpora."""
