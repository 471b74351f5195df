"""Interventions on any loaded model: zero a sublayer (at chosen recurrences), delete or swap layers.

    with intervene(model, [ZeroSublayer("core", 1, "mlp", recurrences=[3])]):
        traj = capture(model, ids)
    base, changed, kl = run_intervention(loaded, prompts, [DeleteLayer("core", 2)])
"""

from loopscope.interventions.kl import next_token_kl, summarize_kl
from loopscope.interventions.run import run_intervention
from loopscope.interventions.specs import DeleteLayer, Intervention, SwapLayers, ZeroSublayer, describe
from loopscope.interventions.surgery import intervene

__all__ = ["DeleteLayer", "Intervention", "SwapLayers", "ZeroSublayer", "describe", "intervene", "next_token_kl",
           "run_intervention", "summarize_kl"]
