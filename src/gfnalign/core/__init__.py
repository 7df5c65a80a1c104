"""Pure torch math with no state: noise schedules, parametrisations, Gaussian kernels, typed batches."""

from gfnalign.core.batches import TrajectoryBatch, TransitionBatch
from gfnalign.core.kernels import (
    KERNELS,
    GaussianKernel,
    NoiseLevels,
    backward_kernel,
    check_noise_level,
    forward_kernel,
    forward_std,
    gaussian_log_prob,
    noising_kernel,
    noising_score_next,
    noising_score_t,
    predict_x0_eps,
    score_pb_next,
    score_pb_t,
    score_wrt_mean_input,
    step_kernel,
)
from gfnalign.core.parametrization import (
    eps_to_x0,
    flow_to_eps,
    flow_to_x0,
    model_output_to_eps,
    x0_eps_to_flow,
    x0_to_eps,
)
from gfnalign.core.protocols import Lookahead, PolicyModel, SharedPassLookahead
from gfnalign.core.schedule import NoiseSchedule

__all__ = [
    "KERNELS",
    "NoiseLevels",
    "check_noise_level",
    "flow_to_eps",
    "flow_to_x0",
    "noising_kernel",
    "noising_score_next",
    "noising_score_t",
    "predict_x0_eps",
    "step_kernel",
    "x0_eps_to_flow",
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
