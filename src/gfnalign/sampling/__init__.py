"""Rollouts over a PolicyModel, transition selection, log-prob recompute."""

from gfnalign.sampling.rollout import recompute_log_pf, rollout, transition_kernel
from gfnalign.sampling.subsample import last_slots, num_selected, select_slots, select_transitions

__all__ = [
    "last_slots",
    "num_selected",
    "recompute_log_pf",
    "rollout",
    "select_slots",
    "select_transitions",
    "transition_kernel",
]
