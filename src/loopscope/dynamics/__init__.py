"""Dynamics of the looped block: convergence, cyclic fixed points, similarity structure, per-token behaviour.

Every function takes a `Trajectory` (never a model), looks at real tokens only (traj.mask) and returns tidy
pandas DataFrames. Non-finite states are analysed, never a crash: they are classified `divergent` and give
inf/NaN distances. Sources: Blayney et al. 2026 (§3.2–3.4, §4, App. C) and Geiping et al. 2025 (§7).

    successive_change, distance_to_fixed_point, cyclic_fixed_point_check, max_final_relative_change
                                                        convergence.py   (Figs. 3, 4, 22–25; Prop. 4.1)
    residual_similarity, attention_distance             similarity.py    (Figs. 2, 19, 21)
    degeneracy, degeneracy_summary                      degeneracy.py    (Fig. 6 right frame)
    classify                                            behaviour.py     (rule_dynamics.py, rule_paper.py)
    cooccurrence                                        cooccurrence.py  (Fig. 14)
    pca_trajectory                                      pca.py           (Fig. 5; Geiping Fig. 12)
"""

from loopscope.dynamics.behaviour import classify
from loopscope.dynamics.convergence import (
    cyclic_fixed_point_check,
    distance_to_fixed_point,
    max_final_relative_change,
    successive_change,
)
from loopscope.dynamics.cooccurrence import cooccurrence
from loopscope.dynamics.degeneracy import degeneracy, degeneracy_summary
from loopscope.dynamics.pca import pca_trajectory
from loopscope.dynamics.rule_dynamics import BEHAVIOURS, FIXED_BEHAVIOURS, DynamicsThresholds
from loopscope.dynamics.rule_paper import PaperThresholds
from loopscope.dynamics.similarity import attention_distance, residual_similarity

__all__ = [
    "BEHAVIOURS", "FIXED_BEHAVIOURS", "DynamicsThresholds", "PaperThresholds", "attention_distance", "classify",
    "cooccurrence",
    "cyclic_fixed_point_check", "degeneracy", "degeneracy_summary", "distance_to_fixed_point",
    "max_final_relative_change", "pca_trajectory", "residual_similarity", "successive_change",
]
