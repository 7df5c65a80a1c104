"""The analytic Gaussian-mixture world that proves the objectives exact (DESIGN.md §6, ``gfnalign toy``).

* :mod:`.mixture`: mixtures, their noised marginals, exact ε, log-densities, responsibilities, sampling;
* :mod:`.rewards`: linear / quadratic rewards and their closed-form tilts;
* :mod:`.world`: the schedule, the policy (exact ε + zero-initialised MLP), the lookahead, a sampler;
* :mod:`.metrics`: energy distance, mode masses, TV;
* :mod:`.train`: the small on-policy loop and the evaluation behind ``gfnalign toy``.
"""

from gfnalign.toy.metrics import energy_distance, mode_mass, total_variation
from gfnalign.toy.mixture import GaussianMixture
from gfnalign.toy.rewards import LinearReward, QuadraticReward, reward_from_spec
from gfnalign.toy.world import ToyLookahead, ToyPolicy, sample_chain, toy_schedule

__all__ = [
    "GaussianMixture",
    "LinearReward",
    "QuadraticReward",
    "ToyLookahead",
    "ToyPolicy",
    "energy_distance",
    "mode_mass",
    "reward_from_spec",
    "sample_chain",
    "total_variation",
    "toy_schedule",
]
