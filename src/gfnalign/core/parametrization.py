"""Conversions between the network's output and (eps, x0) of a Gaussian interpolant.

A state is ``x_t = alpha_t * x0 + sigma_t * eps``. For the variance-preserving (VP) schedules of
DDPM/DDIM ``alpha = sqrt(ab)`` and ``sigma = sqrt(1 - ab)`` with ``ab`` the alpha-bar, and diffusers'
``v_prediction`` is ``v = sqrt(ab) * eps - sqrt(1 - ab) * x0``. For rectified flow (SD3, FLUX)
``alpha = 1 - sigma`` and the network predicts the **flow velocity** ``u = eps - x0`` (= dx/dsigma),
so ``x0 = x - sigma * u`` and ``eps = x + (1 - sigma) * u``; both stay finite at pure noise
(``sigma = 1``), where the eps form cannot recover x0.

``alpha_bar`` / ``sigma`` are tensors of shape ``[N]`` (one per row) or floats; they are broadcast
over the remaining dimensions.
"""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


def _bcast(alpha_bar: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    ab = torch.as_tensor(alpha_bar, dtype=like.dtype, device=like.device)
    return ab.reshape(ab.shape + (1,) * (like.dim() - ab.dim())) if ab.dim() else ab


def eps_to_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
    """Tweedie's one-step clean prediction from a noise prediction (VP)."""
    ab = _bcast(alpha_bar, x_t)
    return (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()


def x0_to_eps(x_t: torch.Tensor, x0: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
    ab = _bcast(alpha_bar, x_t)
    return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()


def v_to_eps(x_t: torch.Tensor, v: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
    ab = _bcast(alpha_bar, x_t)
    return ab.sqrt() * v + (1 - ab).sqrt() * x_t


def eps_to_v(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
    x0 = eps_to_x0(x_t, eps, alpha_bar)
    ab = _bcast(alpha_bar, x_t)
    return ab.sqrt() * eps - (1 - ab).sqrt() * x0


def flow_to_x0(x_t: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """Rectified flow: ``x0 = x - sigma * u`` for the velocity ``u = eps - x0``."""
    return x_t - _bcast(sigma, x_t) * velocity


def flow_to_eps(x_t: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """Rectified flow: ``eps = x + (1 - sigma) * u``."""
    return x_t + (1 - _bcast(sigma, x_t)) * velocity


def x0_eps_to_flow(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The rectified-flow velocity ``u = eps - x0`` (the same at every noise level)."""
    return eps - x0


def model_output_to_eps(
    output: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor | float, prediction_type: str
) -> torch.Tensor:
    """A VP ``prediction_type`` to eps, so a VP backbone hands the kernels one form. Flow models keep
    their velocity (``prediction_type="flow"``): converting it to eps would lose x0 at sigma = 1."""
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return v_to_eps(x_t, output, alpha_bar)
    if prediction_type == "sample":
        return x0_to_eps(x_t, output, alpha_bar)
    if prediction_type == "flow":
        raise ValueError(
            "prediction_type='flow' (a velocity) is not converted to eps: a flow backbone returns the velocity "
            "and the schedule's kernels read it directly (NoiseSchedule.policy_output == 'flow')"
        )
    raise ValueError(f"prediction_type={prediction_type!r}; use one of {', '.join(PREDICTION_TYPES)}")
