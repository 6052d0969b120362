"""Structure policy: budget projection, mask sampling and the VR-PGE structure gradient."""

from sparsefx.policy.estimator import ScoreForm, score_function, structure_gradient
from sparsefx.policy.projection import (
    group_minimum,
    project_to_budget,
    round_group_counts,
    top_budget_mask,
)
from sparsefx.policy.sampling import expected_top_up, keep_minimum, sample_masks

__all__ = [
    "ScoreForm",
    "expected_top_up",
    "group_minimum",
    "keep_minimum",
    "project_to_budget",
    "round_group_counts",
    "sample_masks",
    "score_function",
    "structure_gradient",
    "top_budget_mask",
]
