"""Pure torch math with no state: noise schedules, parametrisations, Gaussian kernels, typed batches."""

from gfnalign.core.batches import TrajectoryBatch, TransitionBatch
from gfnalign.core.kernels import (
    GaussianKernel,
    backward_kernel,
    forward_kernel,
    forward_std,
    gaussian_log_prob,
    score_pb_next,
    score_pb_t,
    score_wrt_mean_input,
)
from gfnalign.core.parametrization import eps_to_x0, model_output_to_eps, x0_to_eps
from gfnalign.core.protocols import Lookahead, PolicyModel, SharedPassLookahead
from gfnalign.core.schedule import NoiseSchedule

__all__ = [
    "GaussianKernel",
    "forward_std",
    "Lookahead",
    "NoiseSchedule",
    "PolicyModel",
    "SharedPassLookahead",
    "TrajectoryBatch",
    "TransitionBatch",
    "backward_kernel",
    "eps_to_x0",
    "forward_kernel",
    "gaussian_log_prob",
    "model_output_to_eps",
    "score_pb_next",
    "score_pb_t",
    "score_wrt_mean_input",
    "x0_to_eps",
]
