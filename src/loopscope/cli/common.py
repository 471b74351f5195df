"""Options several subcommands share, defined once: where a model runs and in what precision, and list parsing."""

from __future__ import annotations

import typer

from loopscope.errors import InputError


def device_option(default: str = "auto"):
    return typer.Option(default, "--device", help="Where the model runs: auto (CUDA if visible, else MPS, else the "
                        "CPU), cpu, cuda, cuda:N or mps.")


def dtype_option():
    return typer.Option("float32", "--dtype", help="Weights dtype: float32, bfloat16 or float16 (loaded directly in "
                        "that dtype, never through a float32 copy).")


def state_dtype_option():
    return typer.Option("float32", "--state-dtype", help="Dtype of the residual stream and recurrent state, and of "
                        "every metric: float32 (default, whatever the weights) or `weights` to follow the weights. "
                        "Fixed-point readings depend on it; the report draws the run's numerical floor.")


def threads_option():
    return typer.Option(None, "--threads", help="torch CPU threads (default: torch's, one per core). On a machine "
                        "where another job keeps a core busy, --threads 1 avoids a stall of several times.")


def overwrite_option():
    return typer.Option(False, "--overwrite", help="Replace what an earlier run left in --out (its report, tables, "
                        "figures and caches; nothing else). Without it, a rerun with the same settings resumes and "
                        "one with other settings or other weights is refused.")


def apply_threads(threads: int | None) -> None:
    """Set torch's CPU threads when given (≥ 1; a bad value is one clear error)."""
    if threads is None:
        return
    if threads < 1:
        raise InputError(f"--threads {threads}: give 1 or more CPU threads")
    import torch

    torch.set_num_threads(threads)


def precision(device: str, dtype: str, state_dtype: str):
    from loopscope.models.device import Precision

    return Precision(device, dtype, state_dtype)


def parse_int_list(spec: str, what: str, minimum: int | None = None) -> list[int]:
    """'4,12,16' → [4, 12, 16], one error line naming the bad item."""
    items = [p.strip() for p in spec.split(",") if p.strip()]
    if not items:
        raise InputError(f"{what} {spec!r}: give a comma-separated list of integers, e.g. 4,12,16")
    out = []
    for item in items:
        try:
            value = int(item)
        except ValueError:
            raise InputError(f"{what} {spec!r}: {item!r} is not an integer; give e.g. 4,12,16") from None
        if minimum is not None and value < minimum:
            raise InputError(f"{what} {spec!r}: {value} is below {minimum}")
        out.append(value)
    return out


def parse_word_list(spec: str, what: str) -> list[str]:
    """'pre, ouro' → ['pre', 'ouro']; one error line when the list is empty (the command checks the names)."""
    items = [p.strip() for p in spec.split(",") if p.strip()]
    if not items:
        raise InputError(f"{what} {spec!r}: give a comma-separated list, e.g. pre,sandwich")
    return items


def parse_float_list(spec: str, what: str, minimum: float | None = None) -> list[float]:
    """'0.5,1,2' → [0.5, 1.0, 2.0], one error line naming the bad item."""
    items = [p.strip() for p in spec.split(",") if p.strip()]
    if not items:
        raise InputError(f"{what} {spec!r}: give a comma-separated list of numbers, e.g. 0.5,1")
    out = []
    for item in items:
        try:
            value = float(item)
        except ValueError:
            raise InputError(f"{what} {spec!r}: {item!r} is not a number; give e.g. 0.5,1") from None
        if minimum is not None and value < minimum:
            raise InputError(f"{what} {spec!r}: {value} is below {minimum}")
        out.append(value)
    return out


def parse_token_list(spec: str, what: str = "--keep-states") -> tuple[tuple[int, int], ...]:
    """'0:-1,3:5' → ((0, -1), (3, 5)): prompt:token pairs (negative tokens count from the prompt's last real one)."""
    pairs = []
    for item in (p.strip() for p in spec.split(",") if p.strip()):
        prompt, sep, token = item.partition(":")
        try:
            pairs.append((int(prompt), int(token) if sep else -1))
        except ValueError:
            raise InputError(f"{what} {spec!r}: {item!r} is not PROMPT:TOKEN (e.g. 0:-1 for prompt 0's last "
                             "token)") from None
    if not pairs:
        raise InputError(f"{what} {spec!r}: give at least one PROMPT:TOKEN, e.g. 0:-1")
    return tuple(pairs)
