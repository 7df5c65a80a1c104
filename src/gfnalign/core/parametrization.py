"""Conversions between the network's output and (eps, x0) at a noise level alpha-bar.

``x_t = sqrt(ab) * x0 + sqrt(1 - ab) * eps`` and ``v = sqrt(ab) * eps - sqrt(1 - ab) * x0``.
``alpha_bar`` is a tensor of shape ``[N]`` (one per row) or a float; it is broadcast over the rest.
"""

from __future__ import annotations

import torch


def _bcast(alpha_bar: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    ab = torch.as_tensor(alpha_bar, dtype=like.dtype, device=like.device)
    return ab.reshape(ab.shape + (1,) * (like.dim() - ab.dim())) if ab.dim() else ab


def eps_to_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
    """Tweedie's one-step clean prediction from a noise prediction."""
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


def model_output_to_eps(
    output: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor | float, prediction_type: str
) -> torch.Tensor:
    """Any diffusers ``prediction_type`` to eps, so every kernel is written once in eps form."""
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return v_to_eps(x_t, output, alpha_bar)
    if prediction_type == "sample":
        return x0_to_eps(x_t, output, alpha_bar)
    raise ValueError(f"prediction_type={prediction_type!r}; use epsilon, v_prediction or sample")
