"""The published looped families, implemented natively on `LoopedLM` (no remote code):

- `ouro`: Ouro / LoopLM (`model_type: "ouro"`),
- `huginn`: Huginn-0125 (`model_type: "huginn_raven"`),
- `retrofit`: retrofitted recurrence (Raven format with Llama blocks), and `retrofit_from_hf` to make one.

Each module is a config translator (published config.json → LoopedConfig) and a weight map (published tensor
names ↔ LoopedLM state_dict); `common` holds the shared loading and checking. Importing a module registers its
loader with `loopscope.models.load`.
"""

from loopscope.models.families.common import BYPASS_INJECTION, load_published
from loopscope.models.families.huginn import HUGINN, load_huginn
from loopscope.models.families.ouro import OURO, exit_probabilities, load_ouro, step_logits
from loopscope.models.families.retrofit import RETROFIT, load_retrofit, retrofit_from_hf

__all__ = ["BYPASS_INJECTION", "HUGINN", "OURO", "RETROFIT", "exit_probabilities", "load_huginn", "load_ouro",
           "load_published", "load_retrofit", "retrofit_from_hf", "step_logits"]
