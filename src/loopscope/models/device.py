"""Where a model runs and in what precision: `--device` and `--dtype` / `--state-dtype`, resolved once.

    device:       auto (CUDA if visible, else Apple MPS, else the CPU), cpu, cuda, cuda:N, mps
    dtype:        the weights' dtype: float32, bfloat16 or float16 (aliases fp32, bf16, fp16)
    state dtype:  the residual stream and recurrent state: float32 by default whatever the weights, or `weights`
                  to follow them. Fixed-point readings depend on it: a state carried in bfloat16 stops changing
                  once its change falls below half a bfloat16 ulp (Huginn-0125 in bf16 "converges" at step ~21,
                  only because rounding dominates; in float32 it keeps converging to step ~96).
"""

from __future__ import annotations

import torch

from loopscope.errors import InputError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
DTYPE_CHOICES = ("float32", "bfloat16", "float16")
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, mps"


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """A usable torch.device for `spec`, or one InputError naming what is missing and the fix."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {spec}: no CUDA device is visible to torch (torch.cuda.is_available() is "
                             "False; this torch build may be CPU-only); use --device cpu or --device auto")
        if spec != "cuda":
            index = spec.split(":", 1)[1]
            if not index.isdigit() or int(index) >= torch.cuda.device_count():
                raise InputError(f"--device {spec}: this machine has CUDA devices 0..{torch.cuda.device_count() - 1}")
        return torch.device(spec)
    if spec == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise InputError("--device mps: Apple's MPS backend is not available here; use --device cpu or auto")
        return torch.device("mps")
    raise InputError(f"--device {spec!r} is not a device; use one of {DEVICE_CHOICES}")


def resolve_dtype(name: str | torch.dtype | None, what: str = "--dtype") -> torch.dtype:
    """torch dtype of a name in DTYPES (None → float32)."""
    if name is None:
        return torch.float32
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise InputError(f"{what} {name}: use one of {', '.join(DTYPE_CHOICES)}")
        return name
    key = name.strip().lower().removeprefix("torch.")
    if key not in DTYPES:
        raise InputError(f"{what} {name!r} is not a dtype; use one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[key]


def resolve_state_dtype(name: str | torch.dtype | None, weights: torch.dtype) -> torch.dtype:
    """The stream/state dtype: float32 by default, `weights` to follow the weights' dtype."""
    if isinstance(name, str) and name.strip().lower() == "weights":
        return weights
    return resolve_dtype(name, "--state-dtype")


class Precision:
    """Where and in what precision a command runs its models (`--device`, `--dtype`, `--state-dtype`)."""

    def __init__(self, device: str = "auto", dtype: str = "float32", state_dtype: str = "float32") -> None:
        self.device_spec, self.dtype_name, self.state_dtype_name = device, dtype, state_dtype
        self.dtype = resolve_dtype(dtype)
        resolve_state_dtype(state_dtype, self.dtype)
        self._device: torch.device | None = None

    @property
    def device(self) -> torch.device:
        if self._device is None:
            self._device = resolve_device(self.device_spec)
        return self._device

    @property
    def state_dtype(self) -> torch.dtype:
        return resolve_state_dtype(self.state_dtype_name, self.dtype)

    def __repr__(self) -> str:
        """Stable across runs (it enters cache keys): the resolved device type, weights and state dtypes."""
        return f"Precision({self.device.type}, {self.dtype_name}, {self.state_dtype_name})"

    def load(self, spec):
        """`load_model(spec)` on this device, in this precision."""
        from loopscope.models.load import load_model

        return load_model(spec, device=self.device, dtype=self.dtype, state_dtype=self.state_dtype_name)

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        """A model built in-process (a preset, a random-init grid cell) moved to this device and precision."""
        model = model.to(device=self.device, dtype=self.dtype)
        if hasattr(model, "stream_dtype"):
            model.stream_dtype = self.state_dtype
        return model

    def describe(self) -> str:
        return f"device {self.device}, weights {self.dtype_name}, states {self.state_dtype_name}"

